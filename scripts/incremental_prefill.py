"""Time from the last piece of a prompt to the first token, with the prompt sent in pieces through a
session (prefilled as it arrives) against the same-sized prompt sent at once.

    rillet serve --port 8000 &
    python scripts/incremental_prefill.py --url http://127.0.0.1:8000

A 1,500-token text (Python's own reference pages, `pydoc_data.topics`) goes out in 30 pieces, one
every `--pace` seconds; the final piece's request is timed to its first streamed token. The same
prompt length sent at once (a different text, so the prefix cache cannot help) is timed the same
way, and a 64-token stream gives the decode step. Each round uses fresh texts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import httpx


def texts(http: httpx.Client, num_tokens: int, count: int) -> list[str]:
    from pydoc_data.topics import topics

    ids = http.post("/tokenize", json={"prompt": "\n\n".join(topics[k] for k in sorted(topics)),
                                       "add_special_tokens": False}).json()["tokens"]
    out = []
    for i in range(count):
        chunk = ids[(i + 1) * 4 * num_tokens:][:num_tokens]
        out.append(http.post("/detokenize", json={"tokens": chunk}).json()["prompt"])
    return out


def pieces(text: str, n: int) -> list[str]:
    size = len(text) // n
    return [text[i * size:(i + 1) * size if i < n - 1 else len(text)] for i in range(n)]


def first_token_s(http: httpx.Client, path: str, body: dict[str, object]) -> tuple[float, list[float]]:
    """Seconds to the first streamed token, and the gaps between the tokens after it."""
    start = time.perf_counter()
    times = []
    with http.stream("POST", path, json={**body, "stream": True, "temperature": 0, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in itertools.pairwise(times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--num-tokens", type=int, default=1500)
    parser.add_argument("--num-pieces", type=int, default=30)
    parser.add_argument("--pace", type=float, default=0.5, help="seconds between pieces")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=600) as http:
        corpus = texts(http, args.num_tokens, 2 * args.rounds + 1)
        _, gaps = first_token_s(http, "/v1/completions", {"prompt": corpus[-1][:200], "max_tokens": 64})
        step = statistics.median(gaps)
        whole, incremental = [], []
        for r in range(args.rounds):
            whole.append(first_token_s(http, "/v1/completions", {"prompt": corpus[2 * r], "max_tokens": 1})[0])
            parts = pieces(corpus[2 * r + 1], args.num_pieces)
            sid = http.post("/v1/sessions", json={"prompt": parts[0]}).json()["id"]
            for part in parts[1:-1]:
                time.sleep(args.pace)
                http.post(f"/v1/sessions/{sid}/append", json={"text": part}).raise_for_status()
            time.sleep(args.pace)
            incremental.append(first_token_s(http, f"/v1/sessions/{sid}/generate",
                                             {"text": parts[-1], "max_tokens": 1})[0])
    print(f"decode step (median of 63 gaps): {step * 1000:.0f} ms")
    print(f"prompt sent at once, time to first token:        "
          f"{statistics.mean(whole) * 1000:7.0f} ms = {statistics.mean(whole) / step:5.1f} decode steps")
    print(f"sent in {args.num_pieces} pieces, last piece to first token: "
          f"{statistics.mean(incremental) * 1000:7.0f} ms = {statistics.mean(incremental) / step:5.1f} decode steps")
    print("rounds (ms):", [round(w * 1000) for w in whole], [round(i * 1000) for i in incremental])


if __name__ == "__main__":
    main()
