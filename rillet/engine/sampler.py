"""Picks each sampling row's next token from one step's logits.

Per row, in vLLM's order: logit_bias; repetition penalty over prompt and output tokens (positive
logits divided, negative multiplied); presence and frequency penalties over output tokens (OpenAI's
formula); banned ids set to -inf. Then argmax if greedy, else temperature, top-k, top-p, min-p and
one draw. Logprobs are reported from the raw logits, before any of this (vLLM's "raw_logprobs").
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from rillet.engine.outputs import SampledToken
from rillet.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplingRow", "SampledToken"]

# Vocabulary chunk width. With the chunk maxima ([rows, vocab / _CHUNK], one cheap pass),
# argmax and top-k only look inside the few chunks that can hold the winners; with the chunk sums,
# the inverse CDF picks a chunk, then a token inside it.
_CHUNK = 64
# Candidate counts tried for top-p / min-p without top-k before a full sort (see _sample_nucleus).
_NUCLEUS_CANDIDATES = (128, 2048, 32768)


@dataclass
class SamplingRow:
    """One sequence that samples this step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    # Seeded from params.seed and owned by the caller; None: the sampler's own generator.
    generator: torch.Generator | None = None
    # Set to -inf before sampling, e.g. the EOS ids while the output is shorter than min_tokens.
    banned_ids: tuple[int, ...] = ()


@dataclass
class _Plan:
    """Row indices by how they pick a token."""

    greedy: list[int] = field(default_factory=list)
    top_k: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))  # k -> rows
    nucleus: list[int] = field(default_factory=list)  # top-p and/or min-p, no top-k
    full: list[int] = field(default_factory=list)  # temperature only: the whole vocabulary

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int) -> _Plan:
        plan = cls()
        for i, row in enumerate(rows):
            p = row.params
            if p.greedy:
                plan.greedy.append(i)
            elif 0 < p.top_k < vocab_size:
                plan.top_k[p.top_k].append(i)
            elif p.top_p < 1.0 or p.min_p > 0.0:
                plan.nucleus.append(i)
            else:
                plan.full.append(i)
        return plan

    @property
    def sampled(self) -> list[int]:
        return sorted([i for rows in self.top_k.values() for i in rows] + self.nucleus + self.full)


class Sampler:
    """Chooses one token per row of a step's logits.

    A row's token depends only on its logits, its params and its generator, never on the other
    rows of the batch.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()  # for rows without their own
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._scratch = torch.empty(0)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """logits: [num_rows, vocab], one row per entry of `rows`; left as it was on return."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
        if not rows:
            return []
        logits = logits.float().contiguous()  # no copy when it already is
        if all(_plain_greedy(row) for row in rows):
            return [SampledToken(t) for t in _argmax(logits, _chunk_max(logits), range(len(rows))).tolist()]
        undo = _edit_logits(logits, rows)
        try:
            token_ids = self._choose(logits, rows)
        finally:
            if undo is not None:
                positions, originals = undo
                logits.view(-1)[positions] = originals
        return self._results(logits, rows, token_ids)

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Token ids [num_rows] chosen from the edited logits."""
        vocab_size = logits.shape[1]
        plan = _Plan.build(rows, vocab_size)
        token_ids = torch.empty(len(rows), dtype=torch.long)
        u = self._uniforms(rows, plan.sampled)  # [num_rows]
        cm = _chunk_max(logits) if plan.greedy or plan.top_k or plan.nucleus else torch.empty(0)
        if plan.greedy:
            token_ids[plan.greedy] = _argmax(logits, cm, plan.greedy)
        for k, idx in plan.top_k.items():
            vals, ids = _topk(logits, cm, idx, k)
            temps, top_p, min_p = _columns(rows, idx)
            token_ids[idx] = _sample_candidates(vals, ids, temps, top_p, min_p, None, u[idx])[0]
        if plan.nucleus:
            token_ids[plan.nucleus] = self._sample_nucleus(logits, cm, rows, plan.nucleus, u[plan.nucleus])
        if plan.full:
            token_ids[plan.full] = self._sample_full(logits, rows, plan.full, u[plan.full])
        return token_ids

    def _uniforms(self, rows: list[SamplingRow], idx: list[int]) -> torch.Tensor:
        """One U[0, 1) draw per sampled row, from the row's generator when it has one."""
        # NOTE: a sampled row draws exactly one uniform number and inverts the CDF of its kept
        # tokens. The exponential race (argmax of probs / noise) needs one noise value per
        # vocabulary entry, ~6 ms per row at vocab 262,144 on a plain CPU; one draw costs nothing,
        # and a generator advances by the same amount every step whatever the row's candidates.
        # Rows never share a draw and every floating-point reduction runs within one row, so a
        # seeded request samples the same tokens whatever else is in the batch.
        u = torch.zeros(len(rows), dtype=torch.float64)
        shared = [i for i in idx if rows[i].generator is None]
        if shared:
            u[shared] = torch.rand(len(shared), generator=self._generator, dtype=torch.float64)
        for i in idx:
            gen = rows[i].generator
            if gen is not None:
                u[i] = torch.rand((), generator=gen, dtype=torch.float64)
        return u

    def _sample_nucleus(self, logits: torch.Tensor, cm: torch.Tensor, rows: list[SamplingRow],
                        idx: list[int], u: torch.Tensor) -> torch.Tensor:
        """Top-p and/or min-p sampling, no top-k."""
        # NOTE: exact top-p needs the mass of the whole row but not its order. One exp pass per row
        # gives the normaliser (no sort); the candidates are the 128 most likely tokens (two-stage
        # top-k), then the best 2048, then 32768, for rows whose candidates hold less than top_p
        # (or all pass min_p); only rows whose best 32768 still fall short get a full sort. On most
        # steps an LLM puts 0.9-0.95 of its mass on far fewer than 128 tokens. At vocab 262,144 a
        # row costs ~0.1 ms at 128, ~1.5 ms at 2048, ~3 ms at 32768 and ~11 ms for the sort.
        vocab_size = logits.shape[1]
        temps, top_p, min_p = _columns(rows, idx)
        z = torch.ones(len(idx), dtype=torch.float64)  # row normaliser relative to its max
        need_z = (top_p < 1.0).nonzero().flatten().tolist()
        if need_z:
            z[need_z] = self._exp_sums(logits, [idx[g] for g in need_z], temps[need_z])[1].sum(-1)
        token_ids = torch.empty(len(idx), dtype=torch.long)
        pending = torch.arange(len(idx))
        for k in (*_NUCLEUS_CANDIDATES, vocab_size):
            k = min(k, vocab_size)
            members = [idx[g] for g in pending.tolist()]
            if k == vocab_size:
                vals, ids = torch.sort(logits[members], descending=True)
            else:
                vals, ids = _topk(logits, cm, members, k)
            chosen, complete = _sample_candidates(vals, ids, temps[pending], top_p[pending], min_p[pending],
                                                  z[pending], u[pending])
            if k == vocab_size:
                complete[:] = True
            token_ids[pending[complete]] = chosen[complete]
            pending = pending[~complete]
            if len(pending) == 0:
                break
        return token_ids

    def _sample_full(self, logits: torch.Tensor, rows: list[SamplingRow], idx: list[int],
                     u: torch.Tensor) -> torch.Tensor:
        """Temperature sampling over the whole vocabulary: the chunk sums pick a chunk by inverse
        CDF, then the chunk's own cumulative sum picks the token. One exp pass, no sort, no cumsum
        over the vocabulary."""
        vocab_size = logits.shape[1]
        temps = _columns(rows, idx)[0]
        maxes, sums = self._exp_sums(logits, idx, temps)  # [G], [G, num_chunks]
        cdf = sums.cumsum(-1)
        target = u[:, None] * cdf[:, -1:]
        chunk = _draw(cdf, target)  # [G, 1]
        below = torch.where(chunk > 0, cdf.gather(1, (chunk - 1).clamp(min=0)), 0.0)
        cols, valid = _chunk_columns(chunk, vocab_size)  # [G, _CHUNK]
        x = _gather(logits, idx, cols).double()
        w = ((x - maxes[:, None]) / temps[:, None]).exp() * valid
        j = _draw(w.cumsum(-1), target - below)
        return cols.gather(1, j).squeeze(1)

    def _exp_sums(self, logits: torch.Tensor, idx: list[int],
                  temps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max [G], chunk sums [G, num_chunks] float64) of exp((logits[idx] - max) / temps)."""
        num_rows, vocab_size = len(idx), logits.shape[1]
        if self._scratch.numel() < num_rows * vocab_size:
            self._scratch = torch.empty(num_rows * vocab_size)
        buf = self._scratch[: num_rows * vocab_size].view(num_rows, vocab_size)
        torch.index_select(logits, 0, torch.tensor(idx), out=buf)
        maxes = buf.amax(-1, keepdim=True)
        buf.sub_(maxes)
        if not bool((temps == 1.0).all()):
            buf.div_(temps.float()[:, None])
        buf.exp_()
        return maxes.squeeze(1).double(), _chunk_sums(buf)

    def _results(self, logits: torch.Tensor, rows: list[SamplingRow],
                 token_ids: torch.Tensor) -> list[SampledToken]:
        """Attaches logprobs of the raw logits where asked: the chosen token's, then the top n."""
        out = [SampledToken(t) for t in token_ids.tolist()]
        want = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if not want:
            return out
        maxes, sums = self._exp_sums(logits, want, torch.ones(len(want), dtype=torch.float64))
        lse = dict(zip(want, (maxes + sums.sum(-1).log()).tolist()))
        chosen = _gather(logits, want, token_ids[want][:, None]).squeeze(1).tolist()
        by_n: dict[int, list[int]] = defaultdict(list)
        for i, raw in zip(want, chosen):
            out[i].logprob = raw - lse[i]
            out[i].top_logprobs = []
            n = rows[i].params.logprobs or 0
            if n:
                by_n[n].append(i)
        cm = _chunk_max(logits) if by_n else torch.empty(0)
        for n, members in by_n.items():
            vals, ids = _topk(logits, cm, members, min(n, logits.shape[1]))
            for i, tok, val in zip(members, ids.tolist(), vals.tolist()):
                out[i].top_logprobs = [(t, v - lse[i]) for t, v in zip(tok, val)]
        return out


def _plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return p.greedy and p.logprobs is None and not _edits_logits(row)


def _edits_logits(row: SamplingRow) -> bool:
    p = row.params
    return (bool(p.logit_bias) or bool(row.banned_ids) or p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)


def _edit_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Applies bias, penalties and bans in place, all rows at once through flat positions
    (row * vocab + token). Returns (positions, original values) to undo the edits, or None."""
    vocab_size = logits.shape[1]
    bias_pos: list[int] = []
    bias: list[float] = []
    banned: list[int] = []
    seen = _TokenLists()  # repetition penalty: prompt and output tokens
    said = _TokenLists()  # presence and frequency penalties: output tokens
    for r, row in enumerate(rows):
        p, base = row.params, r * vocab_size
        for t, b in (p.logit_bias or {}).items():
            if t < vocab_size:
                bias_pos.append(base + t)
                bias.append(b)
        banned.extend(base + t for t in row.banned_ids if 0 <= t < vocab_size)
        if p.repetition_penalty != 1.0:
            seen.add(r, row.prompt_ids + row.output_ids, (p.repetition_penalty,))
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            said.add(r, row.output_ids, (p.presence_penalty, p.frequency_penalty))
    if not (bias_pos or banned or seen.rows or said.rows):
        return None
    flat = logits.view(-1)
    seen_pos, seen_values = seen.positions(vocab_size)
    said_pos, said_values = said.positions(vocab_size)
    bias_t, banned_t = torch.tensor(bias_pos, dtype=torch.long), torch.tensor(banned, dtype=torch.long)
    positions = torch.cat([bias_t, seen_pos, said_pos, banned_t])
    originals = flat[positions]
    if bias_pos:
        flat.index_put_((bias_t,), torch.tensor(bias, dtype=flat.dtype), accumulate=True)
    if seen.rows:
        v, penalty = flat[seen_pos], seen_values[:, 0]  # repeats read the same value, write the same result
        flat[seen_pos] = torch.where(v > 0, v / penalty, v * penalty)
    if said.rows:
        flat[said_pos] = flat[said_pos] - said_values[:, 0]  # presence: once per distinct token
        flat.index_put_((said_pos,), -said_values[:, 1], accumulate=True)  # frequency: per occurrence
    if banned:
        flat[banned_t] = -math.inf
    return positions, originals


@dataclass
class _TokenLists:
    """Token ids of several rows, concatenated, with per-row values (e.g. a penalty)."""

    ids: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    values: list[tuple[float, ...]] = field(default_factory=list)

    def add(self, row: int, token_ids: list[int], values: tuple[float, ...]) -> None:
        self.ids += token_ids
        self.rows.append(row)
        self.counts.append(len(token_ids))
        self.values.append(values)

    def positions(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions [N] (repeats kept) and their row's values [N, num_values]."""
        if not self.rows:
            return torch.empty(0, dtype=torch.long), torch.empty(0, 0)
        counts = torch.tensor(self.counts)
        ids = torch.tensor(self.ids, dtype=torch.long)
        rows = torch.tensor(self.rows).repeat_interleave(counts)
        values = torch.tensor(self.values, dtype=torch.float32).repeat_interleave(counts, dim=0)
        ok = (ids >= 0) & (ids < vocab_size)
        return (rows * vocab_size + ids)[ok], values[ok]


def _columns(rows: list[SamplingRow], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """temperature, top_p, min_p of rows `idx`, each [G] float64."""
    params = [rows[i].params for i in idx]
    return (torch.tensor([p.temperature for p in params], dtype=torch.float64),
            torch.tensor([p.top_p for p in params], dtype=torch.float64),
            torch.tensor([p.min_p for p in params], dtype=torch.float64))


def _sample_candidates(vals: torch.Tensor, ids: torch.Tensor, temps: torch.Tensor, top_p: torch.Tensor,
                       min_p: torch.Tensor, z: torch.Tensor | None,
                       u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one of the candidates `ids` whose edited logits `vals` ([G, K]) are sorted descending.

    z: [G] the whole row's sum of exp((logit - max) / T), or None to renormalise over the
    candidates (top-k). Returns (token ids [G], complete [G]); complete is False where the kept
    set may continue past the K candidates.
    """
    w = ((vals.double() - vals[:, :1].double()) / temps[:, None]).exp()  # [G, K]: p / p_max
    mass = w.cumsum(-1)
    total = mass[:, -1] if z is None else z
    limit = torch.where(top_p < 1.0, top_p * total, math.inf)
    # top-p keeps a token while the mass before it is under top_p; min-p while p >= min_p * p_max.
    keep = (mass - w < limit[:, None]) & (w >= min_p[:, None])
    kept = torch.where(keep, w, 0.0).cumsum(-1)
    j = _draw(kept, u[:, None] * kept[:, -1:])
    return ids.gather(1, j).squeeze(1), ~keep[:, -1]


def _draw(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index [G, 1] of the first entry of `cdf` ([G, K], nondecreasing) above `target` [G, 1].

    The target is held below the total, so the index lands on an entry of positive weight.
    """
    total = cdf[:, -1:]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)


def _chunk_max(x: torch.Tensor) -> torch.Tensor:
    """x: [B, V] -> max of each _CHUNK-wide column chunk [B, ceil(V / _CHUNK)]."""
    num_rows, vocab_size = x.shape
    full = vocab_size // _CHUNK * _CHUNK
    cm = x[:, :full].view(num_rows, full // _CHUNK, _CHUNK).amax(-1)
    if full < vocab_size:
        cm = torch.cat([cm, x[:, full:].amax(-1, keepdim=True)], dim=1)
    return cm


def _chunk_sums(x: torch.Tensor) -> torch.Tensor:
    """x: [G, V] -> sum of each _CHUNK-wide column chunk [G, ceil(V / _CHUNK)] float64."""
    num_rows, vocab_size = x.shape
    full = vocab_size // _CHUNK * _CHUNK
    sums = x[:, :full].view(num_rows, full // _CHUNK, _CHUNK).sum(-1)
    if full < vocab_size:
        sums = torch.cat([sums, x[:, full:].sum(-1, keepdim=True)], dim=1)
    return sums.double()


def _chunk_columns(chunks: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chunks: [G, c] -> their columns [G, c * _CHUNK] (clamped into the vocabulary) and validity."""
    cols = (chunks[:, :, None] * _CHUNK + torch.arange(_CHUNK)).flatten(1)
    return cols.clamp(max=vocab_size - 1), cols < vocab_size


def _gather(x: torch.Tensor, idx: list[int] | range, cols: torch.Tensor) -> torch.Tensor:
    """x[idx[g], cols[g, j]] -> [G, C], without copying whole rows."""
    rows = torch.tensor(idx, dtype=torch.long)
    return x.view(-1)[rows[:, None] * x.shape[1] + cols]


def _argmax(x: torch.Tensor, cm: torch.Tensor, idx: list[int] | range) -> torch.Tensor:
    """argmax over rows `idx` of x [B, V] -> [G]: the first chunk holding the row max, then the
    first column in it holding the max; the same ties as torch.argmax."""
    chunk = cm[torch.tensor(idx, dtype=torch.long)].argmax(-1, keepdim=True)  # [G, 1]
    cols, _ = _chunk_columns(chunk, x.shape[1])  # clamped repeats of the last column come after it
    return cols.gather(1, _gather(x, idx, cols).argmax(-1, keepdim=True)).squeeze(1)


def _topk(x: torch.Tensor, cm: torch.Tensor, idx: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k (values, ids) [G, k], sorted descending, of rows `idx` of x [B, V].

    A row's k largest values lie in the k chunks with the largest maxima, so top-k runs over
    k * _CHUNK gathered values instead of the whole row.
    """
    vocab_size = x.shape[1]
    if k * _CHUNK * 4 > vocab_size:  # the chunks would cover much of the row
        return torch.topk(x[idx], k, dim=-1)
    _, chunks = cm[torch.tensor(idx, dtype=torch.long)].topk(k, dim=-1, sorted=False)
    cols, valid = _chunk_columns(chunks, vocab_size)
    vals, j = _gather(x, idx, cols).masked_fill_(~valid, -math.inf).topk(k, dim=-1)
    return vals, cols.gather(1, j)
