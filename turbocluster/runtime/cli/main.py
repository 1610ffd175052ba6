"""Command-line entry points; thin wrappers over the library.

    turbo-node serve [--host H] [--port P] [--model M --layers S:E] [--memory-budget 8G] [--name N]
    turbo-cluster generate [--nodes h:p,...|--local N] [--prompt TEXT] [--max-tokens N] ...
    turbo-cluster plan     [--nodes ...|--local N] [--context N] [--json]
    turbo-cluster nodes    [--discover-timeout S]
    turbo-cluster sessions [--nodes ...] [--json]
    turbo-cluster migrate  [--nodes ...] --session ID --layers S:E --to HOST:PORT
    turbo-cluster snapshot [--nodes ...] [--session ID] --out PATH
    turbo-cluster restore  [--nodes ...] PATH [--session-id ID]
"""

import argparse
import json
import os
import re
import sys
import time

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text):
    """``"8G"``, ``"512m"``, ``"1073741824"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a byte count like 8G, 512M or 1073741824, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_layers(text):
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected layers as START:END with START < END, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def node_main(argv=None):
    parser = argparse.ArgumentParser(prog="turbo-node", description="Serve a share of a model's layers over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve layers until SIGINT/SIGTERM")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default all interfaces)")
    serve.add_argument("--port", type=int, default=7070, help="port to bind; 0 picks a free one")
    serve.add_argument("--model", default=None, help="model path or hub id to load at start (default: the bundled model)")
    serve.add_argument("--layers", type=parse_layers, default=None, help="layers START:END to load at start; "
                       "without it the node waits for a coordinator's LoadLayers")
    serve.add_argument("--memory-budget", type=parse_bytes, default=None, help="bytes for weights + KV (e.g. 12G)")
    serve.add_argument("--name", default=None, help="name to advertise (default: host name)")
    serve.add_argument("--no-advertise", action="store_true", help="do not advertise with zeroconf")
    _secret_arg(serve)
    _tls_args(serve, server=True)
    serve.add_argument("--session-ttl", type=float, default=1800.0, metavar="SECONDS",
                       help="free a session idle for this long (default 1800; 0 = never)")
    serve.add_argument("--models-dir", default=None, help="LoadLayers may open only models under this folder "
                       "(symlinks resolved; hub ids refused)")
    serve.add_argument("--faults", default=None, help="inject faults for testing, e.g. drop:7,delay:5:0.2,corrupt:11 "
                       "(also $TURBO_FAULTS; see turbocluster/runtime/faults.py)")
    from . import secret as secret_cli

    secret_cli.add_command(sub)
    args = parser.parse_args(argv)
    if args.command == "secret":
        return secret_cli.run(args)
    from ..transport import faults
    from ..node.server import serve as run

    secret = _secret(args)
    if args.session_ttl < 0:
        raise SystemExit(f"--session-ttl must be >= 0 seconds, got {args.session_ttl}")
    try:
        injected = faults.parse(args.faults if args.faults is not None else os.environ.get(faults.ENV, ""))
    except ValueError as e:
        raise SystemExit(f"turbo-node: {e}")
    run(args.host, args.port, args.model, args.layers, args.memory_budget, args.name, not args.no_advertise, secret,
        session_ttl=args.session_ttl, tls=_tls(args, server=True), faults=injected, models_dir=args.models_dir)
    return 0


def _tls_args(p, server=False):
    p.add_argument("--tls-cert", default=None, help="PEM certificate this node serves with" if server
                   else "PEM client certificate to present to nodes (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate: " + (
        "require client certificates it signed (mTLS), and trust it when calling the next node" if server
        else "trust node certificates it signed"))


def _tls(args, server=False):
    """``{"cert", "key", "ca"}`` from the --tls-* options, or None when none is given."""
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if not (cert or key or ca):
        return None
    if (cert is None) != (key is None):
        raise SystemExit(f"give both --tls-cert and --tls-key, got cert={cert!r} key={key!r}")
    if server and cert is None:
        raise SystemExit("serving TLS needs --tls-cert and --tls-key")
    for path in (cert, key, ca):
        if path and not os.path.exists(path):
            raise SystemExit(f"TLS file {path} not found")
    return {"cert": cert, "key": key, "ca": ca}


def _secret_arg(p):
    p.add_argument("--secret-file", default=None, help="cluster secret file (created 0600 if missing); "
                   "$TURBO_CLUSTER_SECRET also sets it. Without either, calls are not authenticated")


def _secret(args):
    """The cluster secret from --secret-file, $TURBO_CLUSTER_SECRET, $TURBO_SECRET_FILE or the default file, else None."""
    from ..transport import auth

    try:
        return auth.find_secret(args.secret_file)
    except (OSError, ValueError) as e:
        raise SystemExit(f"turbo-cluster: {e}") from None


def _connect_args(p):
    p.add_argument("--model", default=None, help="model path or hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--nodes", default=None, help="comma-separated host:port of nodes, in pipeline order")
    p.add_argument("--local", type=int, default=None, metavar="N", help="start N local nodes on loopback")
    p.add_argument("--discover-timeout", type=float, default=2.0, help="seconds to browse zeroconf for nodes")
    _secret_arg(p)
    _tls_args(p)


def _cache_args(p):
    p.add_argument("--kv-bits", type=int, default=None, help="TurboQuant bits for keys and values (default fp16)")
    p.add_argument("--k-bits", type=int, default=None, help="TurboQuant bits for keys")
    p.add_argument("--v-bits", type=int, default=None, help="TurboQuant bits for values")
    p.add_argument("--key-mean", action="store_true",
                   help="subtract a per-channel key mean before encoding (best measured: --k-bits 5 --v-bits 3 --key-mean)")


def _cache(args):
    k = args.k_bits if args.k_bits is not None else args.kv_bits
    v = args.v_bits if args.v_bits is not None else args.kv_bits
    if (k is None) != (v is None):
        raise SystemExit(f"give both --k-bits and --v-bits (or --kv-bits), got k={k} v={v}")
    if args.key_mean and not k:
        raise SystemExit("--key-mean needs a TurboQuant cache: give --kv-bits or --k-bits/--v-bits")
    return {"k_bits": k, "v_bits": v, **({"key_mean": True} if args.key_mean else {})} if k else None


def _connect(args):
    from ..cluster.cluster import Cluster

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    return Cluster.connect(args.model, args.nodes, args.local, args.discover_timeout, log=log, secret=_secret(args), tls=_tls(args))


def _plan_and_load(cluster, context, cache):
    plan = cluster.plan(context=context, cache=cache)
    print(plan.table(), file=sys.stderr, flush=True)

    def progress(address, p):
        if p.done or p.stage != "load":
            print(f"  {address}: {p.stage} {p.fraction:.0%} {p.message}", file=sys.stderr, flush=True)

    cluster.load(plan, progress)
    return plan


def cluster_main(argv=None):
    parser = argparse.ArgumentParser(prog="turbo-cluster", description="Generate text over a cluster of turbo-nodes.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="plan, load and generate, streaming text to stdout")
    _connect_args(gen)
    _cache_args(gen)
    gen.add_argument("--prompt", default="Hello! Who are you?", help="the user message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold; 0 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", nargs="*", default=[], help="stop when any of these strings appears")
    gen.add_argument("--max-context", type=int, default=None, help="positions to reserve (default prompt + max tokens)")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
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

    args = parser.parse_args(argv)
    if args.command == "nodes":
        return _nodes(args)
    from ..transport.errors import ClusterError
    from ..transport.discovery import DiscoveryError
    from ..transport.errors import MigrationError
    from ..cluster.plan import PlanError
    from ..sessions.container import SessionFormatError

    try:
        if args.command == "plan":
            with _connect(args) as cluster:
                plan = cluster.plan(context=args.context, cache=_cache(args))
                print(plan.to_json() if args.json else plan.table())
            return 0
        if args.command in ("sessions", "migrate", "snapshot", "restore"):
            return _session_command(args)
        return _generate(args)
    except (ClusterError, PlanError, DiscoveryError, MigrationError, SessionFormatError) as e:
        print(f"turbo-cluster: {e}", file=sys.stderr)
        return 1


def _nodes(args):
    from ..transport.discovery import browse

    found = browse(args.discover_timeout)
    if not found:
        print(f"no node answered within {args.discover_timeout:g} s", file=sys.stderr)
        return 1
    for f in found:
        p = f.properties
        print(f"{f.name:20s} {f.address:22s} backend={p.get('backend')} memory={int(p.get('memory', 0)) >> 20} MiB "
              f"protocol={p.get('protocol')} format={p.get('format')} id={p.get('node_id')}")
    return 0


def _generate(args):
    cache = _cache(args)
    with _connect(args) as cluster:
        ids = cluster.encode(args.prompt, chat=not args.no_chat_template)
        context = args.max_context or len(ids) + args.max_tokens
        _plan_and_load(cluster, context, cache)
        from ..cluster import failover

        failover.configure(cluster, step_timeout_s=args.step_timeout, checkpoint_every=args.checkpoint_every)
        t0 = time.perf_counter()
        for piece in cluster.generate(ids, args.max_tokens, args.temp, args.top_p, args.seed, args.stop, cache):
            print(piece, end="", flush=True)
        print()
        s = cluster.stats
        print(
            f"prompt {s.prompt_tokens} tokens in {s.prefill_s:.2f} s; generated {s.generated_tokens} tokens, "
            f"{s.tokens_per_s:.1f} tokens/s over {len(cluster.clients)} nodes ({time.perf_counter() - t0:.2f} s total)",
            file=sys.stderr,
        )
    return 0


def _session_command(args):
    with _connect(args) as cluster:
        if args.command == "sessions":
            rows = cluster.sessions()
            if args.json:
                print(json.dumps(rows, indent=1))
            for r in [] if args.json else rows:
                stages = ", ".join(f"{st['node']} ({st['address']}) {st['layers'][0]}:{st['layers'][1]}" for st in r["stages"])
                print(f"{r['session_id']}  {r['offset']} positions  {r['kv_bytes'] / (1 << 20):.1f} MiB  {stages}")
        elif args.command == "migrate":
            r = cluster.migrate(args.session, args.layers, args.to, relay=args.relay)
            print(f"moved layers {args.layers[0]}:{args.layers[1]} of {args.session} to {args.to}: "
                  f"{r['wire_bytes']} bytes in {r['seconds'] * 1e3:.0f} ms (paused {r['pause_ms']:.0f} ms)")
        elif args.command == "snapshot":
            n = cluster.snapshot(args.out, args.session)
            print(f"wrote {n} bytes to {args.out}")
        else:
            print(cluster.restore(args.path, args.session_id))
    return 0
