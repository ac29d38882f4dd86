"""The scheduler core with a spread prior and deadline-chosen rounds (pure: no Redis)."""

from __future__ import annotations

import numpy as np

from middleware.scheduler.prior import RidgeStats, prompt_features
from schemas import JobKind, SampleSet
from tests.unit.test_scheduler_core import T0, admit_all, make_core, make_request, reply


def _fit_where_long_prompts_spread() -> RidgeStats:
    texts = [("why " * (1 + i % 12)).strip() for i in range(40)]
    features = np.stack([prompt_features(t) for t in texts])
    targets = np.stack([[np.log(0.01 + len(t) / 10), 0.0] for t in texts])  # (log s², mean)
    return RidgeStats.from_rows(features, targets)


def test_with_a_fitted_spread_model_exploration_shrinks_and_answers_teach_it() -> None:
    core = make_core(spread_prior=True, prior_explore_fraction=0.25, default_budget=16, max_window=2)
    jobs = {j.request_id: j for j in admit_all(core, make_request("a"), make_request("b")).jobs}
    assert jobs["a"].num_samples == 8  # f = 0.5: no model yet
    core.spread.fits[(None, "continuous:hash")] = _fit_where_long_prompts_spread().fit()
    plan = admit_all(core, make_request("c", prompt="why"), make_request("d", prompt="why " * 11 + "why"))
    explore = {j.request_id: j for j in plan.jobs}
    assert explore["c"].num_samples == 4 and explore["d"].num_samples == 4  # f = 0.25 with a model
    same = [0.0, 0.1, 0.0, 0.1]  # both explore alike: the prior decides
    core.on_sample_set(reply(explore["c"], same), T0 + 5)
    stage2 = core.on_sample_set(reply(explore["d"], same), T0 + 6)
    allocated = {j.request_id: j.num_samples for j in stage2.jobs if j.kind == JobKind.EXPLOIT}
    assert allocated.get("d", 0) > allocated.get("c", 0)  # the prompt predicted to spread more gets more
    for job in stage2.jobs:
        core.on_sample_set(reply(job), T0 + 9)
    assert len(core.spread.pending[(None, "continuous:hash")]) == 2  # answered: queued for the shared model


def test_the_spread_prior_is_per_policy_model() -> None:
    core = make_core(spread_prior=True, prior_explore_fraction=0.25, default_budget=16, max_window=2)
    core.spread.fits[("big", "continuous:hash")] = _fit_where_long_prompts_spread().fit()
    plan = admit_all(core, make_request("c", prompt="why", model="small"),
                     make_request("d", prompt="why " * 11 + "why", model="small"))
    explore = {j.request_id: j for j in plan.jobs}
    assert explore["c"].num_samples == 8  # another model's fit: no prior, the configured f = 0.5
    core.on_sample_set(reply(explore["c"], [0.0] * 8), T0 + 5)
    stage2 = core.on_sample_set(reply(explore["d"], [0.0] * 8), T0 + 6)
    for job in stage2.jobs:
        core.on_sample_set(reply(job), T0 + 9)
    assert "small" in core.spread.models and not core.spread.fit_for("continuous:hash", "small")
    assert len(core.spread.pending[("small", "continuous:hash")]) == 2  # answers teach their own model
    assert ("big", "continuous:hash") not in core.spread.pending
    plan = admit_all(core, make_request("e", prompt="why", model="big"), make_request("f", prompt="why", model="big"))
    assert all(j.num_samples == 4 for j in plan.jobs)  # its own model's fit: f = 0.25


def test_explore_replies_keep_the_prompt_embedding_out_of_result_stats() -> None:
    core = make_core(spread_prior=True, max_window=1, default_budget=4)
    (job,) = admit_all(core, make_request("a")).jobs
    sample_set = reply(job)
    with_vector = SampleSet(**{**sample_set.model_dump(), "stats": {"prompt_embedding": [0.6, 0.8]}})
    plan = core.on_sample_set(with_vector, T0 + 1)
    for exploit in plan.jobs:
        plan = core.on_sample_set(reply(exploit), T0 + 2)
    (answer,) = plan.answers
    assert "prompt_embedding" not in answer.result.stats
    assert core.spread.pending[(None, "continuous:embedding")][0][0].shape == (4,)


def test_a_measured_round_time_turns_a_tight_deadline_into_one_round() -> None:
    core = make_core(default_budget=16, max_window=1)
    core.round_timer.record(8 * 64, 1_000.0)  # measured: 8 samples × 64 tokens per prompt take ~1 s
    (job,) = admit_all(core, make_request("late", deadline_ms=500)).jobs
    assert job.num_samples == 16  # two rounds cannot fit: the whole budget at once (uniform)
    (job,) = admit_all(core, make_request("free")).jobs
    assert job.num_samples == 8  # no deadline: explore f = 0.5
