"""rillet's logits equal transformers' (fp32) on tiny random-weight models, from safetensors and GGUF.

Prompts of different lengths run as one continuously batched workload with a small token
budget, so the check covers chunked prefill, batched decode, prompts longer than one block and
longer than Gemma 3's sliding window (24 tokens in the tiny config).
"""
from __future__ import annotations

import pytest
import torch

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.sampling_params import SamplingParams
from tests.engine.helpers import capture_logits, run_to_completion

PROMPT_LENGTHS = [3, 17, 40, 75]


@pytest.fixture(scope="module")
def hf_models(tiny_models):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(m.hf_dir, dtype=torch.float32).eval()
            for f, m in tiny_models.items()}


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen3", "qwen2"])
@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_logits_match_transformers(tiny_models, hf_models, family: str, source: str) -> None:  # type: ignore[no-untyped-def]
    tiny = tiny_models[family]
    path = tiny.hf_dir if source == "safetensors" else tiny.gguf_path
    engine = Engine(str(path), EngineConfig(max_num_batched_tokens=32, num_kv_tokens=2048, max_num_seqs=8,
                                            quantization="none", lm_head_quantization="none"))
    records = capture_logits(engine)
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for i, n in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(3, vocab, (n,), generator=gen).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    run_to_completion(engine)
    assert len(records) == 6 * len(PROMPT_LENGTHS)
    hf = hf_models[family]
    worst = 0.0
    for tokens, logits in records:
        with torch.inference_mode():
            ref = hf(torch.tensor([tokens])).logits[0, -1].float()
        worst = max(worst, (ref - logits).abs().max().item())
    assert worst < 1e-4, f"max |logit difference| {worst:.2e}"
