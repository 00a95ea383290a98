"""The study at its ``quick`` size: a smoke test of the MECHANICS (not the numbers).

The slow test runs :func:`miroflow.study.run_study` end to end on the repository's ``study.yaml``
(quick size: 256 samples, 7 runs of 40 steps) into a temporary storage root, output directory and
SQLite MLflow store (never over ``docs/``), then checks that ``results.md`` and the figures are
written, that MLflow holds the study's parent run with a child per training run and per sweep
point, and that a second call resumes: nothing is trained again and every stage is reused.
About 3–4 minutes on a loaded 2-core machine, hence ``slow``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from miroflow.config import ParamsError, apply_overrides, load_params
from miroflow.study import StudyConfig, budget_line, choose_threads, load_study_config, run_study, speedup

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fast pieces
def test_speedup_definition() -> None:
    steps = [300, 600, 900, 1200, 1500]
    s = speedup(steps, [0.1, 0.3, 0.5, 0.6, 0.7], target=0.45)
    assert s["reached_at"] == 900 and s["speedup"] == pytest.approx(1500 / 900) and not s["lower_bound"]
    first = speedup(steps, [0.9, 0.9, 0.9, 0.9, 0.9], target=0.45)
    assert first["lower_bound"] and first["text"].startswith("≥ 5.0")
    never = speedup(steps, [0.1, None, 0.2, 0.3, 0.4], target=0.45)
    assert never["speedup"] is None and never["text"] == "not reached"


def test_study_yaml_is_valid_and_strict(tmp_path: Path) -> None:
    cfg = load_study_config(REPO / "study.yaml")
    assert {"default", "quick"} <= set(cfg.sizes)
    roles = {r.role for r in cfg.runs}
    assert {"baseline", "miro", "specialist", "synthetic"} <= roles
    assert sum(r.role == "specialist" for r in cfg.runs) >= 2
    for r in cfg.runs:
        if r.role in ("baseline", "miro"):
            assert len(r.seeds) >= 2
    # the size overrides are valid params overrides
    for size in cfg.sizes.values():
        apply_overrides(load_params(REPO / "params.yaml"), size.overrides)
    bad = tmp_path / "study.yaml"
    bad.write_text("study:\n  runz: []\n")
    with pytest.raises(ParamsError, match="study.runz: unknown key"):
        load_study_config(bad)


def test_thread_choice_ignores_the_studys_own_load() -> None:
    cores = os.cpu_count() or 1
    assert choose_threads(3) == 3 and choose_threads(0) == 1  # explicit settings win, at least one thread
    # whatever the machine's load, the part this process put there itself never forces one thread
    assert choose_threads("auto", own_load=1e9) == cores


def test_budget_line_and_bad_budget(tmp_path: Path) -> None:
    assert "**met**" in budget_line(41.94, 60) and "41.9 min" in budget_line(41.94, 60)
    assert "**NOT met**" in budget_line(60.5, 60)
    cfg = load_study_config(REPO / "study.yaml")
    assert cfg.sizes["default"].budget_min == 60 and cfg.sizes["quick"].budget_min == 10  # the limits
    bad = tmp_path / "study.yaml"
    bad.write_text("study:\n  sizes:\n    default:\n      budget_min: -5\n")
    with pytest.raises(ParamsError, match="budget_min"):
        load_study_config(bad)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    params = apply_overrides(
        load_params(REPO / "params.yaml"),
        [f"storage.root={tmp_path / 'store'}", f"tracking.tracking_uri=sqlite:///{db}"],
    )
    cfg = load_study_config(REPO / "study.yaml")
    # seeds other than the repository's (which start at 0): the study must not assume seed 0 exists
    doc = cfg.model_dump()
    for r in doc["runs"]:
        r["seeds"] = [s + 3 for s in r["seeds"]]
    cfg = StudyConfig.model_validate(doc)
    assert 0 not in {s for r in cfg.runs for s in r.seeds}
    out = tmp_path / "docs"

    study = run_study(params, "quick", out_dir=out, study_config=cfg)

    # the report and its figures
    md = (out / "results.md").read_text()
    for section in (
        "## Claims",
        "## Setup and compute",
        "## Final comparison",
        "## Convergence and speed-up",
        "## Test-time scaling: best-of-N",
        "## Reward-target and guidance sweeps",
        "## Guidance schedules",
        "## Reward-hacking flags",
        "## Samples",
    ):
        assert section in md
    assert "Quick size" in md and "cores" in md and "Budget:" in md
    omega = f"{study['guidance_scale']:g}"
    assert "| # | claim | guidance ω | reproduced |" in md and md.count(f"(ω = {omega}) —") == 5  # ω beside each claim
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"convergence.png", "best_of_n.png", "target_sweep.png", "guidance_sweep.png", "samples.png"} <= figs
    for name in figs:
        assert f"figures/{name}" in md
    assert sum((out / "figures" / n).stat().st_size for n in figs) < 1_000_000

    # the numbers are all there (not judged: quick size)
    n_runs = sum(len(r.seeds) for r in cfg.runs)
    assert len(study["final"]) == n_runs == len(study["curves"])
    assert len(study["claims"]) == 5 and all(isinstance(c["reproduced"], bool) for c in study["claims"])
    steps = study["steps"]
    for c in study["curves"].values():
        assert c["steps"][-1] == steps and len(c["steps"]) == steps // cfg.sizes["quick"].eval_every
        assert c["metrics"]["overall"][-1] is not None
    assert set(study["tts_raw"]) == {"miro", "baseline"}
    assert [p["x"] for p in study["sweeps"]["target"]] == cfg.target_values
    # guidance schedules, judge floor and hacking flags (issue 14): present, whatever the numbers
    assert [p["name"] for p in study["schedules"]["points"]] == [s.name for s in cfg.guidance_schedules]
    assert study["schedule_verdict"]["answer"] in ("yes", "no", "n/a") and study["schedule_verdict"]["sentence"] in md
    assert "Judge floor" in md and md.count("Judge floor") >= 3  # claims, final table, schedules
    assert set(study["hacking"]["curves"]) == set(study["final"])
    assert set(study["hacking"]["sweeps"]) == {"target", "guidance"}
    monitored = [*study["hacking"]["curves"].values(), *study["hacking"]["sweeps"].values()]
    n_lines = sum(len(d["flags"]) + bool(d["error"]) for d in monitored)
    assert ("- no flags" in md) == (n_lines == 0)
    root = Path(study["root"])
    assert json.loads((root / "study.json").read_text())["size"] == "quick"

    # MLflow: one parent run; children for every training run, eval, and sweep point
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(cfg.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("miroflow.run_name") == "study-quick"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid}
    train_children = {n for n in children if n.startswith("train-")}
    assert train_children == {f"train-{n}" for n in study["final"]}
    assert any("loss" in children[n].data.metrics for n in train_children)
    assert {f"eval-{n}" for n in study["final"]} <= set(children)
    assert sum(n.startswith("sweep-") for n in children) == len(cfg.target_values) + len(cfg.guidance_scales)
    assert {f"schedule-{s.name}" for s in cfg.guidance_schedules} <= set(children)
    assert "claim/1" in parents[0].data.metrics
    arts = {a.path for a in client.list_artifacts(pid, "report")}
    assert "report/results.md" in arts

    # resume: a second call trains nothing again and reuses every stage's outputs
    ckpts = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/final/miro.json")}
    assert len(ckpts) == n_runs
    again = run_study(params, "quick", out_dir=out, study_config=cfg)
    assert {p: p.stat().st_mtime_ns for p in root.glob("runs/*/final/miro.json")} == ckpts
    assert again["compute"]["stages_s"]["train"] < 0.5 * study["compute"]["stages_s"]["train"]
    assert again["final"] == study["final"]
    runs2 = client.search_runs([exp.experiment_id], max_results=500)
    p2 = next(r for r in runs2 if r.data.tags.get("miroflow.run_name") == "study-quick" and r.info.run_id != pid)
    assert not any(
        r.info.run_name.startswith("train-") and r.data.tags.get("mlflow.parentRunId") == p2.info.run_id for r in runs2
    )


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    params = apply_overrides(load_params(REPO / "params.yaml"), [f"storage.root={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(ValueError, match="study size 'huge'"):
        run_study(params, "huge", out_dir=tmp_path / "docs", study_config=StudyConfig())  # type: ignore[arg-type]
