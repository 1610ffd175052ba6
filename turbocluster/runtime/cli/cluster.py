"""``turbo-cluster``: plan, load and generate over nodes; list, move, snapshot and restore sessions.

    turbo-cluster generate [--nodes h:p,...|--local N] [--prompt TEXT] [--max-tokens N] ...
    turbo-cluster plan     [--nodes ...|--local N] [--context N] [--json]
    turbo-cluster nodes    [--discover-timeout S]
    turbo-cluster sessions [--nodes ...] [--json]
    turbo-cluster migrate  [--nodes ...] --session ID --layers S:E --to HOST:PORT
    turbo-cluster snapshot [--nodes ...] [--session ID] --out PATH
    turbo-cluster restore  [--nodes ...] PATH [--session-id ID]

Every flag is checked before anything heavy starts (nodes, model loads); a
wrong one gets one line saying what to do (exit 2), a refusal from the
cluster one line naming the node and status (exit 1).
"""

import argparse
import json
import math
import os
import socket
import sys
import time
import uuid

from . import output
from .node import check_model, parse_layers, secret, secret_arg, tls, tls_args, version
from .output import Failure, UsageError

# Subcommands owned by other modules (e.g. cli/serving.py): name -> (add(subparsers), run(args) -> int).
COMMANDS = {}


def _connect_args(p):
    p.add_argument("--model", default=None, help="model path or hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--nodes", default=None, help="comma-separated host:port of nodes, in pipeline order")
    p.add_argument("--local", type=int, default=None, metavar="N", help="start N local nodes on loopback")
    p.add_argument("--discover-timeout", type=float, default=2.0, help="seconds to browse zeroconf for nodes")
    p.add_argument("-v", "--verbose", action="store_true", help="show the cluster's diagnostics (info level)")
    secret_arg(p)
    tls_args(p)


def _cache_args(p):
    p.add_argument("--kv-bits", type=int, default=None, help="TurboQuant bits for keys and values (default fp16)")
    p.add_argument("--k-bits", type=int, default=None, help="TurboQuant bits for keys")
    p.add_argument("--v-bits", type=int, default=None, help="TurboQuant bits for values")
    p.add_argument("--key-mean", action="store_true",
                   help="subtract a per-channel key mean before encoding")
    p.add_argument("--kv-preset", default=None, metavar="NAME",
                   help="a named TurboQuant setting (best: 4.25 bits, small: 3.25 bits; docs/cache.md); not with --kv-bits/--k-bits/--v-bits")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbo-cluster", description="Generate text over a cluster of turbo-nodes.")
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="plan, load and generate, streaming text to stdout")
    _connect_args(gen)
    _cache_args(gen)
    gen.add_argument("--prompt", default="Hello! Who are you?", help="the user message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold; 0 = off")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability; 0 = off")
    gen.add_argument("--repetition-penalty", type=float, default=0.0, help="divide repeated tokens' logits by this; 0 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", nargs="*", default=[], help="stop when any of these strings appears")
    gen.add_argument("--max-context", type=int, default=None, help="positions to reserve (default prompt + max tokens)")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    gen.add_argument("--session-id", default=None, help="id for the session (default: a random one; printed on stderr)")
    gen.add_argument("--keep", action="store_true",
                     help="leave the session on the nodes when done; `turbo-cluster resume SESSION --nodes ...` continues it "
                          "(reserve room with --max-context)")
    gen.add_argument("--step-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="deadline of one decode step; a node silent past it is probed and failed over (default 30)")
    gen.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                     help="keep a packed-KV checkpoint every STEPS steps to rebuild from after a failover "
                          "(default 0: rebuild by replaying the steps; see docs/failover.md)")

    pl = sub.add_parser("plan", help="print the layer plan the nodes would get")
    _connect_args(pl)
    _cache_args(pl)
    pl.add_argument("--context", type=int, default=4096, help="context to size the KV estimate for")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    nodes = sub.add_parser("nodes", help="list nodes advertising on the local network")
    nodes.add_argument("--discover-timeout", type=float, default=2.0)

    # moving sessions (docs/migration.md)
    ss = sub.add_parser("sessions", help="list live sessions: positions, KV bytes, which node holds which layers")
    _connect_args(ss)
    ss.add_argument("--json", action="store_true", help="print JSON")
    mg = sub.add_parser("migrate", help="move a session's layers (whole stages) to another node, between tokens")
    _connect_args(mg)
    mg.add_argument("--session", required=True, help="session id")
    mg.add_argument("--layers", type=parse_layers, required=True, help="layers START:END to move")
    mg.add_argument("--to", required=True, help="host:port of the node to move them to (holding them, or idle)")
    mg.add_argument("--relay", action="store_true", help="send the KV through this process instead of node to node")
    sn = sub.add_parser("snapshot", help="write a session (all its layers) to a file")
    _connect_args(sn)
    sn.add_argument("--session", default=None, help="session id (default: the only live one)")
    sn.add_argument("--out", required=True, help="file to write")
    rs = sub.add_parser("restore", help="load a session snapshot onto the nodes' layers")
    _connect_args(rs)
    rs.add_argument("path", help="snapshot file written by `turbo-cluster snapshot`")
    rs.add_argument("--session-id", default=None, help="id to restore it under (default: the snapshot's)")
    for add, _ in COMMANDS.values():
        add(sub)
    from . import serving

    serving.add_commands(sub, sys.modules[__name__])
    return p


# --------------------------------------------------------------------------- checking input


def check_address(text: str, flag: str) -> str:
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host:
        raise UsageError(f"{flag}: node address {text.strip()!r} needs a port, e.g. {text.strip()}:7070 (turbo-node's default)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag}: node address {text.strip()!r} has port {port!r}; expected host:PORT with PORT 1..65535")
    return f"{host}:{port}"


def check_nodes(args) -> None:
    """Addresses are host:port and answer a TCP connect, before any handshake waits for them."""
    if getattr(args, "local", None) is not None and not 1 <= args.local <= 64:
        raise UsageError(f"--local must be 1..64 nodes, got {args.local}")
    if getattr(args, "discover_timeout", 0) < 0:
        raise UsageError(f"--discover-timeout must be >= 0 seconds, got {args.discover_timeout:g}")
    if not getattr(args, "nodes", None):
        return
    if args.local is not None:
        raise UsageError("give --nodes or --local, not both")
    addresses = [check_address(a, "--nodes") for a in args.nodes.split(",") if a.strip()]
    if not addresses:
        raise UsageError("--nodes is empty; give host:port[,host:port...]")
    for a in addresses:
        reachable(a)
    args.nodes = ",".join(addresses)


def reachable(address: str, timeout: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except socket.gaierror:
        raise UsageError(f"node {address}: host {host!r} is unknown; check the name (or use its IP address)") from None
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UsageError(f"node {address} is not reachable ({why}); is `turbo-node serve` running there?") from None


def cache_of(args):
    """The cache setting from --kv-preset / --kv-bits / --k-bits / --v-bits / --key-mean, or None for fp16."""
    from ...kernels.format import SUPPORTED_BITS
    from ..cache import presets

    name = getattr(args, "kv_preset", None)
    if name is not None:
        try:
            base = presets.resolve(name).to_dict()
        except presets.PresetError as e:
            raise UsageError(f"--kv-preset: {e}") from None
        widths = {k: v for k, v in (("k_bits", args.k_bits or args.kv_bits), ("v_bits", args.v_bits or args.kv_bits)) if v}
        if widths:
            raise UsageError("--kv-preset sets the widths (per layer too); leave out --kv-bits/--k-bits/--v-bits")
        return {**base, **({"key_mean": True} if args.key_mean else {})}

    k = args.k_bits if args.k_bits is not None else args.kv_bits
    v = args.v_bits if args.v_bits is not None else args.kv_bits
    if (k is None) != (v is None):
        raise UsageError(f"give both --k-bits and --v-bits (or --kv-bits), got k={k} v={v}")
    allowed = ", ".join(map(str, SUPPORTED_BITS))
    for flag, b in (("--k-bits" if args.k_bits is not None else "--kv-bits", k), ("--v-bits" if args.v_bits is not None else "--kv-bits", v)):
        if b is not None and b not in SUPPORTED_BITS:
            raise UsageError(f"{flag} {b} is not a TurboQuant width; use one of {allowed}, or leave it out for an fp16 cache")
    if args.key_mean and not k:
        raise UsageError("--key-mean needs a TurboQuant cache: give --kv-bits or --k-bits/--v-bits")
    return {"k_bits": k, "v_bits": v, **({"key_mean": True} if args.key_mean else {})} if k else None


def check_generate(args) -> None:
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not (math.isfinite(args.temp) and args.temp >= 0):
        raise UsageError(f"--temp must be a finite number >= 0 (0 = greedy), got {args.temp:g}")
    if not (math.isfinite(args.top_p) and 0 <= args.top_p <= 1):
        raise UsageError(f"--top-p must be between 0 and 1 (0 = off), got {args.top_p:g}")
    if args.max_context is not None and args.max_context < 1:
        raise UsageError(f"--max-context must be at least 1, got {args.max_context}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not (math.isfinite(args.min_p) and 0 <= args.min_p <= 1):
        raise UsageError(f"--min-p must be between 0 and 1 (0 = off), got {args.min_p:g}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty >= 0):
        raise UsageError(f"--repetition-penalty must be >= 0 (0 = off), got {args.repetition_penalty:g}")
    if not (math.isfinite(args.step_timeout) and args.step_timeout > 0):
        raise UsageError(f"--step-timeout must be > 0 seconds, got {args.step_timeout:g}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0 steps (0 = replay only), got {args.checkpoint_every}")
    if args.no_chat_template and not args.prompt:
        raise UsageError("--prompt is empty and --no-chat-template gives the model nothing to continue; give --prompt TEXT")


def describe(model) -> None:
    """Read the model's description (a hub id is fetched) here, so a bad model is one line, not a traceback."""
    from ..model import loader

    try:
        loader.describe(model)
    except Exception as e:  # noqa: BLE001  (the CLI's boundary: hub, file and format errors of any kind)
        text = " ".join(str(e).split())[:300]
        raise Failure(f"model {model}: cannot read it ({type(e).__name__}: {text}); for a hub id check the network "
                      "or download it first (huggingface-cli download ID) and pass its directory") from None


# --------------------------------------------------------------------------- commands


def _connect(args, tokenizer=None):
    from ..cluster.cluster import Cluster

    cluster = Cluster.connect(args.model, args.nodes, args.local, args.discover_timeout, secret=secret(args), tls=tls(args))
    if tokenizer is not None:
        cluster.tokenizer = tokenizer
    return cluster


def _plan_and_load(cluster, context, cache):
    plan = cluster.plan(context=context, cache=cache)
    output.note(plan.table())

    bars = output.LoadProgress([c.address for c in cluster.clients])
    try:
        cluster.load(plan, bars.update)
    finally:
        bars.close()
    return plan


def generate(args) -> int:
    check_generate(args)
    cache = cache_of(args)
    check_model(args.model)
    secret(args), tls(args)
    check_nodes(args)
    describe(args.model)
    from ..cluster import failover
    from ..cluster.cluster import PREFILL_STEP, encode, tokenizer_for

    tok = tokenizer_for(args.model)
    ids = encode(tok, args.prompt, chat=not args.no_chat_template)
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give a non-empty --prompt")
    need = len(ids) + args.max_tokens
    if args.max_context is not None and args.max_context < need:
        raise UsageError(f"--max-context {args.max_context} is less than the prompt ({len(ids)} tokens) plus --max-tokens "
                         f"({args.max_tokens}) = {need}; raise --max-context or lower --max-tokens")
    if args.keep and args.local:
        raise UsageError("--keep leaves the session on the nodes, but --local nodes stop with this command; "
                         "start nodes with `turbo-node serve` and give --nodes (or let them be discovered)")
    sid = args.session_id or uuid.uuid4().hex[:16]
    with _connect(args, tok) as cluster:
        _plan_and_load(cluster, args.max_context or need, cache)
        failover.configure(cluster, step_timeout_s=args.step_timeout, checkpoint_every=args.checkpoint_every)
        t0 = time.perf_counter()
        output.note(f"session {sid}")
        if len(ids) > PREFILL_STEP:
            cluster.prefill_progress = lambda done, total: output.note(f"prefill {done}/{total} tokens")
        pieces = cluster.generate(
            ids, args.max_tokens, args.temp, args.top_p, args.seed, args.stop, cache,
            session_id=sid, keep=args.keep, max_context=args.max_context,
            sampling=dict(top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty),
        )
        for piece in pieces:
            output.stream(piece)
        output.result()
        if args.keep:
            where = ",".join(c.address for c in cluster.clients)
            output.note(f"kept session {sid} on the nodes (freed after their --session-ttl idle); continue it with "
                        f"`turbo-cluster resume {sid} --nodes {where}`, free it with `turbo-cluster drop {sid} --nodes {where}`")
        s = cluster.stats
        output.note(
            f"prompt {s.prompt_tokens} tokens in {s.prefill_s:.2f} s; generated {s.generated_tokens} tokens, "
            f"{s.tokens_per_s:.1f} tokens/s over {len(cluster.clients)} nodes ({time.perf_counter() - t0:.2f} s total)"
        )
    return 0


def plan(args) -> int:
    cache = cache_of(args)
    if args.context < 1:
        raise UsageError(f"--context must be at least 1, got {args.context}")
    check_model(args.model)
    secret(args), tls(args)
    check_nodes(args)
    describe(args.model)
    with _connect(args) as cluster:
        p = cluster.plan(context=args.context, cache=cache)
        output.result(p.to_json() if args.json else p.table())
    return 0


def nodes(args) -> int:
    from ..transport.discovery import browse

    found = browse(args.discover_timeout)
    if not found:
        raise Failure(f"no node answered within {args.discover_timeout:g} s; start one with `turbo-node serve` "
                      "or give --discover-timeout a few seconds more")
    for f in found:
        p = f.properties
        output.result(f"{f.name:20s} {f.address:22s} backend={p.get('backend')} memory={int(p.get('memory', 0)) >> 20} MiB "
                      f"protocol={p.get('protocol')} format={p.get('format')} id={p.get('node_id')}")
    return 0


def sessions_command(args) -> int:
    check_model(args.model)
    secret(args), tls(args)
    if args.command == "migrate":
        check_address(args.to, "--to")
    if args.command == "restore" and not os.path.isfile(args.path):
        raise UsageError(f"snapshot {args.path} is not a file; give the path `turbo-cluster snapshot --out` wrote")
    if args.command == "restore":
        from ..sessions import container

        try:
            container.load_snapshot(args.path)  # a bad file is refused before any node is dialled
        except container.SessionFormatError as e:
            raise Failure(f"snapshot {args.path} cannot be restored: {e}") from None
        except OSError as e:
            raise Failure(f"snapshot {args.path} cannot be read: {e.strerror or e}") from None
    check_nodes(args)
    with _connect(args) as cluster:
        if args.command == "sessions":
            rows = cluster.sessions()
            if args.json:
                output.result(json.dumps(rows, indent=1))
            for r in [] if args.json else rows:
                stages = ", ".join(f"{st['node']} ({st['address']}) {st['layers'][0]}:{st['layers'][1]}" for st in r["stages"])
                output.result(f"{r['session_id']}  {r['offset']} positions  {r['kv_bytes'] / (1 << 20):.1f} MiB  {stages}")
        elif args.command == "migrate":
            r = cluster.migrate(args.session, args.layers, args.to, relay=args.relay)
            output.result(f"moved layers {args.layers[0]}:{args.layers[1]} of {args.session} to {args.to}: "
                          f"{r['wire_bytes']} bytes in {r['seconds'] * 1e3:.0f} ms (paused {r['pause_ms']:.0f} ms)")
        elif args.command == "snapshot":
            n = cluster.snapshot(args.out, args.session)
            output.result(f"wrote {n} bytes to {args.out}")
        else:
            output.result(cluster.restore(args.path, args.session_id))
    return 0


RUN = {"generate": generate, "plan": plan, "nodes": nodes, "sessions": sessions_command, "migrate": sessions_command,
       "snapshot": sessions_command, "restore": sessions_command}


def cluster_main(argv=None) -> int:
    """``turbo-cluster``: wrong input exits 2, a refusal 1, each with one line on stderr; never a traceback."""
    from ..cluster.plan import PlanError
    from ..sessions.container import SessionFormatError
    from ..transport.discovery import DiscoveryError
    from ..transport.errors import ClusterError

    args = parser().parse_args(argv)
    output.setup_logging(getattr(args, "verbose", False))
    run = getattr(args, "run", None) or (COMMANDS[args.command][1] if args.command in COMMANDS else RUN[args.command])
    try:
        return run(args)
    except (UsageError, Failure, ClusterError, PlanError, DiscoveryError, SessionFormatError) as e:
        return output.fail("turbo-cluster", e)
    except KeyboardInterrupt:
        return output.fail("turbo-cluster", Failure("interrupted"))


if __name__ == "__main__":
    sys.exit(cluster_main())
