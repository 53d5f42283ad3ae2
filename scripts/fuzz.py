"""Fuzz a live `rillet serve`: schemathesis cases from its OpenAPI schema, then hypothesis-generated
request bodies (valid fields, wrong types, junk JSON, corrupted bytes, streams).

Every response must be below 500, every error an OpenAI error body, and no stream may carry an
error event. The test suite runs a few thousand cases (tests/reliability/test_fuzz.py); this
script runs as many as asked:

    python scripts/fuzz.py --tiny --schema-cases 20000 --body-cases 50000
    python scripts/fuzz.py --url http://127.0.0.1:8000 --api-key KEY --model gemma-3-270m
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class FuzzReport:
    """Responses by (route, status), and what went wrong."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def num_5xx(self) -> int:
        return sum(n for (_, status), n in self.statuses.items() if status >= 500)

    def check(self, path: str, status: int, body: bytes, sent: object) -> None:
        self.statuses[(path, status)] += 1
        problem = _problem(status, body)
        if problem is not None:
            self.failures.append(f"{problem}: {path} {status} <- {str(sent)[:300]} -> {body[:300]!r}")

    def summary(self) -> str:
        by_status = Counter(status for (_, status) in self.statuses.elements())
        return f"{self.num_requests} requests, statuses {dict(sorted(by_status.items()))}, " \
               f"{len(self.failures)} failures"


def _problem(status: int, body: bytes) -> str | None:
    if status >= 500:
        return "server error"
    if status >= 400:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return "not an OpenAI error body"
        if not isinstance(error, dict) or set(error) != ERROR_KEYS or not error["message"]:
            return "not an OpenAI error body"
    elif body.startswith(b"data: ") and (b'"error"' in body or not body.rstrip().endswith(b"data: [DONE]")):
        return "a stream with an error event or without [DONE]"
    return None


def _settings(num_cases: int, seed: int | None) -> Callable[[Any], Any]:
    kwargs: dict[str, Any] = {"max_examples": num_cases, "deadline": None, "database": None,
                              "suppress_health_check": list(HealthCheck), "derandomize": seed is None}
    return settings(**kwargs)


# -- schemathesis: cases from the server's own schema --------------------------------------------------

def fuzz_schema(url: str, headers: dict[str, str], num_cases: int, seed: int | None = None) -> FuzzReport:
    """`num_cases` schemathesis cases (positive and negative) over every operation of /openapi.json."""
    import requests
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    report, session = FuzzReport(), requests.Session()

    @_settings(num_cases, seed)
    @given(case=cases)
    def run(case: Any) -> None:
        try:
            response = case.call(base_url=url, session=session, headers=headers, timeout=120)
        except requests.RequestException as e:  # the server dropped the connection
            report.failures.append(f"{type(e).__name__}: {case.path} <- {str(case.body)[:300]}")
            return
        report.check(case.path, response.status_code, response.content, case.body)

    _seeded(run, seed)()
    return report


# -- hypothesis: bodies built field by field -------------------------------------------------------------
# NOTE: Hypothesis draws raw bytes and `Draw` turns them into a body: bytes generate (and shrink) several
# times faster than composed strategies, which keeps thousands of requests to seconds.

class Draw:
    """Decisions read from a byte string; zeros once it runs out."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.pos = raw, 0

    def byte(self) -> int:
        self.pos += 1
        return self.raw[self.pos - 1] if self.pos <= len(self.raw) else 0

    def choice(self, options: Any) -> Any:
        return options[self.byte() % len(options)]

    def integer(self, lo: int, hi: int) -> int:
        value = self.byte() | self.byte() << 8
        return lo + value % (hi - lo + 1)

    def number(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.integer(0, 1000) / 1000

    def text(self) -> str:
        return "".join(self.choice(TEXT_ALPHABET) for _ in range(self.byte() % 12))

    def junk(self, depth: int = 0) -> Any:
        kind = self.byte() % (9 if depth < 2 else 7)
        if kind < 7:
            return [None, True, self.integer(-5, 5) * 10 ** self.byte() % 30, float("nan"), float("inf"),
                    self.number(-1e9, 1e9), self.text()][kind]
        size = self.byte() % 3
        if kind == 7:
            return [self.junk(depth + 1) for _ in range(size)]
        return {self.text(): self.junk(depth + 1) for _ in range(size)}


TEXT_ALPHABET = ["a", "b", " ", "\n", "é", "日", "🤖", "\x00", "\\", "\"", "<|eot_id|>", "Z"]


def _message(d: Draw) -> dict[str, Any]:
    content = d.text() if d.byte() % 4 else [{"type": "text", "text": d.text()} for _ in range(d.byte() % 3)]
    return {"role": d.choice(["system", "user", "user", "assistant", "tool", "wizard"]), "content": content}


def _ids(d: Draw, size: int) -> list[int]:
    return [d.integer(-2, 600) for _ in range(d.byte() % size)]


SAMPLING: dict[str, Callable[[Draw], Any]] = {
    "max_tokens": lambda d: d.integer(-3, 24) if d.byte() % 8 else d.choice([0, 10**9, 2**64, -(2**64)]),
    "n": lambda d: d.integer(-1, 4), "temperature": lambda d: d.number(-1, 3), "top_p": lambda d: d.number(-0.5, 1.5),
    "top_k": lambda d: d.integer(-2, 600), "min_p": lambda d: d.number(-0.5, 1.5),
    "repetition_penalty": lambda d: d.number(-1, 3), "presence_penalty": lambda d: d.number(-3, 3),
    "frequency_penalty": lambda d: d.number(-3, 3), "seed": lambda d: d.integer(-5, 5) * 10 ** (d.byte() % 25),
    "stop": lambda d: d.text() if d.byte() % 2 else [d.text() for _ in range(d.byte() % 20)],
    "stop_token_ids": lambda d: _ids(d, 4),
    "logit_bias": lambda d: {str(d.integer(-2, 600)) if d.byte() % 4 else d.text(): d.number(-200, 200)
                             for _ in range(d.byte() % 3)},
    "ignore_eos": lambda d: d.byte() % 2 == 0, "min_tokens": lambda d: d.integer(-3, 24),
    "skip_special_tokens": lambda d: d.byte() % 2 == 0, "stream": lambda d: d.byte() % 2 == 0,
    "stream_options": lambda d: {"include_usage": d.byte() % 2 == 0}, "user": lambda d: d.text(),
}
FIELDS: dict[str, dict[str, Callable[[Draw], Any]]] = {
    "/v1/completions": {**SAMPLING, "prompt": lambda d: d.text() if d.byte() % 2 else _ids(d, 40),
                        "logprobs": lambda d: d.integer(-1, 22), "echo": lambda d: d.byte() % 8 == 0},
    "/v1/chat/completions": {**SAMPLING, "messages": lambda d: [_message(d) for _ in range(d.byte() % 4)],
                             "logprobs": lambda d: d.byte() % 2 == 0, "top_logprobs": lambda d: d.integer(-1, 22),
                             "max_completion_tokens": lambda d: d.integer(-3, 24),
                             "response_format": lambda d: {"type": d.choice(["text", "json"])}},
    "/tokenize": {"prompt": lambda d: d.text(), "messages": lambda d: [_message(d) for _ in range(d.byte() % 3)],
                  "add_special_tokens": lambda d: d.byte() % 2 == 0},
    "/detokenize": {"tokens": lambda d: _ids(d, 20), "skip_special_tokens": lambda d: d.byte() % 2 == 0},
}
REQUIRED = {"/v1/completions": "prompt", "/v1/chat/completions": "messages", "/tokenize": "prompt",
            "/detokenize": "tokens"}


def build_request(raw: bytes, model: str) -> tuple[str, bytes]:
    """A route and a body: a few of its fields, each a plausible value or (1 in 6) junk; sometimes
    the model is missing or unknown, the body corrupted, deeply nested, or not an object at all."""
    d = Draw(raw)
    path = d.choice(POST_ROUTES)
    fields = FIELDS[path]
    names = set() if d.byte() % 8 == 7 else {REQUIRED[path]}
    names |= {d.choice(sorted(fields)) for _ in range(d.byte() % 6)}
    body: dict[str, Any] = {"model": d.choice([model, model, model, None, "other"])}
    for name in sorted(names):
        body[name] = d.junk() if d.byte() % 6 == 5 else fields[name](d)
    kind = d.byte() % 16
    data = json.dumps(d.junk() if kind == 15 else body, allow_nan=True).encode()
    if kind == 14:  # cut or corrupt the bytes
        cut = d.integer(0, len(data))
        data = data[:cut] + bytes([d.byte()]) * (d.byte() % 2) + data[cut + 1:]
    if kind == 13:  # nest it deeply
        depth = d.integer(1, 5000)
        data = b"[" * depth + data + b"]" * depth
    return path, data


def fuzz_bodies(url: str, headers: dict[str, str], model: str, num_cases: int, seed: int | None = None) -> FuzzReport:
    """`num_cases` hypothesis-generated bodies, posted to the four POST routes."""
    report = FuzzReport()
    with httpx.Client(base_url=url, headers={**headers, "content-type": "application/json"}, timeout=120) as http:

        @_settings(num_cases, seed)
        @given(raw=st.binary(min_size=4, max_size=96))
        def run(raw: bytes) -> None:
            path, body = build_request(raw, model)
            try:
                response = http.post(path, content=body)
            except httpx.TransportError as e:  # the server dropped the connection
                report.failures.append(f"{type(e).__name__}: {path} <- {body[:300]!r}")
                return
            report.check(path, response.status_code, response.content, body)

        _seeded(run, seed)()
    return report


def _seeded(test: Any, seed: int | None) -> Any:
    from hypothesis import seed as with_seed
    return test if seed is None else with_seed(seed)(test)


# -- the command line -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one on a tiny random model, --tiny)")
    parser.add_argument("--tiny", action="store_true", help="start `rillet serve` on a tiny random model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="the model name to send (default: the server's)")
    parser.add_argument("--schema-cases", type=int, default=5000)
    parser.add_argument("--body-cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    args = parser.parse_args(argv)
    if not args.url and not args.tiny:
        parser.error("give --url or --tiny")
    with _server(args.url, args.api_key) as (url, headers):
        model = args.model or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        failures = 0
        for name, fuzz in (("schemathesis", lambda: fuzz_schema(url, headers, args.schema_cases, args.seed)),
                           ("bodies", lambda: fuzz_bodies(url, headers, model, args.body_cases, args.seed))):
            if (args.schema_cases if name == "schemathesis" else args.body_cases) <= 0:
                continue
            start = time.monotonic()
            report = fuzz()
            print(f"{name}: {report.summary()} in {time.monotonic() - start:.0f} s", flush=True)
            for failure in report.failures[:20]:
                print("  ", failure)
            failures += len(report.failures)
    return 1 if failures else 0


class _server:
    """The server at `url`, or a tiny one started for the run (stopped after it)."""

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url, self.api_key = url, api_key
        self.stop: Callable[[], object] = lambda: None

    def __enter__(self) -> tuple[str, dict[str, str]]:
        if self.url is None:
            from scripts.tiny_server import start_tiny_server
            server = start_tiny_server("--max-model-len", "256", api_key=self.api_key)
            self.url, self.stop = server.url, server.stop
        return self.url, {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __exit__(self, *_: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    sys.exit(main())
