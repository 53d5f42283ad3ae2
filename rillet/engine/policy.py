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
stream finishes. A step serves at most max_num_seqs requests, least slack first; and while the
predicted step time exceeds a reader's token interval, streams more than `pause_slack_s` ahead sit
the step out (the most slack first), so that the others' steps are shorter. A request that was served in
the previous step gets `stay_bonus_s` of extra urgency, so near-ties do not flip every step.

Tenant fairness (virtual token counters, Sheng et al. 2024): each tenant's counter grows with the
tokens its requests are served; requests of the tenant with the smallest counter go first, and a
tenant that comes back from idle starts at the smallest active counter, so it cannot bank credit.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


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

        Each stream in a step makes the step longer for all. While the predicted step is longer than
        `target_s` (a reader's token interval), the stream with the most slack sits this step out,
        as long as it is more than `pause_slack_s` ahead of its reader.
        """
        n = len(served)
        if self.config.policy is not SchedulingPolicy.QOE:
            return n
        while n > 1:
            predicted = step_time.predict(n)
            last = served[n - 1].clock
            if predicted is None or predicted <= target_s or last is None \
                    or last.slack(now) <= self.config.pause_slack_s:
                break
            n -= 1
        return n

    def victim(self, candidates: list[Candidate], now: float) -> str:
        """The running request to preempt when KV blocks run out: the one served last in rank order."""
        return max(candidates, key=lambda c: self.rank(c, now)).request_id


class StepTimeModel:
    """Step time ~ base + per_seq * num_seqs + per_token * num_prefill_tokens, fitted online.

    A least-squares fit over the last `window` steps; used to size prefill chunks so that the
    streams sharing a step with a long prompt see a gap below the stall target.
    """

    def __init__(self, window: int = 128) -> None:
        self.window = window
        self.samples: list[tuple[int, int, float]] = []
        self.coef: tuple[float, float, float] | None = None

    def observe(self, num_seqs: int, num_prefill_tokens: int, seconds: float) -> None:
        self.samples.append((num_seqs, num_prefill_tokens, seconds))
        if len(self.samples) > self.window:
            del self.samples[0]
        if len(self.samples) >= 8:
            self.coef = _fit(self.samples) or self.coef

    def predict(self, num_seqs: int, num_prefill_tokens: int = 0) -> float | None:
        """Predicted seconds of a step (None: no data yet)."""
        if self.coef is None:
            return None
        base, per_seq, per_token = self.coef
        return base + per_seq * num_seqs + per_token * num_prefill_tokens

    def max_prefill_tokens(self, num_seqs: int, target_s: float) -> int | None:
        """Most prefill tokens a step with `num_seqs` sequences can carry within `target_s` (None: no data)."""
        if self.coef is None:
            return None
        base, per_seq, per_token = self.coef
        if per_token <= 0:
            return None
        return max(0, int((target_s - base - per_seq * num_seqs) / per_token))


def _fit(samples: list[tuple[int, int, float]]) -> tuple[float, float, float] | None:
    """Least squares for y = a + b*x1 + c*x2 via the 3x3 normal equations.

    A small ridge term keeps the system solvable when a column does not vary (a run of decode-only
    steps, or a constant batch): the fit then leans on the intercept instead of failing.
    """
    n = float(len(samples))
    s1 = sum(x1 for x1, _, _ in samples)
    s2 = sum(x2 for _, x2, _ in samples)
    s11 = sum(x1 * x1 for x1, _, _ in samples)
    s22 = sum(x2 * x2 for _, x2, _ in samples)
    s12 = sum(x1 * x2 for x1, x2, _ in samples)
    sy = sum(y for _, _, y in samples)
    s1y = sum(x1 * y for x1, _, y in samples)
    s2y = sum(x2 * y for _, x2, y in samples)
    ridge = 1e-3 * n
    m = [[n, s1, s2], [s1, s11 + ridge, s12], [s2, s12, s22 + ridge]]
    v = [sy, s1y, s2y]
    det = _det3(m)
    if det == 0:
        return None
    coef = []
    for col in range(3):
        mc = [row[:] for row in m]
        for r in range(3):
            mc[r][col] = v[r]
        coef.append(_det3(mc) / det)
    return coef[0], max(0.0, coef[1]), max(0.0, coef[2])


def _det3(m: list[list[float]]) -> float:
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
