#!/usr/bin/env python3
"""Run sessions through local nodes while killing (kill -9) and restarting nodes at random.

    python scripts/chaos.py                       # 3 nodes, 8 sessions, up to 3 kills
    python scripts/chaos.py --sessions 20 --failures 6 --json

Every session is greedy, so each must give exactly the tokens of a fault-free
run (mlx-lm in this process). Prints sessions completed, sessions lost (must be
0), outputs that differed (must be 0) and the recovery time of each failure:
from the kill to the next token any session produced. Loopback only; bounded
by --time-limit seconds and --failures kills. --migrations moves stages of running
sessions to a spare node and back meanwhile; --restarts restarts planned nodes
gracefully on their port (re-dialled and handshaken again). A killed node restarts on its
port after --restart-after seconds and rejoins at the next re-plan.
"""

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Name three colours.",
    "What is two plus two?",
    "Say hello in French.",
    "Give me a word that rhymes with cat.",
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="local node processes (default 3)")
    p.add_argument("--sessions", type=int, default=8, help="sessions to run, one after another (default 8)")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens per session (default 12)")
    p.add_argument("--failures", type=int, default=3, help="most kills (default 3)")
    p.add_argument("--interval", type=float, default=4.0, help="mean seconds between kills (default 4)")
    p.add_argument("--restart-after", type=float, default=2.0, help="seconds before a killed node restarts (default 2)")
    p.add_argument("--time-limit", type=float, default=300.0, help="stop starting sessions after this (default 300 s)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between packed-KV checkpoints (default 0: replay)")
    p.add_argument("--migrations", type=int, default=0,
                   help="migrations to run while sessions generate: a random stage of a running session moves to a spare "
                        "node and back (default 0; starts one spare node)")
    p.add_argument("--restarts", type=int, default=0,
                   help="graceful restarts (SIGTERM, then at once on the same port) of planned nodes (default 0)")
    p.add_argument("--concurrency", type=int, default=1, help="sessions running at once (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args()
    if args.nodes < 2:
        p.error("--nodes must be at least 2 (one must survive every kill)")
    summary = run(args)
    if args.json:
        print(json.dumps(summary))
    else:
        r = ", ".join(f"{s:.2f}" for s in summary["recovery_s"]) or "-"
        print(
            f"sessions {summary['sessions']}: completed {summary['completed']}, lost {summary['lost']}, "
            f"differed {summary['differed']}; failures injected {summary['failures_injected']} "
            f"(kills {summary['kills']}, restarts {summary['restarts']}); migrations {summary['migrations']} "
            f"(refused {summary['migrations_refused']}); recovery s: {r}"
        )
    return 0 if summary["lost"] == 0 and summary["differed"] == 0 else 1


def run(args):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from turbocluster.runtime.cluster import failover
    from turbocluster.runtime.model import loader
    from turbocluster.runtime.cluster.cluster import Cluster, ClusterError, start_local_nodes, stop_local_nodes

    import warnings

    warnings.filterwarnings("ignore", module=r"turbocluster\.")  # each is logged once already
    rng = random.Random(args.seed)
    model, tok = loader.load()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in PROMPTS]
    refs = [[t for t, _ in generate_step(mx.array(ids), model, max_tokens=args.max_tokens)] for ids in prompts]
    del model

    nodes = start_local_nodes(args.nodes, names=[f"chaos-{i}" for i in range(args.nodes)])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    spare = start_local_nodes(1, names=["chaos-spare"])[0] if args.migrations else None
    done, kills, lock, moves = threading.Event(), [], threading.Lock(), []
    last_token = [0.0]
    cluster = None
    try:
        cluster = Cluster.connect(nodes=[n.address for n in nodes], log=log)
        cluster.load(cluster.plan(context=256))
        failover.configure(cluster, step_timeout_s=10.0, probe_timeout_s=2.0, checkpoint_every=args.checkpoint_every)

        def killer():
            while not done.wait(rng.expovariate(1 / args.interval)) and sum(1 for k in kills if k.get("kind") != "restart") < args.failures:
                with lock:
                    planned = {c.address for c in cluster.clients}
                    alive = [i for i, n in enumerate(nodes) if n.proc.poll() is None]
                    victims = [i for i in alive if nodes[i].address in planned]
                    if len(alive) < 2 or not victims:  # one node must be left to fail over to
                        continue
                    i = rng.choice(victims)
                    os.kill(nodes[i].proc.pid, signal.SIGKILL)
                    nodes[i].proc.wait()
                    kills.append({"node": nodes[i].address, "at": time.monotonic(), "recovered": None})
                    log(f"chaos: killed {nodes[i].address}")
                    threading.Thread(target=restart, args=(i,), daemon=True).start()

        def restart(i):
            time.sleep(args.restart_after)
            if done.is_set():
                return
            port = nodes[i].address.rpartition(":")[2]
            old = nodes[i]
            try:
                [fresh] = start_local_nodes(1, names=[f"chaos-{i}"], args=["--port", port])
            except ClusterError as e:
                log(f"chaos: restart of {old.address} failed: {e}")
                return
            with lock:
                nodes[i] = fresh
            stop_local_nodes([old])
            log(f"chaos: restarted {fresh.address}")

        def restarter():
            n = 0
            while not done.wait(rng.expovariate(1 / args.interval)) and n < args.restarts:
                with lock:
                    planned = {c.address for c in cluster.clients}
                    victims = [i for i, node in enumerate(nodes) if node.proc.poll() is None and node.address in planned]
                    if not victims:
                        continue
                    i = rng.choice(victims)
                    old = nodes[i]
                    old.proc.terminate()  # SIGTERM: the node withdraws and stops cleanly
                    old.proc.wait()
                    kills.append({"node": old.address, "at": time.monotonic(), "recovered": None, "kind": "restart"})
                    n += 1
                    port = old.address.rpartition(":")[2]
                    try:
                        [nodes[i]] = start_local_nodes(1, names=[f"chaos-{i}"], args=["--port", port])
                        log(f"chaos: restarted {old.address} (SIGTERM, same port)")
                    except ClusterError as e:
                        log(f"chaos: restart of {old.address} failed: {e}")
                    stop_local_nodes([old])

        def migrator():
            while not done.wait(rng.expovariate(2 / args.interval)) and len(moves) < args.migrations:
                sids = list(cluster.live)
                live = cluster.live.get(rng.choice(sids)) if sids else None
                if live is None or len(live.route) < 2:
                    continue
                on_spare = [st for st in live.route if st.address == spare.address]
                st = on_spare[0] if on_spare else rng.choice(live.route)
                home = [a.address for a in cluster.plan_.assignments if (a.start, a.end) == (st.start, st.end)]
                target = home[0] if on_spare and home else spare.address
                if target == st.address:
                    continue
                try:
                    r = cluster.migrate(live.session_id, (st.start, st.end), target)
                    moves.append({"ok": True, "pause_ms": round(r["pause_ms"], 1)})
                    log(f"chaos: moved layers {st.start}:{st.end} of {live.session_id[:8]} to {target}")
                except ClusterError as e:  # the session ended, the plan changed, or the spare is busy: nothing moved
                    moves.append({"ok": False, "why": str(e)[:200]})
                    log(f"chaos: migration refused: {e}")

        threads = [threading.Thread(target=f, daemon=True) for f in (killer, restarter, migrator)]
        for thread in threads:
            thread.start()
        t0 = time.monotonic()

        def session(n):
            """"completed", "lost", "differed" or None (not started: out of time)."""
            if time.monotonic() - t0 > args.time_limit:
                return None
            k = n % len(prompts)
            out = []
            try:
                for token in cluster.generate_tokens(prompts[k], max_tokens=args.max_tokens, stop_at_eos=False):
                    out.append(token)
                    now = last_token[0] = time.monotonic()
                    for kill in kills:
                        if kill["recovered"] is None and now > kill["at"]:
                            kill["recovered"] = now
            except ClusterError as e:
                log(f"chaos: session {n} lost: {e}")
                return "lost"
            if out != refs[k]:
                log(f"chaos: session {n} differed: {out} != {refs[k]}")
                return "differed"
            return "completed"

        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(session, range(args.sessions)))
        lost = results.count("lost")
        differed = results.count("differed")
        completed = differed + results.count("completed")
        done.set()
        for thread in threads:
            thread.join()
        return {
            "sessions": completed + lost,
            "completed": completed,
            "lost": lost,
            "differed": differed,
            "failures_injected": len(kills),
            "kills": sum(1 for k in kills if k.get("kind") != "restart"),
            "restarts": sum(1 for k in kills if k.get("kind") == "restart"),
            "migrations": sum(1 for m in moves if m["ok"]),
            "migrations_refused": sum(1 for m in moves if not m["ok"]),
            "migration_pause_ms": [m["pause_ms"] for m in moves if m["ok"]],
            "recovery_s": [round(k["recovered"] - k["at"], 3) for k in kills if k["recovered"] is not None],
            "replans": [round(e["seconds"], 3) for e in failover.state(cluster).events],
            "rebuilds": [
                {"mode": r["mode"], "steps_replayed": r["steps_replayed"], "seconds": round(r["seconds"], 3)}
                for r in failover.state(cluster).rebuilds
            ],
        }
    finally:
        done.set()
        if cluster is not None:
            cluster.close()
        time.sleep(0.1)
        with lock:
            stop_local_nodes([n for n in nodes] + ([spare] if spare else []))


if __name__ == "__main__":
    sys.exit(main())
