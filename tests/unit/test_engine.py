"""The batched Best-of-N engine on tiny random models (float32, one thread).

The reference checks recompute what the engine should produce the slow, obvious way: greedy rows
against ``model.generate``, sampled rows against a cache-free loop that re-runs the whole sequence
for every token with the same uniforms.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from engine_support import engine_request as request
from engine_support import texts

from workers.engine import Engine, GenerationRequest, derive_seed, plan_parts
from workers.models import Policy, load_policy, load_reward
from workers.reward import FunctionReward
from workers.sampling import sample_tokens

torch.set_num_threads(1)

PROMPTS = [
    "Hi",
    "Write a long and detailed story about a dragon who learns to bake bread in a small village.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: pathlib.Path) -> Policy:
    return load_policy(str(tiny_gpt2_dir), device="cpu", dtype="float32")


def test_many_prompts_each_with_its_own_n(llama: Policy, words_reward: FunctionReward) -> None:
    requests = [request(f"k{i}", p, num_samples=n, sample_offset=off, max_new_tokens=t)
                for i, (p, n, off, t) in enumerate(zip(PROMPTS, (3, 5, 2), (0, 10, 4), (6, 9, 3)))]
    results = Engine(llama, words_reward, max_batch=4).run(requests)
    assert [r.key for r in results] == ["k0", "k1", "k2"]
    for req, res in zip(requests, results):
        assert res.error is None
        assert [s.index for s in res.samples] == list(range(req.sample_offset, req.sample_offset + req.num_samples))
        assert all(1 <= s.num_tokens <= req.max_new_tokens for s in res.samples)
        assert all(s.is_finished or s.num_tokens == req.max_new_tokens for s in res.samples)
        assert all(math.isfinite(s.reward) for s in res.samples)
        assert res.generate_s > 0 and res.score_s >= 0
    # a random 2-layer model almost never emits EOS: the limits are what stop it
    assert [s.num_tokens for s in results[1].samples] == [9] * 5


def test_same_seed_same_texts_and_other_seeds_differ(llama: Policy, words_reward: FunctionReward) -> None:
    engine = Engine(llama, words_reward)
    first = engine.run([request(seed=7)])[0]
    again = engine.run([request(seed=7)])[0]
    other = engine.run([request(seed=8)])[0]
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)
    assert len(set(texts(first))) > 1  # samples of one request differ from each other


def test_request_alone_equals_request_in_a_batch(llama: Policy, words_reward: FunctionReward) -> None:
    target = request("target", PROMPTS[1], num_samples=5, max_new_tokens=10, seed=3, top_p=0.9)
    others = [request("a", PROMPTS[0], num_samples=3, max_new_tokens=4, seed=1),
              request("b", PROMPTS[2], num_samples=6, max_new_tokens=12, seed=2, temperature=0.0)]
    alone = Engine(llama, words_reward, max_batch=16).run([target])[0]
    # packed with others into shared batches (different padding, batch sizes and finishing steps)
    mixed = Engine(llama, words_reward, max_batch=16).run([others[0], target, others[1]])[1]
    assert texts(alone) == texts(mixed)
    assert [s.reward for s in alone.samples] == [s.reward for s in mixed.samples]


def test_greedy_rows_equal_model_generate(llama: Policy, gpt2: Policy, words_reward: FunctionReward) -> None:
    for policy in (llama, gpt2):
        requests = [request(f"g{i}", p, num_samples=2, max_new_tokens=7, temperature=0.0) for i, p in enumerate(PROMPTS)]
        results = Engine(policy, words_reward).run(requests)
        for req, res in zip(requests, results):
            ids = torch.tensor([policy.encode(req.prompt)])
            out = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                                        do_sample=False, pad_token_id=policy.tokenizer.pad_token_id)
            expected = policy.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert texts(res) == [expected, expected]


def naive_samples(policy: Policy, req: GenerationRequest) -> list[list[int]]:
    """Cache-free reference: re-run prompt + tokens so far for every token of every sample."""
    uniforms = torch.rand((req.num_samples, req.max_new_tokens),
                          generator=torch.Generator().manual_seed(derive_seed(req.seed, req.sample_offset)))
    prompt = policy.encode(req.prompt)
    rows = []
    with torch.inference_mode():
        for j in range(req.num_samples):
            generated: list[int] = []
            for step in range(req.max_new_tokens):
                logits = policy.model(input_ids=torch.tensor([prompt + generated])).logits[:, -1].float()
                token = sample_tokens(logits, torch.tensor([req.temperature]), torch.tensor([req.top_p]),
                                      uniforms[j, step:step + 1])
                generated.append(int(token))
            rows.append(generated)
    return rows


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_kv_cache_reuse_matches_naive_repetition(llama: Policy, gpt2: Policy, words_reward: FunctionReward,
                                                 top_p: float) -> None:
    for policy in (llama, gpt2):
        target = request("t", PROMPTS[2], num_samples=3, max_new_tokens=6, seed=11, top_p=top_p, temperature=1.3)
        # shares its batch with a longer prompt, so the target is left-padded in the engine
        result = Engine(policy, words_reward).run([request("x", PROMPTS[1], num_samples=2), target])[1]
        expected = [policy.tokenizer.decode(row, skip_special_tokens=True) for row in naive_samples(policy, target)]
        assert texts(result) == expected


def test_rewards_equal_scoring_the_texts_separately(llama: Policy, tiny_reward_dir: pathlib.Path) -> None:
    reward = load_reward(f"hf:{tiny_reward_dir}", device="cpu")
    requests = [request("a", PROMPTS[0], num_samples=3), request("b", PROMPTS[2], num_samples=2, max_new_tokens=5)]
    for req, res in zip(requests, Engine(llama, reward).run(requests)):
        for sample in res.samples:
            assert sample.reward == pytest.approx(reward.score([req.prompt], [sample.text])[0], abs=1e-4)


def test_sampling_stops_at_eos(llama: Policy, words_reward: FunctionReward) -> None:
    engine = Engine(llama, words_reward)
    greedy = request(num_samples=2, max_new_tokens=6, temperature=0.0)
    with torch.inference_mode():
        first_token = int(llama.model(input_ids=torch.tensor([llama.encode(greedy.prompt)])).logits[0, -1].argmax())
    engine.eos_ids = [first_token]  # make the greedy first token an end-of-sequence token
    [result] = engine.run([greedy])
    assert [(s.num_tokens, s.is_finished, s.text) for s in result.samples] == [(1, True, "")] * 2


def test_a_reward_failure_fails_only_its_request(llama: Policy) -> None:
    def picky(prompt, response, metadata):
        if metadata.get("fail"):
            raise RuntimeError("no scores today")
        return float(len(response))

    requests = [request("ok"), request("bad", metadata={"fail": True}), request("ok2", num_samples=2)]
    results = Engine(llama, FunctionReward(picky, "picky")).run(requests)
    assert [r.error is None for r in results] == [True, False, True]
    assert "no scores today" in results[1].error
    assert all(math.isnan(s.reward) for s in results[1].samples) and len(results[1].samples) == 4
    assert [s.reward for s in results[2].samples] == [float(len(s.text)) for s in results[2].samples]


def test_plan_parts_bounds_rows_and_splits_large_requests() -> None:
    requests = [request(num_samples=n) for n in (3, 10, 2, 4)]
    batches = plan_parts(requests, max_batch=4)
    assert all(sum(p.num_rows for p in batch) <= 4 for batch in batches)
    parts = [(p.request, p.first, p.num_rows) for batch in batches for p in batch]
    assert parts == [(0, 0, 3), (1, 0, 4), (1, 4, 4), (1, 8, 2), (2, 0, 2), (3, 0, 4)]


def test_sample_tokens_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    grid = (torch.arange(10_000, dtype=torch.float32) + 0.5) / 10_000  # evenly spread uniforms
    many = logits.expand(len(grid), -1)
    ones = torch.ones(len(grid))
    counts = torch.bincount(sample_tokens(many, ones, ones, grid), minlength=4).float() / len(grid)
    assert counts.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=1e-3)
    nucleus = torch.bincount(sample_tokens(many, ones, ones * 0.7, grid), minlength=4).float() / len(grid)
    assert nucleus.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-3)  # top-p 0.7 keeps 2 tokens
    assert set(sample_tokens(many, ones * 0.0, ones, grid).tolist()) == {0}  # temperature 0: argmax


def test_invalid_requests_are_rejected(llama: Policy, words_reward: FunctionReward) -> None:
    engine = Engine(llama, words_reward)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"num_samples": -1}):
        with pytest.raises(ValueError):
            engine.run([request(**bad)])


@pytest.mark.parametrize("spread", [8.0, 2.5, 0.5])  # nucleus within 256 tokens, within 2048, wider
def test_top_p_candidates_give_the_full_sort_answer(spread: float) -> None:
    torch.manual_seed(0)
    num_rows, vocab, top_p = 64, 5000, 0.9
    logits = torch.randn(num_rows, vocab) * spread
    uniform = torch.rand(num_rows)
    ones = torch.ones(num_rows)
    tokens = sample_tokens(logits, ones, ones * top_p, uniform)
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    nucleus_size = ((sorted_probs.cumsum(-1) - sorted_probs) < top_p).sum(-1)
    for row in range(num_rows):  # reference: the smallest prefix of sorted tokens whose mass reaches top_p
        kept = sorted_probs[row, :nucleus_size[row]]
        position = int(torch.searchsorted(kept.cumsum(0), uniform[row] * kept.sum(), right=True).clamp_max(len(kept) - 1))
        assert int(tokens[row]) == int(order[row, position])
    low, high = {8.0: (1, 256), 2.5: (257, 2048), 0.5: (2049, vocab)}[spread]
    assert low <= int(nucleus_size.median()) <= high  # the case exercises the tier it is meant to


def test_jobs_of_one_prompt_share_a_batch_without_changing_their_samples(llama: Policy,
                                                                         words_reward: FunctionReward) -> None:
    explore = request("explore", PROMPTS[1], num_samples=3, seed=5, sample_offset=0)
    exploit = request("exploit", PROMPTS[1], num_samples=5, seed=5, sample_offset=3)
    engine = Engine(llama, words_reward)
    together = engine.run([explore, exploit])
    assert [texts(r) for r in together] == [texts(engine.run([explore])[0]), texts(engine.run([exploit])[0])]
    assert [s.index for s in together[1].samples] == [3, 4, 5, 6, 7]
    assert not set(texts(together[0])) & set(texts(together[1]))  # offsets give fresh samples
