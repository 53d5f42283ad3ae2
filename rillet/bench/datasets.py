"""Benchmark requests: prompts from text that ships with installed packages, and their length distributions.

The text is the Chit-Chat Challenge conversations of the `chitchat-dataset` package when it is installed
(the package carries its data), else docstrings of the Python standard library. Everything is drawn from
`random.Random` seeded with strings, so one seed gives the same requests on every machine and for every
server, whatever the arrival process or request rate.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import random
from dataclasses import dataclass
from typing import Callable, Protocol

_STDLIB_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
                   "decimal", "email", "functools", "itertools", "json", "logging", "os", "pathlib",
                   "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "textwrap",
                   "threading", "unittest", "urllib.parse", "zipfile")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths, written `N`, `uniform:LO,HI` or `normal:MEAN,STD`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        kind, _, params = text.partition(":")
        try:
            if not params:
                return cls("fixed", float(int(kind)))
            lo, hi = (float(x) for x in params.split(","))
        except ValueError:
            raise ValueError(f"a length is N, uniform:LO,HI or normal:MEAN,STD; got {text!r}") from None
        return cls(kind, lo, hi)

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal"):
            raise ValueError(f"unknown length distribution {self.kind!r}: use N, uniform:LO,HI or normal:MEAN,STD")
        if self.a < 1 or (self.kind == "uniform" and self.b < self.a) or (self.kind == "normal" and self.b < 0):
            raise ValueError(f"lengths must be >= 1 (and LO <= HI, STD >= 0): {self}")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g},{self.b:g}"


@dataclass(frozen=True)
class ReadingSpeedMix:
    """Reading speeds in tokens/s and their weights, written `SPEED:WEIGHT,...` (e.g. `5:0.7,10:0.3`)."""

    speeds: tuple[float, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> ReadingSpeedMix:
        try:
            pairs = [item.split(":") for item in text.split(",")]
            speeds = tuple(float(p[0]) for p in pairs)
            weights = tuple(float(p[1]) if len(p) > 1 else 1.0 for p in pairs)
        except (ValueError, IndexError):
            raise ValueError(f"a reading-speed mix is SPEED:WEIGHT,...; got {text!r}") from None
        return cls(speeds, weights)

    def __post_init__(self) -> None:
        if not self.speeds or any(s <= 0 for s in self.speeds) or any(w < 0 for w in self.weights) \
                or sum(self.weights) <= 0:
            raise ValueError(f"reading speeds must be > 0 and weights >= 0 with a positive sum: {self}")

    def sample(self, rng: random.Random) -> float:
        return rng.choices(self.speeds, self.weights)[0]


@dataclass(frozen=True)
class RequestSpec:
    """One request of a benchmark, the same for every server it is sent to."""

    index: int
    prompt: str
    max_tokens: int
    reading_speed: float       # tokens/s this request's user reads at (the QoE target's pace)


class TextSource(Protocol):
    name: str

    def passages(self) -> list[list[str]]:
        """Runs of consecutive lines (conversations, or paragraphs of one docstring)."""
        ...


class ChitChatSource:
    name = "chitchat-dataset"

    def passages(self) -> list[list[str]]:
        return _chitchat_passages()


@functools.lru_cache(maxsize=1)
def _chitchat_passages() -> list[list[str]]:
    import chitchat_dataset  # type: ignore[import-untyped]

    with open(chitchat_dataset._PATH) as f:
        conversations = json.load(f)
    # NOTE: sorted by key so the order never depends on how the JSON file was written.
    return [[" ".join(u["text"] for u in turn) for turn in conversations[key]["messages"]]
            for key in sorted(conversations)]


class StdlibDocSource:
    name = "python-stdlib-docstrings"

    def passages(self) -> list[list[str]]:
        runs: list[list[str]] = []
        for module_name in _STDLIB_MODULES:
            module = importlib.import_module(module_name)
            own = [obj for _, obj in sorted(vars(module).items())
                   if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__]
            for obj in [module, *own]:
                doc = inspect.getdoc(obj) or ""
                paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
                if sum(len(p.split()) for p in paragraphs) >= 20:
                    runs.append(paragraphs)
        return runs


def default_source() -> TextSource:
    """Chit-chat conversations when `chitchat-dataset` is installed, else standard-library docstrings."""
    try:
        importlib.import_module("chitchat_dataset")
    except ImportError:
        return StdlibDocSource()
    return ChitChatSource()


def sample_text(passages: list[list[str]], num_words: int, rng: random.Random) -> str:
    """Exactly `num_words` words: consecutive lines from a random point of a random passage, then onward."""
    p = rng.randrange(len(passages))
    line = rng.randrange(len(passages[p]))
    words: list[str] = []
    while len(words) < num_words:
        words.extend(passages[p][line].split())
        line += 1
        if line == len(passages[p]):
            p, line = (p + 1) % len(passages), 0
    return " ".join(words[:num_words])


class TokenCounter(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def fit_to_tokens(draw_words: Callable[[int], str], num_tokens: int, tokenizer: TokenCounter) -> str:
    """Text of about `num_tokens` tokens: enough words drawn, then cut at the token boundary."""
    num_words = max(1, num_tokens)
    while True:
        ids = tokenizer.encode(draw_words(num_words), add_special_tokens=False)
        if len(ids) >= num_tokens:
            return tokenizer.decode(ids[:num_tokens])
        num_words *= 2


def build_requests(num_requests: int, seed: int, prompt_words: LengthDist | None, output_tokens: LengthDist,
                   reading_speeds: ReadingSpeedMix, prompt_tokens: LengthDist | None = None,
                   tokenizer: TokenCounter | None = None, source: TextSource | None = None,
                   purpose: str = "measure") -> list[RequestSpec]:
    """The seeded requests of one benchmark. Prompt lengths in words, or in tokens given a tokenizer.

    `purpose` names an independent stream of requests: warm-up requests use another one, so they share
    no prompt prefix with the measured ones.
    """
    if (prompt_words is None) == (prompt_tokens is None):
        raise ValueError("give the prompt length either in words or in tokens")
    if prompt_tokens is not None and tokenizer is None:
        raise ValueError("prompt lengths in tokens need a tokenizer")
    passages = (source or default_source()).passages()
    rng = random.Random(f"rillet-bench-{purpose}-{seed}")
    specs = []
    for i in range(num_requests):
        text_seed = f"rillet-bench-{purpose}-{seed}-text-{i}"
        if prompt_tokens is not None and tokenizer is not None:
            n = prompt_tokens.sample(rng)
            prompt = fit_to_tokens(lambda w: sample_text(passages, w, random.Random(text_seed)), n, tokenizer)
        else:
            assert prompt_words is not None
            prompt = sample_text(passages, prompt_words.sample(rng), random.Random(text_seed))
        specs.append(RequestSpec(i, prompt, output_tokens.sample(rng), reading_speeds.sample(rng)))
    return specs
