"""OpenAI API request and response models: requests onto `SamplingParams`, engine outputs onto responses.

Requests are validated strictly (a string where a number belongs is a 400, not a conversion);
ranges are checked once, by `SamplingParams`, so the server and the Python API agree.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rillet.engine.outputs import RequestOutput, SampledToken
from rillet.request import ContextOverflow, ContextPolicy, OverflowReport
from rillet.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request the server cannot serve as sent; `param` names the field (a 400)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class QoEOptions(_Strict):
    """What the reader of this stream expects: the first token within `ttft_s`, then `tokens_per_s`."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt target must not pass silently

    ttft_s: float = Field(1.0, ge=0, le=3600)
    tokens_per_s: float = Field(5.0, gt=0, le=100000)


class _GenerationRequest(_Strict):
    """The sampling fields both generation endpoints share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Past the context limit: refuse (error), cut the prompt's start (truncate_left), or keep
    # the first tokens and a recent window (sink, StreamingLLM).
    context_overflow: Literal["error", "truncate_left", "sink"] | None = None
    num_sink_tokens: int | None = None
    qoe: QoEOptions | None = None  # the scheduler's qoe policy keeps this stream ahead of this reader
    priority: int = Field(0, ge=-1000000, le=1000000)  # the priority policy serves lower numbers first
    stream_pace: bool | None = None  # stream at the reader's speed; the surplus becomes scheduler slack

    def context_policy(self) -> ContextPolicy:
        if self.num_sink_tokens is not None and self.context_overflow != "sink":
            raise RequestError("num_sink_tokens", 'num_sink_tokens needs "context_overflow": "sink"')
        try:
            return ContextPolicy(ContextOverflow(self.context_overflow or "error"),
                                 *(() if self.num_sink_tokens is None else (self.num_sink_tokens,)))
        except ValueError as e:
            raise RequestError("num_sink_tokens", str(e)) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises `SamplingParamsError` (with the parameter's name) for an invalid value."""
        fields = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "stop", "stop_token_ids", "logit_bias", "ignore_eos",
                  "min_tokens", "skip_special_tokens")
        values: dict[str, Any] = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        return SamplingParams(**values, max_tokens=max_tokens, logprobs=logprobs)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request; batches of prompts are refused."""
        p = self.prompt
        if isinstance(p, str) or all(isinstance(t, int) for t in p):
            return p  # type: ignore[return-value]
        if len(p) == 1:
            return p[0]  # type: ignore[return-value]
        raise RequestError("prompt", "batches of prompts are not supported; send one prompt per request")

    def check_supported(self) -> None:
        if self.suffix:
            raise RequestError("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of", "best_of is not supported (it must equal n)")


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


# OpenAI's roles, and Llama 3.1's `ipython` (tool results in its template).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        return role

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # NOTE: only an assistant turn may come without content (it made tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template sees it: text parts joined into one string."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "\n".join(part.text or "" for part in self.content)
        return out

    def non_text_part(self) -> str | None:
        if isinstance(self.content, list):
            return next((p.type for p in self.content if p.type != "text"), None)
        return None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check_supported(self) -> None:
        for i, message in enumerate(self.messages):
            kind = message.non_text_part()
            if kind is not None:
                raise RequestError(f"messages.{i}.content",
                                   f"content parts of type {kind!r} are not supported, only text")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise RequestError("response_format", 'only response_format {"type": "text"} is supported')
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "top_logprobs needs logprobs: true")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = False


# -- responses ------------------------------------------------------------------------------------

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
        self.text = ""
        self.logprobs: list[SampledToken] = []
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.overflow: OverflowReport | None = None


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
        c.text += out.text
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
        if self.echo_text is None or self.choices[out.index].text or self.choices[out.index].logprobs:
            return out
        scores = out.prompt_logprobs or []
        prompt = [SampledToken(t, lp, []) for t, lp in zip(self.echo_prompt_ids, scores)]
        return dataclasses.replace(out, text=self.echo_text + out.text,
                                   logprobs=prompt + (out.logprobs or []) if out.logprobs is not None else None)

    def chunk(self, out: RequestOutput) -> BaseModel | None:
        offset = len(self.choices[out.index].text)
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
