"""Which params each stage's output depends on, and the content hash that addresses it.

One table (:data:`STAGE_PARAMS`) serves two purposes, so they cannot drift apart:

* ``dvc.yaml`` lists exactly these keys as each stage's ``params`` (:mod:`miroflow.dvc_pipeline`
  renders the file from it), so a change of ``train.log_every`` reruns nothing and a change of
  ``train.lr`` reruns train → evaluate → sweep only;
* object-store keys of the stages whose folder is not already addressed by its inputs carry
  :func:`stage_hash` — the hash of the values of these keys for the stage *and every stage upstream*
  — so a run with other params writes to other keys and the manifests of an old commit still name
  unchanged objects (``git checkout`` + ``dvc checkout``; docs/reproducibility.md).

Keys left out change only how or where work runs, never its result: batch sizes of inference-only
passes, devices, executors, thread counts, logging and checkpoint cadence, sample grids, tracking.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from miroflow.config import Params

__all__ = ["STAGE_PARAMS", "UPSTREAM", "addressed", "stage_hash", "param_value"]

_DATA_KEYS = tuple(
    f"data.{k}"
    for k in (
        "domain",
        "import_uri",
        "num_samples",
        "resolution",
        "seed",
        "shard_size",
        "split",
        "image_format",
        "max_pixels",
        "min_side",
        "swap_caption_fraction",
        "synthetic_captions",
        "max_objects",
        "degradations",
    )
)

#: Train keys that change how a run is executed or observed, not the weights it produces
#: (every step draws its randomness from (seed, step), so cadence keys cannot shift it).
TRAIN_EXECUTION_ONLY = frozenset(
    {
        "device",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_last",
        "sample_prompts",
        "sample_steps",
        "stream_workers",
        "sample_log",
        "nproc_per_node",
        "nnodes",
        "rdzv_endpoint",
        "rdzv_timeout_s",
    }
)

_TRAIN_KEYS = tuple(
    f"train.{k}"
    for k in (
        "run_name",
        "model",
        "text_encoder",
        "latent",
        "vae",
        "rewards",
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "optimizer",
        "grad_clip",
        "ema_decay",
        "ema_warmup",
        "reward_features",
        "reward_dropout",
        "all_reward_dropout",
        "text_dropout",
        "synthetic_caption_prob",
        "seed",
        "data",
        "stream_above",
        "stream_partitions",
        "stream_window",
        "mixed_precision",
        "compile",
    )
)

_EVAL_KEYS = tuple(
    f"eval.{k}"
    for k in (
        "checkpoint",
        "prompt_set",
        "num_prompts",
        "images_per_prompt",
        "steps",
        "guidance_scale",
        "guidance_schedule",
        "guidance_interval",
        "guidance_decay",
        "reward_targets",
        "negative_reward_targets",
        "rewards",
        "seed",
        "output",
    )
)

#: The params (dotted keys) each stage's output depends on.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": (*_DATA_KEYS, "storage.root"),
    "score": ("data.domain", "score.rewards", "score.reward_weights", "storage.root"),
    "bin": ("score.num_bins", "score.bin_max_samples"),
    "embed": ("train.text_encoder", "train.latent", "train.vae", "storage.root"),
    "train": (*_TRAIN_KEYS, "storage.root"),
    "evaluate": (*_EVAL_KEYS, "score.rewards", "train.run_name", "storage.root"),
    "sweep": (
        "sweep.guidance_scales",
        "sweep.target_reward",
        "sweep.target_values",
        "sweep.best_of_n",
        "sweep.select_by",
        "sweep.output",
        *(k for k in _EVAL_KEYS if k != "eval.output"),
        "score.rewards",
        "train.run_name",
        "storage.root",
    ),
}

#: Each stage's direct upstream stages (the inputs its output is a function of).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "score": ("prepare",),
    "bin": ("score",),
    "embed": ("prepare",),
    "train": ("prepare", "score", "bin", "embed"),
    "evaluate": ("train",),
    "sweep": ("train",),
}


def param_value(params: Params, key: str) -> Any:
    """The JSON value of dotted ``key`` (``"train.lr"``) in ``params``; KeyError naming it if absent."""
    section, _, name = key.partition(".")
    doc = getattr(params, section).model_dump(mode="json")
    if name not in doc:
        raise KeyError(f"no param {key!r}")
    return doc[name]


def _closure(stage: str) -> list[str]:
    """``stage`` and every stage upstream of it, each once, in a fixed order."""
    if stage not in STAGE_PARAMS:
        raise KeyError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_PARAMS)}")
    seen: list[str] = []
    todo = [stage]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.append(s)
            todo.extend(UPSTREAM[s])
    return sorted(seen)


def stage_hash(params: Params, stage: str, length: int = 10) -> str:
    """Hex hash (``length`` chars) of the values of every key ``stage`` and its upstream depend on.

    Two param sets with equal values for those keys give equal hashes (the same object-store
    folder: a rerun resumes or skips); any difference in one of them gives another folder.
    """
    keys = sorted({k for s in _closure(stage) for k in STAGE_PARAMS[s]})
    blob = json.dumps({k: param_value(params, k) for k in keys}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def addressed(name: str, params: Params, stage: str) -> str:
    """``<name>-<stage_hash>``: the object-store folder name of ``stage``'s output for ``params``."""
    return f"{name}-{stage_hash(params, stage)}"
