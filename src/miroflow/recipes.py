"""The run set, derived from one validated params tree (docs/design.md §6).

Every derived config goes through :func:`derive` — a whole-tree ``Params.model_validate`` — so a
recipe can never produce a config ``params validate`` would refuse (no unvalidated
``model_copy(update=...)``, no f-string overrides). The demo, the pipeline flow and the study
build their runs here:

* :func:`baseline_of` — the same model without reward conditioning (``train.rewards = []``);
* :func:`miro_of` — conditioned on every binned reward (``train.rewards = None``);
* :func:`specialist_of` — conditioned on one reward only;
* :func:`synthetic_of` — trained on a mix of original and synthetic captions;
* :func:`pipeline_runs` — MIRO and its baseline, the pair every pipeline trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from miroflow.config import Params, ParamsError, format_validation_error

__all__ = [
    "derive",
    "baseline_of",
    "miro_of",
    "specialist_of",
    "synthetic_of",
    "pipeline_runs",
    "sized",
    "with_manifests",
]


def derive(p: Params, **sections: Mapping[str, Any]) -> Params:
    """``p`` with ``sections`` (``train={"seed": 1}``, ``eval={...}``) merged in, validated as a whole.

    Raises:
        ParamsError: an unknown section or key, or a bad value (one ``section.key: problem`` line each).
    """
    doc = p.model_dump(mode="json")
    for name, updates in sections.items():
        if name not in doc or not isinstance(doc[name], dict):
            raise ParamsError("recipe", [f"{name}: unknown params section (sections: {', '.join(doc)})"])
        doc[name] = {**doc[name], **dict(updates)}
    try:
        return Params.model_validate(doc)
    except ValidationError as err:
        raise ParamsError("recipe", format_validation_error(err)) from None


def _name(p: Params, run_name: str | None, suffix: str) -> str:
    return run_name if run_name is not None else f"{p.train.run_name}-{suffix}"


def baseline_of(p: Params, run_name: str | None = None) -> Params:
    """The no-reward baseline of ``p`` (default name ``<run_name>-baseline``)."""
    return derive(p, train={"run_name": _name(p, run_name, "baseline"), "rewards": []})


def miro_of(p: Params, run_name: str | None = None) -> Params:
    """MIRO on every binned reward (``train.rewards = None``); the name is kept unless given."""
    return derive(p, train={"run_name": run_name or p.train.run_name, "rewards": None})


def specialist_of(p: Params, reward: str, run_name: str | None = None) -> Params:
    """A single-reward specialist (default name ``<run_name>-<reward>-only``).

    Raises:
        ValueError: ``reward`` is not one of ``score.rewards`` (lists them).
    """
    if reward not in p.score.rewards:
        raise ValueError(f"specialist_of: {reward!r} is not in score.rewards ({', '.join(p.score.rewards)})")
    return derive(p, train={"run_name": _name(p, run_name, f"{reward}-only"), "rewards": [reward]})


def synthetic_of(p: Params, prob: float, run_name: str | None = None) -> Params:
    """MIRO on a mix of captions: a synthetic one with probability ``prob`` (default name ``<run_name>-syn<pct>``)."""
    return derive(p, train={"run_name": _name(p, run_name, f"syn{round(100 * prob)}"), "synthetic_caption_prob": prob})


def with_manifests(p: Params, folder: str | Path) -> Params:
    """``p`` with its local manifests (``data.manifest``, ``score.manifest``, ``score.bins`` and the
    per-run ones next to them) in ``folder``, so a demo or a flow run never overwrites the files
    ``dvc repro`` tracks in ``manifests/``."""
    f = Path(folder)
    return derive(
        p,
        data={"manifest": str(f / "shards.json")},
        score={"manifest": str(f / "scores.json"), "bins": str(f / "bins.json")},
    )


def sized(p: Params, steps: int, evals: int = 3) -> Params:
    """``p`` trained for ``steps`` steps with ``evals`` sample grids and checkpoints along the way."""
    every = max(1, steps // evals)
    return derive(p, train={"steps": steps, "eval_every": every, "checkpoint_every": every})


def pipeline_runs(
    p: Params, miro_name: str | None = None, baseline_name: str | None = None, with_baseline: bool = True
) -> list[Params]:
    """``p`` itself as the MIRO run (renamed to ``miro_name`` when given; ``train.rewards`` kept) and,
    with ``with_baseline``, its baseline (default name ``<MIRO run name>-baseline``)."""
    miro = derive(p, train={"run_name": miro_name}) if miro_name else p
    runs = [miro]
    if with_baseline:
        runs.append(baseline_of(miro, baseline_name or f"{miro.train.run_name}-baseline"))
    return runs
