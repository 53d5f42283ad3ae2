"""The state of one generation request, as the scheduler sees it. Pure Python."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from rillet.engine.policy import QoETarget, ReaderClock
from rillet.sampling_params import SamplingParams


class ContextOverflow(str, enum.Enum):
    """What a request does when its sequence outgrows the context limit."""

    ERROR = "error"  # refuse the request (or stop at the limit)
    TRUNCATE_LEFT = "truncate_left"  # cut the prompt's oldest tokens so the request fits
    SINK = "sink"  # StreamingLLM: keep the first tokens and a recent window, evict the middle


DEFAULT_NUM_SINK_TOKENS = 4


@dataclass(frozen=True)
class ContextPolicy:
    mode: ContextOverflow = ContextOverflow.ERROR
    num_sink_tokens: int = DEFAULT_NUM_SINK_TOKENS  # sink mode: the attention sinks kept at the start

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ContextOverflow(self.mode))
        if isinstance(self.num_sink_tokens, bool) or not isinstance(self.num_sink_tokens, int) \
                or self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be an integer >= 0, got {self.num_sink_tokens!r}")


@dataclass(frozen=True)
class OverflowReport:
    """What a request lost to the context limit; sent with its final output, never silently."""

    mode: str
    num_truncated_tokens: int = 0  # truncate_left: prompt tokens cut from the left
    num_evicted_tokens: int = 0  # sink: tokens no longer in the KV cache
    num_evictions: int = 0
    first_eviction_at: int | None = None  # sink: the sequence length when the cache first overflowed


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # the engine failed while running it


@dataclass(eq=False)
class Request:
    """A sequence whose `num_computed_tokens` catches up with `len(token_ids)`.

    Prefill, chunked prefill, decode and recompute after preemption are all the same
    arithmetic: each step computes some of the tokens not yet in the KV cache.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    context: ContextPolicy = field(default_factory=ContextPolicy)
    score_prompt: bool = False  # compute the log-probability of every prompt token
    qoe: QoETarget | None = None  # the reader's expectations (None: the scheduler's default)
    priority: int = 0  # the priority policy serves lower numbers first
    tenant: str = ""  # who sent it (API key or `user`), for fair sharing between tenants
    # token_ids = prompt_ids + generated ids
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache at admission
    num_preemptions: int = 0
    # Sink mode. The KV cache holds tokens [0, num_sink_tokens) and [num_sink_tokens +
    # num_evicted_tokens, num_computed_tokens); token i >= num_sink_tokens sits at cache
    # position i - num_evicted_tokens, which is also its rotary position.
    num_evicted_tokens: int = 0
    num_evictions: int = 0
    first_eviction_at: int | None = None
    num_truncated_tokens: int = 0
    prompt_logprobs: list[float | None] = field(default_factory=list)  # score_prompt: [None, lp(1), ...]
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    # Streaming: the reader the output tokens feed (its clock holds what the scheduler needs).
    reader: ReaderClock | None = None
    served_last_step: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        if self.qoe is not None:
            self.reader = ReaderClock(self.qoe, self.arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens whose keys and values are in the cache (all of them, until a sink eviction)."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def is_sink(self) -> bool:
        return self.context.mode is ContextOverflow.SINK

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Why the request must stop after its newest token, if it must."""
        params, last = self.params, self.token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = last
                return FinishReason.STOP
            if last in params.stop_token_ids:
                self.stop_reason = last
                return FinishReason.STOP
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if self.num_tokens >= max_model_len and not self.is_sink:
            return FinishReason.LENGTH
        return None

    def overflow_report(self) -> OverflowReport | None:
        if self.context.mode is ContextOverflow.ERROR:
            return None
        return OverflowReport(self.context.mode.value, self.num_truncated_tokens, self.num_evicted_tokens,
                              self.num_evictions, self.first_eviction_at)


def truncate_left(prompt_ids: list[int], max_tokens: int | None, max_model_len: int) -> list[int]:
    """The prompt's newest tokens that leave room for `max_tokens` (a quarter of the context if None)."""
    room = max_model_len - (max_tokens if max_tokens is not None else max_model_len // 4)
    if room < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for the prompt within the context limit "
                         f"of {max_model_len} tokens")
    return prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids
