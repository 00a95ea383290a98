"""What a reward-target search searches, where its study lives and what it is called (``miroflow tune-targets``).

* :class:`SearchSpace` — one target in ``tune.target_range`` per searched reward (Optuna parameter
  ``target.<reward>``) and, with ``tune.guidance_range``, ω (``guidance_scale``); the rewards that
  are not searched keep ``eval.reward_targets`` (unspecified = 1), negatives keep
  ``eval.negative_reward_targets``. The *default* vector is every searched target at 1 with
  ω = ``eval.guidance_scale``.
* :func:`config_problems` / :func:`model_problems` — one ``tune.<key>: ...`` line per bad input,
  before and after the model is loaded.
* :func:`default_storage_url` — the Optuna storage next to MLflow's SQLite database.
* :func:`study_name` — ``<model run>-<objective>-<hash of everything a trial's value depends on>``,
  so a rerun with the same setup resumes the same study and any change starts another.
* :func:`write_prompt_subset` — a slice of a prompt set written as a prompt file of the same kind, so
  the search and the held-out prompts are plain, disjoint prompt sets on storage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miroflow.config import Params
from miroflow.errors import InputError
from miroflow.prompts import PromptItem
from miroflow.rewards.registry import available_rewards
from miroflow.storage import Storage
from miroflow.tune_stats import ACCURACY, objective_weights

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "GUIDANCE_PARAM",
    "TARGET_PREFIX",
    "TuneError",
    "SearchSpace",
    "scored_rewards",
    "config_problems",
    "model_problems",
    "prompt_problems",
    "build_space",
    "default_storage_url",
    "study_name",
    "write_prompt_subset",
]

#: Optuna parameter of ω.
GUIDANCE_PARAM = "guidance_scale"
#: Prefix of a reward target's Optuna parameter (``target.sharpness``).
TARGET_PREFIX = "target."


class TuneError(InputError, ValueError):
    """A reward-target search cannot run with these params; the message names the ``tune.<key>``."""


@dataclass(frozen=True)
class SearchSpace:
    """The searched targets (and ω) of one model, and the values of everything else.

    Attributes:
        rewards: searched rewards, in the model's order.
        target_range: ``(low, high)`` of every searched target (normalised reward levels in [0, 1]).
        guidance_range: ``(low, high)`` of ω, or ``None`` (ω fixed at ``guidance_scale``).
        guidance_scale: ω of the default vector (and of every trial when ω is not searched).
        fixed_targets: ``eval.reward_targets`` of the rewards that are not searched.
    """

    rewards: tuple[str, ...]
    target_range: tuple[float, float]
    guidance_range: tuple[float, float] | None
    guidance_scale: float
    fixed_targets: dict[str, float] = field(default_factory=dict)

    def point(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``{"reward_targets": {reward: target}, "guidance_scale": ω}`` of Optuna parameter values."""
        targets = dict(self.fixed_targets)
        targets.update({r: float(values[TARGET_PREFIX + r]) for r in self.rewards})
        w = float(values[GUIDANCE_PARAM]) if self.guidance_range is not None else self.guidance_scale
        return {"reward_targets": targets, "guidance_scale": w}

    def suggest(self, trial: "optuna.Trial") -> dict[str, Any]:
        """Draw one point from ``trial`` (its parameters are named as in :meth:`default_values`)."""
        lo, hi = self.target_range
        values: dict[str, float] = {
            TARGET_PREFIX + r: trial.suggest_float(TARGET_PREFIX + r, lo, hi) for r in self.rewards
        }
        if self.guidance_range is not None:
            values[GUIDANCE_PARAM] = trial.suggest_float(GUIDANCE_PARAM, *self.guidance_range)
        return self.point(values)

    def default_values(self) -> dict[str, float]:
        """Optuna parameter values of the default vector (searched targets 1, ω = ``guidance_scale``)."""
        values = {TARGET_PREFIX + r: 1.0 for r in self.rewards}
        if self.guidance_range is not None:
            values[GUIDANCE_PARAM] = self.guidance_scale
        return values

    def contains_default(self) -> bool:
        """Whether the default vector lies inside the space (1 in ``target_range``, ω in ``guidance_range``)."""
        if self.rewards and self.target_range[1] < 1.0:
            return False
        g = self.guidance_range
        return g is None or g[0] <= self.guidance_scale <= g[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (recorded in ``tune.json`` and hashed into the study name)."""
        return {
            "rewards": list(self.rewards),
            "target_range": list(self.target_range),
            "guidance_range": list(self.guidance_range) if self.guidance_range is not None else None,
            "guidance_scale": self.guidance_scale,
            "fixed_targets": dict(sorted(self.fixed_targets.items())),
        }


def scored_rewards(params: Params) -> list[str]:
    """The rewards an evaluation scores: ``eval.rewards``, else ``score.rewards``."""
    ev = params.eval
    return list(ev.rewards if ev.rewards is not None else params.score.rewards)


def config_problems(params: Params) -> list[str]:
    """Problems of ``params.tune`` that need neither I/O nor the model, one ``tune.<key>: ...`` line each."""
    t, ev = params.tune, params.eval
    known = set(available_rewards())
    problems = [
        f"tune.rewards: unknown reward {r!r} (known: {', '.join(sorted(known))})"
        for r in t.rewards or []
        if r not in known
    ]
    scored = scored_rewards(params)
    if t.objective.startswith("reward:"):
        comps, where = objective_weights(t.objective), "tune.objective"
    elif t.objective == "mix":
        comps, where = objective_weights("mix", t.weights), "tune.weights"
    else:
        comps, where = {ACCURACY: 1.0}, "tune.objective"
    for name in comps:
        if name == ACCURACY:
            if params.data.domain != "shapes":
                problems.append(
                    f"{where}: 'accuracy' needs the shapes judge (data.domain=shapes, not {params.data.domain!r}); "
                    "use reward:<name>"
                )
        elif name not in known:
            problems.append(f"{where}: unknown reward {name!r} (known: accuracy, {', '.join(sorted(known))})")
        elif name not in scored:
            problems.append(f"{where}: reward {name!r} is not scored by the evaluation (add it to eval.rewards)")
    search_seed = t.search_seed if t.search_seed is not None else ev.seed
    if t.heldout_seed == search_seed:
        problems.append(
            f"tune.heldout_seed: {t.heldout_seed} equals the search seed (tune.search_seed or eval.seed); "
            "held-out images need other seeds"
        )
    return problems


def model_problems(params: Params, model_rewards: Sequence[str]) -> list[str]:
    """Problems of ``params.tune`` against the loaded model's rewards."""
    t = params.tune
    problems = [
        f"tune.rewards: {r!r} is not a reward of this model (its rewards: {', '.join(model_rewards) or 'none'})"
        for r in t.rewards or []
        if r in set(available_rewards()) and r not in model_rewards
    ]
    searched = list(t.rewards) if t.rewards is not None else list(model_rewards)
    if not searched and t.guidance_range is None:
        problems.append(
            "tune.rewards: nothing to search (the model has no rewards or tune.rewards is []) and "
            "tune.guidance_range is null"
        )
    return problems


def prompt_problems(params: Params, storage: Storage | None = None) -> list[str]:
    """Whether ``eval.prompt_set`` holds ``tune.search_prompts + tune.heldout_prompts`` prompts (it is read)."""
    from miroflow.prompts import PromptSetError, load_prompt_set

    t, ev = params.tune, params.eval
    need = t.search_prompts + t.heldout_prompts
    try:
        have = len(load_prompt_set(ev.prompt_set, need, storage=storage))
    except (PromptSetError, OSError) as err:
        return [f"eval.prompt_set: {err}"]
    if have < need:
        return [
            f"tune.heldout_prompts: eval.prompt_set {ev.prompt_set!r} has {have} prompts, fewer than "
            f"tune.search_prompts + tune.heldout_prompts = {need}"
        ]
    return []


def build_space(params: Params, model_rewards: Sequence[str]) -> SearchSpace:
    """The :class:`SearchSpace` of ``params.tune`` for a model with ``model_rewards``.

    Raises:
        TuneError: a :func:`model_problems` line (the first; all of them joined).
    """
    problems = model_problems(params, model_rewards)
    if problems:
        raise TuneError("; ".join(problems))
    t, ev = params.tune, params.eval
    wanted = set(t.rewards) if t.rewards is not None else set(model_rewards)
    searched = tuple(r for r in model_rewards if r in wanted)
    fixed = {r: float(v) for r, v in ev.reward_targets.items() if r not in searched}
    return SearchSpace(
        rewards=searched,
        target_range=(float(t.target_range[0]), float(t.target_range[1])),
        guidance_range=(float(t.guidance_range[0]), float(t.guidance_range[1])) if t.guidance_range else None,
        guidance_scale=float(ev.guidance_scale),
        fixed_targets=fixed,
    )


def default_storage_url(tracking_uri: str, cwd: Path | None = None) -> str:
    """The Optuna storage of a search when ``tune.storage`` is null.

    A local MLflow database ``sqlite:///<dir>/<name>.db`` gives ``sqlite:///<dir>/optuna.db``: the same
    folder but not the same file, because MLflow and Optuna both keep their schema revision in an
    ``alembic_version`` table and Optuna refuses a database whose revision is MLflow's. Anything else
    (an MLflow server, a Postgres URI) gives ``sqlite:///<cwd>/work/optuna.db``; a shared Postgres
    study needs an explicit ``tune.storage`` (its own database).
    """
    base = (cwd or Path.cwd()).resolve()
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        if db and db != ":memory:":
            folder = Path(db).parent if Path(db).is_absolute() else (base / db).parent
            return f"sqlite:///{folder.resolve() / 'optuna.db'}"
    return f"sqlite:///{base / 'work' / 'optuna.db'}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def study_name(
    params: Params,
    run_label: str,
    checkpoint: str | None,
    model_step: int | None,
    space: SearchSpace,
    search_items: Sequence[PromptItem],
) -> str:
    """``tune.study_name``, else ``<run>-<objective>-<10 hex>`` where the hex hashes everything a trial's
    value depends on: the model (checkpoint URI or run + step), the objective and its weights, the
    space, the search prompts, seed, images per prompt and steps, the negative targets, the scored
    rewards and the sampler's settings. ``tune.trials`` and the held-out settings are left out: raising
    the budget or changing the held-out check resumes the same study."""
    t, ev = params.tune, params.eval
    if t.study_name:
        return t.study_name
    doc = {
        "model": checkpoint or f"{run_label}@{model_step}",
        "objective": t.objective,
        "weights": objective_weights(t.objective, t.weights),
        "space": space.to_dict(),
        "prompts": [(it.tag, it.prompt) for it in search_items],
        "seed": t.search_seed if t.search_seed is not None else ev.seed,
        "images_per_prompt": t.images_per_prompt or ev.images_per_prompt,
        "steps": ev.steps,
        "negative_reward_targets": dict(sorted(ev.negative_reward_targets.items())),
        "rewards": scored_rewards(params),
        "reward_weights": dict(sorted(params.score.reward_weights.items())),
        "domain": params.data.domain,
        "sampler": {"seed": t.seed, "startup_trials": t.startup_trials, "enqueue_default": t.enqueue_default},
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]
    objective = "reward-" + t.objective.split(":", 1)[1] if t.objective.startswith("reward:") else t.objective
    return f"{_slug(run_label)}-{_slug(objective)}-{digest}"


def write_prompt_subset(st: Storage, base_uri: str, items: Sequence[PromptItem]) -> str:
    """Write ``items`` as a prompt file of their own kind under ``base_uri`` and return its prompt-set spec.

    GenEval-style records (``include`` present, as the shapes set has) -> ``geneval:<base>.jsonl`` (records
    verbatim); ``txt`` prompts -> ``txt:<base>.txt``; PartiPrompts records -> ``parti:<base>.tsv``. Each
    round-trips to the same tags and prompts through :func:`miroflow.prompts.load_prompt_set`.

    Raises:
        TuneError: items of another kind, or a prompt a line-based format cannot hold.
    """
    if not items:
        raise TuneError("tune: an empty prompt subset")
    if all("include" in it.metadata for it in items):
        uri = base_uri + ".jsonl"
        st.write_bytes(uri, "".join(json.dumps(it.metadata) + "\n" for it in items).encode())
        return f"geneval:{uri}"
    bad = next((it.prompt for it in items if any(c in it.prompt for c in "\t\r\n")), None)
    if bad is not None:
        raise TuneError(f"eval.prompt_set: prompt {bad[:60]!r} holds a tab or line break; cannot split this set")
    if all(it.tag == "txt" for it in items):
        uri = base_uri + ".txt"
        st.write_bytes(uri, "".join(it.prompt + "\n" for it in items).encode())
        return f"txt:{uri}"
    if all("category" in it.metadata for it in items):
        uri = base_uri + ".tsv"
        lines = ["Prompt\tCategory\tChallenge\tNote"] + [
            "\t".join(
                [
                    it.prompt,
                    str(it.metadata["category"]),
                    str(it.metadata.get("challenge", "")),
                    str(it.metadata.get("note", "")),
                ]
            )
            for it in items
        ]
        st.write_bytes(uri, ("\n".join(lines) + "\n").encode())
        return f"parti:{uri}"
    raise TuneError("eval.prompt_set: tune-targets splits shapes, geneval:, parti: and txt: prompt sets only")
