"""The HTTP routes: OpenAI endpoints over the engine thread, SSE streaming, tokenize, health and metrics.

Handlers parse and tokenize, post the request to the engine thread, and turn its outputs into JSON
or Server-Sent Events. A client that goes away (streaming or not) has its request aborted; the
engine thread drains aborts before its next step, so the KV blocks are free within one step.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive

from rillet.engine.engine import Engine
from rillet.request import ContextPolicy
from rillet.engine.policy import QoETarget
from rillet.sampling_params import SamplingParams, SamplingParamsError
from rillet.server import ServerConfig, errors
from rillet.server.async_engine import (AsyncEngine, EngineFailure, EngineState, RejectReason, RequestRejected,
                                        RequestStream)
from rillet.server.chat_template import ChatTemplate, ChatTemplateError
from rillet.server.errors import APIError, bad_request
from rillet.server.metrics import RequestTimer, ServerMetrics
from rillet.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                    RequestError, TokenizeRequest)
from rillet.server.responses import (ChatBuilder, CompletionBuilder, DetokenizeResponse, ModelCard, ModelList,
                                     ResponseBuilder, TokenizeResponse)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_RETRY_AFTER_S = 1
_M = TypeVar("_M", bound=BaseModel)
_G = TypeVar("_G", CompletionRequest, ChatCompletionRequest)


@dataclass
class ServerState:
    """What the handlers share. `chat_template` is set on the engine thread before it reports ready."""

    config: ServerConfig
    engine: AsyncEngine
    model_names: tuple[str, ...]  # the served name first, then accepted aliases
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    chat_template: ChatTemplate | None = None
    draining: bool = False
    exit_code: int = 0
    request_exit: Callable[[], None] = lambda: None

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def ready_engine(self) -> Engine:
        if self.engine.state is not EngineState.READY or self.engine.engine is None:
            raise errors.unavailable(self.engine.unavailable_message())
        return self.engine.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise errors.model_not_found(name)


# -- requests in --------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes (read to the end so the client sees the reply)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 16 * limit:
        raise errors.too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 16 * limit:
            break
    if size > limit:
        raise errors.too_large(limit)
    return b"".join(chunks)


def parse(model: type[_M], body: bytes) -> _M:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"The request body is not valid UTF-8 (byte {e.start}).") from None
    try:
        data = json.loads(text)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates from \ud800 escapes
    except json.JSONDecodeError as e:
        raise bad_request(f"The request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}).") \
            from None
    except UnicodeEncodeError:
        raise bad_request("The request holds a string that is not valid Unicode (a lone surrogate).") from None
    except ValueError:  # Python reads no integer of over 4300 digits
        raise bad_request("The request body holds a number with too many digits.") from None
    except RecursionError:
        raise bad_request("The request body nests arrays or objects too deeply.") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise errors.validation_error(e.errors()) from None


async def parse_request(request: Request, model: type[_M]) -> _M:
    return parse(model, await read_body(request, _state(request).config.max_request_bytes))


def check_token_ids(ids: list[int], engine: Engine, param: str) -> None:
    """Token ids from a client, checked before anything decodes or runs them."""
    vocab = engine.model_config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", param)


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                    max_tokens_param: str, logprobs: int | None, num_prompt_tokens: int,
                    engine: Engine) -> SamplingParams:
    """Validate the sampling fields and the context budget.

    Without max_tokens, generation may fill the context, or as much of it as the KV cache can hold.
    """
    limit = engine.max_model_len
    overflow = req.context_overflow or "error"
    if overflow == "sink":  # any length: the cache keeps the sinks and a recent window
        return _checked(req, max_tokens, max_tokens_param, logprobs, engine)
    if overflow == "truncate_left":  # the engine cuts the prompt to leave room for max_tokens
        if max_tokens is None:
            max_tokens = limit // 4
        return _checked(req, max_tokens, max_tokens_param, logprobs, engine)
    if num_prompt_tokens >= limit:
        raise bad_request(f"The prompt has {num_prompt_tokens} tokens; this model's context limit is {limit}.",
                          "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
    if max_tokens is None:
        max_tokens = max(1, min(limit, engine.kv_capacity_tokens) - num_prompt_tokens)
    try:
        params = req.sampling_params(max_tokens, logprobs)
        params.verify_vocab(engine.model_config.vocab_size)
    except SamplingParamsError as e:
        param = max_tokens_param if e.param == "max_tokens" else e.param
        raise bad_request(str(e), param) from None
    assert params.max_tokens is not None
    if num_prompt_tokens + params.max_tokens > limit:
        raise bad_request(f"This model's context limit is {limit} tokens, but {num_prompt_tokens + params.max_tokens}"
                          f" were requested ({num_prompt_tokens} in the prompt, {params.max_tokens} to generate); "
                          f"lower {max_tokens_param}.", max_tokens_param)
    return params


def _checked(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, max_tokens_param: str,
             logprobs: int | None, engine: Engine) -> SamplingParams:
    try:
        params = req.sampling_params(max_tokens, logprobs)
        params.verify_vocab(engine.model_config.vocab_size)
    except SamplingParamsError as e:
        raise bad_request(str(e), max_tokens_param if e.param == "max_tokens" else e.param) from None
    if max_tokens is not None and req.context_overflow == "truncate_left" and max_tokens >= engine.max_model_len:
        raise bad_request(f"This model's context limit is {engine.max_model_len} tokens; {max_tokens_param}="
                          f"{max_tokens} leaves no room for the prompt.", max_tokens_param)
    return params


def context_policy(req: CompletionRequest | ChatCompletionRequest) -> ContextPolicy:
    try:
        return req.context_policy()
    except RequestError as e:
        raise bad_request(str(e), e.param) from None


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None) -> str:
    assert state.chat_template is not None
    try:
        return state.chat_template.render([m.template_dict() for m in messages], add_generation_prompt,
                                          tools=tools, variables=kwargs)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None


# -- outputs out ----------------------------------------------------------------------------------------

def _sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


async def _stream(handle: RequestStream, builder: ResponseBuilder, timer: RequestTimer,
                  include_usage: bool, pace: float | None = None) -> AsyncIterator[bytes]:
    """SSE body: opening chunks, one chunk per output, the usage chunk, [DONE]. Cancelled on disconnect.

    With `pace` (tokens/s), chunks leave no faster than that after the first token: the surplus
    waits here, and the scheduler spends the slack it gives on other streams.
    """
    failed = False
    first_at: float | None = None
    num_sent = 0
    try:
        for chunk in builder.opening_chunks():
            yield _sse(chunk)
        async for out in handle:
            timer.on_output(out)
            piece = builder.chunk(out)
            if pace and out.new_token_ids:
                first_at = first_at or time.monotonic()
                delay = first_at + num_sent / pace - time.monotonic()
                num_sent += len(out.new_token_ids)
                if delay > 0:
                    await asyncio.sleep(delay)
            if piece is not None:
                yield _sse(piece)
        if include_usage:
            yield _sse(builder.usage_chunk())
    except EngineFailure as e:
        failed = True
        yield b"data: " + errors.error_bytes(500, str(e), "internal_error") + b"\n\n"
    finally:
        handle.close()
        timer.finish(failed)
    yield b"data: [DONE]\n\n"


async def _collect(handle: RequestStream, builder: ResponseBuilder, timer: RequestTimer) -> BaseModel:
    async for out in handle:
        timer.on_output(out)
        builder.add(out)
    return builder.response()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _complete(request: Request, handle: RequestStream, builder: ResponseBuilder,
                    timer: RequestTimer) -> Response:
    """Wait for the whole response while watching the connection; a disconnect aborts the request."""
    work = asyncio.ensure_future(_collect(handle, builder, timer))
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    failed = False
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            return Response(status_code=499)  # nobody is listening
        try:
            return JSONResponse(work.result().model_dump(mode="json"))
        except EngineFailure as e:
            failed = True
            raise errors.internal(str(e)) from None
    finally:
        for task in (work, gone):
            task.cancel()
        handle.close()
        timer.finish(failed)


def _scheduling(request: Request, req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The scheduler's view of who sent the request and what its reader expects."""
    auth = request.headers.get("authorization", "")
    tenant = req.user or (hashlib.sha256(auth.encode()).hexdigest()[:16] if auth else "")
    qoe = QoETarget(req.qoe.ttft_s, req.qoe.tokens_per_s) if req.qoe is not None else None
    return {"qoe": qoe, "priority": req.priority, "tenant": tenant}


def _pace(request: Request, req: CompletionRequest | ChatCompletionRequest) -> float | None:
    """stream_pace: deliver at the reader's speed (the request's, else the server's default)."""
    if not (req.stream and req.stream_pace):
        return None
    return req.qoe.tokens_per_s if req.qoe is not None else _state(request).metrics.default_qoe.tokens_per_s


async def generate(request: Request, builder: ResponseBuilder, prompt_ids: list[int], params: SamplingParams,
                   stream: bool, include_usage: bool, arrival: float, scheduling: dict[str, Any] | None = None,
                   pace: float | None = None) -> Response:
    state = _state(request)
    timer = RequestTimer(state.metrics, builder.request_id, arrival, (scheduling or {}).get("qoe"))
    # echo with logprobs: the prompt's own logprobs come first
    score_prompt = isinstance(builder, CompletionBuilder) and builder.want_logprobs and builder.echo_text is not None
    try:
        handle = await state.engine.add(builder.request_id, prompt_ids, params, context=builder.context,
                                        score_prompt=score_prompt, **(scheduling or {}))
    except RequestRejected as e:
        raise _rejection(e, state) from None
    except EngineFailure as e:
        raise errors.internal(str(e)) from None
    timer.accepted(len(handle.prompt_ids), params.n)
    builder.num_prompt_tokens = len(handle.prompt_ids)
    if isinstance(builder, CompletionBuilder):
        builder.echo_prompt_ids = handle.prompt_ids
    if stream:
        return StreamingResponse(_stream(handle, builder, timer, include_usage, pace), media_type="text/event-stream",
                                 headers=_SSE_HEADERS)
    return await _complete(request, handle, builder, timer)


def _rejection(e: RequestRejected, state: ServerState) -> APIError:
    if e.reason is RejectReason.QUEUE_FULL:
        return errors.queue_full(state.config.max_queued_requests, _RETRY_AFTER_S)
    if e.reason is RejectReason.UNAVAILABLE:
        return errors.unavailable(str(e))
    return bad_request(str(e), e.param)


# -- routes -----------------------------------------------------------------------------------------------

router = APIRouter()


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.rillet
    return state


@router.get("/health")
async def health(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return errors.unavailable("The server is shutting down.").response()
    if not state.engine.healthy():
        return errors.unavailable(_unhealthy_message(state.engine)).response()
    return JSONResponse({"status": "ok"})


def _unhealthy_message(engine: AsyncEngine) -> str:
    if engine.state is EngineState.READY:
        return f"The engine loop has made no progress for over {engine.stall_timeout:g} s."
    return engine.unavailable_message()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = _state(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    state = _state(request)
    engine = state.ready_engine()
    card = ModelCard(id=state.model_name, created=state.created, max_model_len=engine.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))


async def _accept(request: Request, model: type[_G]) -> tuple[ServerState, Engine, _G]:
    """The checks every generation route makes first: engine ready, body valid, model known, fields supported."""
    state = _state(request)
    engine = state.ready_engine()
    req = await parse_request(request, model)
    state.check_model(req.model)
    try:
        req.check_supported()
    except RequestError as e:
        raise bad_request(str(e), e.param) from None
    return state, engine, req


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state, engine, req = await _accept(request, CompletionRequest)
    try:
        prompt = req.single_prompt()
    except RequestError as e:
        raise bad_request(str(e), e.param) from None
    if not prompt:
        raise bad_request("The prompt is empty.", "prompt")
    if not isinstance(prompt, str):
        check_token_ids(prompt, engine, "prompt")
    prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    params = sampling_params(req, req.max_tokens, "max_tokens", req.logprobs, len(prompt_ids), engine)
    builder = CompletionBuilder(f"cmpl-{uuid.uuid4().hex}", state.model_name, params.n, params.logprobs,
                                engine.tokenizer.token_bytes)
    builder.context = context_policy(req)
    if req.echo:
        builder.echo_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt_ids)
    return await generate(request, builder, prompt_ids, params, bool(req.stream), req.include_usage, arrival,
                          _scheduling(request, req), _pace(request, req))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    state, engine, req = await _accept(request, ChatCompletionRequest)
    text = render_chat(state, req.messages, req.add_generation_prompt, req.tools, req.chat_template_kwargs)
    # NOTE: as transformers' apply_chat_template: the template writes any BOS itself.
    prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(req, req.requested_max_tokens, max_param, req.num_logprobs, len(prompt_ids), engine)
    builder = ChatBuilder(f"chatcmpl-{uuid.uuid4().hex}", state.model_name, params.n, params.logprobs,
                          engine.tokenizer.token_bytes)
    builder.context = context_policy(req)
    return await generate(request, builder, prompt_ids, params, bool(req.stream), req.include_usage, arrival,
                          _scheduling(request, req), _pace(request, req))


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    state = _state(request)
    engine = state.ready_engine()
    req = await parse_request(request, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send either `prompt` or `messages`.", "prompt")
    if req.messages is not None:
        text = render_chat(state, req.messages, req.add_generation_prompt)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
    else:
        assert req.prompt is not None
        ids = engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    body = TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)
    return JSONResponse(body.model_dump())


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    state = _state(request)
    engine = state.ready_engine()
    req = await parse_request(request, DetokenizeRequest)
    state.check_model(req.model)
    check_token_ids(req.tokens, engine, "tokens")
    text = engine.tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())


# Prompts that arrive in pieces (sessions.py builds on the helpers above).
from rillet.server.sessions import router as _sessions_router  # noqa: E402

router.include_router(_sessions_router)
