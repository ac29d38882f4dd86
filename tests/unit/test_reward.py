"""Reward specs: hf: sequence classifiers, python: scorers, the default embedding preference (slow)."""

from __future__ import annotations

import math
import pathlib

import pytest

from workers.errors import ModelLoadError, RewardError
from workers.reward import FunctionReward, RewardModel, SequenceClassifierReward, load_reward
from workers.scorers import distinct_words


def test_hf_reward_from_a_saved_folder_loads_through_load_reward(tiny_reward_dir: pathlib.Path) -> None:
    reward = load_reward(f"hf:{tiny_reward_dir}", device="cpu")
    assert isinstance(reward, SequenceClassifierReward) and isinstance(reward, RewardModel)
    prompts = ["Hi", [{"role": "user", "content": "Tell me a joke"}], "Hi"]
    responses = ["Hello! How can I help?", "Why did the chicken cross the road?", "go away " * 30]
    batched = reward.score(prompts, responses)
    assert len(batched) == 3 and all(math.isfinite(v) for v in batched)
    assert len(set(batched)) == 3  # different pairs, different scores
    separately = [reward.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(separately, abs=1e-4)  # padding does not change a score


def test_python_reward_by_spec() -> None:
    reward = load_reward("python:workers.scorers:distinct_words")
    responses = ["one two three four five six seven eight nine ten eleven twelve", "a a a a", ""]
    assert reward.score(["p"] * 3, responses) == [distinct_words("p", r) for r in responses] == [1.0, 0.25 / 3, 0.0]


def test_python_reward_batched_function_gets_lists() -> None:
    calls = []

    def lengths(prompts, responses, metadata_list):
        calls.append((list(prompts), list(responses), list(metadata_list)))
        return [len(r) + m.get("bonus", 0) for r, m in zip(responses, metadata_list)]

    lengths.batched = True
    assert FunctionReward(lengths, "lengths").score(["a", "b"], ["xy", "z"], [{}, {"bonus": 10}]) == [2.0, 11.0]
    assert len(calls) == 1


@pytest.mark.parametrize("returns,match", [
    (lambda p, r, m: float("nan"), "non-finite"),
    (lambda p, r, m: math.inf, "non-finite"),
    (lambda p, r, m: 1 / 0, "ZeroDivisionError"),
    (lambda p, r, m: "high", "non-number"),
])
def test_python_reward_failures_are_reward_errors(returns, match: str) -> None:
    with pytest.raises(RewardError, match=match):
        FunctionReward(returns, "bad").score(["p"], ["r"])


def test_wrong_number_of_scores_is_a_reward_error() -> None:
    def short(prompts, responses, metadata_list):
        return [1.0]

    short.batched = True
    with pytest.raises(RewardError, match="1 scores for 2"):
        FunctionReward(short, "short").score(["a", "b"], ["x", "y"])


@pytest.mark.parametrize("spec,match", [
    ("sentiment", "unknown reward spec"),
    ("gpt4:judge", "unknown reward spec"),
    ("python:workers.scorers", "cannot import module|use python:<module>:<function>"),
    ("python:workers.no_such_module:fn", "cannot import module"),
    ("python:workers.scorers:no_such_function", "has no function"),
    ("hf:/no/such/reward-model", "does not exist"),
    ("embedding:/no/such/encoder", "does not exist"),
])
def test_bad_reward_specs_are_clear_errors(spec: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match) as error:
        load_reward(spec)
    assert "\n" not in str(error.value)


HELPFUL_AND_RUDE = [
    ("What a lovely day! I am so glad to help you.", "I hate you. Go away."),
    ("Sure! Paris is the capital of France.", "Who cares. Look it up yourself, idiot."),
    ("Thanks for asking! Regular exercise, good sleep and a balanced diet help a lot.",
     "Ugh, whatever. Do what you want, I do not care."),
    ("Sorry to hear that. Resting and drinking fluids usually helps with a cold.", "Not my problem."),
]


@pytest.mark.slow
def test_default_embedding_reward_prefers_a_cheerful_helpful_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = load_reward(device="cpu")
    for helpful, rude in HELPFUL_AND_RUDE:
        good, bad = reward.score(["q", "q"], [helpful, rude])
        assert good > bad, (helpful, rude)
    assert reward.score(["q"], ["What a lovely day! I am so glad to help you."])[0] > 0
    assert reward.score(["q"], ["I hate you. Go away."])[0] < 0
    custom = load_reward(device="cpu", positive="An answer about cooking eggs.", negative="An answer about cars.")
    eggs, cars = custom.score(["How do I boil an egg?"] * 2, ["Boil the egg for nine minutes.", "Change the oil."])
    assert eggs > cars
