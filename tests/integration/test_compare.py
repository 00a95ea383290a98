"""``miroflow compare`` against the session's real MLflow server: a tiny baseline and a tiny MIRO run,
trained and evaluated for real (4 steps, 6 prompts × 2 images), compared through the CLI."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from scipy import stats as sps
from typer.testing import CliRunner

from miroflow import stages
from miroflow.cli import app
from miroflow.compare_stats import Stat, difference_p, standard_errors
from miroflow.config import load_params
from miroflow.recipes import pipeline_runs
from miroflow.stages.pipeline import data_stages

EXPERIMENT = f"compare-{uuid.uuid4().hex[:8]}"
PARAMS = {
    "data": {"num_samples": 32, "shard_size": 32},
    "train": {
        "run_name": "cmp-miro",
        "steps": 4,
        "batch_size": 8,
        "eval_every": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "sample_steps": 2,
        "warmup_steps": 2,
    },
    "eval": {"prompt_set": "shapes:1", "images_per_prompt": 2, "steps": 2},
    "tracking": {"experiment": EXPERIMENT},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> Iterator[dict[str, Any]]:
    """Data, a baseline and a MIRO run (trained + evaluated, tracked on the server) in a temporary project."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
        params = load_params(root / "params.yaml")
        data_stages(params)
        runs: dict[str, dict[str, Any]] = {}
        for p in pipeline_runs(params, miro_name="cmp-miro", baseline_name="cmp-baseline"):
            tr = stages.train(p)
            ev = stages.evaluate(p)
            runs[p.train.run_name] = {"train": tr.mlflow_run_id, "eval": ev.mlflow_run_id, "output": ev.output}
        yield {"root": root, "runs": runs, "client": MlflowClient(mlflow_server)}


def _compare(*args: str) -> Any:
    return CliRunner().invoke(app, ["compare", *args, "-p", "params.yaml"])


def _table(report: str) -> dict[str, list[str]]:
    """The final-evaluation table of report.md: {metric: [cells after the metric name]}."""
    section = report.split("## Final evaluation", 1)[1].split("##", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| eval/")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 0, f"{path} is blank"
    return arr.shape[1], arr.shape[0]


def _expected_ses(output: Path) -> dict[str, tuple[float, int]]:
    """SEs recomputed here from results.jsonl (independently of miroflow.compare)."""
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    out: dict[str, tuple[float, int]] = {}
    for name in ("sharpness", "noise", "contrast", "compressibility", "shapes_alignment"):
        v = np.array([r[name] for r in rows if r[name] is not None])
        out[f"eval/reward/{name}"] = (float(v.std(ddof=1) / math.sqrt(v.size)), int(v.size))
    tags = sorted({r["tag"] for r in rows})
    ses = []
    for tag in tags:
        c = np.array([r["correct"] for r in rows if r["tag"] == tag], dtype=float)
        se = math.sqrt(c.mean() * (1 - c.mean()) / c.size)
        out[f"eval/{tag}"] = (se, int(c.size))
        ses.append(se)
    out["eval/overall"] = (math.sqrt(sum(s * s for s in ses)) / len(ses), len(rows))
    return out


def test_compare_report_matches_the_runs_and_is_logged(project: dict[str, Any]) -> None:
    client: MlflowClient = project["client"]
    runs, out = project["runs"], project["root"] / "cmp-out"
    res = _compare("cmp-baseline", "cmp-miro", "--out", str(out))
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["cmp-baseline", "cmp-miro"]
    assert [r["eval_run_id"] for r in doc["runs"]] == [runs["cmp-baseline"]["eval"], runs["cmp-miro"]["eval"]]
    assert [r["train_run_id"] for r in doc["runs"]] == [runs["cmp-baseline"]["train"], runs["cmp-miro"]["train"]]
    assert all(r["se_source"] == "results.jsonl" for r in doc["runs"])

    table = _table((out / "report.md").read_text())
    by_metric = {e["metric"]: e for e in doc["table"]}
    for label, col in (("cmp-baseline", 0), ("cmp-miro", 1)):
        metrics = {k: v for k, v in client.get_run(runs[label]["eval"]).data.metrics.items() if k.startswith("eval/")}
        assert set(metrics) == set(by_metric) == set(table), (set(metrics) ^ set(by_metric)) | (
            set(metrics) ^ set(table)
        )
        expected = _expected_ses(Path(runs[label]["output"]))
        for key, value in metrics.items():
            got = by_metric[key]["runs"][label]
            assert got["value"] == pytest.approx(value, abs=1e-12), key
            assert got["se"] == pytest.approx(expected[key][0], abs=1e-9) and got["n"] == expected[key][1], key
            assert table[key][col].startswith(f"{value:.4f} ± {expected[key][0]:.4f} (n={expected[key][1]})"), (
                key,
                table[key],
            )
    for key, entry in by_metric.items():
        d = entry["differences"]["cmp-miro"]
        assert d["delta"] == pytest.approx(entry["runs"]["cmp-miro"]["value"] - entry["runs"]["cmp-baseline"]["value"])
        assert d["p"] is None or 0.0 <= d["p"] <= 1.0, (key, d)
        assert d["test"] == (
            "welch" if "/reward/" in key else "wald-z" if key == "eval/overall" else "two-proportion-z"
        )
        assert table[key][2] == f"{d['delta']:+.4f}" and (d["p"] is None or table[key][3] == f"{d['p']:.4f}")
    assert any(e["differences"]["cmp-miro"]["p"] is not None for e in doc["table"] if "/reward/" in e["metric"])

    assert _png(out / "curves.png")[0] > 300 and _png(out / "samples.png")[0] > 300
    assert "![reward curves](curves.png)" in (out / "report.md").read_text()

    cmp_run = client.get_run(doc["mlflow_run_id"])
    assert cmp_run.info.experiment_id == client.get_experiment_by_name(EXPERIMENT).experiment_id
    tags = cmp_run.data.tags
    assert tags["stage"] == "compare" and tags["compare.reference"] == runs["cmp-baseline"]["eval"]
    assert tags["compare.runs"] == f"{runs['cmp-baseline']['eval']},{runs['cmp-miro']['eval']}"
    assert tags["compare.train_runs"] == f"{runs['cmp-baseline']['train']},{runs['cmp-miro']['train']}"
    files = {a.path for a in client.list_artifacts(cmp_run.info.run_id, "compare")}
    assert files == {f"compare/{f}" for f in ("report.md", "compare.json", "curves.png", "samples.png")}


def test_ids_and_evaluation_runs_resolve_to_the_same_pair(project: dict[str, Any]) -> None:
    """A run id (training) and an evaluation run's name (its parent gives the curves) compare the same runs."""
    runs, out = project["runs"], project["root"] / "cmp-ids"
    res = _compare(runs["cmp-miro"]["train"], "eval-cmp-baseline", "--out", str(out))
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "compare.json").read_text())
    assert [(r["eval_run_id"], r["train_run_id"]) for r in doc["runs"]] == [
        (runs["cmp-miro"]["eval"], runs["cmp-miro"]["train"]),
        (runs["cmp-baseline"]["eval"], runs["cmp-baseline"]["train"]),
    ]
    assert doc["reference"] == "cmp-miro" and (out / "curves.png").is_file()


def test_summary_json_gives_the_same_standard_errors(project: dict[str, Any]) -> None:
    """Without results.jsonl (another machine), the SEs come from eval/summary.json and agree."""
    client: MlflowClient = project["client"]
    run = client.get_run(project["runs"]["cmp-miro"]["eval"])
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    summary = json.loads(
        Path(client.download_artifacts(run.info.run_id, "eval/summary.json", str(project["root"]))).read_text()
    )
    rows = [
        json.loads(line)
        for line in (Path(project["runs"]["cmp-miro"]["output"]) / "results.jsonl").read_text().splitlines()
    ]
    from_rows, src_rows = standard_errors(rows, summary, metrics)
    from_summary, src_summary = standard_errors(None, summary, metrics)
    assert (src_rows, src_summary) == ("results.jsonl", "summary.json")
    for key, s in from_rows.items():
        assert from_summary[key].se == pytest.approx(s.se, rel=1e-9, abs=1e-12) and from_summary[key].n == s.n, key
    # rows that do not reproduce the run's metrics (a later evaluation in the same folder) are not used
    bad = [{**r, "sharpness": None if r["sharpness"] is None else r["sharpness"] + 0.25} for r in rows]
    assert standard_errors(bad, summary, metrics)[1] == "summary.json"


def test_unknown_run_is_a_one_line_error_naming_it(project: dict[str, Any]) -> None:
    res = _compare("cmp-baseline", "no-such-run-xyz")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-run-xyz" in lines[0] and EXPERIMENT in lines[0], res.output
    assert "Traceback" not in res.output
    res = _compare("0123456789abcdef0123456789abcdef")  # looks like an id, is none: tried as a name, then an error
    assert res.exit_code == 2 and "0123456789abcdef0123456789abcdef" in res.output


def test_the_tests_agree_with_scipy_and_handle_degenerate_cases() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.1, 40), rng.normal(0.56, 0.2, 30)
    ref = Stat(float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)), a.size, float(a.std(ddof=1)))
    oth = Stat(float(b.mean()), float(b.std(ddof=1) / math.sqrt(b.size)), b.size, float(b.std(ddof=1)))
    p, test = difference_p("eval/reward/sharpness", ref, oth)
    assert test == "welch" and p == pytest.approx(sps.ttest_ind(b, a, equal_var=False).pvalue)
    # 30/100 vs 45/100: the pooled two-proportion z-test
    p, test = difference_p("eval/colors", Stat(0.30, 0.0458, 100), Stat(0.45, 0.0497, 100))
    pooled = 0.375
    z = 0.15 / math.sqrt(pooled * (1 - pooled) * 0.02)
    assert test == "two-proportion-z" and p == pytest.approx(2 * sps.norm.sf(z))
    assert difference_p("eval/colors", Stat(0.0, 0.0, 50), Stat(0.0, 0.0, 50))[0] == 1.0
    assert difference_p("eval/overall", Stat(0.2, 0.0, 6), Stat(0.5, 0.0, 6))[0] == 0.0
    assert math.isnan(difference_p("eval/reward/x", Stat(0.5, math.nan, 1, math.nan), oth)[0])
