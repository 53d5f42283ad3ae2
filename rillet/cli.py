"""The `rillet` command."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Any

from rillet.config import EngineConfig

_SAMPLING_HELP = {
    "max_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 is greedy",
    "top_p": "nucleus sampling: keep the smallest set of tokens whose probability reaches top_p",
    "top_k": "keep only the k most likely tokens (0: off)",
    "min_p": "drop tokens less likely than min_p times the most likely one",
    "repetition_penalty": "divide the logits of tokens already seen (>1 discourages repeats)",
    "presence_penalty": "subtract from the logits of tokens already generated",
    "frequency_penalty": "subtract, per occurrence, from the logits of tokens already generated",
    "seed": "random seed of this request (same seed, same output)",
    "stop": "stop when this string is generated (repeatable)",
    "ignore_eos": "keep generating past the end-of-sequence token",
    "n": "number of completions",
}


def add_dataclass_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                          helps: dict[str, str] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """One --option per field of `cls`, typed and documented from the dataclass itself."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        text = (helps or {}).get(f.name) or f.metadata.get("help")
        if text is None:
            continue
        kind = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, None if f.default is dataclasses.MISSING else f.default)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind is tuple:
            parser.add_argument(flag, action="append", default=None, help=text)
        else:
            shown = "" if default is None or "default" in text else f" (default: {default})"
            parser.add_argument(flag, type=kind, default=default, help=text + shown)


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _base_type(args[0])
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def options_for(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def build_parser() -> argparse.ArgumentParser:
    from rillet.sampling_params import SamplingParams

    parser = argparse.ArgumentParser(prog="rillet", description="A streaming-first LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of PROMPT to the terminal",
                         description="Stream a completion of PROMPT to the terminal. With no --model, "
                                     "the embedded Gemma 3 270M is used.")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--model", default=None, help="a .gguf file or a Hugging Face model folder")
    gen.add_argument("-v", "--verbose", action="store_true", help="log model loading and timings")
    add_dataclass_options(gen.add_argument_group("sampling"), SamplingParams, _SAMPLING_HELP, {"max_tokens": 64})
    add_dataclass_options(gen.add_argument_group("engine"), EngineConfig)
    _add_serve(sub)
    from rillet.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from rillet.server import ServerConfig

    serve = sub.add_parser("serve", help="serve the OpenAI API over HTTP",
                           description="Serve /v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
                                       "/detokenize, /health and /metrics. With no --model, the embedded "
                                       "Gemma 3 270M is served.")
    serve.add_argument("--model", default=None, help="a .gguf file or a Hugging Face model folder")
    serve.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    add_dataclass_options(serve.add_argument_group("server"), ServerConfig)
    add_dataclass_options(serve.add_argument_group("engine"), EngineConfig)


def generate(args: argparse.Namespace) -> int:
    from rillet.llm import LLM
    from rillet.sampling_params import SamplingParams

    llm = LLM(args.model, **options_for(EngineConfig, args))
    params = SamplingParams(**options_for(SamplingParams, args))
    out = sys.stdout
    for delta in llm.stream(args.prompt, params):
        out.write(delta.text)
        out.flush()
    out.write("\n")
    return 0


def serve(args: argparse.Namespace) -> int:
    import os

    from rillet.server import ServerConfig
    from rillet.server.serve import run

    options = options_for(ServerConfig, args)
    if "api_key" not in options and os.environ.get("RILLET_API_KEY"):
        options["api_key"] = os.environ["RILLET_API_KEY"]
    config = ServerConfig(**options)
    logging.getLogger("rillet").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return run(args.model, EngineConfig(**options_for(EngineConfig, args)), config)


def bench(args: argparse.Namespace) -> int:
    from rillet.bench.cli import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": generate, "serve": serve, "bench": bench}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"rillet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
