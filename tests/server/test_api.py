"""Black-box tests of a live `rillet serve` through the official `openai` client and raw HTTP."""
from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.fixtures.tiny_models import TinyModel
from tests.server.conftest import LiveServer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "Two more?"},
]
PROMPT = "The quick brown fox jumps over"


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def check_stream_shape(events: list[Any], n: int) -> dict[int, str]:
    """Exactly one finish_reason per choice, then the usage chunk, then [DONE]; returns each choice's reason."""
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    reasons: dict[int, list[str]] = {}
    for event in events[:-2]:
        assert event["usage"] is None
        for choice in event["choices"]:
            if choice["finish_reason"] is not None:
                reasons.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert sorted(reasons) == list(range(n))
    assert all(len(r) == 1 for r in reasons.values()), reasons
    return {i: r[0] for i, r in reasons.items()}


# -- the model and the tokenizer ------------------------------------------------------------------------

def test_health_and_models(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == [server.model]


def test_prompt_tokens_match_the_tokenizer(server: LiveServer, qwen3: TinyModel) -> None:
    expected = AutoTokenizer.from_pretrained(qwen3.hf_dir)(PROMPT).input_ids
    got = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=2)
    assert got.usage is not None and got.usage.prompt_tokens == len(expected)
    with server.http() as http:
        assert http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"] == expected


def test_token_id_prompt(server: LiveServer) -> None:
    got = server.client().completions.create(model=server.model, prompt=[5, 17, 99, 3], max_tokens=3,
                                             temperature=0)
    assert got.usage is not None and got.usage.prompt_tokens == 4 and got.usage.completion_tokens == 3


def test_chat_prompt_matches_transformers(server: LiveServer, qwen3: TinyModel) -> None:
    hf = AutoTokenizer.from_pretrained(qwen3.hf_dir)
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = hf(text, add_special_tokens=False).input_ids
    with server.http() as http:
        tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert tokens == expected
        assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == text
    got = server.client().chat.completions.create(model=server.model, messages=MESSAGES,  # type: ignore[arg-type]
                                                  max_tokens=2)
    assert got.usage is not None and got.usage.prompt_tokens == len(expected)


# -- streaming --------------------------------------------------------------------------------------------

def test_completion_stream_equals_non_stream(server: LiveServer) -> None:
    client = server.client()
    kwargs: dict[str, Any] = dict(model=server.model, prompt=PROMPT, max_tokens=24, n=2, seed=11,
                                  temperature=0.9, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.01})
    whole = client.completions.create(**kwargs)
    texts, reasons = ["", ""], [None, None]
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == [c.finish_reason for c in sorted(whole.choices, key=lambda c: c.index)]
    assert usage == whole.usage


def test_chat_stream_equals_non_stream(server: LiveServer) -> None:
    client = server.client()
    kwargs: dict[str, Any] = dict(model=server.model, messages=MESSAGES, max_completion_tokens=20, n=2, seed=5,
                                  temperature=0.8, frequency_penalty=0.5, presence_penalty=0.2)
    whole = client.chat.completions.create(**kwargs)
    texts, roles = ["", ""], [None, None]
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles[c.index] = c.delta.role or roles[c.index]
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert roles == ["assistant", "assistant"]
    assert usage == whole.usage


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sse_shape(server: LiveServer, path: str) -> None:
    body: dict[str, Any] = {"model": server.model, "n": 3, "max_tokens": 12, "seed": 1, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"prompt": PROMPT} if "chat" not in path else {"messages": MESSAGES})
    with server.http() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    reasons = check_stream_shape(events, n=3)
    assert set(reasons.values()) <= {"stop", "length"}


def test_seed_determinism_and_greedy(server: LiveServer) -> None:
    client = server.client()
    sampled = [client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, seed=3,
                                         temperature=1.0).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    greedy = [client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16,
                                        temperature=0).choices[0].text for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_stop_string(server: LiveServer) -> None:
    client = server.client()
    full = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    start = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isalnum() and full.find(full[i:i + 2]) == i)
    stop = full[start:start + 2]
    got = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert got.text == full[:start]
    assert got.finish_reason == "stop"
    assert got.model_extra is not None and got.model_extra["stop_reason"] == stop


def test_logprobs(server: LiveServer) -> None:
    client = server.client()
    got = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, logprobs=3, temperature=0)
    lp = got.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == 5 and all(len(top) >= 1 for top in lp.top_logprobs)
    assert "".join(lp.tokens).replace("\ufffd", "") == got.choices[0].text.replace("\ufffd", "")
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=4, logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_metrics_names(server: LiveServer) -> None:
    m = server.metrics()
    for name in ("rillet_time_to_first_token_seconds_count", "rillet_inter_token_latency_seconds_count",
                 "rillet_e2e_request_latency_seconds_count", "rillet_num_requests_waiting",
                 "rillet_num_requests_running", "rillet_kv_cache_usage_ratio", "rillet_prefix_cache_hit_rate",
                 "rillet_num_preemptions_total", "rillet_prompt_tokens_total", "rillet_generation_tokens_total",
                 "rillet_requests_total{finish_reason=length}", "rillet_kv_cache_free_blocks{group=0}"):
        assert name in m, name
    assert m["rillet_e2e_request_latency_seconds_count"] >= 1


# -- errors --------------------------------------------------------------------------------------------

def _completion(server: LiveServer, **fields: Any) -> dict[str, Any]:
    return {"model": server.model, "prompt": PROMPT, "max_tokens": 2, **fields}


BAD_COMPLETIONS: list[tuple[dict[str, Any], str | None]] = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"prompt": [1, 2, 10**7]}, None),
    ({"prompt": list(range(5000))}, "prompt"),
    ({"logit_bias": {"10000000": 5}}, "logit_bias"),
    ({"stop": ["x"] * 40}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"logprobs": 99}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_COMPLETIONS, ids=[json.dumps(f)[:40] for f, _ in BAD_COMPLETIONS])
def test_invalid_completion_is_400(server: LiveServer, fields: dict[str, Any], param: str | None) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", json=_completion(server, **fields))
        assert_error(response, 400, param)
        assert_still_serves(http, server)


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
], ids=["empty", "no-role", "image", "negative-max", "top-logprobs-alone"])
def test_invalid_chat_is_400(server: LiveServer, fields: dict[str, Any], param: str) -> None:
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 2, **fields}
    with server.http() as http:
        assert_error(http.post("/v1/chat/completions", json=body), 400, param)
        assert_still_serves(http, server)


@pytest.mark.parametrize("content", [b'{"prompt": "a", ', b"[1, 2]", b'{"prompt": "\xff\xfe"}',
                                     b'{"prompt": "\\ud800"}'], ids=["truncated", "not-object", "bad-utf8",
                                                                     "lone-surrogate"])
def test_malformed_body_is_400(server: LiveServer, content: bytes) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert_error(response, 400, None)
        assert_still_serves(http, server)


def test_unknown_model_is_404(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    with server.http() as http:
        assert_error(http.post("/v1/completions", json=_completion(server, model="nope")), 404, "model")
        assert_error(http.get("/v1/nothing-here"), 404, None)
        assert_still_serves(http, server)


def test_oversized_body_is_413(server: LiveServer) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", json=_completion(server, prompt="a " * (1 << 20)))
        assert_error(response, 413, None)
        assert_still_serves(http, server)


def test_openai_client_raises_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=-1)
    assert "temperature" in str(info.value)


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error


def assert_still_serves(http: httpx.Client, server: LiveServer) -> None:
    ok = http.post("/v1/completions", json=_completion(server))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 2
