"""How much of a window to explore, chosen from its requests' deadlines: the latency side of allocation.

Pure, no I/O. A ``bon`` window runs in rounds: stage 1 explores d_i samples per prompt, stage 2 draws
the allocated a_i. Each round costs a fixed part (queueing, prefill, the reply's trip through Redis)
plus a part that grows with the work per prompt in it: samples × max_new_tokens ("sample-tokens"; the
largest prompt of the window sets the pace). The scheduler measures both (``RoundTimer``, an
exponentially weighted fit of round time against sample-tokens per prompt) and picks:

    one round   d = B (plain Best-of-N: nothing left to allocate; the request is answered after stage 1)
                when two rounds of the expected size do not fit before the earliest deadline in the window;
    two rounds  d = round(f·B), with f the configured explore fraction, or the smaller one when a spread
                prior is available (``prior_explore_fraction``).

Requests without a deadline, and every window before the first round was timed, get two rounds with
the configured fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Until measured: a round costs this much fixed and this much per sample-token per prompt (CPU, 135M model).
DEFAULT_ROUND_FIXED_MS = 150.0
DEFAULT_ROUND_PER_SAMPLE_MS = 1.0
SMOOTHING = 0.2  # weight of the newest round in the running averages


@dataclass(slots=True)
class RoundTimer:
    """Running estimate of a round's duration: fixed_ms + per_sample_ms · sample-tokens per prompt."""

    fixed_ms: float = DEFAULT_ROUND_FIXED_MS
    per_sample_ms: float = DEFAULT_ROUND_PER_SAMPLE_MS
    num_rounds: int = 0

    def expected_ms(self, samples_per_prompt: float) -> float:
        return self.fixed_ms + self.per_sample_ms * max(0.0, samples_per_prompt)

    def record(self, samples_per_prompt: float, duration_ms: float) -> None:
        """One finished round; splits the surprise between the two terms by their shares of the estimate."""
        if duration_ms <= 0 or samples_per_prompt <= 0:
            return
        expected = self.expected_ms(samples_per_prompt)
        ratio = duration_ms / expected
        weight = SMOOTHING if self.num_rounds else 0.5
        self.fixed_ms *= 1 + weight * (ratio - 1)
        self.per_sample_ms *= 1 + weight * (ratio - 1)
        self.num_rounds += 1


def choose_explore_fraction(budget: int, time_left_ms: float | None, timer: RoundTimer, *,
                            explore_fraction: float, max_overdraw: float = 1.25) -> float:
    """The explore fraction for a window whose tightest request has ``time_left_ms`` (None: no deadline).

    ``budget`` is in the timer's unit: B × max_new_tokens for the scheduler (sample-tokens per prompt).

    Two rounds take ≈ 2·fixed + per_sample·(d + max a_i) and d + max a_i can reach ``max_overdraw``·B
    (the allocator's cap), whatever d is; one round takes fixed + per_sample·B. So the deadline picks the
    number of rounds, and 1.0 (one round: uniform Best-of-N) is returned when two do not fit.
    """
    if time_left_ms is None or budget <= 1 or timer.num_rounds == 0:
        return explore_fraction  # no deadline, or no round measured yet: the configured plan
    two_rounds_ms = 2 * timer.fixed_ms + timer.per_sample_ms * max_overdraw * budget
    return explore_fraction if time_left_ms >= two_rounds_ms else 1.0
