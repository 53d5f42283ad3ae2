"""Helpers for engine tests: capture the logits the sampler sees, reference logits from transformers."""
from __future__ import annotations

from typing import Any

import torch

from rillet.engine.engine import Engine


def capture_logits(engine: Engine) -> list[tuple[list[int], torch.Tensor]]:
    """Record (tokens so far, logits of the next token) for every row the sampler gets."""
    records: list[tuple[list[int], torch.Tensor]] = []
    sampler = engine.runner.sampler
    inner = sampler.__call__

    def recording(logits: torch.Tensor, rows: list[Any]) -> Any:
        for row, lg in zip(rows, logits):
            records.append((list(row.prompt_ids) + list(row.output_ids), lg.clone()))
        return inner(logits, rows)

    engine.runner.sampler = recording  # type: ignore[assignment]
    return records


def run_to_completion(engine: Engine) -> list[Any]:
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def texts_and_ids(engine: Engine) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for out in run_to_completion(engine):
        ids.setdefault(out.request_id, []).extend(out.new_token_ids)
    return ids
