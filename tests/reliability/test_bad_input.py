"""Bad input, class by class: each gets its 4xx with an OpenAI error body, and the server's greedy
output is the same after it as before."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import API_KEY, MAX_MODEL_LEN, assert_error_body, canary
from tests.server.conftest import LiveServer

COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
USER = [{"role": "user", "content": "hi"}]
VOCAB = 512  # the tiny models' vocabulary


@dataclass(frozen=True)
class Bad:
    """One bad request: a JSON body (merged into a valid one) or raw bytes, and what must come back."""

    path: str = COMPLETIONS
    fields: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    status: int = 400
    param: str | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def c(status: int = 400, param: str | None = None, **fields: Any) -> Bad:
    return Bad(COMPLETIONS, fields, status=status, param=param)


def chat(param: str | None = None, status: int = 400, **fields: Any) -> Bad:
    return Bad(CHAT, fields, status=status, param=param)


def raw(body: bytes, path: str = COMPLETIONS) -> Bad:
    return Bad(path, raw=body)


ROUTES = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", COMPLETIONS),
          ("POST", CHAT), ("POST", TOKENIZE), ("POST", DETOKENIZE), ("GET", "/no/such/route")]


def every_route(headers: dict[str, str]) -> list[Bad]:
    return [Bad(path, {}, status=401, method=method, headers=headers) for method, path in ROUTES]


CLASSES: dict[str, list[Bad]] = {
    "malformed-json": [raw(b'{"prompt": "a", '), raw(b"{'prompt': 'a'}"), raw(b'{"prompt": "a"} trailing'),
                       raw(b'{"prompt": "a", "max_tokens": 01}')],
    "non-object-body": [raw(b"[1, 2]"), raw(b'"a prompt"'), raw(b"42"), raw(b"null"), raw(b"true"),
                        raw(b"[]", CHAT), raw(b'"x"', TOKENIZE)],
    "empty-body": [raw(b""), raw(b"", CHAT), raw(b"   ")],
    "deeply-nested-json": [raw(b"[" * 100_000 + b"]" * 100_000),
                           raw(b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
                           raw(b'{"messages": [{"role": "user", "content": "x"}], "tools": ['
                               + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"]}", CHAT)],
    "huge-numbers": [raw(b'{"prompt": [' + b"9" * 5000 + b"]}"),
                     raw(b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"),
                     Bad(COMPLETIONS, raw=b'{"prompt": "a", "temperature": 1e400}', param="temperature")],
    "invalid-utf8": [raw(b'{"prompt": "\xff\xfe"}'), raw(b'{"prompt": "\xc3"}'), raw(b'{"prompt": "\xed\xa0\x80"}'),
                     raw(b'{"messages": [{"role": "user", "content": "\xe2\x82"}]}', CHAT)],
    "lone-surrogate": [raw(b'{"prompt": "\\ud800"}'), raw(b'{"prompt": "a\\udfffb"}'),
                       raw(b'{"messages": [{"role": "user", "content": "\\udc00"}]}', CHAT),
                       raw(b'{"prompt": "\\ud800"}', TOKENIZE)],
    "missing-field": [Bad(COMPLETIONS, {"prompt": None}, param="prompt"), raw(b"{}"), raw(b"{}", CHAT),
                      raw(b"{}", DETOKENIZE)],
    "wrong-type": [c(temperature="hot", param="temperature"), c(max_tokens="5", param="max_tokens"),
                   c(stream="yes", param="stream"), c(max_tokens=1.5, param="max_tokens"),
                   c(max_tokens=True, param="max_tokens"), c(n=2.0, param="n"), c(seed="1", param="seed"),
                   c(stop=5, param="stop"), c(model=5, param="model"), c(prompt=[1.5], param="prompt"),
                   c(stream_options={"include_usage": "yes"}, param="stream_options.include_usage")],
    "out-of-range-sampling": [c(temperature=-0.5, param="temperature"), c(top_p=0, param="top_p"),
                              c(top_p=1.5, param="top_p"), c(min_p=2, param="min_p"), c(top_k=-5, param="top_k"),
                              c(presence_penalty=5, param="presence_penalty"),
                              c(frequency_penalty=-3, param="frequency_penalty"),
                              c(repetition_penalty=0, param="repetition_penalty")],
    "non-finite-numbers": [raw(b'{"prompt": "a", "temperature": NaN}'),
                           raw(b'{"prompt": "a", "top_p": Infinity}'),
                           raw(b'{"prompt": "a", "logit_bias": {"5": -Infinity}}')],
    "huge-n": [c(n=10**6, param="n"), c(n=129, param="n"), c(n=0, param="n"), c(n=-1, param="n"),
               chat(n=10**9, param="n")],
    "empty-prompt": [c(prompt="", param="prompt"), c(prompt=[], param="prompt"), c(prompt=[""], param="prompt"),
                     c(prompt=[[]], param="prompt")],
    "invalid-token-ids": [c(prompt=[1, 2, 10**7], param="prompt"), c(prompt=[VOCAB], param="prompt"),
                          c(prompt=[10**30], param="prompt"), c(prompt=[2, 10**11], echo=True, param="prompt"),
                          Bad(DETOKENIZE, {"tokens": [VOCAB]}, param="tokens")],
    "negative-token-ids": [c(prompt=[-1, 2], param="prompt"), c(prompt=[[5, -7]], param="prompt"),
                           c(prompt=[-(2**70)], echo=True, param="prompt"),
                           Bad(DETOKENIZE, {"tokens": [-1]}, param="tokens")],
    "over-long-prompt": [c(prompt=list(range(1, MAX_MODEL_LEN + 50)), param="prompt"),
                         c(prompt="word " * (4 * MAX_MODEL_LEN), param="prompt"),
                         chat(messages=[{"role": "user", "content": "word " * (4 * MAX_MODEL_LEN)}], param="messages")],
    "absurd-max-tokens": [c(max_tokens=10**9, param="max_tokens"), c(max_tokens=2**63, param="max_tokens"),
                          c(max_tokens=10**40, param="max_tokens"), c(max_tokens=-1, param="max_tokens"),
                          c(max_tokens=0, param="max_tokens"),
                          chat(max_completion_tokens=10**9, param="max_completion_tokens")],
    "context-overflow": [c(prompt=list(range(1, MAX_MODEL_LEN - 10)), max_tokens=20, param="max_tokens")],
    "oversized-body": [c(413, prompt="a " * (1 << 20)), Bad(CHAT, {"messages": [{"role": "user",
                                                                                 "content": "x" * (2 << 20)}]},
                                                          status=413)],
    "unknown-model": [c(404, "model", model="no-such-model"), chat(model="gpt-4o", param="model", status=404),
                      Bad(TOKENIZE, {"prompt": "a", "model": "nope"}, status=404, param="model")],
    "missing-api-key": every_route({"Authorization": ""}),
    "wrong-api-key": every_route({"Authorization": "Bearer wrong"}) + every_route({"Authorization": API_KEY})
                     + every_route({"Authorization": f"Basic {API_KEY}"}),
    "bad-logit-bias": [c(logit_bias={"abc": 1}, param="logit_bias"), c(logit_bias={"-1": 1}, param="logit_bias"),
                       c(logit_bias={"10000000": 5}, param="logit_bias"), c(logit_bias={"5": 1000},
                                                                           param="logit_bias"),
                       c(logit_bias={"5": "x"}, param="logit_bias.5"), c(logit_bias=[1, 2], param="logit_bias")],
    "too-many-stop-strings": [c(stop=["x"] * 17, param="stop"), c(stop=[f"s{i}" for i in range(1000)],
                                                                  param="stop")],
    "bad-stop": [c(stop="", param="stop"), c(stop=[""], param="stop"), c(stop=[1, 2], param="stop")],
    "bad-stop-token-ids": [c(stop_token_ids=[-1], param="stop_token_ids"),
                           c(stop_token_ids=[10**9], param="stop_token_ids"),
                           c(stop_token_ids="1", param="stop_token_ids")],
    "bad-seed": [c(seed=2**70, param="seed"), c(seed=-(2**70), param="seed")],
    "bad-logprobs": [c(logprobs=99, param="logprobs"), c(logprobs=-1, param="logprobs"),
                     chat(top_logprobs=2, param="top_logprobs"), chat(logprobs=True, top_logprobs=99,
                                                                      param="logprobs")],
    "bad-min-tokens": [c(min_tokens=-1, param="min_tokens"), c(min_tokens=100, param="min_tokens")],
    "chat-wrong-shape": [chat(messages=[], param="messages"), chat(messages={"role": "user"}, param="messages"),
                         chat(messages=["hi"], param="messages.0"), chat(messages=[{"content": "no role"}],
                                                                         param="messages.0.role"),
                         chat(messages=[[{"role": "user", "content": "hi"}]], param="messages.0"),
                         chat(messages=[{"role": "user"}], param="messages.0"),
                         chat(messages=[{"role": "system", "content": None}], param="messages.0")],
    "unknown-role": [chat(messages=[{"role": "wizard", "content": "hi"}], param="messages.0.role"),
                     chat(messages=[*USER, {"role": "", "content": "x"}], param="messages.1.role"),
                     Bad(TOKENIZE, {"messages": [{"role": "robot", "content": "x"}]}, param="messages.0.role")],
    "non-string-content": [chat(messages=[{"role": "user", "content": 5}], param="messages.0.content"),
                           chat(messages=[{"role": "user", "content": {"text": "hi"}}], param="messages.0.content"),
                           chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                param="messages.0.content"),
                           chat(messages=[{"role": 1, "content": "x"}], param="messages.0.role"),
                           chat(messages=[{"role": "user", "content": "x", "name": 5}], param="messages.0.name")],
    "unsupported-feature": [c(suffix="x", param="suffix"), c(best_of=3, param="best_of"),
                            c(prompt=["a", "b"], param="prompt"), chat(response_format={"type": "json_object"},
                                                                       param="response_format"),
                            chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                                         "image_url": {"url": "x"}}]}],
                                 param="messages.0.content")],
    "bad-tokenize-detokenize": [Bad(TOKENIZE, {"prompt": 5}, param="prompt"), Bad(TOKENIZE, raw=b"{}", param="prompt"),
                                Bad(TOKENIZE, {"prompt": "a", "messages": USER}, param="prompt"),
                                Bad(DETOKENIZE, {"tokens": "abc"}, param="tokens"),
                                Bad(DETOKENIZE, {"tokens": [[1]]}, param="tokens.0")],
    "bad-chat-extras": [chat(tools="x", param="tools"), chat(chat_template_kwargs=[1], param="chat_template_kwargs"),
                        chat(add_generation_prompt="yes", param="add_generation_prompt")],
    "bad-streaming-request": [c(stream=True, temperature=-1, param="temperature"),
                              chat(stream=True, messages=[{"role": "wizard", "content": "x"}],
                                   param="messages.0.role"),
                              c(stream=True, max_tokens=10**9, param="max_tokens")],
    "unknown-route-or-method": [Bad("/v2/completions", {}, status=404), Bad(COMPLETIONS, {}, status=405, method="GET"),
                                Bad("/health", {}, status=405, method="POST"),
                                Bad("/v1/models", {}, status=405, method="DELETE")],
}
NUM_CASES = sum(len(cases) for cases in CLASSES.values())


def send(server: LiveServer, bad: Bad) -> httpx.Response:
    # The API-key classes replace the client's key with theirs ("" for none).
    headers = {k: v for k, v in bad.headers.items() if v} if bad.headers else dict(server.headers)
    if bad.raw is not None:
        body = bad.raw
    elif bad.method == "POST":
        base: dict[str, Any] = {"model": server.model, "max_tokens": 2}
        base.update({"prompt": "hello"} if bad.path == COMPLETIONS else {"messages": USER} if bad.path == CHAT
                    else {"prompt": "hello"} if bad.path == TOKENIZE else {"tokens": [1, 2]})
        if bad.path in (TOKENIZE, DETOKENIZE):
            del base["max_tokens"]
        body = json.dumps({**base, **bad.fields}).encode()
    else:
        body = b""
    headers["content-type"] = "application/json"
    return httpx.request(bad.method, f"{server.url}{bad.path}", content=body if bad.method == "POST" else None,
                         headers=headers, timeout=60)


def test_there_are_at_least_25_classes() -> None:
    assert len(CLASSES) >= 25 and NUM_CASES >= 100


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_input_is_4xx_and_changes_nothing(guarded: LiveServer, name: str) -> None:
    with guarded.http() as http:
        before = canary(http, guarded)
        for bad in CLASSES[name]:
            response = send(guarded, bad)
            assert response.status_code == bad.status, (bad, response.text[:300])
            error = assert_error_body(response)
            if bad.param is not None:
                assert error["param"] == bad.param, (bad, error)
            if bad.status == 429 or bad.status == 503:
                assert int(response.headers["retry-after"]) >= 1
            assert canary(http, guarded) == before, bad
        assert httpx.get(f"{guarded.url}/health").status_code == 200
