"""SamplingParams: validation messages a user can act on, normalisation, and no torch needed."""
# Lists and strings are passed where the fields say tuples, as a JSON body has them.
# mypy: disable-error-code="arg-type, dict-item"
from __future__ import annotations

import dataclasses
import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st


def _import_without_torch() -> ModuleType:
    """rillet.sampling_params, imported afresh while `import torch` fails."""
    saved = sys.modules.pop("rillet.sampling_params", None)
    had_torch, torch_module = "torch" in sys.modules, sys.modules.get("torch")
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        return importlib.import_module("rillet.sampling_params")
    finally:
        if had_torch:
            sys.modules["torch"] = torch_module  # type: ignore[assignment]
        else:
            del sys.modules["torch"]
        if saved is not None:
            sys.modules["rillet.sampling_params"] = saved


sp = _import_without_torch()
if TYPE_CHECKING:
    from rillet.sampling_params import SamplingParams, SamplingParamsError
else:
    SamplingParams, SamplingParamsError = sp.SamplingParams, sp.SamplingParamsError


def error(**kwargs: Any) -> SamplingParamsError:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    return info.value


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.logprobs) == (16, 0, (), (), None)
    assert p.logit_bias is None and p.seed is None and not p.ignore_eos and p.skip_special_tokens
    assert not p.greedy


def test_greedy() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=2, temperature=0.5).greedy
    assert not SamplingParams(top_k=-1).greedy


def test_error_is_a_value_error_naming_the_param() -> None:
    e = error(temperature=-1)
    assert isinstance(e, ValueError)
    assert e.param == "temperature"
    assert str(e) == "temperature must be >= 0, got -1"


@pytest.mark.parametrize("kwargs, param, message", [
    ({"n": 0}, "n", "n must be between 1 and 128, got 0"),
    ({"n": 129}, "n", "n must be between 1 and 128, got 129"),
    ({"n": True}, "n", "n must be an integer, got True"),
    ({"n": 2.0}, "n", "n must be an integer, got 2.0"),
    ({"temperature": float("nan")}, "temperature", "temperature must be a finite number, got nan"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number, got 'hot'"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -2}, "top_k", "top_k must be -1 or 0 (off) or >= 1, got -2"),
    ({"min_p": 1.1}, "min_p", "min_p must be between 0 and 1, got 1.1"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0, got 0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be between -2 and 2, got 2.5"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be between -2 and 2, got -3"),
    ({"logit_bias": {5: 101}}, "logit_bias", "logit_bias must be between -100 and 100, got 101"),
    ({"logit_bias": {-1: 1}}, "logit_bias", "logit_bias keys must be token ids (integers >= 0), got -1"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "logit_bias keys must be token ids (integers >= 0), got 'x'"),
    ({"logit_bias": [1, 2]}, "logit_bias", "logit_bias must map token ids to biases, got [1, 2]"),
    ({"seed": 2**64}, "seed", f"seed must be between {-2**63} and {2**64 - 1}, got {2**64}"),
    ({"seed": "7"}, "seed", "seed must be an integer, got '7'"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be >= 0, got -1"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "min_tokens must be <= max_tokens (10), got 20"),
    ({"stop": ["a"] * 17}, "stop", "stop accepts at most 16 strings, got 17"),
    ({"stop": ["a", ""]}, "stop", "stop strings must be non-empty strings, got ''"),
    ({"stop": 5}, "stop", "stop must be a string or a list of strings, got 5"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids", "stop_token_ids must hold token ids (integers >= 0), got -2"),
    ({"stop_token_ids": "12"}, "stop_token_ids", "stop_token_ids must be a list of token ids, got '12'"),
    ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false, got 1"),
    ({"logprobs": 21}, "logprobs", "logprobs must be between 0 and 20, got 21"),
    ({"logprobs": -1}, "logprobs", "logprobs must be between 0 and 20, got -1"),
    ({"skip_special_tokens": None}, "skip_special_tokens", "skip_special_tokens must be true or false, got None"),
])
def test_invalid_values(kwargs: dict[str, Any], param: str, message: str) -> None:
    e = error(**kwargs)
    assert (e.param, str(e)) == (param, message)


def test_boundaries_are_accepted() -> None:
    SamplingParams(n=128, temperature=0, top_p=1, top_k=-1, min_p=1, repetition_penalty=1e-3,
                   presence_penalty=-2, frequency_penalty=2, logit_bias={0: -100, 7: 100},
                   seed=-(2**63), max_tokens=None, min_tokens=5, stop=["x"] * 16, logprobs=20)
    SamplingParams(seed=2**64 - 1, logprobs=0, max_tokens=1, min_tokens=1)


def test_normalisation() -> None:
    p = SamplingParams(temperature=1, top_p=1, stop="END", stop_token_ids=[3, 4], logit_bias={"42": -5})
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert p.stop_token_ids == (3, 4)
    assert p.logit_bias == {42: -5.0}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_caller_dict_is_not_aliased() -> None:
    bias = {1: 2.0}
    p = SamplingParams(logit_bias=bias)
    bias[1] = 99.0
    assert p.logit_bias == {1: 2.0}


def test_frozen_hashable_and_replace_revalidates() -> None:
    p = SamplingParams(logit_bias={1: 2.0}, stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(logit_bias={1: 2.0}, stop=("x",)))
    assert p == SamplingParams(logit_bias={1: 2.0}, stop="x")
    assert dataclasses.replace(p, n=1, seed=3).seed == 3
    with pytest.raises(SamplingParamsError):
        dataclasses.replace(p, n=0)


def test_verify_vocab() -> None:
    SamplingParams(logit_bias={99: 1}, stop_token_ids=[99]).verify_vocab(100)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(logit_bias={100: 1}).verify_vocab(100)
    assert info.value.param == "logit_bias"
    assert str(info.value) == "logit_bias has token id 100, but the vocabulary has 100 tokens"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(stop_token_ids=[5, 300]).verify_vocab(256)
    assert info.value.param == "stop_token_ids"


@given(temperature=st.floats(0, 1e6), top_p=st.floats(1e-9, 1), min_p=st.floats(0, 1),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2), top_k=st.integers(-1, 10**6),
       n=st.integers(1, 128), logprobs=st.none() | st.integers(0, 20))
def test_valid_values_always_construct(temperature: float, top_p: float, min_p: float, presence: float,
                                       frequency: float, top_k: int, n: int, logprobs: int | None) -> None:
    p = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                       presence_penalty=presence, frequency_penalty=frequency, logprobs=logprobs)
    assert p.greedy == (temperature == 0 or top_k == 1)


@given(name=st.sampled_from(["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty"]),
       value=st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_accepted_or_rejected_by_name(name: str, value: float) -> None:
    try:
        kwargs: dict[str, Any] = {name: value}
        p = SamplingParams(**kwargs)
    except SamplingParamsError as e:
        assert e.param == name and str(e).startswith(name)
    else:
        assert getattr(p, name) == value
