"""The engine thread, against a scripted stand-in engine: messages, failures, aborts, health."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from rillet.engine.outputs import RequestOutput
from rillet.sampling_params import SamplingParams, SamplingParamsError
from rillet.server.async_engine import (AsyncEngine, EngineFailure, EngineState, RejectReason, RequestRejected,
                                        RequestStream)

POISON = 666  # a prompt holding this id makes every step that schedules it raise
T = TypeVar("T")


class ScriptedEngine:
    """Enough of `Engine` for the loop: one token per running request per step."""

    def __init__(self, max_running: int = 8) -> None:
        self.max_running = max_running
        self.scheduler = SimpleNamespace(waiting=deque(), running=[], num_preemptions=0)
        pool = SimpleNamespace(num_free=10, num_usable=10)
        self.kv = SimpleNamespace(usage=lambda: 0.0, hit_rate=lambda: 0.0, pools=[pool])
        self.parents: dict[str, tuple[str, int]] = {}
        self.last_schedule: Any = None
        self.prompts: dict[str, list[int]] = {}
        self.remaining: dict[str, int] = {}
        self.aborted: list[str] = []
        self.fail_schedule = False
        self.gate = threading.Event()
        self.gate.set()

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, **_: Any) -> list[int]:
        if not prompt:
            raise ValueError("the prompt is empty")
        if params.logit_bias:
            raise SamplingParamsError("logit_bias", "no biases here")
        assert params.max_tokens is not None
        self.prompts[request_id], self.remaining[request_id] = prompt, params.max_tokens
        self.parents[request_id] = (request_id, 0)
        self.scheduler.waiting.append(request_id)
        return prompt

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.remaining)

    def step(self) -> list[RequestOutput]:
        self.gate.wait()
        sched = self.scheduler
        while sched.waiting and len(sched.running) < self.max_running:
            sched.running.append(sched.waiting.popleft())
        if self.fail_schedule:
            raise RuntimeError("the scheduler broke")
        self.last_schedule = SimpleNamespace(seqs=[SimpleNamespace(request_id=r) for r in sched.running])
        if any(POISON in self.prompts[r] for r in sched.running):
            raise RuntimeError("a kernel broke")
        return [self._advance(r) for r in list(sched.running)]

    def _advance(self, request_id: str) -> RequestOutput:
        self.remaining[request_id] -= 1
        done = self.remaining[request_id] == 0
        out = RequestOutput(request_id, 0, [7], "x", done, "length" if done else None,
                            num_prompt_tokens=len(self.prompts[request_id]), num_output_tokens=1)
        if done:
            self._forget(request_id)
        return out

    def _forget(self, request_id: str) -> None:
        self.remaining.pop(request_id, None)
        self.parents.pop(request_id, None)
        for queue in (self.scheduler.waiting, self.scheduler.running):
            if request_id in queue:
                queue.remove(request_id)


def run(engine: ScriptedEngine, body: Callable[[AsyncEngine], Awaitable[T]], max_queued: int = 16,
        stall_timeout: float = 60.0) -> T:
    async def main() -> T:
        loop_engine = AsyncEngine(lambda: engine, max_queued, stall_timeout)  # type: ignore[arg-type,return-value]
        loop_engine.start(asyncio.get_running_loop())
        while loop_engine.state is EngineState.LOADING:
            await asyncio.sleep(0.01)
        try:
            return await body(loop_engine)
        finally:
            loop_engine.stop(10)
    return asyncio.run(main())


async def drain(stream: RequestStream) -> list[RequestOutput]:
    try:
        return [out async for out in stream]
    finally:
        stream.close()


def params(max_tokens: int = 3, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kwargs)


def test_a_request_runs_to_the_end() -> None:
    async def body(e: AsyncEngine) -> None:
        outs = await drain(await e.add("a", [1, 2], params(3)))
        assert [o.text for o in outs] == ["x"] * 3 and outs[-1].finish_reason == "length"
        assert e.healthy() and e.num_streams == 0
        assert e.stats.kv_free_blocks == (10,) and e.stats.num_running == 0
    run(ScriptedEngine(), body)


def test_rejections() -> None:
    async def body(e: AsyncEngine) -> None:
        with pytest.raises(RequestRejected) as info:
            await e.add("empty", [], params())
        assert info.value.reason is RejectReason.INVALID and "empty" in str(info.value)
        with pytest.raises(RequestRejected) as info:
            await e.add("bias", [1], params(logit_bias={1: 1.0}))
        assert info.value.param == "logit_bias"
        assert len(await drain(await e.add("ok", [1], params(2)))) == 2
    run(ScriptedEngine(), body)


def test_queue_full() -> None:
    engine = ScriptedEngine(max_running=0)  # nothing is ever admitted

    async def body(e: AsyncEngine) -> None:
        held = [await e.add(f"w{i}", [1], params()) for i in range(2)]
        with pytest.raises(RequestRejected) as info:
            await e.add("third", [1], params())
        assert info.value.reason is RejectReason.QUEUE_FULL
        for stream in held:
            stream.close()
    run(engine, body, max_queued=2)
    assert sorted(engine.aborted) == ["w0", "w1"]


def test_a_failed_step_fails_only_its_requests() -> None:
    engine = ScriptedEngine(max_running=1)

    async def body(e: AsyncEngine) -> None:
        poisoned = await e.add("bad", [POISON], params(3))
        waiting = await e.add("good", [1], params(3))
        with pytest.raises(EngineFailure, match="RuntimeError"):
            await drain(poisoned)
        assert len(await drain(waiting)) == 3
        assert e.state is EngineState.READY and e.healthy()
    run(engine, body)
    assert engine.aborted == ["bad"]


def test_repeated_failures_kill_the_engine() -> None:
    async def body(e: AsyncEngine) -> None:
        for i in range(3):
            with pytest.raises(EngineFailure):
                await drain(await e.add(f"bad{i}", [POISON], params()))
        assert e.state is EngineState.DEAD and not e.healthy()
        with pytest.raises(RequestRejected) as info:
            await e.add("after", [1], params())
        assert info.value.reason is RejectReason.UNAVAILABLE
    run(ScriptedEngine(), body)


def test_a_broken_scheduler_kills_the_engine_and_fails_everyone() -> None:
    engine = ScriptedEngine(max_running=0)

    async def body(e: AsyncEngine) -> None:
        streams = [await e.add(f"r{i}", [1], params(50)) for i in range(3)]
        engine.fail_schedule = True
        for stream in streams:
            with pytest.raises(EngineFailure):
                await drain(stream)
        assert e.state is EngineState.DEAD and "RuntimeError" in (e.error or "")
    run(engine, body)


def test_close_aborts_and_abort_all_ends_streams() -> None:
    engine = ScriptedEngine()

    async def body(e: AsyncEngine) -> None:
        # NOTE: long enough that the scripted engine (microseconds a step) cannot finish them first.
        left = await e.add("left", [1], params(10**7))
        async for _ in left:
            break
        left.close()
        cut = [await e.add(f"cut{i}", [1, 2], params(10**7)) for i in range(2)]
        e.abort_all()
        for stream in cut:
            outs = await drain(stream)
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert outs[-1].num_prompt_tokens == 2
    run(engine, body)
    assert sorted(engine.aborted) == ["cut0", "cut1", "left"]


def test_a_wedged_step_makes_health_fail() -> None:
    engine = ScriptedEngine()

    async def body(e: AsyncEngine) -> None:
        engine.gate.clear()
        stream = await e.add("slow", [1], params(1))
        deadline = time.monotonic() + 30
        while e.healthy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not e.healthy()
        engine.gate.set()
        assert len(await drain(stream)) == 1
        while not e.healthy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert e.healthy()
    run(engine, body, stall_timeout=0.2)


def test_a_failed_load_is_dead() -> None:
    def broken() -> Any:
        raise FileNotFoundError("no such model")

    async def main() -> None:
        e = AsyncEngine(broken, 4, 60.0)
        e.start(asyncio.get_running_loop())
        while e.state is EngineState.LOADING:
            await asyncio.sleep(0.01)
        assert e.state is EngineState.DEAD and "no such model" in (e.error or "")
        with pytest.raises(RequestRejected):
            await e.add("x", [1], params())
    asyncio.run(main())
