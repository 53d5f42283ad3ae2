"""Engine-level behaviour on a tiny model: chunked prefill, prefix cache, batch invariance, abort."""
from __future__ import annotations

import torch

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.sampling_params import SamplingParams
from tests.engine.helpers import run_to_completion, texts_and_ids

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_long_prompt_is_chunked_while_streams_get_a_token_every_step(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(str(tiny_models["gemma3"].gguf_path),
                    EngineConfig(max_num_batched_tokens=256, num_kv_tokens=8192, max_stall_ms=0))
    vocab = engine.model_config.vocab_size
    streams = [str(i) for i in range(4)]
    for i in streams:
        engine.add_request(i, prompt(vocab, 10, int(i)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()  # the four prompts
    engine.add_request("long", prompt(vocab, 3000, 99), GREEDY)
    chunks = []
    while engine.kv.block_tables.get("long") is None or engine.scheduler.requests["long"].num_output_tokens == 0:
        engine.step()
        record = engine.last_schedule.num_scheduled_tokens  # type: ignore[union-attr]
        assert all(record[s] == 1 for s in streams), record
        chunks.append(record["long"])
    assert len(chunks) >= 10 and sum(chunks) == 3000 and max(chunks) <= 256 - 4


def test_prefix_cache_hits_and_keeps_the_output(tiny_models) -> None:  # type: ignore[no-untyped-def]
    path = str(tiny_models["llama"].gguf_path)
    cached = Engine(path, EngineConfig(num_kv_tokens=8192))
    vocab = cached.model_config.vocab_size
    shared = prompt(vocab, 1000, 1)
    cached.add_request("first", shared + prompt(vocab, 20, 2), GREEDY)
    run_to_completion(cached)
    cached.add_request("second", shared + prompt(vocab, 30, 3), GREEDY)
    second = texts_and_ids(cached)["second"]
    hits_before = cached.kv.num_hits
    assert hits_before >= 992  # every full block of the shared 1,000 tokens (block size 16)

    uncached = Engine(path, EngineConfig(num_kv_tokens=8192, enable_prefix_caching=False))
    uncached.add_request("second", shared + prompt(vocab, 30, 3), GREEDY)
    assert texts_and_ids(uncached)["second"] == second
    assert uncached.kv.num_hits == 0


def test_prefix_cache_with_sliding_window_layers(tiny_models) -> None:  # type: ignore[no-untyped-def]
    path = str(tiny_models["gemma3"].gguf_path)
    cached = Engine(path, EngineConfig(num_kv_tokens=8192))
    vocab = cached.model_config.vocab_size
    shared = prompt(vocab, 200, 1)
    cached.add_request("a", shared + [5], GREEDY)
    run_to_completion(cached)
    cached.add_request("b", shared + [6, 7], GREEDY)
    out = texts_and_ids(cached)["b"]
    assert cached.kv.num_hits == 192
    fresh = Engine(path, EngineConfig(num_kv_tokens=8192, enable_prefix_caching=False))
    fresh.add_request("b", shared + [6, 7], GREEDY)
    assert texts_and_ids(fresh)["b"] == out


def test_abort_frees_every_block_within_one_step(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(str(tiny_models["qwen3"].gguf_path), EngineConfig(max_num_batched_tokens=64, num_kv_tokens=4096))
    vocab = engine.model_config.vocab_size
    free = [p.num_free for p in engine.kv.pools]
    engine.add_request("decoding", prompt(vocab, 20, 1), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("prefilling", prompt(vocab, 500, 2), GREEDY)
    engine.add_request("queued", prompt(vocab, 20, 3), GREEDY)
    engine.step()
    engine.step()
    for rid in ("decoding", "prefilling", "queued"):
        engine.abort(rid)
    assert [p.num_free for p in engine.kv.pools] == free
    assert not engine.has_unfinished() and engine.step() == []


def test_n_choices_and_seeds(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(str(tiny_models["qwen2"].gguf_path), EngineConfig(num_kv_tokens=4096))
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=42, ignore_eos=True)
    engine.add_request("a", prompt(vocab, 9, 1), params)
    outs = run_to_completion(engine)
    choices: dict[int, list[int]] = {}
    for o in outs:
        choices.setdefault(o.index, []).extend(o.new_token_ids)
    assert sorted(choices) == [0, 1, 2] and all(len(c) == 12 for c in choices.values())
    assert len({tuple(c) for c in choices.values()}) > 1
    # Same seed, different batch company: same output.
    engine.add_request("b", prompt(vocab, 9, 1), params)
    for i in range(5):
        engine.add_request(f"noise{i}", prompt(vocab, 30, i), SamplingParams(temperature=1.0, max_tokens=20))
    again: dict[int, list[int]] = {}
    for o in run_to_completion(engine):
        if o.request_id == "b":
            again.setdefault(o.index, []).extend(o.new_token_ids)
    assert again == choices
