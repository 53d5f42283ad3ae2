"""Prompt scoring: the log-probability of each prompt token given the tokens before it."""
from __future__ import annotations

from collections.abc import Callable

import torch

from rillet.engine.outputs import ScheduledSeq

_ROWS_PER_PASS = 128  # bounds the [rows, vocab] logits held at once


def score_prompts(compute_logits: Callable[[torch.Tensor], torch.Tensor], seqs: list[ScheduledSeq],
                  hidden: torch.Tensor) -> dict[str, list[float]]:
    """log p(target | prefix) for every row of the seqs that carry prompt targets.

    seqs in the order their tokens are laid out in `hidden`: [total tokens, hidden_size].
    """
    out: dict[str, list[float]] = {}
    first = 0
    for s in seqs:
        if s.prompt_targets:
            scores = []
            targets = torch.tensor(s.prompt_targets, dtype=torch.long)
            for lo in range(0, len(targets), _ROWS_PER_PASS):
                t = targets[lo:lo + _ROWS_PER_PASS]
                logits = compute_logits(hidden[first + lo:first + lo + len(t)])  # [rows, vocab]
                scores.extend(logits.log_softmax(-1).gather(1, t.unsqueeze(1)).squeeze(1).tolist())
            out[s.request_id] = scores
        first += s.num_tokens
    return out
