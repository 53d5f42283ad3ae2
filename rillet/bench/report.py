"""Aggregates of a benchmark run, the table printed for it, its JSON, and its plots."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from rillet.bench.datasets import RequestSpec
from rillet.bench.loadgen import RequestResult, RunResult
from rillet.bench.qoe import QoETarget, RequestMetrics, displayed_times, expected_times, request_metrics

QOE_GOOD = 0.95                      # a sweep's rate passes while the mean QoE stays at or above this


@dataclass(frozen=True)
class SLO:
    """Goodput counts the requests with TTFT <= ttft_s and TPOT <= tpot_s (a one-token response has no TPOT)."""

    ttft_s: float
    tpot_s: float

    def met(self, m: RequestMetrics) -> bool:
        return m.ttft is not None and m.ttft <= self.ttft_s and (m.tpot is None or m.tpot <= self.tpot_s)


@dataclass(frozen=True)
class RequestRecord:
    """One request's result and metrics, against its own QoE target."""

    result: RequestResult
    target: QoETarget
    metrics: RequestMetrics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats(values: Sequence[float], percentiles: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Mean and percentiles, keyed `mean`, `p50`, ...; NaN when there are no values."""
    out = {"mean": sum(values) / len(values) if values else math.nan}
    out.update({f"p{q}": percentile(values, q) for q in percentiles})
    return out


def analyze(run: RunResult, specs: list[RequestSpec], ttft_target_s: float) -> list[RequestRecord]:
    """Per-request metrics; each request is judged against its own reading speed."""
    by_index = {s.index: s for s in specs}
    records = []
    for r in run.results:
        target = QoETarget(ttft_target_s, by_index[r.index].reading_speed)
        records.append(RequestRecord(r, target, request_metrics(r.token_times if r.ok else [], target)))
    return records


def summarize(run: RunResult, records: list[RequestRecord], slo: SLO) -> dict[str, Any]:
    """The aggregates of one run. Latencies cover the requests that succeeded; QoE counts a failure as 0."""
    ok = [rec.metrics for rec in records if rec.result.ok]
    duration = run.duration_s or math.nan
    num_tokens = sum(rec.result.num_tokens for rec in records if rec.result.ok)

    def of(name: str) -> list[float]:
        return [v for m in ok if (v := getattr(m, name)) is not None]

    return {
        "url": run.url, "model": run.model,
        "num_requests": len(records), "num_ok": len(ok), "duration_s": run.duration_s,
        "output_tokens": num_tokens,
        "throughput_tok_s": num_tokens / duration,
        "request_throughput_req_s": len(ok) / duration,
        "goodput_req_s": sum(slo.met(m) for m in ok) / duration,
        "slo": asdict(slo),
        "ttft_s": stats(of("ttft")), "tpot_s": stats(of("tpot")), "e2e_s": stats(of("e2e")),
        "itl_s": stats([g for m in ok for g in m.gaps]),
        "max_stall_s": stats(of("max_stall")),
        "qoe": stats([rec.metrics.qoe for rec in records], percentiles=(50, 10, 1)),
    }


def record_json(rec: RequestRecord) -> dict[str, Any]:
    m, r = rec.metrics, rec.result
    return {"index": r.index, "sent_at_s": r.sent_at, "error": r.error, "reading_speed": rec.target.reading_speed,
            "num_tokens": r.num_tokens, "num_prompt_tokens": r.num_prompt_tokens,
            "ttft_s": m.ttft, "tpot_s": m.tpot, "e2e_s": m.e2e, "max_stall_s": m.max_stall, "qoe": m.qoe,
            "token_times_s": [round(t, 6) for t in r.token_times]}


def max_good_rate(points: list[tuple[float, dict[str, Any]]], threshold: float = QOE_GOOD) -> float | None:
    """The highest swept rate whose mean QoE is >= threshold; None when no rate passes."""
    passing = [rate for rate, summary in points if summary["qoe"]["mean"] >= threshold]
    return max(passing, default=None)


# ---- the printed table ------------------------------------------------------------------------------

_ROWS: list[tuple[str, str, str | None, str]] = [
    # label, summary key, stat key, format
    ("output tok/s", "throughput_tok_s", None, "{:.1f}"),
    ("requests/s", "request_throughput_req_s", None, "{:.2f}"),
    ("goodput req/s", "goodput_req_s", None, "{:.2f}"),
    ("duration s", "duration_s", None, "{:.1f}"),
    *[(f"TTFT {k} s", "ttft_s", k, "{:.3f}") for k in ("mean", "p50", "p90", "p99")],
    *[(f"TPOT {k} ms", "tpot_s", k, "{:.1f}") for k in ("mean", "p50", "p90", "p99")],
    *[(f"ITL {k} ms", "itl_s", k, "{:.1f}") for k in ("p50", "p99")],
    *[(f"max stall {k} s", "max_stall_s", k, "{:.3f}") for k in ("mean", "p99")],
    *[(f"e2e {k} s", "e2e_s", k, "{:.2f}") for k in ("p50", "p99")],
    *[(f"QoE {k}", "qoe", k, "{:.3f}") for k in ("mean", "p50", "p10")],
]


def _value(summary: dict[str, Any], key: str, stat: str | None) -> float:
    v = float(summary[key] if stat is None else summary[key][stat])
    return v * 1000.0 if key in ("tpot_s", "itl_s") else v


def format_table(summaries: list[dict[str, Any]], labels: list[str]) -> str:
    """Metrics down, servers across; then the ratio of the first to each other server."""
    ratio_names = ["ratio"] if len(labels) == 2 else [f"1st/{lab}" for lab in labels[1:]]
    header = ["", *labels, *ratio_names]
    rows = [header, ["requests ok", *(f"{s['num_ok']}/{s['num_requests']}" for s in summaries), *[""] * len(ratio_names)]]
    for label, key, stat, fmt in _ROWS:
        values = [_value(s, key, stat) for s in summaries]
        row = [label, *(fmt.format(v) for v in values)]
        for other in values[1:]:
            row.append(f"{values[0] / other:.2f}x" if other and math.isfinite(other) else "-")
        rows.append(row)
    return _grid(rows)


def format_sweep(sweeps: dict[str, list[tuple[float, dict[str, Any]]]]) -> str:
    """One row per rate: mean QoE, TTFT p99 and tokens/s of each server; then each one's best passing rate."""
    labels = list(sweeps)
    rows = [["rate req/s", *(f"{lab} {col}" for lab in labels for col in ("QoE", "TTFTp99", "tok/s"))]]
    rates = sorted({rate for points in sweeps.values() for rate, _ in points})
    for rate in rates:
        row = [f"{rate:g}"]
        for lab in labels:
            s = dict(sweeps[lab]).get(rate)
            row += ["-"] * 3 if s is None else [f"{s['qoe']['mean']:.3f}", f"{s['ttft_s']['p99']:.2f}",
                                                f"{s['throughput_tok_s']:.1f}"]
        rows.append(row)
    best = {lab: max_good_rate(points) for lab, points in sweeps.items()}
    lines = [_grid(rows), ""]
    for lab, best_rate in best.items():
        shown = "none" if best_rate is None else f"{best_rate:g} req/s"
        lines.append(f"highest rate with mean QoE >= {QOE_GOOD}: {lab}: {shown}")
    values = list(best.values())
    if len(values) == 2 and values[0] is not None and values[1]:
        lines.append(f"ratio: {values[0] / values[1]:.2f}x")
    return "\n".join(lines)


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


# ---- plots ------------------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rate_curves(sweeps: dict[str, list[tuple[float, dict[str, Any]]]], path: Path) -> None:
    """Mean QoE and TTFT p99 against request rate, one line per server (infinite rates left out)."""
    plt = _pyplot()
    fig, (ax_qoe, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in sweeps.items():
        finite = sorted((rate, s) for rate, s in points if math.isfinite(rate))
        rates = [rate for rate, _ in finite]
        ax_qoe.plot(rates, [s["qoe"]["mean"] for _, s in finite], marker="o", label=label)
        ax_ttft.plot(rates, [s["ttft_s"]["p99"] for _, s in finite], marker="o", label=label)
    ax_qoe.axhline(QOE_GOOD, color="gray", linestyle=":", linewidth=1)
    ax_qoe.set(xlabel="request rate (req/s)", ylabel="mean QoE", ylim=(0, 1.05), title="QoE vs request rate")
    ax_ttft.set(xlabel="request rate (req/s)", ylabel="TTFT p99 (s)", title="TTFT p99 vs request rate")
    for ax in (ax_qoe, ax_ttft):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick_for_timelines(records: list[RequestRecord], count: int = 4) -> list[RequestRecord]:
    """Requests spread over the QoE range: the worst, the best, and evenly between."""
    ok = sorted((r for r in records if r.result.ok), key=lambda r: (r.metrics.qoe, r.result.index))
    if len(ok) <= count:
        return ok
    picks = {round(i * (len(ok) - 1) / (count - 1)) for i in range(count)}
    return [ok[i] for i in sorted(picks)]


def plot_timelines(records: list[RequestRecord], title: str, path: Path) -> None:
    """Token count against time for a few requests: arrived, displayed at reading speed, and expected."""
    plt = _pyplot()
    picks = pick_for_timelines(records)
    fig, axes = plt.subplots(1, max(1, len(picks)), figsize=(4 * max(1, len(picks)), 3.6), squeeze=False)
    for ax, rec in zip(axes[0], picks):
        arrived = rec.result.token_times
        counts = list(range(1, len(arrived) + 1))
        ax.step(arrived, counts, where="post", label="arrived", alpha=0.7)
        ax.step(displayed_times(arrived, rec.target.reading_speed), counts, where="post", label="displayed")
        ax.step(expected_times(len(arrived), rec.target), counts, where="post", label="expected", linestyle="--")
        ax.set(xlabel="seconds since sent", ylabel="tokens",
               title=f"request {rec.result.index}: QoE {rec.metrics.qoe:.2f}")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
