"""OpenAI API response models, and the builders that turn engine outputs into responses or stream chunks."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from rillet.engine.outputs import RequestOutput, SampledToken
from rillet.request import ContextPolicy, OverflowReport


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] | None = []
    text_offset: list[int] = []


class ContextOverflowInfo(BaseModel):
    """What the choice lost to the context limit (with context_overflow truncate_left or sink)."""

    mode: str
    num_truncated_tokens: int = 0
    num_evicted_tokens: int = 0
    num_evictions: int = 0
    first_eviction_at: int | None = None

    @classmethod
    def of(cls, report: OverflowReport | None) -> ContextOverflowInfo | None:
        return None if report is None else cls(**dataclasses.asdict(report))


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    context_overflow: ContextOverflowInfo | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with `object` unchanged, as OpenAI streams it) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    context_overflow: ContextOverflowInfo | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": ...}; {} with the finish
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    context_overflow: ContextOverflowInfo | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rillet"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- engine outputs -> responses --------------------------------------------------------------------

class _Choice:
    """What one choice has produced so far."""

    def __init__(self) -> None:
        self.pieces: list[str] = []  # joined once, at the end: += per token is quadratic in long streams
        self.num_chars = 0
        self.logprobs: list[SampledToken] = []
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.overflow: OverflowReport | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ResponseBuilder:
    """Turns one request's `RequestOutput`s into an OpenAI response, or into stream chunks."""

    def __init__(self, request_id: str, model: str, n: int, num_logprobs: int | None,
                 token_bytes: Callable[[int], bytes]) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.want_logprobs = num_logprobs is not None
        self.token_bytes = token_bytes
        self.choices = [_Choice() for _ in range(n)]
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.context = ContextPolicy()

    def add(self, out: RequestOutput) -> None:
        c = self.choices[out.index]
        if out.text:
            c.pieces.append(out.text)
            c.num_chars += len(out.text)
        c.logprobs.extend(out.logprobs or [])
        c.num_output_tokens = max(c.num_output_tokens, out.num_output_tokens)
        if out.finished:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
            c.overflow = out.overflow
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)

    def usage(self) -> Usage:
        completion = sum(c.num_output_tokens for c in self.choices)
        return Usage(prompt_tokens=self.num_prompt_tokens, completion_tokens=completion,
                     total_tokens=self.num_prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens))

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # Overridden per endpoint.
    def opening_chunks(self) -> list[BaseModel]:
        return []

    def chunk(self, out: RequestOutput) -> BaseModel | None:
        raise NotImplementedError

    def usage_chunk(self) -> BaseModel:
        raise NotImplementedError

    def response(self) -> BaseModel:
        raise NotImplementedError


class CompletionBuilder(ResponseBuilder):
    # echo: the prompt's text and ids, put before each choice's first output
    echo_text: str | None = None
    echo_prompt_ids: list[int] = []

    def add(self, out: RequestOutput) -> None:
        super().add(self._echo(out))

    def _echo(self, out: RequestOutput) -> RequestOutput:
        """The choice's first output with the prompt (and its logprobs, if scored) in front."""
        if self.echo_text is None or self.choices[out.index].num_chars or self.choices[out.index].logprobs:
            return out
        scores = out.prompt_logprobs or []
        prompt = [SampledToken(t, lp, []) for t, lp in zip(self.echo_prompt_ids, scores)]
        return dataclasses.replace(out, text=self.echo_text + out.text,
                                   logprobs=prompt + (out.logprobs or []) if out.logprobs is not None else None)

    def chunk(self, out: RequestOutput) -> BaseModel | None:
        offset = self.choices[out.index].num_chars
        out = self._echo(out)
        self.add(out)
        if not (out.text or out.finished or out.logprobs):
            return None
        logprobs = self._logprobs(out.logprobs or [], offset) if self.want_logprobs else None
        choice = CompletionChoice(index=out.index, text=out.text, logprobs=logprobs,
                                  finish_reason=out.finish_reason if out.finished else None,
                                  stop_reason=out.stop_reason if out.finished else None,
                                  context_overflow=ContextOverflowInfo.of(out.overflow))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self) -> BaseModel:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=[],
                                  usage=self.usage())

    def response(self) -> BaseModel:
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                    context_overflow=ContextOverflowInfo.of(c.overflow),
                                    logprobs=self._logprobs(c.logprobs, 0) if self.want_logprobs else None)
                   for i, c in enumerate(self.choices)]
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())

    def _logprobs(self, tokens: list[SampledToken], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for t in tokens:
            text = self.token_text(t.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(t.logprob)
            assert out.top_logprobs is not None
            out.top_logprobs.append({self.token_text(i): lp for i, lp in t.top_logprobs or []})
            out.text_offset.append(offset)
            offset += len(text)
        return out


class ChatBuilder(ResponseBuilder):
    def opening_chunks(self) -> list[BaseModel]:
        return [self._chunk(ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}))
                for i in range(len(self.choices))]

    def chunk(self, out: RequestOutput) -> BaseModel | None:
        self.add(out)
        if not (out.text or out.finished or out.logprobs):
            return None
        logprobs = self._logprobs(out.logprobs or []) if self.want_logprobs else None
        delta = {"content": out.text} if out.text else {}
        return self._chunk(ChatChunkChoice(index=out.index, delta=delta, logprobs=logprobs,
                                           finish_reason=out.finish_reason if out.finished else None,
                                           stop_reason=out.stop_reason if out.finished else None,
                                           context_overflow=ContextOverflowInfo.of(out.overflow)))

    def usage_chunk(self) -> BaseModel:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=[],
                                   usage=self.usage())

    def response(self) -> BaseModel:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason, context_overflow=ContextOverflowInfo.of(c.overflow),
                              logprobs=self._logprobs(c.logprobs) if self.want_logprobs else None)
                   for i, c in enumerate(self.choices)]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=self.usage())

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=[choice])

    def _logprobs(self, tokens: list[SampledToken]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(**self._top(t.token_id, t.logprob).model_dump(),
                             top_logprobs=[self._top(i, lp) for i, lp in t.top_logprobs or []])
            for t in tokens])

    def _top(self, token_id: int, logprob: float | None) -> TopLogprob:
        raw = self.token_bytes(token_id)
        # NOTE: OpenAI reports impossible tokens as -9999.0 rather than -inf, which JSON cannot carry.
        value = -9999.0 if logprob is None or logprob == float("-inf") else logprob
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=value, bytes=list(raw))
