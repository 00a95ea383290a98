"""Typed, frozen results of every stage (what :mod:`miroflow.stages` returns).

Each result is a frozen dataclass with ``to_json()`` / ``from_json()`` (and ``to_dict()`` /
``from_dict()``); the JSON is what the stage's manifest holds. Nested parts that are written to
storage as documents of their own (a sweep's points, best-of-N curves) stay JSON values
(:data:`JsonDict`), typed as such. The one conversion from an evaluation to metric names lives
here (:func:`eval_metrics`), used by evaluate, sweep, best-of-N and the study alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from miroflow.util import json_safe, json_text

__all__ = [
    "JsonValue",
    "JsonDict",
    "Result",
    "ShardRef",
    "PrepareResult",
    "ScoreResult",
    "ShardScore",
    "BinResult",
    "EmbedResult",
    "TrainResult",
    "RewardStat",
    "EvalSummary",
    "SweepResult",
    "BestOfNResult",
    "eval_metrics",
]

JsonValue = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]
JsonDict = dict[str, JsonValue]

R = TypeVar("R", bound="Result")


def eval_metrics(
    accuracy: Mapping[str, float],
    overall: float | None,
    reward_means: Mapping[str, float | None],
    prefix: str = "eval/",
) -> dict[str, float]:
    """Metric names of one evaluation: ``<prefix><category>``, ``<prefix>overall``,
    ``<prefix>reward/<name>`` (rewards without a finite mean are left out)."""
    out = {f"{prefix}{tag}": float(acc) for tag, acc in accuracy.items()}
    if overall is not None:
        out[f"{prefix}overall"] = float(overall)
    out.update({f"{prefix}reward/{name}": float(m) for name, m in reward_means.items() if m is not None})
    return out


class Result:
    """Mixin: JSON round trip of a frozen dataclass (unknown keys are errors, missing ones too)."""

    def to_dict(self) -> JsonDict:
        """The result as a JSON-safe dict."""
        return json_safe(dataclasses.asdict(self))  # type: ignore[call-overload, no-any-return]

    def to_json(self) -> str:
        """Indented JSON text (what the stage's manifest holds)."""
        return json_text(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ValueError: a missing or unknown field (named).
        """
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        try:
            return cls(**cls._convert(dict(d)))
        except TypeError as err:
            raise ValueError(f"{cls.__name__}: {err}") from None

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Hook for nested typed fields (tuples, sub-results)."""
        return d

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        """Rebuild from :meth:`to_json` text."""
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ShardRef(Result):
    """One webdataset shard: its URI, sha256 (hex) and sample count."""

    uri: str
    sha256: str
    n: int


@dataclass(frozen=True)
class PrepareResult(Result):
    """The prepare stage: shards under ``root`` and the local manifest that names them."""

    manifest: str
    root: str
    data_hash: str
    domain: str
    num_samples: int
    shards: tuple[ShardRef, ...]
    rejected: tuple[JsonDict, ...] = ()

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["shards"] = tuple(s if isinstance(s, ShardRef) else ShardRef.from_dict(s) for s in d["shards"])
        d["rejected"] = tuple(d.get("rejected", ()))
        return d


@dataclass(frozen=True)
class ShardScore(Result):
    """One shard's score table: ``n`` rows, ``failures`` samples that could not be scored (listed at
    ``failures_uri``); ``skipped`` when an up-to-date table already existed (``sha256`` is then ``None``);
    ``reused`` the rewards copied from another reward set's table of the shard, ``scored`` the ones
    computed by this call (:mod:`miroflow.score_reuse`)."""

    shard: str
    uri: str
    n: int
    failures: int
    failures_uri: str | None
    sha256: str | None
    skipped: bool
    reused: tuple[str, ...] = ()
    scored: tuple[str, ...] = ()

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        for k in ("reused", "scored"):
            if k in d:
                d[k] = tuple(d[k])
        return d


@dataclass(frozen=True)
class ScoreResult(Result):
    """The score stage: one table per shard; ``rewards`` maps name -> version."""

    manifest: str
    rewards: dict[str, str]
    num_tables: int
    num_rows: int
    failures: int


@dataclass(frozen=True)
class BinResult(Result):
    """The bin stage: ``num_bins`` quantile bins per reward (``counts``: values fitted on)."""

    path: str
    hash: str
    names: tuple[str, ...]
    num_bins: int
    counts: dict[str, int]

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["names"] = tuple(d["names"])
        return d


@dataclass(frozen=True)
class EmbedResult(Result):
    """The embed stage: sidecars (text embeddings, latents) per shard."""

    manifest: str
    sidecars: int
    encoder: str


@dataclass(frozen=True)
class TrainResult(Result):
    """The train stage: final (or latest) checkpoint and the tracking ids; ``ema_decay`` is the decay the
    last EMA update applied (the effective one with ``train.ema_warmup``; None in manifests that predate it);
    ``hacking_flags`` the reward-hacking monitor's flags at this call's eval points, one line each
    (docs/hacking.md; empty in manifests that predate it)."""

    run_name: str
    kind: str
    checkpoint: str
    loss: float | None
    steps: int
    wall_time_s: float
    mlflow_run_id: str | None
    model_version: str | None
    manifest: str | None
    ema_decay: float | None = None
    hacking_flags: tuple[str, ...] = ()

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["hacking_flags"] = tuple(d.get("hacking_flags") or ())
        return d


@dataclass(frozen=True)
class RewardStat(Result):
    """Mean, std and count of one reward's finite normalised values."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class EvalSummary(Result):
    """The evaluate stage (``summary.json``): GenEval-style accuracy per category, ``overall`` (mean
    over categories), reward stats, and the setup that produced them."""

    accuracy: dict[str, float]
    overall: float | None
    n_judged: dict[str, int]
    rewards: dict[str, RewardStat]
    n_images: int
    n_prompts: int
    images_per_prompt: int
    guidance_scale: float
    reward_targets: dict[str, float | None]
    negative_reward_targets: dict[str, float | None]
    guidance_mode: str | None
    checkpoint: str | None
    prompt_set: str
    steps: int
    seed: int
    output: str
    model: JsonDict
    mlflow_run_id: str | None = None
    manifest: str | None = None

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["rewards"] = {k: v if isinstance(v, RewardStat) else RewardStat.from_dict(v) for k, v in d["rewards"].items()}
        return d

    def reward_means(self) -> dict[str, float | None]:
        """``{reward: mean}`` (``None`` = no finite value)."""
        return {k: v.mean for k, v in self.rewards.items()}

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """:func:`eval_metrics` of this evaluation."""
        return eval_metrics(self.accuracy, self.overall, self.reward_means(), prefix)

    def with_ids(self, mlflow_run_id: str | None, manifest: str | None) -> EvalSummary:
        """A copy carrying the MLflow run id and manifest path."""
        return dataclasses.replace(self, mlflow_run_id=mlflow_run_id, manifest=manifest)


@dataclass(frozen=True)
class SweepResult(Result):
    """The sweep stage (``sweep.json``): every point's metrics, the best-of-N block, plot URIs."""

    run_name: str
    output: str
    checkpoint: str | None
    prompt_set: str
    n_prompts: int | None
    steps: int
    seed: int
    parent_run_id: str | None
    points: tuple[JsonDict, ...]
    tts: JsonDict | None
    plots: dict[str, str]
    notes: tuple[str, ...]
    manifest: str | None = None

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["points"] = tuple(d["points"])
        d["notes"] = tuple(d["notes"])
        return d


@dataclass(frozen=True)
class BestOfNResult(Result):
    """Best-of-N test-time scaling (``tts.json``): for each N, the selected images' metrics.

    ``curves[metric]`` and ``std[metric]`` are lists aligned with ``ns``; ``selected[k][i]`` is the
    candidate chosen for prompt ``i`` at ``ns[k]``; ``compute`` holds denoiser evaluations and reward
    calls per image for each N; ``points`` one dict per N (rewards, accuracy, overall, costs)."""

    select_by: str
    ns: tuple[int, ...]
    n_max: int
    n_prompts: int
    rewards: tuple[str, ...]
    curves: dict[str, list[float | None]]
    std: dict[str, list[float | None]]
    selected: tuple[tuple[int, ...], ...]
    compute: JsonDict
    points: tuple[JsonDict, ...]
    checkpoint: str | None
    prompt_set: str
    seed: int
    reward_targets: dict[str, float | None]
    negative_reward_targets: dict[str, float | None]
    output: str
    model: JsonDict
    mlflow_run_id: str | None = None
    manifest: str | None = None

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["ns"] = tuple(d["ns"])
        d["rewards"] = tuple(d["rewards"])
        d["selected"] = tuple(tuple(s) for s in d["selected"])
        d["points"] = tuple(d["points"])
        return d

    def point_metrics(self, k: int) -> dict[str, float]:
        """:func:`eval_metrics` of the images selected at ``ns[k]``."""
        p = self.points[k]
        rewards = p.get("rewards") or {}
        assert isinstance(rewards, dict)
        means = {r: (s.get("mean") if isinstance(s, dict) else None) for r, s in rewards.items()}
        acc = p.get("accuracy_by_tag") or {}
        assert isinstance(acc, dict)
        overall = p.get("overall")
        return eval_metrics(
            {t: float(a) for t, a in acc.items() if isinstance(a, (int, float))},
            float(overall) if isinstance(overall, (int, float)) else None,
            {r: float(m) if isinstance(m, (int, float)) else None for r, m in means.items()},
        )


@dataclass(frozen=True)
class TuneResult(Result):
    """The reward-target search (``tune.json``, ``miroflow tune-targets``): the Optuna study it ran or resumed,
    its best vector, and the held-out re-evaluation of the best and the default vector.

    ``best`` / ``default``: ``{"trial", "value" (search objective), "reward_targets", "guidance_scale"}``;
    ``heldout``: ``{"prompt_set", "n_prompts", "seed", "confidence", "best", "default", "difference"}`` where
    each of the last three is ``{"mean", "low", "high", "n"}`` over held-out prompts (``difference`` = best -
    default, paired on the same prompts and seeds); ``beats_default`` = the difference's interval lies above 0;
    ``trials`` = every trial of the study (number, state, value, params, point, MLflow run id, metrics)."""

    run_name: str
    study_name: str
    storage: str
    objective: str
    weights: dict[str, float]
    output: str
    checkpoint: str | None
    parent_run_id: str | None
    n_trials: int
    new_trials: int
    space: JsonDict
    best: JsonDict
    default: JsonDict
    heldout: JsonDict
    beats_default: bool
    trials: tuple[JsonDict, ...]
    plots: dict[str, str]
    summary: str
    notes: tuple[str, ...]
    manifest: str | None = None

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["trials"] = tuple(d["trials"])
        d["notes"] = tuple(d["notes"])
        return d


__all__ += ["TuneResult"]
