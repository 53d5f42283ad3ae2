"""The engine: owns the model, the KV cache and every request's state; one step at a time."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from rillet.config import EngineConfig
from rillet.engine.block_manager import KVCacheManager
from rillet.engine.kv_cache import KVShifter, allocate_kv_cache, plan_kv_cache
from rillet.engine.model_runner import ModelRunner
from rillet.engine.outputs import RequestOutput, SampledToken, SchedulerOutput
from rillet.engine.policy import PolicyConfig, QoETarget, SchedulingPolicy, StepTimeModel
from rillet.engine.scheduler import Scheduler, SchedulerConfig
from rillet.kernels import cpu as cpu_kernels
from rillet.loaders import default_model_path, format_cache, load_model
from rillet.models.weight_formats import apply_quantization
from rillet.request import ContextOverflow, ContextPolicy, FinishReason, Request, truncate_left
from rillet.sampling_params import SamplingParams
from rillet.tokenizer.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_dtype(name: str, dtype: torch.dtype, quantization: str) -> torch.dtype:
    """auto: float16 with float32 weights and a fast weight format (decode attention reads the cache: half
    the bytes); the exact path (quantization none) and bfloat16 models keep the model's dtype."""
    if name == "auto":
        return torch.float16 if dtype == torch.float32 and quantization != "none" else dtype
    return _DTYPES[name]


FAULT_ENV = "RILLET_INJECT_FAULT"
STALL_S = 4.0


class InjectedFault(RuntimeError):
    """Raised inside the model's forward by the fault-injection test hook."""


def install_fault_hook(model: nn.Module, spec: str) -> None:
    """A test hook (`RILLET_INJECT_FAULT=spec`): make the model's forward raise.

    `token=ID`: every forward whose input holds token ID raises (so only the steps that prefill a
    prompt holding it fail); `after=N`: every forward after the first N raises (the engine cannot
    recover); `stall=ID`: a forward whose input holds token ID sleeps `STALL_S` seconds (a wedged
    step). Nothing is installed without the environment variable.
    """
    kind, _, value = spec.partition("=")
    if kind not in ("token", "after", "stall") or not value.strip().isdigit():
        raise ValueError(f"{FAULT_ENV} must be token=ID, after=N or stall=ID, got {spec!r}")
    number, num_calls = int(value), 0

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal num_calls
        num_calls += 1
        if kind == "token" and bool((args[0] == number).any()):
            raise InjectedFault(f"injected fault: token {number} in the batch")
        if kind == "after" and num_calls > number:
            raise InjectedFault(f"injected fault: forward {num_calls} (after {number})")
        if kind == "stall" and bool((args[0] == number).any()):
            time.sleep(STALL_S)

    logger.warning("fault injection is on (%s=%s): the model's forward will fail or stall", FAULT_ENV, spec)
    model.register_forward_pre_hook(hook)


class Engine:
    def __init__(self, model: str | None = None, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = _DTYPES[config.dtype]
        cpu_kernels.prefetch()
        max_len = config.max_model_len or 1 << 30
        model = model or default_model_path()
        self.model, self.model_config, self.tokenizer = load_model(model, dtype)
        self.max_model_len = min(max_len, self.model_config.max_position)
        start = time.perf_counter()
        cache = format_cache.entry_path(Path(model), config.quantization, config.lm_head_quantization, config.dtype)
        with format_cache.cached(cache):
            apply_quantization(self.model, config.quantization, config.lm_head_quantization)
        logger.info("weight formats %s / %s ready in %.1f s", config.quantization, config.lm_head_quantization,
                    time.perf_counter() - start)
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype, config.quantization)
        plan = plan_kv_cache(self.model_config, config, self.kv_dtype, self.max_model_len)
        allocate_kv_cache(self.model, self.model_config, plan, config.block_size, self.kv_dtype)
        self.kv_plan = plan
        self.kv_shifter = KVShifter(self.model, self.model_config, config.block_size)
        self.kv = KVCacheManager(config.block_size, plan.num_blocks, plan.windows, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
                            policy=PolicyConfig(SchedulingPolicy(config.scheduling_policy),
                                                fair_tenants=config.fairness == "tenant"),
                            default_qoe=QoETarget(config.qoe_ttft_s, config.qoe_tokens_per_s),
                            max_stall_s=config.max_stall_ms / 1000 if config.max_stall_ms else None), self.kv)
        self.runner = ModelRunner(self.model, config.block_size, plan.windows, self.tokenizer.eos_token_ids)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.parents: dict[str, tuple[str, int]] = {}  # child request id -> (request id, choice index)
        self.children: dict[str, list[str]] = {}  # request id -> child request ids
        self.last_schedule: SchedulerOutput | None = None
        self._warm_up()
        if os.environ.get(FAULT_ENV):
            install_fault_hook(self.model, os.environ[FAULT_ENV])

    def _warm_up(self) -> None:
        """Run a short prompt and one decode step before the first request does: the process's first
        step took ~0.6 s (first calls, first-touched memory) against ~20 ms for the next, which the
        first user waited for and the step-time model learned as a prompt cost ~30x too high."""
        start = time.perf_counter()
        # Fewer tokens than a block (where a block holds more than one): nothing enters the prefix cache.
        num = max(1, min(7, self.config.block_size - 1))
        ids = [i % self.model_config.vocab_size for i in range(1, num + 1)]
        self.add_request("rillet-warm-up", ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while self.has_unfinished():
            self.step()
        self.scheduler.step_time = StepTimeModel()
        logger.info("warmed up in %.1f s", time.perf_counter() - start)

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.kv_plan.num_blocks[0] - 1) * self.config.block_size

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    context: ContextPolicy | None = None, score_prompt: bool = False,
                    qoe: QoETarget | None = None, priority: int = 0, tenant: str = "") -> list[int]:
        """Queue a request (n choices become n sequences). Returns the prompt's token ids (as kept).

        `context` says what happens past the context limit; `score_prompt` asks for the
        log-probability of every prompt token (in the first output).
        """
        context = context or ContextPolicy()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        num_truncated = 0
        if context.mode is ContextOverflow.TRUNCATE_LEFT:
            kept = truncate_left(prompt_ids, params.max_tokens, self.max_model_len)
            num_truncated, prompt_ids = len(prompt_ids) - len(kept), kept
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        params.verify_vocab(self.model_config.vocab_size)
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            child_params = dataclasses.replace(params, n=1, seed=seed) if params.n > 1 else params
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(child_id, prompt_ids, child_params, self.tokenizer.eos_token_ids,
                                    context=context, score_prompt=score_prompt, num_truncated_tokens=num_truncated,
                                    qoe=qoe, priority=priority, tenant=tenant))
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already in use")
        for index, req in enumerate(children):
            self.scheduler.add_request(req)  # may raise: every child passes the same checks
            self.parents[req.request_id] = (request_id, index)
            self.detokenizers[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, params.skip_special_tokens, list(params.stop))
        self.children[request_id] = [req.request_id for req in children]
        return prompt_ids

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks are free before the next step."""
        for child_id in list(self.children.get(request_id, ())):
            if self.scheduler.abort(child_id) is not None:
                self._forget(child_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        schedule = self.last_schedule = self.scheduler.schedule()
        if not schedule.seqs:
            return []
        self.kv_shifter.apply(schedule.kv_shifts)  # sink evictions: kept keys move back
        sampled = self.runner.execute(schedule)
        for rid, scores in self.runner.prompt_logprobs.items():
            self.scheduler.requests[rid].prompt_logprobs.extend(scores)
        advanced = self.scheduler.update(schedule, {rid: t.token_id for rid, t in sampled.items()})
        outputs = [self._output(req, sampled[req.request_id]) for req in advanced]
        # NOTE: the whole step, as a stream sees it: scheduling and detokenizing included.
        self.scheduler.observe_step(schedule, time.perf_counter() - start)
        return outputs

    def _output(self, req: Request, token: SampledToken) -> RequestOutput:
        detok = self.detokenizers[req.request_id]
        text = detok.push([token.token_id])
        if detok.stopped and not req.is_finished:
            self.scheduler.finish(req, FinishReason.STOP)
            req.stop_reason = detok.matched_stop
        elif req.is_finished and not detok.stopped:
            text += detok.flush()
        parent, index = self.parents[req.request_id]
        out = RequestOutput(
            request_id=parent, index=index, new_token_ids=[token.token_id], text=text,
            finished=req.is_finished, finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=req.stop_reason, logprobs=[token] if req.params.logprobs is not None else None,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            overflow=req.overflow_report() if req.is_finished else None,
            prompt_logprobs=[None, *req.prompt_logprobs] if req.score_prompt and req.num_output_tokens == 1 else None)
        if req.is_finished:
            self._forget(req.request_id)
        return out

    def _forget(self, child_id: str) -> None:
        self.runner.release(child_id)
        self.detokenizers.pop(child_id, None)
        parent, _ = self.parents.pop(child_id)
        siblings = self.children[parent]
        siblings.remove(child_id)
        if not siblings:
            del self.children[parent]
