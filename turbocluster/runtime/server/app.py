"""The FastAPI app: the OpenAI routes, the API key check, health, metrics, cluster status and the dashboard.

    engine = Engine(cluster, cache); scheduler = Scheduler(engine)
    app = make_app(engine, scheduler, api_key=None)
    uvicorn.run(app)   # then scheduler.close(); engine.close(); cluster.close()
"""

import hmac
import logging
import os
import time
from typing import Optional

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..cluster import failover
from .engine import Engine
from .metrics import Metrics
from .routes import error, router
from .scheduler import Scheduler

log = logging.getLogger(__name__)
STATIC = os.path.join(os.path.dirname(__file__), "static")
_OPEN = ("/health", "/metrics", "/", "/static")  # no key needed: the dashboard asks for it itself


def make_app(engine: Engine, scheduler: Scheduler, api_key: Optional[str] = None, model_name: Optional[str] = None,
             system: Optional[str] = None, default_max_tokens: int = 512, metrics: Optional[Metrics] = None) -> FastAPI:
    app = FastAPI(title="turbo-cluster", docs_url=None, redoc_url=None)
    s = app.state
    s.engine, s.scheduler, s.metrics = engine, scheduler, metrics or scheduler.metrics or Metrics()
    s.metrics.add_nodes(lambda: list(engine.cluster.clients))
    s.model_name = model_name or engine.cluster.desc.get("name") or "turbo-cluster"
    s.system, s.default_max_tokens, s.started, s.retry_after = system, default_max_tokens, int(time.time()), 1

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        path = request.url.path
        if api_key and not (path in _OPEN or path.startswith("/static/")):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors()]
        return error(400, "; ".join(parts) or "invalid request")

    app.include_router(router)

    @app.get("/health")
    async def health():
        return {"status": "ok", "nodes": len(engine.cluster.clients), "model": s.model_name}

    @app.get("/metrics")
    def metrics_page():  # sync: the nodes' GetMetrics calls run in FastAPI's thread pool
        m = s.metrics
        m.queue_depth.set(scheduler.depth())
        m.running.set(scheduler.running)
        m.kept.set(len(engine.kept))
        m.tokens_per_s.set(scheduler.tokens_per_s())
        m.failovers.set(len(failover.state(engine.cluster).events))
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/cluster")
    def cluster_status():  # sync: FastAPI runs it in its thread pool, the gRPC calls do not block the loop
        return status(engine, scheduler)

    @app.get("/v1/sessions")
    async def sessions():
        return {"object": "list", "data": engine.rows()}

    @app.delete("/v1/sessions/{session_id}")
    def drop(session_id: str):
        if not engine.drop(session_id):
            return error(404, f"this server holds no idle session {session_id!r}")
        return {"id": session_id, "object": "session", "deleted": True}

    @app.get("/")
    async def dashboard():
        return FileResponse(os.path.join(STATIC, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def node_rows(cluster) -> list:
    """Each node: address, backend, memory used/free, layers, sessions and their KV bytes."""
    nodes = []
    for client in cluster.clients:
        row = {"address": client.address}
        try:
            info = client.info(timeout=5.0)
            held = client.sessions(timeout=5.0)
        except grpc.RpcError as e:
            row.update(state="unreachable", error=f"{e.code().name}: {e.details()}")
            nodes.append(row)
            continue
        row.update(
            state="ready", name=info.name, node_id=info.node_id, backend=info.backend, layers=[info.layer_start, info.layer_end],
            memory_budget_bytes=info.memory_budget_bytes, memory_used_bytes=info.memory_used_bytes,
            memory_free_bytes=info.memory_budget_bytes - info.memory_used_bytes, weights_bytes=info.weights_bytes,
            sessions=len(held), kv_bytes=sum(x.kv_bytes_used for x in held),
        )
        nodes.append(row)
    return nodes


def status(engine: Engine, scheduler: Scheduler) -> dict:
    """Nodes, sessions with their placement and whether this server keeps them, load."""
    c = engine.cluster
    nodes = node_rows(c)
    kept = {r["session_id"]: r for r in engine.rows()}
    sessions = []
    try:
        for r in c.sessions():
            r.update(kept.get(r["session_id"], {"kept": False}))
            sessions.append(r)
    except Exception as e:  # noqa: BLE001 - a node went away mid-listing: the nodes rows say which
        log.warning("listing sessions failed: %s", e)
    plan = c.plan_
    return {
        "model": c.desc.get("name"), "num_layers": c.desc.get("num_layers"),
        "plan": [{"node": a.node, "address": a.address, "layers": [a.start, a.end]} for a in plan.assignments] if plan else [],
        "nodes": nodes, "sessions": sessions,
        "queue_depth": scheduler.depth(), "running": scheduler.running, "tokens_per_s": round(scheduler.tokens_per_s(), 2),
    }
