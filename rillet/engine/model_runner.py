"""Turns a schedule into tensors, runs the model, samples. Sees no request objects."""
from __future__ import annotations

import torch
from torch import nn

from rillet.engine.attention import AttentionMetadata, GroupMetadata, attention_context
from rillet.engine.outputs import SampledToken, ScheduledSeq, SchedulerOutput
from rillet.engine.sampler import Sampler, SamplingRow
from rillet.engine.scoring import score_prompts


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, windows: list[int | None],
                 eos_token_ids: frozenset[int]) -> None:
        self.model = model
        self.block_size = block_size
        self.windows = windows
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.prompt_logprobs: dict[str, list[float]] = {}  # the last step's prompt scores, per request

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        # Decodes (one token each) first, so attention can batch them.
        seqs = sorted(out.seqs, key=lambda s: s.num_tokens > 1)
        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long)
        positions = torch.tensor([p for s in seqs for p in range(s.start_pos, s.start_pos + s.num_tokens)])
        with attention_context(self._metadata(seqs, positions)):
            hidden = self.model(input_ids, positions)  # [T, hidden]
        scored = any(s.prompt_targets for s in seqs)
        self.prompt_logprobs = score_prompts(self.compute_logits, seqs, hidden) if scored else {}
        ends = torch.tensor([s.num_tokens for s in seqs]).cumsum(0) - 1
        sampling = [i for i, s in enumerate(seqs) if s.samples]
        if not sampling:
            return {}
        logits = self.compute_logits(hidden[ends[sampling]])  # [R, vocab]
        rows = [self._row(seqs[i]) for i in sampling]
        tokens = self.sampler(logits, rows)
        return {seqs[i].request_id: tok for i, tok in zip(sampling, tokens)}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model.compute_logits(hidden)  # type: ignore[operator]
        return logits.float()

    def _row(self, seq: ScheduledSeq) -> SamplingRow:
        params = seq.params
        assert params is not None
        gen = None
        if params.seed is not None:
            gen = self.generators.get(seq.request_id)
            if gen is None:
                gen = self.generators[seq.request_id] = torch.Generator().manual_seed(params.seed)
        banned = self.eos_token_ids if len(seq.output_ids) < params.min_tokens else ()
        return SamplingRow(params=params, prompt_ids=seq.prompt_ids, output_ids=seq.output_ids,
                           generator=gen, banned_ids=banned)

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # -- attention metadata ---------------------------------------------------------------------
    def _metadata(self, seqs: list[ScheduledSeq], positions: torch.Tensor) -> AttentionMetadata:
        num_decodes = sum(1 for s in seqs if s.num_tokens == 1)
        groups = [self._group(seqs, positions, g, w, num_decodes) for g, w in enumerate(self.windows)]
        return AttentionMetadata(num_decodes, groups)

    def _group(self, seqs: list[ScheduledSeq], positions: torch.Tensor, g: int, window: int | None,
               num_decodes: int) -> GroupMetadata:
        bs = self.block_size
        # NOTE: index arithmetic in Python ints, one tensor per array: cheaper than small tensor ops per sequence.
        slots = torch.tensor([s.block_tables[g][p // bs] * bs + p % bs
                              for s in seqs for p in range(s.start_pos, s.start_pos + s.num_tokens)])
        decode_blocks = decode_mask = decode_firsts = decode_positions = None
        if num_decodes:
            spans = [self._span(s, window) for s in seqs[:num_decodes]]
            width = max(len(r) for r in spans)
            decode_blocks = torch.tensor([s.block_tables[g][r.start:r.stop] + [0] * (width - len(r))
                                          for s, r in zip(seqs, spans)])
            decode_firsts = torch.tensor([r.start for r in spans])
            decode_positions = positions[:num_decodes]
            decode_mask = _mask(decode_firsts, width, bs, decode_positions.unsqueeze(1), window)[:, None, None]
        prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []
        first = num_decodes
        for s in seqs[num_decodes:]:
            if s.start_pos == 0 and (window is None or s.num_tokens <= window):
                prefills.append((first, s.num_tokens, None, None))  # its own keys only, causal
                first += s.num_tokens
                continue
            r = self._span(s, window)
            qpos = positions_of(s).unsqueeze(1)  # [n, 1]
            mask = _mask(torch.tensor([r.start]), len(r), bs, qpos, window)  # [n, keys]
            blocks = torch.tensor(s.block_tables[g][r.start:r.stop], dtype=torch.long)
            prefills.append((first, s.num_tokens, blocks, mask.unsqueeze(0).unsqueeze(0)))
            first += s.num_tokens
        return GroupMetadata(slots, decode_blocks, decode_mask, prefills, decode_firsts, decode_positions,
                             window or 0)

    def _span(self, s: ScheduledSeq, window: int | None) -> range:
        """Logical blocks holding keys that some query of this chunk can see."""
        first = 0 if window is None else max(0, s.start_pos - window + 1) // self.block_size
        return range(first, -(-(s.start_pos + s.num_tokens) // self.block_size))


def positions_of(s: ScheduledSeq) -> torch.Tensor:
    return torch.arange(s.start_pos, s.start_pos + s.num_tokens)


def _mask(first_blocks: torch.Tensor, num_blocks: int, block_size: int, qpos: torch.Tensor,
          window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask over gathered keys.

    first_blocks: [B] logical block each gathered row starts at; qpos: [B or n, 1] query positions.
    Returns [rows, num_blocks * block_size] bool.
    """
    kpos = first_blocks.unsqueeze(1) * block_size + torch.arange(num_blocks * block_size)
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask
