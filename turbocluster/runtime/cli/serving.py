"""``turbo-cluster serve | chat | status | drop | resume``: the server and the session lifecycle from the terminal.

    turbo-cluster serve  [--host 127.0.0.1] [--port 8080] [--local N | --nodes ...] [--api-key K] [cache flags]
    turbo-cluster chat   [--local N | --nodes ...] [--system TEXT]        multi-turn; KV kept between turns
    turbo-cluster status [--server URL | --nodes ...] [--json]
    turbo-cluster drop   SESSION [--server URL | --nodes ...]
    turbo-cluster resume SESSION [--nodes ...] [--keep] | --server URL | --snapshot PATH   (a kept, served or saved session)

Registered by ``add_commands(subparsers, common)``, where ``common`` is the
module holding the shared connect/cache/load helpers of the CLI.
"""

import json
import logging
import os
import signal
import socket
import sys
import urllib.error
import urllib.request

from . import output

log = logging.getLogger(__name__)
ENV_API_KEY = "TURBO_API_KEY"


def _err(text: str) -> None:
    output.note(text)


def add_commands(sub, common) -> None:
    """Add the serving subcommands to ``sub``; each sets ``args.run``."""
    sv = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API and a dashboard over the cluster")
    common._connect_args(sv)
    common._cache_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0 = any free one)")
    sv.add_argument("--context", type=int, default=4096, help="positions each session reserves (default 4096)")
    sv.add_argument("--workers", type=int, default=8, help="sessions in flight through the pipeline at once (default 8)")
    sv.add_argument("--queue", type=int, default=32, help="requests that may wait; past it the API answers 503 (default 32)")
    sv.add_argument("--max-kept", type=int, default=8, help="idle sessions kept for prefix reuse (default 8)")
    sv.add_argument("--max-tokens", type=int, default=512, help="max_tokens when a request gives none (default 512)")
    sv.add_argument("--system", default=None, help="system prompt for chats that bring none")
    sv.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (also ${ENV_API_KEY})")
    sv.add_argument("--model-name", default=None, help="model id reported by /v1/models (default the model's name)")
    sv.set_defaults(run=lambda a: _guard(_serve, a, common))

    ch = sub.add_parser("chat", help="chat in the terminal (multi-turn; the KV is kept between turns)")
    common._connect_args(ch)
    common._cache_args(ch)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temp", type=float, default=0.0)
    ch.add_argument("--top-p", type=float, default=0.0)
    ch.add_argument("--context", type=int, default=4096, help="positions the chat's session reserves")
    ch.set_defaults(run=lambda a: _guard(_chat, a, common))

    st = sub.add_parser("status", help="nodes (memory, layers, sessions, KV bytes) and sessions (placement, bytes)")
    _server_args(st, common)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(run=lambda a: _guard(_status, a, common))

    dr = sub.add_parser("drop", help="free a session on every node (or on a server)")
    _server_args(dr, common)
    dr.add_argument("session", help="session id")
    dr.set_defaults(run=lambda a: _guard(_drop, a, common))

    rs = sub.add_parser("resume", help="continue a kept session (on --nodes or --server) or a snapshot (--snapshot)")
    _server_args(rs, common)
    rs.add_argument("session", nargs="?", default=None, help="session id (kept on --server, or the snapshot's id)")
    rs.add_argument("--snapshot", default=None, help="restore this snapshot onto the nodes and continue it")
    rs.add_argument("--max-tokens", type=int, default=256)
    rs.add_argument("--keep", action="store_true", help="leave the session on the nodes afterwards (resume it again later)")
    rs.set_defaults(run=lambda a: _guard(_resume, a, common))


def _server_args(p, common):
    common._connect_args(p)
    p.add_argument("--server", default=None, help="URL of a `turbo-cluster serve` (e.g. http://127.0.0.1:8080)")
    p.add_argument("--api-key", default=None, help=f"API key of --server (also ${ENV_API_KEY})")


def _guard(fn, args, common):
    """Run a command; a cluster, plan, file or HTTP failure is one line on stderr and exit status 1."""
    from ..cluster.plan import PlanError
    from ..sessions.container import SessionFormatError
    from ..transport.discovery import DiscoveryError
    from ..transport.errors import ClusterError

    try:
        return fn(args, common)
    except (ClusterError, PlanError, DiscoveryError, SessionFormatError, OSError, ValueError) as e:
        return output.fail("turbo-cluster", output.Failure(str(e)))
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------- serve


def _loopback(host: str) -> bool:
    """Whether ``host`` binds loopback only (no key needed there, as for a node without a secret)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args, common):
    import uvicorn

    from ..server.app import make_app
    from ..server.engine import Engine
    from ..server.metrics import Metrics
    from ..server.scheduler import Scheduler

    if args.workers < 1 or args.queue < 1 or args.context < 1:
        raise ValueError("--workers, --queue and --context must be >= 1")
    key = args.api_key or os.environ.get(ENV_API_KEY) or None
    if not key and not _loopback(args.host):
        raise ValueError(f"serving on {args.host} would open the API to the network without a key: give --api-key KEY "
                         f"(or ${ENV_API_KEY}), or --host 127.0.0.1 for this machine only")
    cache = common.cache_of(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # before loading, so a taken port fails at once
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it caught: make that a clean exit
        signal.signal(sig, lambda signum, _frame: stop.update(signal=signum))
    cluster = engine = scheduler = None
    try:
        cluster = common._connect(args)
        common._plan_and_load(cluster, args.context, cache)
        metrics = Metrics()
        engine = Engine(cluster, cache, context=args.context, max_kept=args.max_kept, metrics=metrics)
        scheduler = Scheduler(engine, workers=args.workers, queue_limit=args.queue, metrics=metrics)
        app = make_app(engine, scheduler, api_key=key, model_name=args.model_name, system=args.system,
                       default_max_tokens=args.max_tokens, metrics=metrics)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        _err(f"serving on http://{shown}:{port} (dashboard at /, API at /v1{', key required' if key else ''})")
        if stop["signal"] is None:
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off")
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        if scheduler is not None:
            scheduler.close()
        if engine is not None:
            engine.close()
        if cluster is not None:
            cluster.close()
        sock.close()
    _err("stopped" + (f" on signal {signal.Signals(stop['signal']).name}" if stop["signal"] else ""))
    return 0


# --------------------------------------------------------------------------- chat


def _chat(args, common):
    from ..server.engine import Engine, Sampling
    from ..server.scheduler import _Text

    cache = common.cache_of(args)
    with common._connect(args) as cluster:
        common._plan_and_load(cluster, args.context, cache)
        engine = Engine(cluster, cache, context=args.context, max_kept=1)
        tok = cluster.tokenizer
        messages = [{"role": "system", "content": args.system}] if args.system else []
        sampling = Sampling(args.temp, args.top_p)
        tty = sys.stdin.isatty()
        _err("type a message; /reset starts over, /exit or end of input quits")
        try:
            while True:
                if tty:
                    output.stream(">>> ")
                line = sys.stdin.readline()
                if not line or line.strip() in ("/exit", "/quit"):
                    break
                if line.strip() == "/reset":
                    engine.close()
                    messages = messages[:1] if args.system else []
                    continue
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line.rstrip("\n")})
                ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
                k, reused = engine.acquire(ids, sampling, args.max_tokens)
                text, ok, n = _Text(tok), False, 0
                try:
                    for token in engine.run(k, ids, reused, args.max_tokens):
                        if token in engine.eos:
                            break
                        n += 1
                        output.stream(text.add(token)[0])
                    output.result(text.flush())
                    ok = True
                finally:
                    engine.release(k, keep=ok)
                messages.append({"role": "assistant", "content": tok.decode(text.ids)})
                _err(f"[session {k.session_id}: prefilled {len(ids) - reused} new tokens, reused {reused}; "
                     f"generated {n}]")
        finally:
            engine.close()
    return 0


# --------------------------------------------------------------------------- status, drop, resume


def _http(args, method, path, body=None, stream=False):
    key = args.api_key or os.environ.get(ENV_API_KEY)
    req = urllib.request.Request(args.server.rstrip("/") + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise ValueError(f"{args.server}: HTTP {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise ValueError(f"{args.server}: {e.reason}") from None
    return resp if stream else json.loads(resp.read())


def _status(args, common):
    if args.server:
        st = _http(args, "GET", "/v1/cluster")
    else:
        from ..server.app import node_rows

        with common._connect(args) as cluster:
            st = {"nodes": node_rows(cluster), "sessions": cluster.sessions()}
    if args.json:
        output.result(json.dumps(st, indent=1))
        return 0
    mib = lambda b: f"{(b or 0) / (1 << 20):.1f} MiB"  # noqa: E731
    output.result(f"{len(st['nodes'])} nodes" + (f", {st['tokens_per_s']} tokens/s over the last minute, "
                                          f"{st['running']} running, {st['queue_depth']} queued" if "running" in st else ""))
    for n in st["nodes"]:
        if n.get("state") != "ready":
            output.result(f"  {n['address']:22s} {n.get('state')}: {n.get('error', '')}")
            continue
        output.result(f"  {n['name']:14s} {n['address']:22s} {n['backend']:5s} layers {n['layers'][0]}:{n['layers'][1]}  "
              f"used {mib(n['memory_used_bytes'])} free {mib(n['memory_free_bytes'])}  "
              f"{n['sessions']} sessions, KV {mib(n['kv_bytes'])}")
    output.result(f"{len(st['sessions'])} sessions" if st["sessions"] else "no sessions")
    for r in st["sessions"]:
        stages = ", ".join(f"{x['node']} {x['layers'][0]}:{x['layers'][1]}" for x in r["stages"])
        output.result(f"  {r['session_id']}  {r['offset']} tokens  KV {mib(r['kv_bytes'])}  {stages}")
    return 0


def _drop(args, common):
    if args.server:
        _http(args, "DELETE", f"/v1/sessions/{args.session}")
        output.result(f"dropped {args.session}")
        return 0
    import grpc

    freed, held = 0, 0
    with common._connect(args) as cluster:
        for c in cluster.clients:
            try:
                freed += c.drop(args.session).bytes_freed
                held += 1
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise ValueError(f"node {c.address}: {e.code().name}: {e.details()}") from None
    if not held:
        raise ValueError(f"no node holds session {args.session!r}")
    output.result(f"dropped {args.session} from {held} nodes, {freed} KV bytes freed")
    return 0


def _resume(args, common):
    if args.server:
        if not args.session:
            raise ValueError("give the SESSION id to resume on --server")
        resp = _http(args, "POST", f"/v1/sessions/{args.session}/resume", {"max_tokens": args.max_tokens, "stream": True}, stream=True)
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise ValueError(event["error"]["message"])
            for ch in event.get("choices", []):
                output.stream(ch.get("text", ""))
        output.result()
        return 0
    if not args.snapshot:
        if not args.session:
            raise ValueError("give the SESSION id (kept by `turbo-cluster generate --keep`), --server URL or --snapshot PATH")
        with common._connect(args) as cluster:  # a session kept on the nodes: its last node holds the pending token
            _continue(cluster, args.session, args)
        if args.keep:
            _err(f"kept session {args.session}")
        return 0
    with common._connect(args) as cluster:
        if not _loaded(cluster):
            common._plan_and_load(cluster, 4096, None)
        sid = cluster.restore(args.snapshot, args.session)
        _err(f"restored session {sid}")
        _continue(cluster, sid, args)
    return 0


def _continue(cluster, sid, args):
    """Print the text ``resume`` generates for ``sid`` (up to EOS or --max-tokens)."""
    tok, ids = cluster.tokenizer, []
    for token in cluster.resume(sid, args.max_tokens, keep=args.keep):
        if token in tok.eos_token_ids:
            break
        ids.append(token)
    output.result(tok.decode(ids))


def _loaded(cluster):
    """Every node holds layers of this model (a snapshot restores onto them as they are)."""
    from ...proto import turbo_pb2 as pb

    return all(i.load_state == pb.READY and i.model_identity == cluster.desc["identity"] for i in cluster.infos())
