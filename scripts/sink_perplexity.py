"""Perplexity of a long natural text in sink mode, against dense attention over a sliding window
and against a plain window cache without sinks (the comparison of the StreamingLLM paper).

The text is the Python Language Reference's topic pages that ship with Python
(`pydoc_data.topics`), so nothing is downloaded. With the context limited to `--context`
tokens, the same `--num-tokens` tokens are scored three ways:

  sink     rillet's sink mode: the first 4 tokens and the most recent window stay in the cache,
           the tokens between are evicted and the kept keys re-rotated (one pass, flat memory);
  window   the same with no sink tokens (a plain rolling window cache);
  dense    every token scored by a fresh forward pass over the `--context` tokens before it,
           recomputed for each stride of `--stride` tokens (so each token sees between
           context - stride and context tokens; the first `--context` tokens see everything).

    python scripts/sink_perplexity.py --num-tokens 20480 --context 2048
"""
from __future__ import annotations

import argparse
import math
import time

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.request import ContextOverflow, ContextPolicy
from rillet.sampling_params import SamplingParams

SCORE = SamplingParams(temperature=0, max_tokens=1)


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def score(engine: Engine, rid: str, ids: list[int], context: ContextPolicy | None = None
          ) -> tuple[list[float], int]:
    """Prompt log-probabilities of `ids` (first token excluded), and the most KV blocks held at once."""
    engine.add_request(rid, ids, SCORE, context=context, score_prompt=True)
    scores: list[float | None] | None = None
    most_blocks = 0
    while engine.has_unfinished():
        for out in engine.step():
            scores = out.prompt_logprobs if out.prompt_logprobs is not None else scores
        most_blocks = max(most_blocks, engine.kv.pools[0].num_usable - engine.kv.pools[0].num_free)
    assert scores is not None
    return [s for s in scores[1:] if s is not None], most_blocks


def perplexity(scores: list[float]) -> float:
    return math.exp(-sum(scores) / len(scores))


def dense(engine: Engine, ids: list[int], context: int, stride: int) -> list[float]:
    """Sliding-window recomputation: score the last `stride` tokens of each window ending at `end`.

    NOTE: a window holds context - 1 tokens (the sink cache holds at most `context` with the one being
    scored; the request's one generated token needs the last place), and starts with the text's
    first token when that is BOS: Gemma is lost without it, and the sinks keep it too.
    """
    head = ids[:1] if ids[0] == engine.tokenizer.bos_token_id else []
    size = context - 1 - len(head)
    scores, _ = score(engine, "dense-0", ids[:context - 1])
    done = context - 1  # tokens scored so far, counting the unscored first one
    while done < len(ids):
        end = min(done + stride, len(ids))
        window, _ = score(engine, f"dense-{done}", head + ids[end - size:end])
        scores += window[-(end - done):]
        done = end
    return scores


def generate(engine: Engine, prompt: list[int], num_tokens: int) -> None:
    """Sample `num_tokens` tokens in sink mode; print the KV blocks held and the time as it goes."""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=num_tokens, ignore_eos=True)
    engine.add_request("gen", prompt, params, context=ContextPolicy(ContextOverflow.SINK))
    start, most_blocks, done = time.perf_counter(), 0, 0
    print(f"{'tokens':>8} {'KV blocks':>10} {'most':>6} {'time s':>8}")
    while engine.has_unfinished():
        for out in engine.step():
            done = out.num_output_tokens
            if out.finished:
                print(f"finished: {out.finish_reason}, {out.num_output_tokens} tokens, {out.overflow}")
        held = engine.kv.pools[0].num_usable - engine.kv.pools[0].num_free
        most_blocks = max(most_blocks, held)
        if done % 500 == 0 and done:
            print(f"{done:8d} {held:10d} {most_blocks:6d} {time.perf_counter() - start:8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    parser.add_argument("--num-tokens", type=int, default=20480)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per step (the sink run's prefill chunk)")
    parser.add_argument("--stride", type=int, default=256, help="the dense baseline's recompute stride")
    parser.add_argument("--modes", default="sink,window,dense")
    parser.add_argument("--generate", type=int, default=0,
                        help="instead: generate this many tokens in sink mode and report memory")
    args = parser.parse_args()
    engine = Engine(args.model, EngineConfig(max_model_len=args.context, max_num_batched_tokens=args.chunk,
                                             num_kv_tokens=args.context + 2 * args.chunk, max_num_seqs=1,
                                             enable_prefix_caching=False, quantization="none",
                                             lm_head_quantization="none"))
    ids = engine.tokenizer.encode(corpus())[:args.num_tokens]
    assert len(ids) == args.num_tokens, f"the corpus has only {len(ids)} tokens"
    print(f"{len(ids)} tokens of pydoc_data.topics, context {args.context}, chunk {args.chunk}, "
          f"stride {args.stride}, block size {engine.config.block_size}")
    if args.generate:
        return generate(engine, ids[:args.context // 2], args.generate)
    print(f"{'mode':8} {'ppl':>8} {'ppl after ctx':>14} {'most KV blocks':>15} {'time s':>8}")
    for mode in args.modes.split(","):
        start = time.perf_counter()
        blocks = 0
        if mode == "dense":
            scores = dense(engine, ids, args.context, args.stride)
        else:
            policy = ContextPolicy(ContextOverflow.SINK, num_sink_tokens=4 if mode == "sink" else 0)
            scores, blocks = score(engine, mode, ids, policy)
        assert len(scores) == len(ids) - 1
        late = scores[args.context - 1:]  # the tokens scored after the context filled up
        print(f"{mode:8} {perplexity(scores):8.3f} {perplexity(late):14.3f} {blocks or '-':>15} "
              f"{time.perf_counter() - start:8.1f}", flush=True)


if __name__ == "__main__":
    main()
