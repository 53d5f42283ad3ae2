"""The HTTP layer: OpenAI routes over the engine thread, SSE streaming, the API-key gate and draining.

Handlers parse and tokenize, post the request to the engine thread, and turn its outputs into JSON
or Server-Sent Events. A client that goes away (streaming or not) has its request aborted; the
engine thread drains aborts before its next step, so the KV blocks are free within one step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.sampling_params import SamplingParams, SamplingParamsError
from rillet.server import ServerConfig, errors
from rillet.server.async_engine import (AsyncEngine, EngineFailure, EngineState, RejectReason, RequestRejected,
                                        RequestStream)
from rillet.server.chat_template import ChatTemplate, ChatTemplateError, select_chat_template
from rillet.server.errors import APIError, bad_request
from rillet.server.metrics import RequestTimer, ServerMetrics
from rillet.server.protocol import (ChatBuilder, ChatCompletionRequest, ChatMessage, CompletionBuilder,
                                    CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                    RequestError, ResponseBuilder, TokenizeRequest, TokenizeResponse)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_RETRY_AFTER_S = 1
_M = TypeVar("_M", bound=BaseModel)


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
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise errors.validation_error(e.errors()) from None


async def parse_request(request: Request, model: type[_M]) -> _M:
    return parse(model, await read_body(request, _state(request).config.max_request_bytes))


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                    max_tokens_param: str, logprobs: int | None, num_prompt_tokens: int,
                    engine: Engine) -> SamplingParams:
    """Validate the sampling fields and the context budget.

    Without max_tokens, generation may fill the context, or as much of it as the KV cache can hold.
    """
    limit = engine.max_model_len
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
                  include_usage: bool) -> AsyncIterator[bytes]:
    """SSE body: opening chunks, one chunk per output, the usage chunk, [DONE]. Cancelled on disconnect."""
    failed = False
    try:
        for chunk in builder.opening_chunks():
            yield _sse(chunk)
        async for out in handle:
            timer.on_output(out)
            piece = builder.chunk(out)
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


async def generate(request: Request, builder: ResponseBuilder, prompt_ids: list[int], params: SamplingParams,
                   stream: bool, include_usage: bool, arrival: float) -> Response:
    state = _state(request)
    timer = RequestTimer(state.metrics, builder.request_id, arrival)
    try:
        handle = await state.engine.add(builder.request_id, prompt_ids, params)
    except RequestRejected as e:
        raise _rejection(e, state) from None
    except EngineFailure as e:
        raise errors.internal(str(e)) from None
    timer.accepted(len(handle.prompt_ids), params.n)
    builder.num_prompt_tokens = len(handle.prompt_ids)
    if stream:
        return StreamingResponse(_stream(handle, builder, timer, include_usage), media_type="text/event-stream",
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


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = _state(request)
    engine = state.ready_engine()
    req = await parse_request(request, CompletionRequest)
    state.check_model(req.model)
    try:
        req.check_supported()
        prompt = req.single_prompt()
    except RequestError as e:
        raise bad_request(str(e), e.param) from None
    prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    params = sampling_params(req, req.max_tokens, "max_tokens", req.logprobs, len(prompt_ids), engine)
    builder = CompletionBuilder(f"cmpl-{uuid.uuid4().hex}", state.model_name, params.n, params.logprobs,
                                engine.tokenizer.token_bytes)
    return await generate(request, builder, prompt_ids, params, bool(req.stream), req.include_usage, arrival)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = _state(request)
    engine = state.ready_engine()
    req = await parse_request(request, ChatCompletionRequest)
    state.check_model(req.model)
    try:
        req.check_supported()
    except RequestError as e:
        raise bad_request(str(e), e.param) from None
    text = render_chat(state, req.messages, req.add_generation_prompt, req.tools, req.chat_template_kwargs)
    # NOTE: as transformers' apply_chat_template: the template writes any BOS itself.
    prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(req, req.requested_max_tokens, max_param, req.num_logprobs, len(prompt_ids), engine)
    builder = ChatBuilder(f"chatcmpl-{uuid.uuid4().hex}", state.model_name, params.n, params.logprobs,
                          engine.tokenizer.token_bytes)
    return await generate(request, builder, prompt_ids, params, bool(req.stream), req.include_usage, arrival)


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
    vocab = engine.model_config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", "tokens")
    text = engine.tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())


# -- the gate in front of every route ---------------------------------------------------------------

class Gate:
    """The API key on every route but /health (constant-time comparison); 503 for new work while draining."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            error = self._refusal(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> APIError | None:
        key = self.state.config.api_key
        if key is not None and not _authorized(scope, key):
            return errors.unauthorized()
        if self.state.draining and scope["path"] != "/metrics":
            return errors.unavailable("The server is shutting down.")
        return None


def _authorized(scope: Scope, key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())
    return False


# -- the app and its process ----------------------------------------------------------------------------

def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start(asyncio.get_running_loop())
        watcher = asyncio.create_task(_watch_loading(state))
        yield
        watcher.cancel()
        await asyncio.to_thread(state.engine.stop, 30.0)

    app = FastAPI(title="rillet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rillet = state
    errors.install(app)
    app.add_middleware(Gate, state=state)
    app.include_router(router)
    return app


async def _watch_loading(state: ServerState) -> None:
    """Exit with status 1 if the model fails to load (a server that can never serve is no use)."""
    while state.engine.state is EngineState.LOADING:
        await asyncio.sleep(0.05)
    if state.engine.state is EngineState.DEAD:
        logger.error("rillet: the model failed to load: %s", state.engine.error)
        state.exit_code = 1
        state.request_exit()


class DrainingServer(uvicorn.Server):
    """On SIGTERM or SIGINT: refuse new requests (503), let in-flight ones finish for up to
    `shutdown_timeout` seconds, abort the rest, then exit normally. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        state.request_exit = self._exit

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def _exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self.state.draining
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        engine, timeout = self.state.engine, self.state.config.shutdown_timeout
        logger.info("draining: %d requests in flight, waiting up to %g s", engine.num_streams, timeout)
        deadline = time.monotonic() + timeout
        while engine.num_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_streams:
            logger.warning("aborting %d requests still running after %g s", engine.num_streams, timeout)
            engine.abort_all()
        self.should_exit = True


def _load(model: str | None, engine_config: EngineConfig, config: ServerConfig, state: ServerState,
          template_source: str | None) -> Engine:
    """Runs on the engine thread: load the model and its chat template, then log the banner."""
    engine = Engine(model, engine_config)
    tokenizer = engine.tokenizer
    ids = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.settings.eos_token_id}
    special = {name: tokenizer.backend.id_to_token(i) or "" for name, i in ids.items() if i is not None}
    state.chat_template, origin = select_chat_template(tokenizer.chat_template, special, template_source)
    logger.info("rillet serving %s (%s, weights %s, KV cache %d tokens, context %d tokens, chat template: %s) "
                "at http://%s:%d", state.model_name, engine.model_config.family, engine_config.dtype,
                engine.kv_capacity_tokens, engine.max_model_len, origin, config.host, config.port)
    return engine


def served_names(model: str | None, served_model_name: str | None) -> tuple[str, ...]:
    if model is None:
        derived = DEFAULT_MODEL_NAME
    else:
        path = Path(model)
        derived = path.stem if path.suffix == ".gguf" else path.name
    names = [served_model_name or derived, derived] + ([model] if model else [])
    return tuple(dict.fromkeys(names))


def run(model: str | None, engine_config: EngineConfig, config: ServerConfig) -> int:
    """Serve until SIGTERM; returns the process exit status."""
    template_source = Path(config.chat_template).read_text(encoding="utf-8") if config.chat_template else None
    if template_source is not None:
        ChatTemplate(template_source, {})  # a broken file fails now, not after the model loads
    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"{model} does not exist")
    # NOTE: the engine thread calls `_load` only once the server starts, after `state` is bound.
    engine = AsyncEngine(lambda: _load(model, engine_config, config, state, template_source),
                         config.max_queued_requests, config.stall_timeout)
    names = served_names(model, config.served_model_name)
    state = ServerState(config, engine, names, ServerMetrics(lambda: engine.stats))
    uv_config = uvicorn.Config(create_app(state), host=config.host, port=config.port, access_log=False,
                               log_level="info", timeout_graceful_shutdown=10, lifespan="on")
    DrainingServer(uv_config, state).run()
    return state.exit_code
