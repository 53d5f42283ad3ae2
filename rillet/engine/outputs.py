"""Plain data passed between scheduler, model runner and engine."""
from __future__ import annotations

from dataclasses import dataclass, field

from rillet.engine.sink import KVShift
from rillet.request import OverflowReport
from rillet.sampling_params import SamplingParams


@dataclass
class ScheduledSeq:
    """One request's share of a step: compute `token_ids` starting at `start_pos` (the cache position)."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_tables: list[list[int]]  # one per KV group
    # Set when this chunk reaches the end of the known tokens, so the step samples a successor.
    params: SamplingParams | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    # Prompt scoring: the next prompt token after each of `token_ids` (shorter at the prompt's end).
    prompt_targets: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def samples(self) -> bool:
        return self.params is not None


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted_ids: list[str] = field(default_factory=list)
    kv_shifts: list[KVShift] = field(default_factory=list)  # sink evictions to apply before the step

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request_id: s.num_tokens for s in self.seqs}

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request; `text` is the newly completed text."""

    request_id: str
    index: int  # which of the request's n choices
    new_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[SampledToken] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    overflow: OverflowReport | None = None  # with the final output, when the context overflowed
    prompt_logprobs: list[float | None] | None = None  # score_prompt: with the first output
