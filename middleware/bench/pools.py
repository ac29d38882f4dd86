"""Response pools: many scored samples per prompt, generated once, replayed by ``alignq bench allocation``.

Format (JSON lines, UTF-8; small enough to commit, greppable, appendable):

    line 1   {"alignq_pool": 1, "kind": "model" | "synthetic:<kind>", "model": ..., "reward": ...,
              "max_new_tokens": ..., "temperature": ..., "seed": ..., "created_at": ...}
    line 2+  {"prompt_id": "p001", "prompt": str | [{"role", "content"}], "metadata": {...},
              "rewards": [float, ...], "num_tokens": [int, ...] | null, "texts": [str, ...] | null,
              "is_finished": [bool, ...] | null}

One line per prompt, samples in generation order. Building appends a line as each prompt finishes, so
an interrupted build resumes where it stopped (prompts already in the file are skipped; a last line cut
short by a kill is dropped and its prompt generated again). ``max_duration_s`` stops a build cleanly
after the prompt that crosses it, so long builds run in bounded chunks. A finished pool may be
gzip-compressed (``.jsonl.gz``): ``load_pool`` reads either. Synthetic
pools draw rewards from parametric distributions and carry no texts.

Building from models imports ``workers`` lazily: this module is torch-free on import.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from middleware.errors import PoolError

logger = logging.getLogger(__name__)

POOL_FORMAT_VERSION = 1
SYNTHETIC_KINDS = {
    "normal-spread": "Gaussian rewards, per-prompt std log-spaced over a `spread`-fold range",
    "skew-right": "Gumbel rewards (long right tail), scales over a `spread`-fold range",
    "skew-left": "mirrored Gumbel rewards (long left tail), scales over a `spread`-fold range",
    "bernoulli": "0/1 rewards, success rates log-spaced from 0.01 to 0.9 (a verifiable reward)",
    "alike": "every prompt the same standard normal: nothing for allocation to find",
}


@dataclass(slots=True)
class PoolPrompt:
    prompt_id: str
    prompt: str | list[dict]
    rewards: np.ndarray  # (num_samples,) float64
    metadata: dict = field(default_factory=dict)
    num_tokens: list[int] | None = None
    texts: list[str] | None = None
    is_finished: list[bool] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "metadata": self.metadata,
                "rewards": [float(r) for r in self.rewards], "num_tokens": self.num_tokens,
                "texts": self.texts, "is_finished": self.is_finished}


@dataclass(slots=True)
class Pool:
    header: dict[str, Any]
    prompts: list[PoolPrompt]

    @property
    def rewards(self) -> list[np.ndarray]:
        return [p.rewards for p in self.prompts]

    def summary(self) -> list[dict[str, Any]]:
        """Per prompt: samples, mean, std, max and (0/1 rewards) the success rate."""
        rows = []
        for p in self.prompts:
            r = p.rewards
            rows.append({"prompt_id": p.prompt_id, "num_samples": int(r.size), "mean": float(r.mean()),
                         "std": float(r.std()), "max": float(r.max()),
                         "mean_tokens": float(np.mean(p.num_tokens)) if p.num_tokens else None})
        return rows


# ---------------------------------------------------------------- reading and writing


def _parse_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise PoolError(f"{path}:{number}: not JSON ({e.msg}); one JSON object per line") from e
    if not isinstance(value, dict):
        raise PoolError(f"{path}:{number}: expected a JSON object")
    return value


def load_pool(path: str | Path) -> Pool:
    path = Path(path)
    if not path.is_file():
        raise PoolError(f"no pool at {path}: build one with `alignq pool build`")
    header: dict[str, Any] | None = None
    prompts: list[PoolPrompt] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            value = _parse_line(line, path, number)
            if header is None:
                if value.get("alignq_pool") != POOL_FORMAT_VERSION:
                    raise PoolError(f"{path}:1: not an alignq pool (version {POOL_FORMAT_VERSION} header missing)")
                header = value
                continue
            rewards = np.asarray(value.get("rewards") or [], dtype=np.float64)
            if rewards.size == 0 or not np.all(np.isfinite(rewards)):
                raise PoolError(f"{path}:{number}: prompt needs a non-empty list of finite rewards")
            prompts.append(PoolPrompt(str(value["prompt_id"]), value.get("prompt", ""), rewards,
                                      value.get("metadata") or {}, value.get("num_tokens"), value.get("texts"),
                                      value.get("is_finished")))
    if header is None:
        raise PoolError(f"{path} is empty: build it with `alignq pool build`")
    return Pool(header, prompts)


def write_pool(pool: Pool, path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as out:
        out.write(json.dumps(pool.header) + "\n")
        out.writelines(json.dumps(prompt.to_json(), ensure_ascii=False) + "\n" for prompt in pool.prompts)


def drop_truncated_tail(path: str | Path) -> bool:
    """Cut a last line that a kill left without its newline (resuming then regenerates that prompt)."""
    path = Path(path)
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    path.write_bytes(data[: data.rfind(b"\n") + 1])
    logger.warning("pool path=%s: dropped a truncated last line", path)
    return True


def append_prompt(path: str | Path, prompt: PoolPrompt) -> None:
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(json.dumps(prompt.to_json(), ensure_ascii=False) + "\n")
        out.flush()


def read_prompts(path: str | Path) -> list[tuple[str, str | list[dict], dict]]:
    """(prompt_id, prompt, metadata) per line of a prompts file: {"prompt", "id"?, "metadata"?}."""
    path = Path(path)
    if not path.is_file():
        raise PoolError(f"no prompts file at {path}")
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            value = _parse_line(line, path, number)
            prompt = value.get("prompt", value.get("messages"))
            if not prompt:
                raise PoolError(f"{path}:{number}: needs a non-empty \"prompt\" (text or chat messages)")
            prompt_id = value.get("id") or value.get("prompt_id") or value.get("request_id") or f"p{number:03d}"
            prompts.append((str(prompt_id), prompt, dict(value.get("metadata") or {})))
    ids = [p[0] for p in prompts]
    if len(set(ids)) != len(ids):
        raise PoolError(f"{path}: prompt ids repeat; give each line a unique \"id\"")
    return prompts


# ---------------------------------------------------------------- synthetic pools


def synthetic_pool(kind: str, *, num_prompts: int = 24, num_samples: int = 192, spread: float = 11.0,
                   seed: int = 0) -> Pool:
    """Rewards from parametric distributions; per-prompt scales log-spaced over ``spread``-fold."""
    if kind not in SYNTHETIC_KINDS:
        raise PoolError(f"unknown synthetic pool {kind!r}: choose one of {', '.join(SYNTHETIC_KINDS)}")
    if num_prompts < 1 or num_samples < 1 or spread < 1:
        raise PoolError("synthetic pools need num_prompts >= 1, num_samples >= 1 and spread >= 1")
    rng = np.random.default_rng(seed)
    levels = np.linspace(0.0, 1.0, num_prompts) if num_prompts > 1 else np.zeros(1)
    scales = rng.permutation(spread**levels)
    means = rng.normal(0.0, 1.0, num_prompts)
    shape = (num_prompts, num_samples)
    if kind == "normal-spread":
        rewards = means[:, None] + scales[:, None] * rng.standard_normal(shape)
    elif kind in ("skew-right", "skew-left"):
        sign = 1.0 if kind == "skew-right" else -1.0
        rewards = means[:, None] + sign * scales[:, None] * rng.gumbel(0.0, 1.0, shape)
    elif kind == "bernoulli":
        rates = rng.permutation(np.exp(np.linspace(math.log(0.01), math.log(0.9), num_prompts)))
        rewards = (rng.random(shape) < rates[:, None]).astype(np.float64)
    else:  # alike
        rewards = rng.standard_normal(shape)
    header = {"alignq_pool": POOL_FORMAT_VERSION, "kind": f"synthetic:{kind}", "spread": spread, "seed": seed,
              "num_samples": num_samples, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    prompts = [PoolPrompt(f"s{i:03d}", f"synthetic {kind} prompt {i}", rewards[i]) for i in range(num_prompts)]
    return Pool(header, prompts)


# ---------------------------------------------------------------- pools from the real engine


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_pool(prompts_path: str | Path, out_path: str | Path, *, num_samples: int, model: str | None = None,
               reward: str | None = None, max_new_tokens: int = 32, temperature: float = 0.8, top_p: float = 1.0,
               seed: int = 0, device: str = "auto", num_threads: int = 0, max_batch: int = 64,
               progress: bool = True, max_duration_s: float | None = None) -> Pool:
    """Generate ``num_samples`` scored samples per prompt; resumes a partly built pool at ``out_path``.

    ``max_duration_s``: stop after the prompt that crosses it (the pool is then partial; run again).
    """
    prompts = read_prompts(prompts_path)
    out_path = Path(out_path)
    if out_path.suffix == ".gz":
        raise PoolError(f"{out_path} is compressed: gunzip it, build into the .jsonl, then gzip it again")
    header = {"alignq_pool": POOL_FORMAT_VERSION, "kind": "model", "model": model, "reward": reward,
              "prompts": str(prompts_path), "num_samples": num_samples, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "top_p": top_p, "seed": seed,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    done: set[str] = set()
    if out_path.exists() and out_path.stat().st_size > 0:
        drop_truncated_tail(out_path)
        existing = load_pool(out_path)
        settings = ("model", "reward", "max_new_tokens", "temperature", "seed")
        changed = [k for k in settings if existing.header.get(k) != header[k]]
        if changed:
            raise PoolError(f"{out_path} was built with other {', '.join(changed)}: pass the same options or a new -o")
        done = {p.prompt_id for p in existing.prompts}
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    todo = [p for p in prompts if p[0] not in done]
    if todo:
        _generate_into(out_path, todo, num_samples=num_samples, model=model, reward=reward,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       device=device, num_threads=num_threads, max_batch=max_batch, progress=progress,
                       max_duration_s=max_duration_s)
    return load_pool(out_path)


def _generate_into(out_path: Path, todo: list[tuple[str, str | list[dict], dict]], *, num_samples: int,
                   model: str | None, reward: str | None, max_new_tokens: int, temperature: float, top_p: float,
                   seed: int, device: str, num_threads: int, max_batch: int, progress: bool,
                   max_duration_s: float | None = None) -> None:
    from tqdm import tqdm

    from workers.engine import Engine, GenerationRequest
    from workers.models import configure_threads, load_policy, load_reward

    configure_threads(num_threads)
    engine = Engine(load_policy(model, device=device), load_reward(reward, device=device), max_batch=max_batch)
    # several prompts per engine call when N is small, so a batch stays near max_batch samples
    prompts_per_call = max(1, max_batch // max(1, num_samples))
    started = time.monotonic()
    with tqdm(total=len(todo) * num_samples, unit="sample", file=sys.stderr, disable=not progress) as bar:
        for chunk in _batches(todo, prompts_per_call):
            requests = [GenerationRequest(key=pid, prompt=prompt, num_samples=num_samples,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seed=seed, metadata=metadata) for pid, prompt, metadata in chunk]
            for (pid, prompt, metadata), result in zip(chunk, engine.run(requests)):
                if result.error:
                    raise PoolError(f"prompt {pid}: reward failed: {result.error}")
                samples = sorted(result.samples, key=lambda s: s.index)
                append_prompt(out_path, PoolPrompt(pid, prompt, np.array([s.reward for s in samples]), metadata,
                                                   [s.num_tokens for s in samples], [s.text for s in samples],
                                                   [s.is_finished for s in samples]))
                bar.update(len(samples))
                logger.info("pool prompt_id=%s samples=%d generate_s=%.1f", pid, len(samples), result.generate_s)
            if max_duration_s is not None and time.monotonic() - started >= max_duration_s:
                logger.info("pool path=%s: stopped early after max_duration_s=%.0f", out_path, max_duration_s)
                return
