"""Prompts that arrive in pieces: a session is opened, text is appended while the user types or
speaks, and a last request starts generation.

Each append re-tokenizes the session's text and posts a one-token request for it, so the engine
prefills the new piece at once; its full blocks land in the prefix cache as they are computed.
The final request then finds all but the last partial block (plus the final piece) cached, and
its first token comes about one step after it arrives instead of one whole prefill later.

    POST   /v1/sessions                 {"prompt": "..."}      -> {"id": "sess-...", "num_tokens": n}
    POST   /v1/sessions/{id}/append     {"text": "..."}        -> {"id": ..., "num_tokens": n}
    POST   /v1/sessions/{id}/generate   completion fields, "text": the last piece  -> a completion
    GET    /v1/sessions/{id}                                   -> {..., "prefilled": true}
    DELETE /v1/sessions/{id}

The KV of an idle session is held as the prefix cache holds anything: its blocks stay findable
until memory runs short, then the least recently used are evicted and, if the session goes on,
recomputed. Sessions expire after `SESSION_TTL_S` idle seconds, at most `MAX_SESSIONS` are open,
and a session holds fewer tokens than the context limit.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from rillet.engine.engine import Engine
from rillet.sampling_params import SamplingParams
from rillet.server.app import ServerState, _state, context_policy, generate, parse_request, sampling_params
from rillet.server.async_engine import EngineFailure, RequestRejected, RequestStream
from rillet.server.errors import APIError, bad_request
from rillet.server.protocol import CompletionRequest, RequestError, _Strict
from rillet.server.responses import CompletionBuilder

SESSION_TTL_S = 600.0
MAX_SESSIONS = 256
_WARM = SamplingParams(temperature=0, max_tokens=1)


class SessionOpen(_Strict):
    model: str | None = None
    prompt: str = ""


class SessionAppend(_Strict):
    text: str


class SessionGenerate(CompletionRequest):
    prompt: str = ""  # unused: the session's text is the prompt
    text: str = ""  # the last piece


class SessionInfo(BaseModel):
    id: str
    object: str = "session"
    num_tokens: int
    prefilled: bool = False  # the text so far has been prefilled (or dropped from the queue)
    expires_in_s: float = SESSION_TTL_S


@dataclass
class Session:
    session_id: str
    text: str = ""
    num_tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)
    warming: asyncio.Task[None] | None = None  # the prefill of the text so far
    num_warms: int = 0

    def info(self) -> SessionInfo:
        return SessionInfo(id=self.session_id, num_tokens=self.num_tokens,
                           prefilled=self.warming is None or self.warming.done())

    def cancel_warming(self) -> None:
        if self.warming is not None and not self.warming.done():
            self.warming.cancel()  # closing its stream aborts the request; cached blocks stay
        self.warming = None


def _sessions(request: Request) -> dict[str, Session]:
    app_state = request.app.state
    if not hasattr(app_state, "rillet_sessions"):
        app_state.rillet_sessions = {}
    sessions: dict[str, Session] = app_state.rillet_sessions
    now = time.monotonic()
    for sid in [sid for sid, s in sessions.items() if now - s.last_used > SESSION_TTL_S]:
        sessions.pop(sid).cancel_warming()
    return sessions


def _session(request: Request, session_id: str) -> Session:
    session = _sessions(request).get(session_id)
    if session is None:
        raise APIError(404, f"No open session {session_id!r} (it may have expired after {SESSION_TTL_S:g} s "
                            "idle, or finished).", code="session_not_found")
    session.last_used = time.monotonic()
    return session


async def _drain(handle: RequestStream) -> None:
    try:
        async for _ in handle:
            pass
    except EngineFailure:
        pass
    finally:
        handle.close()


async def _warm(state: ServerState, engine: Engine, session: Session) -> None:
    """Tokenize the session's text and prefill it (its KV goes to the prefix cache)."""
    ids = engine.tokenizer.encode(session.text)
    if len(ids) >= engine.max_model_len:
        raise bad_request(f"The session would hold {len(ids)} tokens; this model's context limit is "
                          f"{engine.max_model_len}.", "text")
    session.num_tokens = len(ids)
    session.cancel_warming()
    if not session.text:
        return
    session.num_warms += 1
    try:
        handle = await state.engine.add(f"{session.session_id}-{session.num_warms}", ids, _WARM)
    except (RequestRejected, EngineFailure):
        return  # only a head start lost: the final request computes what is missing
    session.warming = asyncio.ensure_future(_drain(handle))


router = APIRouter()


@router.post("/v1/sessions")
async def open_session(request: Request) -> JSONResponse:
    state = _state(request)
    engine = state.ready_engine()
    req = await parse_request(request, SessionOpen)
    state.check_model(req.model)
    sessions = _sessions(request)
    if len(sessions) >= MAX_SESSIONS:
        raise APIError(429, f"{MAX_SESSIONS} sessions are open; finish or delete one first.", code="too_many_sessions")
    session = Session(f"sess-{uuid.uuid4().hex}", req.prompt)
    await _warm(state, engine, session)
    sessions[session.session_id] = session
    return JSONResponse(session.info().model_dump())


@router.get("/v1/sessions/{session_id}")
async def get_session(request: Request, session_id: str) -> JSONResponse:
    return JSONResponse(_session(request, session_id).info().model_dump())


@router.post("/v1/sessions/{session_id}/append")
async def append(request: Request, session_id: str) -> JSONResponse:
    state = _state(request)
    engine = state.ready_engine()
    session = _session(request, session_id)
    req = await parse_request(request, SessionAppend)
    before = session.text
    session.text += req.text
    try:
        await _warm(state, engine, session)
    except APIError:
        session.text = before
        raise
    return JSONResponse(session.info().model_dump())


@router.post("/v1/sessions/{session_id}/generate")
async def generate_session(request: Request, session_id: str) -> Response:
    """The session's text plus `text` as a completion prompt; the session ends with it."""
    arrival = time.monotonic()
    state = _state(request)
    engine = state.ready_engine()
    session = _session(request, session_id)
    req = await parse_request(request, SessionGenerate)
    state.check_model(req.model)
    try:
        req.check_supported()
    except RequestError as e:
        raise bad_request(str(e), e.param) from None
    _sessions(request).pop(session_id, None)
    session.cancel_warming()
    prompt_ids = engine.tokenizer.encode(session.text + req.text)
    if not prompt_ids:
        raise bad_request("The session's prompt is empty.", "text")
    params = sampling_params(req, req.max_tokens, "max_tokens", req.logprobs, len(prompt_ids), engine)
    builder = CompletionBuilder(f"cmpl-{uuid.uuid4().hex}", state.model_name, params.n, params.logprobs,
                                engine.tokenizer.token_bytes)
    builder.context = context_policy(req)
    return await generate(request, builder, prompt_ids, params, bool(req.stream), req.include_usage, arrival)


@router.delete("/v1/sessions/{session_id}")
async def delete_session(request: Request, session_id: str) -> JSONResponse:
    session = _session(request, session_id)
    _sessions(request).pop(session_id, None)
    session.cancel_warming()
    return JSONResponse({"id": session_id, "object": "session", "deleted": True})
