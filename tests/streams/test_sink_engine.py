"""Sink mode on tiny models: kept keys re-rotated exactly, output unchanged before the limit,
flat memory and a report after it, prompt scoring through evictions."""
from __future__ import annotations

import math

import pytest
import torch

from rillet.config import EngineConfig
from rillet.engine.attention import PagedAttention
from rillet.engine.engine import Engine
from rillet.engine.sink import KVShift
from rillet.request import ContextOverflow, ContextPolicy
from rillet.sampling_params import SamplingParams
from tests.engine.helpers import run_to_completion

SINK = ContextPolicy(ContextOverflow.SINK)
LIMIT = 128  # tiny gemma3's sliding window is 24


def engine_for(tiny_models, family: str, limit: int = LIMIT, kv_cache_dtype: str = "auto") -> Engine:  # type: ignore[no-untyped-def]
    return Engine(str(tiny_models[family].gguf_path),
                  EngineConfig(max_model_len=limit, num_kv_tokens=4096, max_num_batched_tokens=64,
                               kv_cache_dtype=kv_cache_dtype))


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_shifted_keys_equal_keys_rotated_at_the_new_position(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(tiny_models, "gemma3", kv_cache_dtype="float32")  # the rotation's own precision
    model = engine.model.model  # type: ignore[union-attr]
    rotaries = [model.rotary_global, model.rotary_local]  # KV group order: full, sliding
    bs, delta, num_kv = engine.config.block_size, 32, 40  # 40 kept positions after the shift
    table = [1, 2, 3]
    raw = torch.randn(num_kv + delta, engine.model_config.num_kv_heads, engine.model_config.head_dim)
    layers = [m for m in engine.model.modules() if isinstance(m, PagedAttention)]
    for layer in layers:
        # Old layout: positions 0..3 (sinks) in block 1, positions 36.. (kept) at slots 4.. after the shift.
        (k_old,) = rotaries[layer.group](torch.arange(num_kv + delta), (raw, None))
        flat = layer.k_cache.view(-1, *layer.k_cache.shape[2:])
        new_pos = torch.arange(num_kv)
        old_pos = torch.where(new_pos < 4, new_pos, new_pos + delta)
        flat[torch.tensor(table)[new_pos // bs] * bs + new_pos % bs] = k_old[old_pos]
    engine.kv_shifter.apply([KVShift("x", [table, table], [None, None], 4, num_kv, delta)])
    for layer in layers:
        kept = raw[torch.where(torch.arange(num_kv) < 4, torch.arange(num_kv), torch.arange(num_kv) + delta)]
        (expected,) = rotaries[layer.group](torch.arange(num_kv), (kept, None))
        flat = layer.k_cache.view(-1, *layer.k_cache.shape[2:])
        pos = torch.arange(num_kv)
        got = flat[torch.tensor(table)[pos // bs] * bs + pos % bs]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_sink_output_equals_normal_output_before_the_limit(tiny_models, family: str) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(tiny_models, family)
    ids = prompt(engine.model_config.vocab_size, 60, 1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("normal", ids, params)
    engine.add_request("sink", ids, params, context=SINK)
    outs = run_to_completion(engine)
    tokens = {rid: [t for o in outs if o.request_id == rid for t in o.new_token_ids] for rid in ("normal", "sink")}
    assert tokens["normal"] == tokens["sink"] and len(tokens["sink"]) == 40
    final = next(o for o in outs if o.request_id == "sink" and o.finished)
    assert final.overflow is not None and final.overflow.num_evicted_tokens == 0
    assert final.overflow.first_eviction_at is None


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_generation_far_past_the_limit_holds_flat_memory(tiny_models, family: str) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(tiny_models, family)
    ids = prompt(engine.model_config.vocab_size, 20, 2)
    engine.add_request("r", ids, SamplingParams(temperature=0.8, seed=3, max_tokens=600, ignore_eos=True),
                       context=SINK)
    most_blocks, outs = 0, []
    while engine.has_unfinished():
        outs += engine.step()
        assert all(s.start_pos + s.num_tokens <= LIMIT for s in engine.last_schedule.seqs)  # type: ignore[union-attr]
        most_blocks = max(most_blocks, max(p.num_usable - p.num_free for p in engine.kv.pools))
    assert most_blocks <= LIMIT // engine.config.block_size + 1
    final = outs[-1]
    assert final.finished and final.finish_reason == "length" and final.num_output_tokens == 600
    assert final.overflow is not None and final.overflow.mode == "sink"
    assert final.overflow.first_eviction_at == LIMIT
    assert final.overflow.num_evicted_tokens >= 620 - 1 - LIMIT
    assert all(p.num_free == p.num_usable for p in engine.kv.pools)


def test_scoring_a_long_prompt_in_sink_mode(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(tiny_models, "gemma3")
    ids = prompt(engine.model_config.vocab_size, 400, 4)
    params = SamplingParams(temperature=0, max_tokens=1)
    engine.add_request("short", ids[:100], params, score_prompt=True)  # within the limit: as normal
    engine.add_request("short-sink", ids[:100], params, context=SINK, score_prompt=True)
    engine.add_request("long", ids, params, context=SINK, score_prompt=True)
    outs = {o.request_id: o for o in run_to_completion(engine)}
    short, short_sink, long = (outs[k].prompt_logprobs for k in ("short", "short-sink", "long"))
    assert short is not None and short_sink is not None and long is not None
    assert len(short) == 100 and len(long) == 400 and short[0] is None
    torch.testing.assert_close(torch.tensor(short[1:]), torch.tensor(short_sink[1:]), atol=1e-4, rtol=1e-4)
    # Before the first eviction the long prompt is scored exactly as the short one.
    torch.testing.assert_close(torch.tensor(long[1:100]), torch.tensor(short[1:]), atol=1e-4, rtol=1e-4)
    assert all(lp is not None and math.isfinite(lp) and lp <= 0 for lp in long[1:])
    assert outs["long"].overflow is not None and outs["long"].overflow.num_evicted_tokens > 0


def test_truncate_left_reports_what_it_cut(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = engine_for(tiny_models, "llama")
    ids = prompt(engine.model_config.vocab_size, 200, 5)
    kept = engine.add_request("t", ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                              context=ContextPolicy(ContextOverflow.TRUNCATE_LEFT))
    assert kept == ids[-(LIMIT - 8):]
    final = run_to_completion(engine)[-1]
    assert final.overflow is not None and final.overflow.num_truncated_tokens == 200 - (LIMIT - 8)
    assert final.num_prompt_tokens == LIMIT - 8
