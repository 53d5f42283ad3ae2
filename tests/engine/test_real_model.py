"""The embedded Gemma 3 270M: greedy parity with transformers, batch invariance, preemption."""
from __future__ import annotations

import os

import pytest
import torch

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.sampling_params import SamplingParams
from tests.engine.helpers import texts_and_ids

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Les trois couleurs du drapeau français sont",
    "1, 2, 3, 5, 8, 13,",
]
GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    # The exact path: "auto" decodes small batches with int8 weights, so batch composition would show.
    return Engine(None, EngineConfig(num_kv_tokens=16384, max_num_batched_tokens=256, quantization="none"))


def run_alone(engine: Engine, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    outs = []
    for i, p in enumerate(prompts):
        engine.add_request(f"alone{i}", p, params)
        outs.append(texts_and_ids(engine)[f"alone{i}"])
    return outs


def run_together(engine: Engine, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"batch{i}", p, params)
    got = texts_and_ids(engine)
    return [got[f"batch{i}"] for i in range(len(prompts))]


def test_greedy_matches_transformers_on_the_same_gguf(engine: Engine, default_model_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    ours = run_together(engine, PROMPTS, GREEDY_32)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name,
                                              dtype=torch.float32).eval()
    for prompt, got in zip(PROMPTS, ours):
        ids = engine.tokenizer.encode(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert got == ref[0, len(ids):].tolist(), prompt


def mixed_prompts(engine: Engine) -> list[str]:
    words = "the river runs past stones and roots while the town sleeps under a grey morning sky".split()
    return [" ".join(words[: 2 + (i * 7) % len(words)] * (1 + i % 4)) for i in range(16)]


INVARIANCE = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(engine: Engine) -> list[list[int]]:
    return run_alone(engine, mixed_prompts(engine), INVARIANCE)


def test_batch_invariance(engine: Engine, alone: list[list[int]]) -> None:
    assert run_together(engine, mixed_prompts(engine), INVARIANCE) == alone


def test_batch_invariance_under_preemption(engine: Engine, alone: list[list[int]]) -> None:
    small = Engine(None, EngineConfig(num_kv_tokens=384, max_num_batched_tokens=256, max_num_seqs=16,
                                      quantization="none"))
    together = run_together(small, mixed_prompts(engine), INVARIANCE)
    assert small.scheduler.num_preemptions > 0
    assert together == alone


def test_llm_generate_on_the_default_model() -> None:
    from rillet.llm import LLM

    llm = LLM()
    res = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert res[0].text and res[0].text == llm.tokenizer.decode(res[0].token_ids)
    assert res[0].usage.completion_tokens == 8 and res[0].finish_reason == "length"
    assert res[0].usage.prompt_tokens == len(llm.tokenizer.encode("The capital of France is"))


@pytest.mark.skipif(os.environ.get("RILLET_SKIP_CLI") == "1", reason="CLI smoke test disabled")
def test_cli_generate_streams_text() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rillet.cli", "generate", "The capital of France is",
                           "--max-tokens", "8", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
