"""Loading policies by spec: local folders, the default GGUF wheel (slow), bad specs; threads and dtypes."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from workers.errors import ModelLoadError
from workers.models import (
    configure_threads,
    cpu_has_native_bf16,
    default_cache_dir,
    load_policy,
    resolve_dtype,
)


def test_configure_threads_splits_cores_between_workers() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(0, workers_on_host=1) == max(1, os.cpu_count() or 1) == torch.get_num_threads()
        assert configure_threads(0, workers_on_host=64) == 1 == torch.get_num_threads()
        assert configure_threads(3) == 3 == torch.get_num_threads()
        with pytest.raises(ValueError):
            configure_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_auto_dtype_follows_the_cpu_flags() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_local_folder_loads_with_left_padding_and_chat_template(tiny_gpt2_dir: pathlib.Path) -> None:
    policy = load_policy(str(tiny_gpt2_dir), device="cpu", dtype="bfloat16")
    assert policy.dtype == torch.bfloat16 and next(policy.model.parameters()).dtype == torch.bfloat16
    assert policy.device == torch.device("cpu") and not policy.model.training
    assert policy.tokenizer.padding_side == "left" and policy.tokenizer.pad_token_id is not None
    rendered = policy.render("What is 2+2?")
    assert rendered.endswith("<|im_start|>assistant\n") and "What is 2+2?" in rendered
    chat = policy.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}])
    assert chat.index("a") < chat.index("b") < chat.rindex("c")
    assert policy.encode("hi") == policy.tokenizer(rendered.replace("What is 2+2?", "hi"),
                                                   add_special_tokens=False)["input_ids"]
    assert policy.tokenizer.eos_token_id in policy.eos_token_ids()


@pytest.mark.parametrize("spec", ["/no/such/folder", "./missing-model", "/tmp/nothing-here.gguf"])
def test_missing_paths_are_clear_errors(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as error:
        load_policy(spec, device="cpu")
    assert "\n" not in str(error.value)


def test_unknown_hub_name_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load causal LM 'alignq-test/no-such-model'") as error:
        load_policy("alignq-test/no-such-model", device="cpu")
    assert "\n" not in str(error.value)


def test_bad_device_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="device"):
        load_policy(None, device="tpu")


@pytest.mark.slow
def test_default_policy_loads_offline_from_the_wheel_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    policy = load_policy(device="cpu", dtype="float32")
    assert policy.name == "SmolLM2-135M-Instruct.Q4_1"
    assert policy.tokenizer.eos_token == "<|im_end|>" == policy.tokenizer.pad_token
    assert any(p.name.endswith("-float32-v1") for p in default_cache_dir().iterdir())
    ids = torch.tensor([policy.encode("What is the capital of France?")])
    with torch.inference_mode():
        out = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False, pad_token_id=policy.tokenizer.pad_token_id)
    assert "Paris" in policy.tokenizer.decode(out[0, ids.shape[1]:])
