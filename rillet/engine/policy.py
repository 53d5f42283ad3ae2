"""Which requests a step serves first, when it cannot serve them all. Pure Python.

Three policies, one interface (`Policy.rank`: lower keys are served first):

- fcfs: running requests in admission order, then waiting ones in arrival order;
- priority: by the request's priority number (lower first), then as fcfs;
- qoe: by *slack*, the seconds until the request's reader runs out of text (Andes, Liu et al. 2024).

Slack. A user reads a stream at `tokens_per_s` and wants the first token within `ttft_s`. The
reader's screen shows a token when it has arrived and 1/tokens_per_s after the previous one, so
with tokens delivered at t_1..t_n the screen is busy until

    shown_n = max(t_n, shown_{n-1} + 1/speed)        and   slack = shown_n + 1/speed - now.

Before the first token, slack = arrival + ttft_s - now (the time left to the TTFT target). A
stream far ahead of its reader has seconds of slack; one that is late has negative slack. Serving
the least slack first is earliest-deadline-first on "when does this reader stall": a stream that
is not served loses slack at one second per second, so every request is eventually the most
urgent one and nothing starves.

Under the qoe policy, when requests short of slack (below half of `pause_slack_s`) wait for a batch
slot, streams more than `pause_slack_s` ahead of their readers give up theirs: they keep their KV,
their readers keep reading from the buffer, and the waiting request starts now instead of when some
stream finishes. A step serves at most max_num_seqs requests, least slack first; and while a
stream's reader is waiting for text, or the predicted step time exceeds a reader's token interval,
streams more than `pause_slack_s` ahead sit the step out (the most slack first), so that the
others' steps are shorter: with readers of different speeds, a slow reader's surplus becomes a
fast reader's tokens. A request that was served in
the previous step gets `stay_bonus_s` of extra urgency, so near-ties do not flip every step.

Tenant fairness (virtual token counters, Sheng et al. 2024): each tenant's counter grows with the
tokens its requests are served; requests of the tenant with the smallest counter go first, and a
tenant that comes back from idle starts at the smallest active counter, so it cannot bank credit.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace


class SchedulingPolicy(str, enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"
    QOE = "qoe"


@dataclass(frozen=True)
class QoETarget:
    """First token within `ttft_s`, then `tokens_per_s` (the reader's speed)."""

    ttft_s: float = 1.0
    tokens_per_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.ttft_s < float("inf"):
            raise ValueError(f"qoe.ttft_s must be a number of seconds >= 0, got {self.ttft_s}")
        if not 0 < self.tokens_per_s < float("inf"):
            raise ValueError(f"qoe.tokens_per_s must be > 0, got {self.tokens_per_s}")


@dataclass
class ReaderClock:
    """The reader of one stream: when it will have read everything delivered so far."""

    target: QoETarget
    arrival_time: float
    num_delivered: int = 0
    shown_until: float = 0.0  # when the newest delivered token is (or was) put on screen

    def deliver(self, now: float, num_tokens: int = 1) -> None:
        interval = 1.0 / self.target.tokens_per_s
        for _ in range(num_tokens):
            self.shown_until = now if self.num_delivered == 0 else max(now, self.shown_until + interval)
            self.num_delivered += 1

    def slack(self, now: float) -> float:
        """Seconds until the reader wants a token that has not arrived (negative: it is waiting)."""
        if self.num_delivered == 0:
            return self.arrival_time + self.target.ttft_s - now
        return self.shown_until + 1.0 / self.target.tokens_per_s - now

    def behind(self, now: float) -> float:
        """Seconds the reader has been waiting beyond the expected pace (0 when on pace)."""
        return max(0.0, -self.slack(now))


@dataclass
class TenantCounters:
    """Virtual token counters: service received per tenant, for fair sharing."""

    served: dict[str, float] = field(default_factory=dict)
    prefill_weight: float = 1.0
    decode_weight: float = 2.0

    def activate(self, tenant: str, active: Iterable[str]) -> None:
        """A tenant with no request in the system starts at the smallest active counter."""
        others = [self.served[t] for t in set(active) if t in self.served and t != tenant]
        floor = min(others, default=0.0)
        self.served[tenant] = max(self.served.get(tenant, 0.0), floor)

    def charge(self, tenant: str, num_prefill_tokens: int, num_decode_tokens: int) -> None:
        self.served[tenant] = self.served.get(tenant, 0.0) + (
            self.prefill_weight * num_prefill_tokens + self.decode_weight * num_decode_tokens)

    def key(self, tenant: str) -> float:
        return self.served.get(tenant, 0.0)


@dataclass(frozen=True)
class Isolation:
    """A step run for the least served tenant's new request (see Policy.isolate)."""

    tenant: str
    limit: float  # that tenant's counter: tenants below it may join the step
    held: frozenset[str] = frozenset()  # served requests of other tenants that sit the step out


@dataclass(frozen=True)
class PolicyConfig:
    policy: SchedulingPolicy = SchedulingPolicy.FCFS
    pause_slack_s: float = 3.0
    stay_bonus_s: float = 0.25
    fair_tenants: bool = False


@dataclass
class Candidate:
    """What the policy needs to know of one request; the scheduler fills it from a Request."""

    request_id: str
    arrival_time: float
    priority: int = 0
    tenant: str = ""
    clock: ReaderClock | None = None
    served_last_step: bool = False


class Policy:
    def __init__(self, config: PolicyConfig, counters: TenantCounters | None = None) -> None:
        self.config = config
        self.counters = counters or TenantCounters()

    def rank(self, c: Candidate, now: float) -> tuple[float, ...]:
        """Sort key: lower is served first."""
        fair = (self.counters.key(c.tenant),) if self.config.fair_tenants else ()
        if self.config.policy is SchedulingPolicy.QOE and c.clock is not None:
            slack = c.clock.slack(now) - (self.config.stay_bonus_s if c.served_last_step else 0.0)
            return (*fair, slack, c.arrival_time)
        if self.config.policy is SchedulingPolicy.PRIORITY:
            return (*fair, float(c.priority), c.arrival_time)
        return (*fair, c.arrival_time)

    def paused(self, running: list[Candidate], waiting: list[Candidate], free_slots: int, now: float) -> set[str]:
        """qoe: streams to pause so that waiting requests short of slack get a batch slot.

        Only streams more than `pause_slack_s` ahead of their readers pause, the furthest ahead
        first, and only as many as there are short requests that find no free slot.
        """
        if self.config.policy is not SchedulingPolicy.QOE:
            return set()
        limit = self.config.pause_slack_s
        short = sum(1 for c in waiting if c.clock is not None and c.clock.slack(now) < limit / 2)
        need = short - free_slots
        if need <= 0:
            return set()
        ahead = [(c.clock.slack(now), c.request_id) for c in running if c.clock is not None]
        ahead = sorted((x for x in ahead if x[0] > limit), reverse=True)
        return {rid for _, rid in ahead[:need]}

    def trim(self, served: list[Candidate], now: float, step_time: StepTimeModel, target_s: float) -> int:
        """qoe: how many of `served` (least slack first) to run this step.

        Each stream in a step makes the step longer for all. Streams more than `pause_slack_s` ahead
        of their readers sit the step out, the most slack first, while another stream's reader is
        waiting for text (the step gets shorter for the late ones) or while the predicted step is
        longer than `target_s` (a reader's token interval). The readers of those that sit out keep
        reading from seconds of buffered text.
        """
        n = len(served)
        if self.config.policy is not SchedulingPolicy.QOE:
            return n
        waiting_reader = any(c.clock is not None and c.clock.num_delivered and c.clock.slack(now) < 0
                             for c in served)
        while n > 1:
            last = served[n - 1].clock
            if last is None or last.slack(now) <= self.config.pause_slack_s:
                break
            predicted = step_time.predict(n)
            if not waiting_reader and (predicted is None or predicted <= target_s):
                break
            n -= 1
        return n

    def isolate(self, served: list[Candidate], next_waiting: Candidate | None) -> Isolation | None:
        """Tenant fairness: a step for the least served tenant's request (running, or `next_waiting`
        to be admitted) that waits for its first token; None where there is none.

        The step that carries that request's prompt serves only its tenant and tenants with lower
        counters: their streams in `served` sit it out, and their waiting requests are not admitted
        in it, so a light tenant's first token does not wait behind a heavy tenant's whole batch
        or its new prompts. Only streams served in the previous step are held back (none skips two
        steps in a row), and the light tenant's counter grows with what it is served, so nothing
        starves.
        """
        if not self.config.fair_tenants:
            return None
        candidates = served if next_waiting is None else [*served, next_waiting]
        fresh = [c for c in candidates if c.clock is not None and c.clock.num_delivered == 0]
        if not fresh:
            return None
        tenant = min(fresh, key=lambda c: self.counters.key(c.tenant)).tenant
        iso = Isolation(tenant, self.counters.key(tenant))
        held = [c for c in served if not self.joins(iso, c.tenant)]
        if not held or not all(c.served_last_step for c in held):
            return None  # no heavier batch to step aside, or it sat out the last step
        return replace(iso, held=frozenset(c.request_id for c in held))

    def joins(self, iso: Isolation, tenant: str) -> bool:
        """Whether a request of `tenant` may run in the step isolated for `iso.tenant`."""
        return tenant == iso.tenant or self.counters.key(tenant) < iso.limit

    def victim(self, candidates: list[Candidate], now: float) -> str:
        """The running request to preempt when KV blocks run out: the one served last in rank order."""
        return max(candidates, key=lambda c: self.rank(c, now)).request_id


class StepTimeModel:
    """Step time ~ base + per_seq * seqs + per_token * prompt tokens + per_pair * prompt attention.

    "prompt attention" counts the (query, key) pairs of the step's prompt chunks, sum n * (start + n)
    in thousands: a chunk late in a long prompt attends over everything before it, so the same
    number of tokens costs more there. Fitted online by least squares over the recent steps with
    prompt tokens and the recent steps without (kept apart, so a long run of decodes cannot push
    the prompt costs out); used to size prefill chunks so that the streams sharing a step with a
    long prompt see a gap below the stall target. Costs are kept non-negative by the fit itself,
    not clipped after it: early on, with few and alike samples, an unconstrained fit gave a
    negative cost per sequence and, clipped, a 0.3 s base and 0.14 s per token, which throttled
    prompts to 16 tokens a step.
    """

    def __init__(self, window: int = 64) -> None:
        self.window = window
        self.decodes: list[tuple[float, float, float, float]] = []  # (seqs, tokens, kpairs, seconds)
        self.prefills: list[tuple[float, float, float, float]] = []
        # Sums of r_i * r_j over the kept samples, r = (1, seqs, tokens, kpairs, seconds): kept as
        # samples come and go, so a refit costs no pass over them.
        self.gram = [[0.0] * 5 for _ in range(5)]
        self.coef: tuple[float, float, float, float] | None = None

    def observe(self, num_seqs: int, num_prefill_tokens: int, seconds: float, prefill_pairs: int = 0) -> None:
        samples = self.prefills if num_prefill_tokens else self.decodes
        samples.append((num_seqs, num_prefill_tokens, prefill_pairs / 1000, seconds))
        self._count(samples[-1], 1.0)
        if len(samples) > self.window:
            self._count(samples.pop(0), -1.0)
        if len(self.decodes) + len(self.prefills) >= 8:
            self.coef = _fit(self.gram) or self.coef

    def _count(self, sample: tuple[float, float, float, float], sign: float) -> None:
        r = (1.0, *sample)
        for i in range(5):
            for j in range(5):
                self.gram[i][j] += sign * r[i] * r[j]

    def predict(self, num_seqs: int, num_prefill_tokens: int = 0, prefill_pairs: int = 0) -> float | None:
        """Predicted seconds of a step (None: no data yet)."""
        if self.coef is None:
            return None
        base, per_seq, per_token, per_kpair = self.coef
        return base + per_seq * num_seqs + per_token * num_prefill_tokens + per_kpair * prefill_pairs / 1000

    def max_prefill_tokens(self, num_seqs: int, target_s: float, context: int = 0) -> int | None:
        """Most prompt tokens, continuing a prompt `context` tokens in, that a step with `num_seqs`
        sequences can carry within `target_s` (None: no data)."""
        if self.coef is None:
            return None
        base, per_seq, per_token, per_kpair = self.coef
        room = target_s - base - per_seq * num_seqs
        if room <= 0:
            return 0
        # per_token * n + per_kpair * n * (context + n) / 1000 <= room
        a, b = per_kpair / 1000, per_token + per_kpair * context / 1000
        if a <= 0:
            return None if b <= 0 else int(room / b)
        return int((-b + math.sqrt(b * b + 4 * a * room)) / (2 * a))


def _fit(gram: list[list[float]]) -> tuple[float, float, float, float] | None:
    """Non-negative least squares for y = c0 + c1*x1 + c2*x2 + c3*x3, from the samples' sums.

    With three costs the constrained optimum is the best of the 8 fits over subsets of them whose
    costs all come out >= 0 (the others held at 0). A small ridge term on c1..c3 keeps each system
    solvable when a column does not vary (a run of decode-only steps, or a constant batch): the fit
    then leans on the intercept instead of failing.
    """
    n = gram[0][0]
    best: tuple[float, list[float], tuple[int, ...]] | None = None
    for mask in range(8):
        cols = (0, *(i for i in (1, 2, 3) if mask >> (i - 1) & 1))
        a = [[gram[i][j] + (1e-3 * n if i == j and i else 0.0) for j in cols] for i in cols]
        c = _solve(a, [gram[i][4] for i in cols])
        if c is None or min(c[1:], default=0.0) < 0:
            continue
        # the residual sum of squares, from the sums: y.y - 2 c.(X.y) + c.(X.X)c
        rss = gram[4][4] - 2 * sum(ci * gram[i][4] for ci, i in zip(c, cols)) + sum(
            ci * cj * gram[i][j] for ci, i in zip(c, cols) for cj, j in zip(c, cols))
        if best is None or rss < best[0]:
            best = (rss, c, cols)
    if best is None:
        return None
    full = [0.0] * 4
    for ci, i in zip(best[1], best[2]):
        full[i] = ci
    return full[0], full[1], full[2], full[3]


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b, by Gaussian elimination with partial pivoting (None: singular)."""
    k = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(k):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][k] / m[i][i] for i in range(k)]
