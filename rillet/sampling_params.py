"""How one request wants its tokens chosen, validated once when the request arrives.

Pure Python: the HTTP layer validates with it and the scheduler reads it, and neither needs torch.
Ranges follow the OpenAI API where it has the parameter, and vLLM where it does not.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_ABS_LOGIT_BIAS = 100.0
MAX_ABS_PENALTY = 2.0  # presence_penalty, frequency_penalty
# torch.Generator.manual_seed accepts exactly this range.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid; `param` names it as the API spells it (for a 400 reply)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping options of one request.

    `stop` accepts a string or a list and `stop_token_ids` a list; both are stored as tuples.
    `logit_bias` accepts string keys (JSON objects have no integer keys); they are stored as ints.
    """

    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens; 1: off
    presence_penalty: float = 0.0  # over output tokens
    frequency_penalty: float = 0.0  # over output tokens, per occurrence
    logit_bias: dict[int, float] | None = field(default=None, hash=False)
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per token; 0: only the chosen token's
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._set("n", _integer("n", self.n, lo=1, hi=MAX_N))
        self._set("temperature", _number("temperature", self.temperature, lo=0.0))
        top_p = _number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        self._set("top_p", top_p)
        top_k = _integer("top_k", self.top_k)
        if top_k < -1:
            raise SamplingParamsError("top_k", f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k!r}")
        self._set("top_k", top_k)
        self._set("min_p", _number("min_p", self.min_p, lo=0.0, hi=1.0))
        penalty = _number("repetition_penalty", self.repetition_penalty)
        if not penalty > 0.0:
            raise SamplingParamsError("repetition_penalty",
                                      f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        self._set("repetition_penalty", penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _number(name, getattr(self, name), lo=-MAX_ABS_PENALTY, hi=MAX_ABS_PENALTY))
        self._set("logit_bias", _logit_bias(self.logit_bias))
        if self.seed is not None:
            self._set("seed", _integer("seed", self.seed, lo=MIN_SEED, hi=MAX_SEED))
        if self.max_tokens is not None:
            self._set("max_tokens", _integer("max_tokens", self.max_tokens, lo=1))
        min_tokens = _integer("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                                                    f"got {min_tokens}")
        self._set("min_tokens", min_tokens)
        self._set("stop", _stop(self.stop))
        self._set("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        self._set("ignore_eos", _boolean("ignore_eos", self.ignore_eos))
        if self.logprobs is not None:
            self._set("logprobs", _integer("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS))
        self._set("skip_special_tokens", _boolean("skip_special_tokens", self.skip_special_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def verify_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model cannot produce; call once the model is known."""
        for param, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise SamplingParamsError(param, f"{param} has token id {bad[0]}, "
                                                 f"but the vocabulary has {vocab_size} tokens")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


def _integer(param: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(param, f"{param} must be an integer, got {value!r}")
    _check_range(param, value, lo, hi)
    return value


def _number(param: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(param, f"{param} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(param, f"{param} must be a finite number, got {value!r}")
    _check_range(param, value, lo, hi)
    return float(value)


def _check_range(param: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise SamplingParamsError(param, f"{param} must be between {_fmt(lo)} and {_fmt(hi)}, got {value!r}")
    if lo is not None and value < lo:
        raise SamplingParamsError(param, f"{param} must be >= {_fmt(lo)}, got {value!r}")
    if hi is not None and value > hi:
        raise SamplingParamsError(param, f"{param} must be <= {_fmt(hi)}, got {value!r}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _boolean(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(param, f"{param} must be true or false, got {value!r}")
    return value


def _logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise SamplingParamsError("logit_bias", f"logit_bias must map token ids to biases, got {bias!r}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token_id = _token_id("logit_bias", key)
        out[token_id] = _number("logit_bias", value, lo=-MAX_ABS_LOGIT_BIAS, hi=MAX_ABS_LOGIT_BIAS)
    return out or None


def _token_id(param: str, key: Any) -> int:
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise SamplingParamsError(param, f"{param} keys must be token ids (integers >= 0), got {key!r}")
    return key


def _token_ids(param: str, ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise SamplingParamsError(param, f"{param} must be a list of token ids, got {ids!r}")
    out = tuple(ids)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise SamplingParamsError(param, f"{param} must hold token ids (integers >= 0), got {t!r}")
    return out


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Iterable):
        raise SamplingParamsError("stop", f"stop must be a string or a list of strings, got {stop!r}")
    out = tuple(stop)
    if len(out) > MAX_STOP:
        raise SamplingParamsError("stop", f"stop accepts at most {MAX_STOP} strings, got {len(out)}")
    for s in out:
        if not isinstance(s, str) or not s:
            raise SamplingParamsError("stop", f"stop strings must be non-empty strings, got {s!r}")
    return out
