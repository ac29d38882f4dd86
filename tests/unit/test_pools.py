"""Response pools: the file format, synthetic pools, and the allocation benchmark's simulation on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from middleware.bench.allocation import simulate
from middleware.bench.pools import (
    SYNTHETIC_KINDS,
    Pool,
    PoolError,
    PoolPrompt,
    append_prompt,
    load_pool,
    read_prompts,
    synthetic_pool,
    write_pool,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_KINDS))
def test_synthetic_pools_have_the_promised_shape(kind: str) -> None:
    pool = synthetic_pool(kind, num_prompts=6, num_samples=400, spread=10.0, seed=1)
    assert len(pool.prompts) == 6 and all(p.rewards.shape == (400,) for p in pool.prompts)
    stds = np.array([p.rewards.std() for p in pool.prompts])
    if kind == "bernoulli":
        assert set(np.unique(np.concatenate(pool.rewards))) <= {0.0, 1.0}
    elif kind == "alike":
        assert stds.max() / stds.min() < 1.3
    else:
        assert 6 < stds.max() / stds.min() < 15  # a 10-fold spread of scales, seen through 400 samples
    skew = [float(np.mean(((r - r.mean()) / r.std()) ** 3)) for r in pool.rewards]
    if kind == "skew-right":
        assert min(skew) > 0.5
    if kind == "skew-left":
        assert max(skew) < -0.5


def test_pool_round_trip_and_append(tmp_path: Path) -> None:
    pool = synthetic_pool("normal-spread", num_prompts=3, num_samples=5)
    path = tmp_path / "pool.jsonl"
    write_pool(pool, path)
    append_prompt(path, PoolPrompt("extra", [{"role": "user", "content": "hi"}], np.array([0.5, 0.25]),
                                   {"answer": "4"}, [3, 4], ["a", "b"], [True, False]))
    loaded = load_pool(path)
    assert loaded.header["kind"] == "synthetic:normal-spread"
    assert [p.prompt_id for p in loaded.prompts] == ["s000", "s001", "s002", "extra"]
    assert np.array_equal(loaded.prompts[1].rewards, pool.prompts[1].rewards)
    extra = loaded.prompts[-1]
    assert extra.texts == ["a", "b"] and extra.num_tokens == [3, 4] and extra.metadata == {"answer": "4"}
    assert loaded.summary()[-1] == {"prompt_id": "extra", "num_samples": 2, "mean": 0.375, "std": 0.125,
                                    "max": 0.5, "mean_tokens": 3.5}


def test_bad_pool_files_raise_pool_errors(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="alignq pool build"):
        load_pool(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "a pool"}\n')
    with pytest.raises(PoolError, match="header"):
        load_pool(bad)
    write_pool(Pool({"alignq_pool": 1}, []), bad)
    with bad.open("a") as out:
        out.write(json.dumps({"prompt_id": "x", "rewards": [1.0, "NaN"]}).replace('"NaN"', "NaN") + "\n")
    with pytest.raises(PoolError, match=r"bad.jsonl:2: .*finite"):
        load_pool(bad)


def test_example_prompt_files_parse() -> None:
    preference = read_prompts(EXAMPLES / "pool_prompts.jsonl")
    verifiable = read_prompts(EXAMPLES / "verifiable_prompts.jsonl")
    assert len(preference) >= 24 and len(verifiable) >= 30
    assert all(metadata.get("answer") for _, _, metadata in verifiable)


def test_duplicate_prompt_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(PoolError, match="repeat"):
        read_prompts(path)


def _row(rows: list, method: str):
    return next(r for r in rows if r.method == method)


def test_adaptive_allocation_wins_where_spreads_differ_and_ties_where_alike() -> None:
    common = {"ks": [5], "methods": ["adabon-eb"], "budget": 16, "explore_fraction": 0.5, "num_runs": 40,
              "num_batches": 12, "seed": 0}
    spread = simulate(synthetic_pool("normal-spread", spread=50.0, num_samples=1024).rewards, **common)
    assert _row(spread, "adabon-eb").median_bwr > 0.55
    assert _row(spread, "adabon-eb").median_est_over_budget > _row(spread, "null").median_est_over_budget
    assert _row(spread, "oracle").frac_bwr_gt_half >= 0.75
    bernoulli = simulate(synthetic_pool("bernoulli", num_samples=1024).rewards, **common)
    assert _row(bernoulli, "adabon-eb").median_bwr > 0.5 and _row(bernoulli, "adabon-eb").mean_gain > 0
    alike = simulate(synthetic_pool("alike", num_samples=1024).rewards, **common)
    eb, null = _row(alike, "adabon-eb"), _row(alike, "null")
    assert abs(null.median_bwr - 0.5) < 0.08
    assert 0.45 < eb.median_bwr < 0.65  # nothing to find but each prompt's luck in exploration


def test_gzip_pools_load_and_a_truncated_tail_is_dropped(tmp_path) -> None:
    import gzip

    from middleware.bench.pools import drop_truncated_tail, load_pool, write_pool

    pool = synthetic_pool("alike", num_prompts=3, num_samples=4)
    plain = tmp_path / "p.jsonl"
    write_pool(pool, plain)
    packed = tmp_path / "p.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [p.prompt_id for p in load_pool(packed).prompts] == [p.prompt_id for p in pool.prompts]
    assert not drop_truncated_tail(plain)
    with plain.open("a") as out:
        out.write('{"prompt_id": "cut", "rewa')  # a kill mid-append
    assert drop_truncated_tail(plain) and len(load_pool(plain).prompts) == 3


def test_equivalence_and_saving_are_reported_with_intervals() -> None:
    rows = simulate(synthetic_pool("normal-spread", spread=50.0, num_samples=512).rewards, ks=[5],
                    methods=["adabon-eb", "adabon-eb@0.5"], budget=16, explore_fraction=0.75, num_runs=20,
                    num_batches=10, seed=0, saving_grid=(0.75, 1.25))
    eb, oracle, null = _row(rows, "adabon-eb"), _row(rows, "oracle"), _row(rows, "null")
    assert null.budget_equivalence == 1.0 and null.budget_saving == 0.0
    assert oracle.budget_equivalence > 1.05 and oracle.budget_saving > 0.0
    for row in (eb, oracle, _row(rows, "adabon-eb@0.5")):
        low, high = row.budget_equivalence_ci
        assert low <= row.budget_equivalence <= high
        assert row.budget_saving_ci[0] <= row.budget_saving <= row.budget_saving_ci[1]
    assert _row(rows, "adabon-eb@0.5").num_explore == 8
