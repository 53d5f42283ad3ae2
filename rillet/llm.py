"""Offline Python API: `LLM(...).generate(prompts, params)` and `LLM(...).stream(prompt, params)`."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.engine.outputs import RequestOutput, SampledToken
from rillet.sampling_params import SamplingParams


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[SampledToken] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    """`LLM()` runs the embedded default model; `LLM(model=PATH)` a GGUF file or HF folder."""

    def __init__(self, model: str | None = None, **engine_options: object) -> None:
        self.engine = Engine(model, EngineConfig(**engine_options))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | None = None) -> list[GenerationResult]:
        """Generate for every prompt at once (continuously batched); one result per prompt."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        results: dict[str, GenerationResult] = {}
        for prompt in prompts:
            rid = str(next(self._ids))
            ids = self.engine.add_request(rid, prompt, params)  # type: ignore[arg-type]
            results[rid] = GenerationResult(rid, ids, [Completion(i) for i in range(params.n)])
        while self.engine.has_unfinished():
            for out in self.engine.step():
                _accumulate(results[out.request_id], out)
        return list(results.values())

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield each step's new text and tokens for one prompt as they are produced."""
        rid = str(next(self._ids))
        self.engine.add_request(rid, prompt, params or SamplingParams())
        try:
            while self.engine.has_unfinished():
                yield from self.engine.step()
        finally:
            self.engine.abort(rid)


def _accumulate(result: GenerationResult, out: RequestOutput) -> None:
    c = result.outputs[out.index]
    c.text += out.text
    c.token_ids.extend(out.new_token_ids)
    if out.logprobs is not None:
        c.logprobs = (c.logprobs or []) + out.logprobs
    if out.finished:
        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        result.usage.prompt_tokens = out.num_prompt_tokens
        result.usage.completion_tokens += out.num_output_tokens
        result.usage.cached_tokens = max(result.usage.cached_tokens, out.num_cached_tokens)
