"""The resumable stages of a study: data, train, curves (+ final), best-of-N, sweeps.

Every stage calls :mod:`miroflow.stages` (and the plan's configs come from :mod:`miroflow.recipes`);
each is idempotent: a run with a ``final/`` checkpoint and its ``study_train.json`` is not trained
again, an evaluation whose ``summary.json`` matches its settings is reused, and so is a best-of-N
document for the same checkpoint and grid.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from miroflow import hacking, stages
from miroflow.checkpoint import list_checkpoints, run_uri
from miroflow.config import Params
from miroflow.data.shards import iter_shard
from miroflow.recipes import derive
from miroflow.results import EvalSummary
from miroflow.storage import Storage, join_uri
from miroflow.study.config import StudyPlan
from miroflow.study.machine import choose_threads
from miroflow.tracking import NullTracker, Tracker
from miroflow.tts import best_of_n
from miroflow.util import json_text

__all__ = [
    "StudyRun",
    "Curves",
    "found_prior_work",
    "read_json",
    "write_json",
    "study_metrics",
    "evaluate",
    "stage_data",
    "stage_train",
    "stage_curves",
    "stage_tts",
    "stage_sweeps",
    "stage_schedules",
    "curve_flags",
    "sample_images",
]

log = logging.getLogger(__name__)

Metrics = dict[str, float | None]


# --------------------------------------------------------------------------- small I/O
def read_json(st: Storage, uri: str) -> Any | None:
    """The JSON document at ``uri``, or ``None`` when there is none."""
    return json.loads(st.read_bytes(uri)) if st.exists(uri) else None


def write_json(st: Storage, uri: str, doc: Any) -> None:
    """``doc`` (made JSON-safe) as indented JSON at ``uri``."""
    st.write_bytes(uri, json_text(doc).encode())


def found_prior_work(plan: StudyPlan, st: Storage) -> bool:
    """Whether an earlier invocation left anything of this study size (artifacts or local manifests)."""
    if st.list(plan.root.rstrip("/") + "/"):
        return True
    return plan.manifests.is_dir() and any(plan.manifests.iterdir())


@dataclass
class StudyRun:
    """What the stages of one invocation share: the plan, storage, parent tracker and timings."""

    plan: StudyPlan
    st: Storage
    parent: Tracker = field(default_factory=NullTracker)
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Record the wall time of ``stage`` (seconds) in :attr:`timings`."""
        t0 = time.time()
        try:
            yield
        finally:
            self.timings[stage] = time.time() - t0


# --------------------------------------------------------------------------- metrics
def study_metrics(s: EvalSummary) -> Metrics:
    """The study's table keys of one evaluation, from :meth:`EvalSummary.metrics` (the one conversion):
    ``overall``, ``acc/<category>`` and ``<reward>`` (``None`` where a value is missing)."""
    m = s.metrics(prefix="")
    out: Metrics = {"overall": m.get("overall")}
    out.update({f"acc/{tag}": m.get(tag) for tag in s.accuracy})
    out.update({name: m.get(f"reward/{name}") for name in s.rewards})
    return out


def _se(s: EvalSummary, rewards: Sequence[str]) -> dict[str, float]:
    """Standard error of each reward's mean."""
    return {r: (s.rewards[r].std or 0) / math.sqrt(max(1, s.rewards[r].n)) for r in rewards}


def _reusable(doc: Mapping[str, Any], p: Params, checkpoint: str) -> bool:
    """Whether a stored ``summary.json`` is the evaluation ``p`` of ``checkpoint`` would make."""
    ev = p.eval
    targets = doc.get("reward_targets") or {}
    return (
        doc.get("checkpoint") == checkpoint
        and doc.get("prompt_set") == ev.prompt_set
        and doc.get("images_per_prompt") == ev.images_per_prompt
        and doc.get("n_images") == ev.images_per_prompt * doc.get("n_prompts", -1)
        and doc.get("steps") == ev.steps
        and doc.get("seed") == ev.seed
        and doc.get("guidance_scale") == ev.guidance_scale
        and all(targets.get(k) == v for k, v in ev.reward_targets.items())
    )


#: Sidecar of an evaluation with a non-constant guidance schedule (summary.json does not record it).
SCHEDULE_JSON = "guidance_schedule.json"


def _schedule_key(p: Params) -> dict[str, Any]:
    """The guidance schedule of ``p.eval`` as the sidecar stores it (``{"schedule": "constant"}`` for constant)."""
    ev = p.eval
    if ev.guidance_schedule == "constant":
        return {"schedule": "constant"}
    return {"schedule": ev.guidance_schedule, "interval": list(ev.guidance_interval), "decay": ev.guidance_decay}


def evaluate(run: StudyRun, p: Params, checkpoint: str, out: str) -> EvalSummary:
    """``stages.evaluate`` of ``checkpoint`` into ``out`` unless its summary is already there (idempotent).

    A non-constant guidance schedule is recorded in ``out/guidance_schedule.json``; a summary is reused
    only when that sidecar (absent = constant) matches ``p.eval``'s schedule.
    """
    done = read_json(run.st, join_uri(out, "summary.json"))
    key = _schedule_key(p)
    sidecar = read_json(run.st, join_uri(out, SCHEDULE_JSON)) or {"schedule": "constant"}
    if done is not None and _reusable(done, p, checkpoint) and sidecar == key:
        try:
            return EvalSummary.from_dict(done)
        except ValueError:
            log.warning("study: %s/summary.json has another layout; evaluating again", out)
    res = stages.evaluate(
        derive(p, eval={"checkpoint": checkpoint}), out_uri=out, manifest=None, storage=run.st, tracker=NullTracker()
    )
    if key["schedule"] != "constant":
        write_json(run.st, join_uri(out, SCHEDULE_JSON), key)
    elif run.st.exists(join_uri(out, SCHEDULE_JSON)):
        run.st.delete(join_uri(out, SCHEDULE_JSON))
    return res


def _judge_se(s: EvalSummary) -> float | None:
    """Standard error of the judge's overall accuracy (:mod:`miroflow.hacking`'s binomial SE), ``None`` if unjudged."""
    try:
        est = hacking.as_point(s).metrics.get(hacking.JUDGE)
    except hacking.HackingInputError:
        return None
    return None if est is None else est.se


def _flags(points: Sequence[hacking.EvalPoint | EvalSummary]) -> dict[str, Any]:
    """``{"flags": [Flag as dict], "error": None}`` of :func:`miroflow.hacking.monitor_evals` over ``points``
    (in the order given); an input the monitor rejects gives no flags and its message in ``error``."""
    try:
        flags = hacking.monitor_evals(points, k=hacking.DEFAULT_K)
    except hacking.HackingInputError as err:
        return {"flags": [], "error": str(err)}
    return {"flags": [dataclasses.asdict(f) for f in flags], "error": None}


def _point(s: EvalSummary, where: str, x: float) -> hacking.EvalPoint:
    return dataclasses.replace(hacking.as_point(s), where=where, x=float(x))


def curve_flags(ev: Curves) -> dict[str, dict[str, Any]]:
    """Reward-hacking flags over each run's convergence evaluations, ordered by step (see :func:`_flags`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, pts in ev.summaries.items():
        try:
            points = [_point(s, f"step {step}", step) for step, s in sorted(pts, key=lambda q: q[0])]
        except hacking.HackingInputError as err:
            out[name] = {"flags": [], "error": str(err)}
            continue
        out[name] = _flags(points)
    return out


# --------------------------------------------------------------------------- stages
def stage_data(run: StudyRun) -> dict[str, Any]:
    """Render, score, bin and embed the study's dataset; its statistics for the report."""
    with run.timed("data"):
        data = stages.data_stages(run.plan.params, run.st)
    n = swapped = blurred = noisy = lowc = 0
    for sh in data.prepare.shards:
        for rec in iter_shard(sh.uri, run.st):
            meta = rec.get("json") or {}
            if isinstance(meta, (bytes, str)):
                meta = json.loads(meta)
            d = meta.get("degradations") or {}
            n += 1
            swapped += bool(meta.get("swapped"))
            blurred += "blur" in d
            noisy += "noise" in d
            lowc += "low_contrast" in d or "contrast" in d
    return {
        "num_samples": n,
        "swapped": swapped,
        "blurred": blurred,
        "noisy": noisy,
        "low_contrast": lowc,
        "data_hash": data.prepare.data_hash,
        "bins_hash": data.bins.hash,
    }


def stage_train(run: StudyRun) -> dict[str, dict[str, Any]]:
    """Train (or resume) every planned run; ``{name: record + role, spec, seed, checkpoints}``."""
    plan, st = run.plan, run.st
    info: dict[str, dict[str, Any]] = {}
    own = 0.0  # threads of the training this invocation just ran (its share of the load average)
    with run.timed("train"):
        for pr in plan.runs:
            run_dir = run_uri(pr.params)
            rec_uri = join_uri(run_dir, "study_train.json")
            rec = read_json(st, rec_uri)
            final = join_uri(run_dir, "final")
            if rec is None or not st.exists(join_uri(final, "miro.json")):
                threads = choose_threads(plan.cfg.threads, own_load=own)  # re-chosen per run: other load changes
                os.environ["OMP_NUM_THREADS"] = str(threads)
                done = list_checkpoints(run_dir, st)
                start = done[-1][0] if done else 0
                log.info("study: training %s with %d thread(s) from step %d", pr.name, threads, start)
                tags = {"study.kind": "train", "study.role": pr.spec.role, "study.run": pr.name}
                with run.parent.child_run(f"train-{pr.name}", tags=tags) as tr:
                    res = stages.train(pr.params, resume=True, tracker=tr, storage=st)
                prev = rec["wall_time_s"] if rec else 0.0
                rec = {
                    "checkpoint": res.checkpoint,
                    "steps": res.steps,
                    "loss": res.loss,
                    "wall_time_s": prev + res.wall_time_s,
                    "mlflow_run_id": tr.run_id,
                    "threads": threads,
                    "s_per_step": res.wall_time_s / max(1, res.steps - start),
                }
                write_json(st, rec_uri, rec)
                own = float(threads)
            ckpts = list(list_checkpoints(run_dir, st))
            if not ckpts or ckpts[-1][0] != plan.steps:
                ckpts.append((plan.steps, final))
            info[pr.name] = {**rec, "role": pr.spec.role, "spec": pr.spec.name, "seed": pr.seed, "checkpoints": ckpts}
    return info


@dataclass(frozen=True)
class Curves:
    """Every run's convergence curve and final evaluation (table keys, and the summaries for MLflow)."""

    curves: dict[str, dict[str, Any]]
    final: dict[str, dict[str, Any]]
    summaries: dict[str, list[tuple[int, EvalSummary]]]
    final_summaries: dict[str, EvalSummary]


def stage_curves(run: StudyRun, train: Mapping[str, Mapping[str, Any]]) -> Curves:
    """Evaluate every checkpoint (curve set) and the final checkpoint (final set) of every run."""
    plan = run.plan
    curves: dict[str, dict[str, Any]] = {}
    finals: dict[str, dict[str, Any]] = {}
    summaries: dict[str, list[tuple[int, EvalSummary]]] = {}
    final_summaries: dict[str, EvalSummary] = {}
    with run.timed("eval"):
        for name, rec in train.items():
            pts = [
                (int(step), evaluate(run, plan.curve, uri, join_uri(plan.root, "eval", name, f"step-{step:08d}")))
                for step, uri in rec["checkpoints"]
            ]
            ms = [study_metrics(s) for _, s in pts]
            curves[name] = {"steps": [s for s, _ in pts], "metrics": {k: [m.get(k) for m in ms] for k in ms[-1]}}
            fin = evaluate(run, plan.final, rec["checkpoints"][-1][1], join_uri(plan.root, "eval", name, "final"))
            finals[name] = {
                **study_metrics(fin),
                "_se": _se(fin, plan.rewards),
                "_summary_uri": join_uri(plan.root, "eval", name, "final", "summary.json"),
            }
            summaries[name], final_summaries[name] = pts, fin
    return Curves(curves, finals, summaries, final_summaries)


def _candidates(
    st: Storage, output: str, rewards: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Scores ``{reward: [P, Nmax]}``, judge arrays and prompt tags from a tts stage's ``candidates.jsonl``."""
    rows = [json.loads(x) for x in st.read_bytes(join_uri(output, "candidates.jsonl")).decode().splitlines() if x]
    p = 1 + max(r["prompt_index"] for r in rows)
    n = 1 + max(r["sample_index"] for r in rows)

    def grid(key: str, conv: Any = float) -> np.ndarray:
        a = np.full((p, n), np.nan)
        for r in rows:
            if r.get(key) is not None:
                a[r["prompt_index"], r["sample_index"]] = conv(r[key])
        return a

    tags = [""] * p
    for r in rows:
        tags[r["prompt_index"]] = r["tag"]
    judge = {"correct": grid("correct", lambda v: 1.0 if v else 0.0), "judge_score": grid("judge_score")}
    return {name: grid(name) for name in rewards}, judge, tags


def _select_all(run: StudyRun, st: Storage, output: str, ns: Sequence[int]) -> dict[str, Any]:
    """Best-of-N selected by each of the study's rewards from a tts stage's ``candidates.jsonl``:
    ``{reward: {"ns", "curves", "compute", "points"}}`` (points: per-N reward stats and judged counts,
    what the reward-hacking monitor reads)."""
    plan = run.plan
    scores, judge, tags = _candidates(st, output, plan.rewards)
    by: dict[str, Any] = {}
    for sel in plan.rewards:
        r = best_of_n(
            scores,
            select_by=sel,
            ns=ns,
            judge=judge,
            tags=tags,
            steps=plan.sz.eval_steps,
            guidance_scale=plan.cfg.guidance_scale,
        )
        by[sel] = {"ns": r["ns"], "curves": r["curves"], "compute": r["compute"], "points": r["points"]}
    return by


def tts_flags(tts: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Reward-hacking flags of every best-of-N curve of the study (``{"<label> by <reward>": {"flags",
    "error"}}``): selecting by one reward must not lower the judge beyond noise."""
    out: dict[str, dict[str, Any]] = {}
    for label, doc in tts.items():
        for sel, r in (doc.get("select_by") or {}).items():
            try:
                flags = hacking.monitor_best_of_n(r, k=hacking.DEFAULT_K)
            except hacking.HackingInputError as err:
                out[f"{label} by {sel}"] = {"flags": [], "error": str(err)}
                continue
            out[f"{label} by {sel}"] = {"flags": [dataclasses.asdict(f) for f in flags], "error": None}
    return out


def stage_tts(run: StudyRun, train: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Best-of-N of the MIRO and baseline runs (first seed of each): ``stages.tts`` generates and scores
    the candidates once; selecting by every reward then reuses its ``candidates.jsonl``."""
    plan, st, cfg = run.plan, run.st, run.plan.cfg
    n_max, ns = max(cfg.best_of_n), sorted(set(cfg.best_of_n))
    out: dict[str, Any] = {}
    with run.timed("tts"):
        for label in ("miro", "baseline"):
            name = plan.tts_runs[label]
            ckpt = train[name]["checkpoints"][-1][1]
            uri = join_uri(plan.root, "tts", f"{name}.json")
            ev = plan.tts.eval
            key = {
                "checkpoint": ckpt,
                "n_max": n_max,
                "ns": ns,
                "prompt_set": ev.prompt_set,
                "steps": ev.steps,
                "guidance_scale": ev.guidance_scale,
                "seed": ev.seed,
            }
            doc = read_json(st, uri)
            cand = join_uri(plan.root, "tts", name)
            if doc is None or any(doc.get(k) != v for k, v in key.items()):
                p = derive(plan.tts, eval={"checkpoint": ckpt}, train={"run_name": name})
                with run.parent.child_run(f"tts-{name}", tags={"study.kind": "tts", "study.run": name}) as tr:
                    res = stages.tts(p, out_uri=cand, storage=st, tracker=tr)
                doc = {**key, "run": name, "n_prompts": res.n_prompts, "output": res.output, "select_by": {}}
            if doc["select_by"].keys() != set(plan.rewards) or any(
                "points" not in b for b in doc["select_by"].values()
            ):
                # selection is pure numpy over the stored candidates: redone (no sampling) when a field is new
                doc["select_by"] = _select_all(run, st, doc.get("output") or cand, ns)
                write_json(st, uri, doc)
            out[label] = doc
    return out


def stage_sweeps(run: StudyRun, train: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``target_reward`` target sweep and the ω sweep of the MIRO run (first seed); one child run per point."""
    plan, cfg = run.plan, run.plan.cfg
    name = plan.sweep_run
    ckpt = train[name]["checkpoints"][-1][1]
    tr = cfg.target_reward
    res: dict[str, Any] = {"run": name, "target": [], "guidance": []}
    summaries: dict[str, list[EvalSummary]] = {"target": [], "guidance": []}
    with run.timed("sweeps"):
        for x, p in plan.target_points:
            s = evaluate(run, p, ckpt, join_uri(plan.root, "sweeps", f"target-{tr}-{x:g}"))
            res["target"].append({"x": x, **study_metrics(s), "se": _se(s, plan.rewards)})
            summaries["target"].append(s)
        for w, p in plan.guidance_points:
            s = evaluate(run, p, ckpt, join_uri(plan.root, "sweeps", f"guidance-{w:g}"))
            res["guidance"].append({"x": w, **study_metrics(s)})
            summaries["guidance"].append(s)
        for kind, key in (("target", f"target.{tr}"), ("guidance", "guidance_scale")):
            for pt, s in zip(res[kind], summaries[kind]):
                tags = {"study.kind": f"sweep-{kind}", "study.run": name}
                with run.parent.child_run(f"sweep-{kind}-{pt['x']:g}", tags=tags) as c:
                    c.log_params({"sweep.kind": kind, key: pt["x"], "checkpoint": ckpt})
                    c.log_metrics(s.metrics(), step=0)
    res["hacking"] = {}
    for kind, label in (("target", f"{tr} target"), ("guidance", "ω")):
        try:
            pts = sorted(
                (_point(s, f"{label} {pt['x']:g}", pt["x"]) for pt, s in zip(res[kind], summaries[kind])),
                key=lambda q: q.x if q.x is not None else 0.0,
            )
        except hacking.HackingInputError as err:
            res["hacking"][kind] = {"flags": [], "error": str(err)}
            continue
        res["hacking"][kind] = _flags(pts)
    return res


def stage_schedules(run: StudyRun, train: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The guidance-schedule sweep on the MIRO run (first seed), at the sweep sizes; one child run per point.

    A constant-schedule point with an ω of the ω sweep reuses that sweep's evaluation (same settings,
    same directory); the others are evaluated under ``sweeps/schedule-<name>``.

    Returns:
        ``{"run", "points": [{name, omega, schedule, interval, decay, overall, acc/<cat>, <reward>, se
        {reward: SE}, judge_se}]}``.
    """
    plan = run.plan
    name = plan.sweep_run
    ckpt = train[name]["checkpoints"][-1][1]
    sweep_ws = set(plan.cfg.guidance_scales)
    res: dict[str, Any] = {"run": name, "points": []}
    with run.timed("schedules"):
        for spec, p in plan.schedule_points:
            if spec.schedule == "constant" and spec.guidance_scale in sweep_ws:
                out = join_uri(plan.root, "sweeps", f"guidance-{spec.guidance_scale:g}")
            else:
                out = join_uri(plan.root, "sweeps", f"schedule-{spec.name}")
            s = evaluate(run, p, ckpt, out)
            res["points"].append(
                {
                    "name": spec.name,
                    "omega": spec.guidance_scale,
                    "schedule": spec.schedule,
                    "interval": list(spec.interval),
                    "decay": spec.decay,
                    **study_metrics(s),
                    "se": _se(s, plan.rewards),
                    "judge_se": _judge_se(s),
                }
            )
            tags = {"study.kind": "sweep-schedule", "study.run": name}
            with run.parent.child_run(f"schedule-{spec.name}", tags=tags) as c:
                c.log_params(
                    {
                        "sweep.kind": "schedule",
                        "guidance_scale": spec.guidance_scale,
                        "guidance_schedule": spec.schedule,
                        "guidance_interval": f"[{spec.interval[0]:g}, {spec.interval[1]:g}]",
                        "guidance_decay": spec.decay,
                        "checkpoint": ckpt,
                    }
                )
                c.log_metrics(s.metrics(), step=0)
    return res


def sample_images(
    run: StudyRun, train: Mapping[str, Any], n_prompts: int = 6
) -> tuple[np.ndarray, list[str], list[str]]:
    """First image of the first prompts of every run's final eval: ``[runs, prompts, H, W, 3]``, labels, prompts."""
    rows, labels = [], []
    prompts: list[str] = []
    for name in train:
        out = join_uri(run.plan.root, "eval", name, "final")
        recs = [json.loads(x) for x in run.st.read_bytes(join_uri(out, "results.jsonl")).decode().splitlines()]
        firsts = [r for r in recs if r["sample_index"] == 0][:n_prompts]
        prompts = [r["prompt"] for r in firsts]
        rows.append(np.stack([_png(run.st.read_bytes(join_uri(out, r["path"]))) for r in firsts]))
        labels.append(name)
    return np.stack(rows), labels, prompts


def _png(data: bytes) -> np.ndarray:
    """PNG bytes -> ``[H, W, 3]`` uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
