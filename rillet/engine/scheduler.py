"""Decides what each step computes, within a token budget. Pure Python.

There is no prefill phase and no decode phase: every request has `num_computed_tokens`
catching up with its token count, and a step gives each request some tokens of the budget.
Running requests go first (those one token behind, the streams, before partial prefills),
then waiting requests are admitted with whatever budget is left, so a long prompt is
prefilled in chunks while the streams keep receiving a token every step.

Within that, a policy (policy.py) decides who goes first when not everyone fits: fcfs, priority,
or qoe (least slack first; streams far ahead of their readers pause). With a stall target, the
prefill tokens of a step are capped so that the step, and so every stream's gap, stays under it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rillet.engine.block_manager import KVCacheManager
from rillet.engine.outputs import ScheduledSeq, SchedulerOutput
from rillet.engine.policy import (Candidate, Isolation, Policy, PolicyConfig, QoETarget, ReaderClock, SchedulingPolicy,
                                  StepTimeModel)
from rillet.engine.sink import KVShift, max_sink_chunk, num_tokens_to_evict
from rillet.request import FinishReason, Request, RequestStatus

_STALL_MARGIN = 0.75  # prefill chunks aim at this share of --max-stall-ms
_UNCALIBRATED_PREFILL_CAP = 128  # prompt tokens per step beside streams until the step-time model has data


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    default_qoe: QoETarget = field(default_factory=QoETarget)
    max_stall_s: float | None = None  # cap prefill per step so streams' gaps stay under this


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock
        self.policy = Policy(config.policy)
        self.step_time = StepTimeModel()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        limit = self.config.max_model_len
        if req.is_sink:
            if self._max_sink_chunk(req) == 0:
                raise ValueError(f"sink mode with {req.context.num_sink_tokens} sink tokens needs a larger "
                                 f"context limit than {limit} tokens")
        elif req.num_tokens >= limit:
            raise ValueError(f"the prompt has {req.num_tokens} tokens; the context limit is {limit}")
        peak = limit if req.params.max_tokens is None else min(limit, req.num_tokens + req.params.max_tokens)
        if not self.kv.can_ever_fit(peak, self.config.max_num_batched_tokens):
            raise ValueError(f"a sequence of {peak} tokens can never fit in the KV cache; "
                             "lower max_tokens or give the cache more memory")
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.reader is None:
            req.reader = ReaderClock(req.qoe or self.config.default_qoe, req.arrival_time)
        self.policy.counters.activate(req.tenant, (r.tenant for r in self.requests.values()))
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self, isolate: bool = True) -> SchedulerOutput:
        now = self.clock()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        preempted: list[str] = []
        shifts: dict[str, KVShift] = {}
        running = {r: self._candidate(r) for r in self.running}  # the policy's view, built once per step
        paused = self.policy.paused(list(running.values()), [self._candidate(r) for r in self.waiting],
                                    self.config.max_num_seqs - len(self.running), now)
        # Batch slots: at most max_num_seqs requests per step, in the policy's order (under qoe
        # more may be running, the furthest ahead of their readers holding KV but no slot).
        ranked = sorted((r for r in self.running if r.request_id not in paused),
                        key=lambda r: self.policy.rank(running[r], now))
        served = ranked[:self.config.max_num_seqs]
        served = served[:self.policy.trim([running[r] for r in served], now, self.step_time, self._step_target_s())]
        num_served = len(served)
        isolation = None
        if isolate and self.policy.config.fair_tenants:
            first = min(self.waiting, key=lambda r: self._rank(r, now), default=None)  # the next to be admitted
            isolation = self.policy.isolate([running[r] for r in served], self._candidate(first) if first else None)
            if isolation is not None:
                served = [r for r in served if r.request_id not in isolation.held]
        num_streams = sum(1 for r in served if r.num_tokens - r.num_computed_tokens == 1)
        prefill_cap = self._prefill_cap(num_streams, max((r.num_kv_tokens for r in served
                                                          if r.num_tokens - r.num_computed_tokens > 1), default=0))
        # Streams (one token behind) first, then partial prefills, each in the policy's order.
        for req in sorted(served, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0 or req.status is not RequestStatus.RUNNING:
                continue
            remaining = req.num_tokens - req.num_computed_tokens
            num_new = min(remaining, budget if remaining == 1 else min(budget, prefill_cap))
            if num_new == 0:
                continue
            if req.is_sink:
                num_new = min(num_new, self._max_sink_chunk(req))
                self._make_room(req, num_new, shifts)
            while not self.kv.allocate(req, num_new):
                victim = self._victim(now)
                budget += scheduled.pop(victim, 0)
                shifts.pop(victim.request_id, None)  # its blocks are gone: nothing to move
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled[req] = num_new
                budget -= num_new
                if remaining > 1:
                    prefill_cap -= num_new
        if not preempted:
            budget = self._admit(scheduled, min(budget, prefill_cap), now, len(paused), isolation)
        if not scheduled and len(served) < num_served:  # the isolated request could not start: no one waits for it
            return self.schedule(isolate=False)
        for req in self.running:
            req.served_last_step = req in scheduled
        return SchedulerOutput([self._seq(req, n) for req, n in scheduled.items()], preempted,
                               list(shifts.values()))

    def _max_sink_chunk(self, req: Request) -> int:
        return max_sink_chunk(self.config.max_model_len, req.context.num_sink_tokens, self.kv.block_size,
                              self.kv.windows)

    def _make_room(self, req: Request, num_new: int, shifts: dict[str, KVShift]) -> None:
        """Sink mode: evict the tokens after the sinks that `num_new` more would push past the limit."""
        num_evict = num_tokens_to_evict(req.num_kv_tokens, num_new, self.config.max_model_len,
                                        self.kv.block_size)
        if num_evict == 0:
            return
        if req.first_eviction_at is None:
            req.first_eviction_at = req.num_computed_tokens
        shifts[req.request_id] = self.kv.evict(req, num_evict)
        req.num_evicted_tokens += num_evict
        req.num_evictions += 1

    # -- policy ---------------------------------------------------------------------------------
    def _candidate(self, req: Request) -> Candidate:
        return Candidate(req.request_id, req.arrival_time, req.priority, req.tenant, req.reader,
                         req.served_last_step)

    def _rank(self, req: Request, now: float) -> tuple[float, ...]:
        return self.policy.rank(self._candidate(req), now)

    def _victim(self, now: float) -> Request:
        """The running request to preempt when blocks run out."""
        if self.policy.config.policy is SchedulingPolicy.FCFS and not self.policy.config.fair_tenants:
            return self.running[-1]  # the newest running request
        rid = self.policy.victim([self._candidate(r) for r in self.running], now)
        return self.requests[rid]

    def _step_target_s(self) -> float:
        """The step time a reader tolerates: the stall target, else the default reading interval."""
        return self.config.max_stall_s or 1.0 / self.config.default_qoe.tokens_per_s

    def _prefill_cap(self, num_streams: int, context: int) -> int:
        """Most prompt tokens this step may carry, continuing a prompt `context` tokens in, without
        stalling `num_streams` streams past the target (aiming a little below it: the fit is a mean)."""
        budget = self.config.max_num_batched_tokens
        if self.config.max_stall_s is None or num_streams == 0:
            return budget
        cap = self.step_time.max_prefill_tokens(num_streams + 1, _STALL_MARGIN * self.config.max_stall_s, context)
        if cap is None:  # not calibrated yet (the first few steps): a chunk that is short on any model here
            cap = _UNCALIBRATED_PREFILL_CAP
        return min(budget, max(cap, self.kv.block_size))

    def observe_step(self, out: SchedulerOutput, seconds: float) -> None:
        """The time of the step that ran `out`: teaches the step-time model behind the stall bound."""
        prefills = [s for s in out.seqs if s.num_tokens > 1]
        pairs = sum(s.num_tokens * (s.start_pos + s.num_tokens) for s in prefills)
        self.step_time.observe(len(out.seqs), sum(s.num_tokens for s in prefills), seconds, pairs)

    def _admission_order(self, now: float) -> list[Request]:
        if self.policy.config.policy is SchedulingPolicy.FCFS and not self.policy.config.fair_tenants:
            return list(self.waiting)
        return sorted(self.waiting, key=lambda r: self._rank(r, now))

    def _admit(self, scheduled: dict[Request, int], budget: int, now: float = 0.0, num_paused: int = 0,
               isolation: Isolation | None = None) -> int:
        # NOTE: under qoe, paused streams hold KV but no batch slot: up to max_num_seqs are served
        # per step, and up to 4x that may be admitted while their readers have text buffered.
        qoe = self.policy.config.policy is SchedulingPolicy.QOE
        max_running = 4 * self.config.max_num_seqs if qoe else self.config.max_num_seqs
        for req in self._admission_order(now):
            if budget <= 0 or len(scheduled) >= self.config.max_num_seqs or len(self.running) >= max_running:
                break
            if qoe and len(self.running) - num_paused >= self.config.max_num_seqs:
                break
            if isolation is not None and not self.policy.joins(isolation, req.tenant):
                continue  # a step isolated for a lighter tenant's first token
            hit = self.kv.find_prefix(req) if req.num_computed_tokens == 0 else None
            start = hit.num_tokens if hit else req.num_computed_tokens
            num_new = min(req.num_tokens - start, budget)
            if req.is_sink:
                num_new = min(num_new, self._max_sink_chunk(req))
            if not self.kv.allocate(req, num_new, hit):
                break
            self.waiting.remove(req)
            req.num_computed_tokens = start
            if req.num_preemptions == 0:
                req.num_cached_tokens = start
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req] = num_new
            budget -= num_new
        return budget

    def _seq(self, req: Request, num_new: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        seq = ScheduledSeq(req.request_id, req.token_ids[start:start + num_new], req.num_kv_tokens,
                           self.kv.get_block_tables(req.request_id))
        if req.score_prompt and start + 1 < req.num_prompt_tokens:
            seq.prompt_targets = req.prompt_ids[start + 1:start + num_new + 1]
        if start + num_new == req.num_tokens:
            seq.params, seq.prompt_ids, seq.output_ids = req.params, req.prompt_ids, req.output_ids
        return seq

    def _preempt(self, req: Request) -> None:
        """Free all of the request's blocks; it is recomputed from its tokens when readmitted."""
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_evicted_tokens = 0
        req.prompt_logprobs.clear()
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the model ran --------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish what must stop.

        Returns the requests that received a token this step.
        """
        advanced = []
        now = self.clock()
        for seq in out.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += seq.num_tokens
            self.kv.cache_blocks(req)
            samples = seq.request_id in sampled
            self.policy.counters.charge(req.tenant, seq.num_tokens - samples, int(samples))
            if not samples:
                continue
            req.append_token(sampled[seq.request_id])
            if req.reader is not None:
                req.reader.deliver(now)
            advanced.append(req)
            reason = req.check_stop(self.config.max_model_len)
            if reason is not None:
                self.finish(req, reason)
        return advanced

    def finish(self, req: Request, reason: FinishReason) -> None:
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, FinishReason.ABORT)
        return req
