"""OpenAI API request models, mapped onto `SamplingParams` (the responses are in `responses.py`).

Requests are validated strictly (a string where a number belongs is a 400, not a conversion);
ranges are checked once, by `SamplingParams`, so the server and the Python API agree.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rillet.request import ContextOverflow, ContextPolicy
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
