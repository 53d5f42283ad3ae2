"""The engine's own thread: the only code that touches the `Engine`.

HTTP handlers on the event loop post typed messages (add, abort) to the thread's inbox and read
their request's events from an `asyncio.Queue` that the thread feeds through
`loop.call_soon_threadsafe`, one batch per iteration:

    event loop                                engine thread
    ----------                                -------------
    add() ------- AddRequest ------> inbox -> drain inbox: add / abort
    RequestStream <- Accepted | Rejected ---- step() while there is work
                  <- RequestOutput ...   ---- publish EngineStats (heartbeat)
    close() ----- AbortRequest ----> inbox    block on the inbox when idle

Messages are plain frozen dataclasses, so moving the engine to a subprocess changes the
transport, not the types.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from rillet.engine.policy import QoETarget
from rillet.engine.engine import Engine
from rillet.engine.outputs import RequestOutput
from rillet.request import ContextPolicy
from rillet.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

_IDLE_TICK_S = 0.5  # an idle loop still wakes this often, so its heartbeat stays fresh
# NOTE: a step that fails with an identifiable set of requests fails only those; this many failed
# steps in a row means the engine cannot recover, and it is marked dead.
_MAX_CONSECUTIVE_FAILURES = 3


# -- event loop -> engine thread ------------------------------------------------------------------

@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    qoe: QoETarget | None = None  # the reader's expectations (None: the server's default)
    priority: int = 0
    tenant: str = ""
    context: ContextPolicy | None = None  # past the context limit (None: error)
    score_prompt: bool = False


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


Message = AddRequest | AbortRequest | Shutdown


# -- engine thread -> one request's queue ---------------------------------------------------------

@dataclass(frozen=True)
class Accepted:
    prompt_ids: list[int]


class RejectReason(str, enum.Enum):
    INVALID = "invalid"  # the engine refused the input (a 400)
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"  # loading, stopped or dead


@dataclass(frozen=True)
class Rejected:
    reason: RejectReason
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Aborted:
    pass


Event = Accepted | Rejected | Failed | Aborted | RequestOutput


class RequestRejected(Exception):
    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.message)
        self.reason = rejected.reason
        self.param = rejected.param


class EngineFailure(Exception):
    """The engine failed while running this request."""


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes every iteration; readers never touch the engine."""

    heartbeat: float = field(default_factory=time.monotonic)  # time.monotonic() of the last iteration
    num_waiting: int = 0  # sequences
    num_running: int = 0
    num_preemptions: int = 0
    kv_usage: float = 0.0
    kv_free_blocks: tuple[int, ...] = ()  # per KV-cache group
    kv_usable_blocks: tuple[int, ...] = ()
    prefix_cache_hit_rate: float = 0.0


class RequestStream:
    """One request's outputs in order, all n choices interleaved; `close()` before the end aborts it."""

    def __init__(self, owner: AsyncEngine, request_id: str, n: int, events: asyncio.Queue[Event],
                 prompt_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.n = n
        self._owner = owner
        self._events = events
        self._last: dict[int, RequestOutput] = {}
        self._finished: set[int] = set()
        self._closed = False

    @property
    def done(self) -> bool:
        return len(self._finished) == self.n

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.done:
            event = await self._events.get()
            if isinstance(event, RequestOutput):
                self._record(event)
                yield event
            elif isinstance(event, Aborted):
                for out in self._abort_outputs():
                    yield out
            elif isinstance(event, Failed):
                self._finished.update(range(self.n))
                raise EngineFailure(event.message)

    def _record(self, out: RequestOutput) -> None:
        self._last[out.index] = out
        if out.finished:
            self._finished.add(out.index)

    def _abort_outputs(self) -> list[RequestOutput]:
        """Final outputs for the choices an abort cut short."""
        outs = []
        for index in range(self.n):
            if index in self._finished:
                continue
            last = self._last.get(index)
            outs.append(RequestOutput(
                request_id=self.request_id, index=index, new_token_ids=[], text="", finished=True,
                finish_reason="abort", num_prompt_tokens=len(self.prompt_ids),
                num_output_tokens=last.num_output_tokens if last else 0,
                num_cached_tokens=last.num_cached_tokens if last else 0))
            self._record(outs[-1])
        return outs

    def close(self) -> None:
        """Stop listening; abort the request in the engine if it has not finished."""
        if self._closed:
            return
        self._closed = True
        self._owner.forget(self.request_id, abort=not self.done)


class AsyncEngine:
    """Owns the engine thread. Every method is called from the event loop's thread."""

    def __init__(self, load: Callable[[], Engine], max_queued_requests: int, stall_timeout: float) -> None:
        self._load = load
        self.max_queued_requests = max_queued_requests
        self.stall_timeout = stall_timeout
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="rillet-engine", daemon=True)
        self._outbox: list[tuple[str, Event]] = []  # engine thread only
        self._num_failures = 0  # engine thread only
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.engine: Engine | None = None  # set once loaded; handlers read only its constant facts
        self.stats = EngineStats()

    # -- event loop side -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._inbox.put(Shutdown())
        self._thread.join(timeout)

    def healthy(self) -> bool:
        """Loaded, not failed, and the loop made progress within the stall timeout."""
        fresh = time.monotonic() - self.stats.heartbeat < self.stall_timeout
        return self.state is EngineState.READY and fresh and self._thread.is_alive()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  qoe: QoETarget | None = None, priority: int = 0, tenant: str = "",
                  context: ContextPolicy | None = None, score_prompt: bool = False) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises `RequestRejected`."""
        if self.state is not EngineState.READY:
            raise RequestRejected(Rejected(RejectReason.UNAVAILABLE, self.unavailable_message()))
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._streams[request_id] = events
        self._inbox.put(AddRequest(request_id, prompt_ids, params, qoe, priority, tenant,
                                   context=context, score_prompt=score_prompt))
        try:
            first = await events.get()
        except asyncio.CancelledError:
            self.forget(request_id, abort=True)
            raise
        if isinstance(first, Accepted):
            return RequestStream(self, request_id, params.n, events, first.prompt_ids)
        self.forget(request_id, abort=False)
        if isinstance(first, Rejected):
            raise RequestRejected(first)
        raise EngineFailure(first.message if isinstance(first, Failed) else "the engine stopped")

    def forget(self, request_id: str, abort: bool) -> None:
        self._streams.pop(request_id, None)
        if abort:
            self._inbox.put(AbortRequest(request_id))

    def abort_all(self) -> None:
        """Abort every request in flight; their streams end with finish_reason "abort"."""
        for request_id in list(self._streams):
            self._inbox.put(AbortRequest(request_id))

    def unavailable_message(self) -> str:
        if self.state is EngineState.LOADING:
            return "The model is still loading; retry shortly."
        if self.state is EngineState.DEAD:
            return f"The engine failed and cannot serve requests: {self.error}"
        return "The server is shutting down."

    def _dispatch(self, batch: list[tuple[str, Event]]) -> None:
        for request_id, event in batch:
            events = self._streams.get(request_id)
            if events is not None:  # else the handler has gone: nothing to tell
                events.put_nowait(event)

    def _fail_all(self, message: str) -> None:
        for events in self._streams.values():
            events.put_nowait(Failed(message))

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._load()
        except Exception as e:
            logger.exception("loading the model failed")
            self.error = f"{type(e).__name__}: {e}"
            self.state = EngineState.DEAD
            return
        self.engine = engine
        self._publish(engine)
        self.state = EngineState.READY
        while self._iterate(engine):
            pass
        if self.state is EngineState.READY:
            self.state = EngineState.STOPPED

    def _iterate(self, engine: Engine) -> bool:
        """One loop iteration: drain the inbox, step if there is work, publish. False on shutdown."""
        ready = self.state is EngineState.READY
        for msg in self._receive(block=not (ready and engine.has_unfinished())):
            if isinstance(msg, Shutdown):
                self._flush()
                return False
            self._handle(engine, msg)
        self._flush()  # replies to adds go out before a possibly long step
        if self.state is EngineState.READY:
            if engine.has_unfinished():
                self._step(engine)
            self._publish(engine)
        self._flush()
        return True

    def _receive(self, block: bool) -> list[Message]:
        msgs: list[Message] = []
        if block:
            try:
                msgs.append(self._inbox.get(timeout=_IDLE_TICK_S))
            except queue.Empty:
                return msgs
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _handle(self, engine: Engine, msg: AddRequest | AbortRequest) -> None:
        if isinstance(msg, AbortRequest):
            if self.state is EngineState.READY:
                engine.abort(msg.request_id)
            self._outbox.append((msg.request_id, Aborted()))
        else:
            self._outbox.append((msg.request_id, self._add(engine, msg)))

    def _add(self, engine: Engine, msg: AddRequest) -> Event:
        if self.state is not EngineState.READY:
            return Rejected(RejectReason.UNAVAILABLE, self.unavailable_message())
        if len(engine.scheduler.waiting) + msg.params.n > self.max_queued_requests:
            return Rejected(RejectReason.QUEUE_FULL, f"the waiting queue is full ({self.max_queued_requests})")
        try:
            return Accepted(engine.add_request(msg.request_id, msg.prompt_ids, msg.params, context=msg.context,
                                               score_prompt=msg.score_prompt, qoe=msg.qoe,
                                               priority=msg.priority, tenant=msg.tenant))
        except SamplingParamsError as e:
            return Rejected(RejectReason.INVALID, str(e), e.param)
        except ValueError as e:
            return Rejected(RejectReason.INVALID, str(e))
        except Exception as e:
            logger.exception("adding request %s failed", msg.request_id)
            engine.abort(msg.request_id)
            return Failed(f"the engine failed to add the request: {type(e).__name__}")

    def _step(self, engine: Engine) -> None:
        before = engine.last_schedule
        try:
            outputs = engine.step()
        except Exception as e:
            logger.exception("engine step failed")
            self._recover(engine, before, f"the engine failed while running the request: {type(e).__name__}")
            return
        self._num_failures = 0
        self._outbox.extend((out.request_id, out) for out in outputs)

    def _recover(self, engine: Engine, before: object, message: str) -> None:
        """Fail the requests of the step that raised; mark the engine dead if that is not enough."""
        self._num_failures += 1
        schedule = engine.last_schedule
        if schedule is None or schedule is before or self._num_failures >= _MAX_CONSECUTIVE_FAILURES:
            self._die(message)  # the scheduler itself failed, or failures keep coming
            return
        affected = {engine.parents[s.request_id][0] for s in schedule.seqs if s.request_id in engine.parents}
        try:
            for request_id in affected:
                engine.abort(request_id)
        except Exception:
            logger.exception("aborting the failed requests failed too")
            self._die(message)
            return
        self._outbox.extend((request_id, Failed(message)) for request_id in affected)

    def _die(self, message: str) -> None:
        self.error = message
        self.state = EngineState.DEAD
        self._flush()
        self._call(self._fail_all, message)

    def _publish(self, engine: Engine) -> None:
        kv, scheduler = engine.kv, engine.scheduler
        self.stats = EngineStats(
            heartbeat=time.monotonic(), num_waiting=len(scheduler.waiting), num_running=len(scheduler.running),
            num_preemptions=scheduler.num_preemptions, kv_usage=kv.usage(),
            kv_free_blocks=tuple(p.num_free for p in kv.pools),
            kv_usable_blocks=tuple(p.num_usable for p in kv.pools), prefix_cache_hit_rate=kv.hit_rate())

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._call(self._dispatch, batch)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the event loop has closed: nobody is listening any more
