"""The scheduler's pure core, driven from factory helpers: windows, stages, dedup, deadlines, answers."""

from __future__ import annotations

import math

import pytest

from middleware.scheduler.core import CoreConfig, Plan, SchedulerCore, make_job_id, rank_samples, request_seed
from schemas import (
    AlignRequest,
    ErrorCode,
    ErrorInfo,
    EventKind,
    Job,
    JobKind,
    Method,
    ResultStatus,
    Sample,
    SampleSet,
)

T0 = 1_000_000


def make_core(**overrides: object) -> SchedulerCore:
    options = {"scheduler_id": "s1", "default_budget": 8, "max_budget": 64, "explore_fraction": 0.5, "allocator": "adabon",
                   "max_window": 4, "window_ms": 50}
    options.update(overrides)
    return SchedulerCore(CoreConfig(**options))  # type: ignore[arg-type]


def make_request(request_id: str, **fields: object) -> AlignRequest:
    fields.setdefault("submitted_at_ms", T0)
    return AlignRequest(request_id=request_id, prompt=fields.pop("prompt", f"prompt {request_id}"), **fields)


def reply(job: Job, rewards: list[float] | None = None, *, error: ErrorInfo | None = None,
          texts: list[str] | None = None) -> SampleSet:
    """A worker's reply to ``job``: sample i gets rewards[i] (default: the index itself)."""
    if rewards is None:
        rewards = [float(job.sample_offset + i) for i in range(job.num_samples)]
    samples = [Sample(index=job.sample_offset + i, text=(texts[i] if texts else f"{job.job_id}#{i}"), reward=r,
                      num_tokens=3) for i, r in enumerate(rewards)]
    return SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id="w1", kind=job.kind, samples=samples,
                     generate_s=0.5, score_s=0.25, error=error)


def admit_all(core: SchedulerCore, *requests: AlignRequest, now_ms: int = T0) -> Plan:
    plan = Plan()
    for i, request in enumerate(requests):
        plan.extend(core.admit(request, entry_id=f"{i + 1}-0", now_ms=now_ms))
    return plan


def kinds(plan: Plan, request_id: str) -> list[EventKind]:
    return [event.kind for event in plan.events if event.request_id == request_id]


def test_window_closes_when_full_with_explore_jobs() -> None:
    core = make_core(max_window=3)
    plan = admit_all(core, make_request("a"), make_request("b", budget=16))
    assert plan.jobs == [] and kinds(plan, "a") == [EventKind.QUEUED]
    plan = core.admit(make_request("c", budget=3), entry_id="3-0", now_ms=T0 + 1)
    by_request = {job.request_id: job for job in plan.jobs}
    assert set(by_request) == {"a", "b", "c"}
    assert [by_request[r].num_samples for r in "abc"] == [4, 8, 2]  # d = max(2, round(0.5 B))
    assert all(job.kind == JobKind.EXPLORE and job.sample_offset == 0 for job in plan.jobs)
    assert by_request["a"].job_id == make_job_id("a", JobKind.EXPLORE, 0) == "a:explore:0"
    assert by_request["a"].scheduler_id == "s1" and by_request["a"].max_new_tokens == 64
    assert core.forming is None and len(core.windows) == 1


def test_window_closes_after_window_ms_and_not_before() -> None:
    core = make_core(window_ms=50)
    admit_all(core, make_request("a"))
    assert not core.tick(T0 + 49).jobs
    assert [job.request_id for job in core.tick(T0 + 50).jobs] == ["a"]
    assert not core.tick(T0 + 100).jobs


def test_seed_is_deterministic_per_request() -> None:
    assert request_seed(make_request("x")) == request_seed(make_request("x"))
    assert request_seed(make_request("x")) != request_seed(make_request("y"))
    assert request_seed(make_request("x", seed=7)) == 7
    assert not make_core().tick(T0, close_forming=True)  # nothing forming: nothing to do
    core1, core2 = make_core(), make_core()
    admit_all(core1, make_request("x"))
    admit_all(core2, make_request("x"))
    assert core1.tick(T0, close_forming=True).jobs[0].seed == core2.tick(T0, close_forming=True).jobs[0].seed


def test_stage2_spends_the_window_budget_and_easy_prompts_answer_first() -> None:
    core = make_core(max_window=3, default_budget=8, explore_fraction=0.5)
    plan = admit_all(core, make_request("easy"), make_request("hard1"), make_request("hard2"))
    jobs = {job.request_id: job for job in plan.jobs}
    # Verifiable rewards: "easy" solved every time, the others never yet: stage 2 goes to the hard ones.
    plan = core.on_sample_set(reply(jobs["easy"], [1.0, 1.0, 1.0, 1.0]), T0 + 10)
    assert not plan
    plan.extend(core.on_sample_set(reply(jobs["hard1"], [0.0, 0.0, 0.0, 0.0]), T0 + 11))
    plan.extend(core.on_sample_set(reply(jobs["hard2"], [0.0, 0.0, 0.0, 0.0]), T0 + 12))
    assert kinds(plan, "easy") == [EventKind.EXPLORED, EventKind.ALLOCATED]
    explored = next(e for e in plan.events if e.request_id == "hard1" and e.kind == EventKind.EXPLORED)
    assert explored.data == {"reward_mean": 0.0, "reward_std": 0.0, "num_samples": 4}
    allocated = {e.request_id: e.data["num_samples"] for e in plan.events if e.kind == EventKind.ALLOCATED}
    assert sum(allocated.values()) == 3 * (8 - 4)
    assert allocated["easy"] == 0
    assert [a.result.request_id for a in plan.answers] == ["easy"]  # does not wait for stage 2
    easy = plan.answers[0].result
    assert easy.status == ResultStatus.OK and easy.samples_used == 4 and easy.explore_samples == 4
    assert easy.exploit_samples == 0 and plan.answers[0].entry_id == "1-0"
    exploit = {job.request_id: job for job in plan.jobs}
    assert set(exploit) == {"hard1", "hard2"}
    assert all(job.kind == JobKind.EXPLOIT and job.sample_offset == 4 for job in exploit.values())
    assert sum(job.num_samples for job in exploit.values()) == 12
    answers = core.on_sample_set(reply(exploit["hard1"]), T0 + 20).answers
    answers += core.on_sample_set(reply(exploit["hard2"]), T0 + 21).answers
    assert {a.result.request_id for a in answers} == {"hard1", "hard2"}
    total_used = easy.samples_used + sum(a.result.samples_used for a in answers)
    assert total_used == 3 * 8  # samples used per window = Σ budgets
    assert core.num_in_flight == 0 and not core.windows


def test_answer_is_argmax_over_deduplicated_samples_and_skips_nan() -> None:
    core = make_core(default_budget=4, explore_fraction=1.0, max_window=1)
    job = admit_all(core, make_request("a")).jobs[0]
    assert job.num_samples == 4
    sample_set = reply(job, [0.5, math.nan, 2.0, 1.0], texts=["w", "x", "y", "z"])
    plan = core.on_sample_set(sample_set, T0 + 5)
    assert not core.on_sample_set(sample_set, T0 + 6)  # duplicate reply: ignored
    result = plan.answers[0].result
    assert (result.response, result.reward, result.best_index) == ("y", 2.0, 2)
    assert [s.index for s in result.samples] == [2, 3, 0, 1]  # best first, NaN last
    assert result.samples_used == 4 and result.num_tokens == 12
    assert result.generate_s == 0.5 and result.score_s == 0.25 and result.total_s == pytest.approx(0.005)


def test_uniform_and_aisp_are_one_job_each_without_a_window() -> None:
    core = make_core()
    plan = admit_all(core, make_request("u", method="uniform", budget=10), make_request("p", method="aisp", budget=12))
    by_request = {job.request_id: job for job in plan.jobs}
    assert (by_request["u"].kind, by_request["u"].num_samples) == (JobKind.UNIFORM, 10)
    assert (by_request["p"].kind, by_request["p"].num_samples) == (JobKind.AISP, 12)
    assert core.forming is None
    result = core.on_sample_set(reply(by_request["p"], [0.1] * 8), T0 + 1).answers[0].result
    assert result.method == Method.AISP and result.samples_used == 8 and result.exploit_samples == 0


def test_error_reply_without_samples_gives_an_error_result() -> None:
    core = make_core(max_window=1)
    job = admit_all(core, make_request("a", method="uniform")).jobs[0]
    error = ErrorInfo(code=ErrorCode.REWARD_FAILED, message="scorer raised")
    result = core.on_sample_set(reply(job, [], error=error), T0 + 1).answers[0].result
    assert result.status == ResultStatus.ERROR and result.error == error and result.response is None


def test_bon_prompt_with_only_nan_rewards_is_answered_after_stage1_and_others_continue() -> None:
    core = make_core(max_window=2)
    jobs = {job.request_id: job for job in admit_all(core, make_request("bad"), make_request("good")).jobs}
    plan = core.on_sample_set(reply(jobs["bad"], [math.nan] * 4), T0 + 1)
    plan.extend(core.on_sample_set(reply(jobs["good"], [1.0, 2.0, 3.0, 4.0]), T0 + 2))
    bad = next(a.result for a in plan.answers if a.result.request_id == "bad")
    assert bad.status == ResultStatus.ERROR and bad.error.code == ErrorCode.REWARD_FAILED
    allocated = [e for e in plan.events if e.kind == EventKind.ALLOCATED]
    assert [(e.request_id, e.data["num_samples"]) for e in allocated] == [("good", 4)]


def test_kept_samples_are_reused_not_regenerated() -> None:
    core = make_core(max_window=1, default_budget=8, explore_fraction=0.5)
    kept = [Sample(index=i, text=f"k{i}", reward=float(i), num_tokens=2) for i in range(4)]
    plan = core.admit(make_request("a"), entry_id="9-0", now_ms=T0, kept=kept)
    # Stage 1 fully kept: no explore job, straight to the stage-2 job at offset 4.
    assert [(job.kind, job.sample_offset, job.num_samples) for job in plan.jobs] == [(JobKind.EXPLOIT, 4, 4)]
    assert kinds(plan, "a") == [EventKind.QUEUED, EventKind.EXPLORED, EventKind.ALLOCATED]
    result = core.on_sample_set(reply(plan.jobs[0]), T0 + 1).answers[0].result
    assert result.samples_used == 8 and result.best_index == 7


def test_stale_job_completed_from_kept_samples() -> None:
    core = make_core(max_window=1, default_budget=4, explore_fraction=1.0)
    job = admit_all(core, make_request("a")).jobs[0]
    assert core.stale_jobs(T0 + 10, older_than_ms=100) == {}
    assert core.stale_jobs(T0 + 100, older_than_ms=100) == {"a": [job.job_id]}
    partial = [Sample(index=0, text="x", reward=1.0, num_tokens=1)]
    assert not core.on_kept_samples("a", partial, T0 + 101)
    rest = [Sample(index=i, text="x", reward=float(i), num_tokens=1) for i in range(1, 4)]
    result = core.on_kept_samples("a", rest, T0 + 102).answers[0].result
    assert result.samples_used == 4 and result.reward == 3.0


def test_deadline_answers_best_so_far_as_partial_or_error() -> None:
    core = make_core(max_window=2)
    plan = admit_all(core, make_request("a", deadline_ms=100), make_request("b", deadline_ms=100))
    assert all(job.deadline_at_ms == T0 + 100 for job in plan.jobs)
    jobs = {job.request_id: job for job in plan.jobs}
    core.on_sample_set(reply(jobs["a"], [0.3, 0.9, 0.1, 0.2]), T0 + 50)
    assert not core.tick(T0 + 99).answers
    answers = {a.result.request_id: a.result for a in core.tick(T0 + 100).answers}
    assert answers["a"].status == ResultStatus.PARTIAL and answers["a"].reward == 0.9
    assert answers["b"].status == ResultStatus.ERROR and answers["b"].error.code == ErrorCode.DEADLINE_EXCEEDED
    assert core.num_in_flight == 0


def test_deadline_of_one_prompt_unblocks_its_window() -> None:
    core = make_core(max_window=2)
    jobs = {job.request_id: job for job in
            admit_all(core, make_request("slow", deadline_ms=100), make_request("fast")).jobs}
    assert not core.on_sample_set(reply(jobs["fast"]), T0 + 10).jobs  # waits for "slow"'s stage 1
    plan = core.tick(T0 + 100)
    assert [a.result.request_id for a in plan.answers] == ["slow"]
    assert [(job.request_id, job.kind) for job in plan.jobs] == [("fast", JobKind.EXPLOIT)]


def test_request_already_past_its_deadline_is_answered_at_once() -> None:
    core = make_core()
    plan = core.admit(make_request("a", deadline_ms=10), entry_id="1-0", now_ms=T0 + 11)
    assert plan.answers[0].result.error.code == ErrorCode.DEADLINE_EXCEEDED and not plan.jobs


@pytest.mark.parametrize(("fields", "message"), [({"budget": 65}, "max_budget"),
                                                 ({"prompt": "x" * 101}, "max_prompt_chars")])
def test_limits_of_the_deployment_give_bad_request(fields: dict, message: str) -> None:
    core = make_core(max_prompt_chars=100)
    plan = core.admit(make_request("a", **fields), entry_id="1-0", now_ms=T0)
    result = plan.answers[0].result
    assert result.error.code == ErrorCode.BAD_REQUEST and message in result.error.message
    assert plan.answers[0].entry_id == "1-0" and core.num_in_flight == 0


def test_redelivered_request_is_held_once() -> None:
    core = make_core()
    core.admit(make_request("a"), entry_id="1-0", now_ms=T0)
    plan = core.admit(make_request("a"), entry_id="2-0", now_ms=T0)
    assert plan.acks == ["2-0"] and not plan.events
    assert core.entry_ids() == ["1-0"]


def test_priority_orders_jobs_within_a_window() -> None:
    core = make_core(max_window=3)
    plan = admit_all(core, make_request("low", priority=1), make_request("mid", priority=3),
                     make_request("high", priority=5))
    assert [job.request_id for job in plan.jobs] == ["high", "mid", "low"]


def test_a_window_holds_one_priority_lane() -> None:
    """A high-priority request never waits for a backlog of low ones' exploration in its window."""
    core = make_core(max_window=16)
    plan = admit_all(core, make_request("low1", priority=-1), make_request("low2", priority=-1),
                     make_request("high", priority=5), make_request("normal"))
    assert [job.request_id for job in plan.jobs] == ["low1", "low2", "high"]  # two windows launched early
    assert sorted(len(w.request_ids) for w in core.windows.values()) == [1, 2]
    assert core.forming is not None and core.forming.request_ids == ["normal"]


def test_several_windows_in_flight() -> None:
    core = make_core(max_window=1)
    first = admit_all(core, make_request("a")).jobs[0]
    second = core.admit(make_request("b"), entry_id="2-0", now_ms=T0 + 1).jobs[0]
    assert len(core.windows) == 2
    assert core.on_sample_set(reply(second), T0 + 2).jobs  # window 2 reaches stage 2 first
    assert core.on_sample_set(reply(first), T0 + 3).jobs


def test_rank_samples_puts_non_finite_last() -> None:
    samples = [Sample(index=i, text="", reward=r, num_tokens=0) for i, r in enumerate([math.inf, 1.0, math.nan, 3.0])]
    assert [s.index for s in rank_samples(samples)] == [3, 1, 0, 2]


def test_releasing_the_last_unexplored_request_lets_its_window_plan() -> None:
    core = make_core(max_window=2)
    jobs = {job.request_id: job for job in admit_all(core, make_request("kept"), make_request("lost")).jobs}
    assert not core.on_sample_set(reply(jobs["kept"]), T0 + 1).jobs
    plan = core.release("lost", T0 + 2)
    assert [(job.request_id, job.kind) for job in plan.jobs] == [("kept", JobKind.EXPLOIT)]
    assert not plan.answers and "lost" not in core.requests


def test_a_request_re_read_after_stage_2_finishes_on_its_grant_not_its_own_budget() -> None:
    """A failover (or a lost lease) after stage 2 drops the window's requests; re-read, each must spend
    what the window granted it. Planned again alone on its own budget, the share an easy prompt left in
    the pool was lost: the window spent one sample less (test_redis_restart's 11 of 12)."""
    core = make_core(max_window=3, default_budget=8, explore_fraction=0.5)
    jobs = {job.request_id: job for job in admit_all(core, make_request("easy"), make_request("hard1"),
                                                     make_request("hard2")).jobs}
    plan = core.on_sample_set(reply(jobs["easy"], [1.0, 1.0, 1.0, 1.0]), T0 + 10)
    explored = {rid: reply(jobs[rid], [0.0, 0.0, 0.0, 0.0]) for rid in ("hard1", "hard2")}
    for sample_set in explored.values():
        plan.extend(core.on_sample_set(sample_set, T0 + 11))
    (easy,) = [answer.result for answer in plan.answers]
    exploit = {job.request_id: job for job in plan.jobs}
    assert {rid: (g.num_explore, g.total) for rid, g in plan.grants.items()} == {"hard1": (4, 10), "hard2": (4, 10)}
    for rid in ("hard1", "hard2"):  # the primary changed: forget, re-read with what Redis kept
        core.release(rid, T0 + 12)
    answers = []
    for i, rid in enumerate(("hard1", "hard2")):
        resumed = core.admit(make_request(rid), entry_id=f"{i + 2}-0", now_ms=T0 + 13,
                             kept=explored[rid].samples, grant=plan.grants[rid])
        assert [(j.job_id, j.num_samples) for j in resumed.jobs] == [(exploit[rid].job_id, 6)]  # the same job
        answers += core.on_sample_set(reply(resumed.jobs[0]), T0 + 14).answers
    results = [answer.result for answer in answers]
    assert [(r.samples_used, r.explore_samples, r.exploit_samples) for r in results] == [(10, 4, 6)] * 2
    assert easy.samples_used + sum(r.samples_used for r in results) == 3 * 8  # the window's budget, once
    assert core.num_in_flight == 0 and not core.windows


def test_a_granted_request_whose_samples_are_all_kept_is_answered_at_once() -> None:
    from middleware.scheduler.plans import Grant

    core = make_core(default_budget=4)
    kept = [Sample(index=i, text=f"k{i}", reward=float(i), num_tokens=2) for i in range(5)]
    plan = core.admit(make_request("a"), entry_id="1-0", now_ms=T0, kept=kept, grant=Grant(3, 5))
    assert not plan.jobs and [(a.result.samples_used, a.result.explore_samples) for a in plan.answers] == [(5, 3)]
    assert Grant.decode(Grant(3, 5).encode().encode()) == Grant(3, 5)
    assert Grant.decode(b"bad") is None and Grant.decode(None) is None and Grant.decode(b"5,3") is None
