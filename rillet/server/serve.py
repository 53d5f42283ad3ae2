"""Running the server: the API-key gate, start-up while the model loads, draining on SIGTERM."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from rillet.config import EngineConfig
from rillet.engine.policy import QoETarget
from rillet.engine.engine import Engine
from rillet.server import ServerConfig, errors
from rillet.server.app import DEFAULT_MODEL_NAME, ServerState, router
from rillet.server.async_engine import AsyncEngine, EngineState
from rillet.server.chat_template import ChatTemplate, select_chat_template
from rillet.server.errors import APIError
from rillet.server.metrics import ServerMetrics
from rillet.server.openapi import openapi_schema

logger = logging.getLogger(__name__)


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

    app = FastAPI(title="rillet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
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
    logger.info("rillet serving %s (%s, weights %s / %s, KV cache %d tokens in %s, context %d tokens, chat template: "
                "%s) at http://%s:%d", state.model_name, engine.model_config.family, engine_config.dtype,
                engine_config.quantization, engine.kv_capacity_tokens, str(engine.kv_dtype).removeprefix("torch."),
                engine.max_model_len, origin, config.host, config.port)
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
    metrics = ServerMetrics(lambda: engine.stats, QoETarget(engine_config.qoe_ttft_s, engine_config.qoe_tokens_per_s),
                            (engine_config.max_stall_ms or 200.0) / 1000)
    state = ServerState(config, engine, names, metrics)
    uv_config = uvicorn.Config(create_app(state), host=config.host, port=config.port, access_log=False,
                               log_level="info", timeout_graceful_shutdown=10, lifespan="on")
    DrainingServer(uv_config, state).run()
    return state.exit_code
