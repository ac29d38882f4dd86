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


def write_tiny_gguf(path: pathlib.Path, num_tokens: int = 600) -> pathlib.Path:
    """A 1-layer random Llama GGUF (one Q8_0 tensor) with the first tokens of SmolLM2's tokenizer."""
    import gguf
    import numpy as np

    from workers.models import default_policy_gguf

    reader = gguf.GGUFReader(str(default_policy_gguf()))

    def strings(key: str, limit: int) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data[:limit]]

    tokens = strings("tokenizer.ggml.tokens", num_tokens)
    kept = set(tokens)
    # BPE ids follow merge order, so the merges that build the kept tokens come first
    merges = [m for m in strings("tokenizer.ggml.merges", 4 * num_tokens)
              if m.replace(" ", "") in kept and all(part in kept for part in m.split(" "))]
    types = reader.fields["tokenizer.ggml.token_type"]
    hidden, ffn, heads, kv_heads = 64, 128, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(num_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([int(types.parts[i][0]) for i in types.data[:num_tokens]])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode())
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (num_tokens, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv_heads * hidden // heads, hidden),
              "blk.0.attn_v.weight": (kv_heads * hidden // heads, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        data = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        if name == "token_embd.weight":  # one quantised tensor, so loading really de-quantises
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Built once per machine (reading SmolLM2's tokenizer takes seconds), in the tiny-model test cache."""
    cache = pathlib.Path(os.environ.get("ALIGNQ_TEST_CACHE", pathlib.Path.home() / ".cache" / "alignq" / "test-models"))
    target = cache / "tiny-llama-v1.gguf"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = write_tiny_gguf(cache / f".tiny-llama-v1.{os.getpid()}.gguf")
        tmp.replace(target)
    folder = tmp_path_factory.mktemp("gguf")  # its own folder: transformers reads the GGUF's folder too
    (folder / target.name).symlink_to(target)
    return folder / target.name


def test_gguf_is_dequantised_once_then_read_from_the_cache(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    import workers.models

    policy = load_policy(str(tiny_gguf), device="cpu", dtype="float32", cache_dir=str(tmp_path))
    [cached] = list(tmp_path.iterdir())  # one finished folder, no temp folder left behind
    assert cached.name.startswith("tiny-llama-") and cached.name.endswith("-float32-v1")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in cached.iterdir()}
    assert policy.tokenizer.padding_side == "left" and policy.tokenizer.pad_token == "<|im_end|>"
    ids = torch.tensor([policy.encode("hello")])
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    with torch.inference_mode():
        expected = direct(input_ids=ids).logits
        assert torch.equal(policy.model(input_ids=ids).logits, expected)

    def no_dequantising(gguf: pathlib.Path) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(workers.models, "_dequantise", no_dequantising)
    again = load_policy(str(tiny_gguf), device="cpu", dtype="float32", cache_dir=str(tmp_path))
    half = load_policy(str(tiny_gguf), device="cpu", dtype="bfloat16", cache_dir=str(tmp_path))  # cast from fp32
    assert sorted(p.name.rsplit("-", 2)[1] for p in tmp_path.iterdir()) == ["bfloat16", "float32"]
    with torch.inference_mode():
        assert torch.equal(again.model(input_ids=ids).logits, expected)
    for name, weight in half.model.state_dict().items():
        assert torch.equal(weight, policy.model.state_dict()[name].to(torch.bfloat16)), name
