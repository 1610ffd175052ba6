"""The OpenAI-compatible endpoints: chat and text completions (streamed by server-sent events or not), models.

Field names and reply shapes follow OpenAI's API as mlx_lm.server, LM Studio
and Ollama serve it; extras (``session_id``, ``usage.prompt_tokens_details.
cached_tokens``) are ignored by clients that do not know them.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import List, Optional, Union

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..transport.errors import ClusterError
from .engine import Sampling
from .scheduler import Job, QueueFull

log = logging.getLogger(__name__)
router = APIRouter()
MAX_TOKENS_CAP = 1 << 16

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status, headers=headers)


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, lt=1 << 63)
    stop: Union[str, List[str], None] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(1, ge=1, le=1)
    keep: bool = True  # keep the session's KV for a later turn (prefix reuse)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, List[dict], None] = None


class ChatRequest(_Base):
    messages: List[Message] = Field(..., min_length=1)


class CompletionRequest(_Base):
    prompt: Union[str, List[int]]


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _job_args(app, body: _Base):
    top_p = body.top_p if body.top_p < 1 else 0.0  # 1 = off, as 0 is for the nodes
    sampling = Sampling(body.temperature, top_p if body.temperature else 0.0, body.top_k if body.temperature else 0,
                        body.min_p if body.temperature else 0.0, body.seed)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    max_tokens = body.max_completion_tokens or body.max_tokens or app.state.default_max_tokens
    return dict(max_tokens=max_tokens, sampling=sampling, stop=stop, keep=body.keep)


@router.get("/v1/models")
async def models(request: Request):
    name = request.app.state.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": request.app.state.started,
                                        "owned_by": "turbo-cluster"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    app = request.app
    messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    if app.state.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": app.state.system})
    tok = app.state.engine.cluster.tokenizer
    try:
        if getattr(tok, "chat_template", None):
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
        else:
            ids = tok.encode("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:")
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages (e.g. role order)
        return error(400, f"the chat template rejected the messages: {e}")
    return await _serve(request, ids, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    tok = request.app.state.engine.cluster.tokenizer
    ids = list(body.prompt) if isinstance(body.prompt, list) else tok.encode(body.prompt)
    vocab = request.app.state.engine.cluster.desc["vocab_size"]
    if not ids:
        return error(400, "the prompt must hold at least one token")
    if any(not 0 <= t < vocab for t in ids):
        return error(400, f"prompt token ids must be in [0, {vocab})")
    return await _serve(request, ids, body, chat=False)


@router.post("/v1/sessions/{session_id}/resume")
async def resume(session_id: str, request: Request):
    """Continue a kept session from its pending token (``turbo-cluster resume``); a completion reply."""
    try:
        raw = await request.json()
    except ValueError:
        raw = {}
    try:
        body = CompletionRequest(prompt="", **{k: v for k, v in (raw if isinstance(raw, dict) else {}).items() if k != "prompt"})
    except ValidationError as e:
        return error(400, str(e).splitlines()[0])
    return await _serve(request, [], body, chat=False, resume=session_id)


async def _serve(request: Request, ids, body: _Base, chat: bool, resume: Optional[str] = None):
    app = request.app
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind, value):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the event loop is gone (shutdown): nobody is listening

    job = Job(ids=ids, emit=emit, resume=resume, **_job_args(app, body))
    try:
        app.state.scheduler.submit(job)
    except QueueFull as e:
        return error(503, f"server busy: {e}", "server_busy", headers={"Retry-After": str(app.state.retry_after)})
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, model = int(time.time()), app.state.model_name
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(events, job, rid, created, model, chat, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text = []
    try:
        while True:
            kind, value = await events.get()
            if kind == "text":
                text.append(value)
            elif kind == "error":
                return _cluster_error(value)
            else:
                break
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    out = "".join(text)
    choice = {"index": 0, "finish_reason": value["finish_reason"], "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": out}} if chat else {"text": out})
    return JSONResponse(
        {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
         "choices": [choice], "usage": _usage(value), "session_id": value["session_id"]},
        headers={"X-Session-Id": value["session_id"]})


def _cluster_error(e: ClusterError) -> JSONResponse:
    status = _HTTP.get(getattr(e, "code", None), 502 if getattr(e, "code", None) else 500)
    return error(status, str(e), "cluster_error" if status >= 500 else "invalid_request_error")


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]}}


async def _sse(events, job, rid, created, model, chat, include_usage):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece=None, finish=None, first=False, usage=None, session_id=None):
        if chat:
            delta = {} if piece is None else {"content": piece}
            if first:
                delta = {"role": "assistant", "content": ""}
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [] if usage else [{"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}]
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if usage:
            body["usage"] = usage
        if session_id:
            body["session_id"] = session_id
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(first=True)
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield chunk(value)
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'cluster_error'}})}\n\n"
                break
            else:
                yield chunk(finish=value["finish_reason"], session_id=value["session_id"])
                if include_usage:
                    yield chunk(usage=_usage(value))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops its generation at the next token
