"""miroflow.tracking against a real ``mlflow server`` on loopback (and a local SQLite store)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from miroflow import tracking as T
from miroflow.config import Params, TrackingConfig

# Fake credentials: none of these strings may ever reach the server, its files or any log.
FAKE_SECRET = "fake-secret-9f8e7d6c5b4a"
FAKE_PASSWORD = "fake-password-1a2b3c4d"
FAKE_URI_PW = "fake-uripw-77aa88bb"
FAKE_TOKEN = "fake-token-deadbeef0123"
FAKE_AKID = "AKIAFAKEFAKEFAKE1234"
FAKE_VALUES = (FAKE_SECRET, FAKE_PASSWORD, FAKE_URI_PW, FAKE_TOKEN, FAKE_AKID)


def _params(**sections: dict) -> Params:
    """Params with a unique experiment (one per test) plus section overrides."""
    tracking = {"experiment": f"test-{uuid.uuid4().hex[:10]}", **sections.pop("tracking", {})}
    return Params.model_validate({"tracking": tracking, **sections})


@pytest.fixture
def server_env(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point MLFLOW_TRACKING_URI at the session's server for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    yield mlflow_server


@pytest.fixture
def client(server_env: str) -> MlflowClient:
    """A plain MLflow client on the test server (to check what actually got stored)."""
    return MlflowClient(tracking_uri=server_env)


# --------------------------------------------------------------------------- pure helpers


def test_flatten_params_dotted_keys_json_lists_and_truncation() -> None:
    flat = T.flatten_params({"a": {"b": {"c": 1}, "l": [1, "x"], "e": {}, "n": None}, "s": "y" * 7000, "bad key!": 2})
    assert flat["a.b.c"] == "1"
    assert json.loads(flat["a.l"]) == [1, "x"]
    assert flat["a.e"] == "{}"
    assert flat["a.n"] == "None"
    assert len(flat["s"]) == T.MAX_PARAM_VALUE_LENGTH and flat["s"].endswith("[truncated]")
    assert flat["bad key_"] == "2"
    assert all(isinstance(v, str) for v in flat.values())


def test_redact_masks_credential_keys_uris_and_assignments_but_not_lookalikes() -> None:
    d = {
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "db": {"password": FAKE_PASSWORD, "max_tokens": 77, "keys": ["a"], "apiKey": FAKE_TOKEN},
        "github_token": FAKE_TOKEN,
        "empty_password": "",
        "endpoint": f"postgresql://mlflow:{FAKE_URI_PW}@db:5432/mlflow",
        "note": f"export AWS_SECRET_ACCESS_KEY={FAKE_SECRET} and id {FAKE_AKID}",
        "lr": 0.001,
    }
    r = T.redact(d)
    assert d["db"]["password"] == FAKE_PASSWORD  # input untouched
    assert r["AWS_SECRET_ACCESS_KEY"] == T.REDACTED
    assert r["db"]["password"] == T.REDACTED and r["db"]["apiKey"] == T.REDACTED
    assert r["db"]["max_tokens"] == 77 and r["db"]["keys"] == ["a"]
    assert r["github_token"] == T.REDACTED
    assert r["empty_password"] == ""
    assert r["endpoint"] == f"postgresql://mlflow:{T.REDACTED}@db:5432/mlflow"
    assert r["lr"] == 0.001
    assert not any(v in json.dumps(r) for v in FAKE_VALUES)


def test_resolve_tracking_uri_default_is_sqlite_under_cwd_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = T.resolve_tracking_uri(TrackingConfig())
    assert uri == f"sqlite:///{tmp_path.resolve()}/work/mlflow.db"
    assert (tmp_path / "work").is_dir()
    assert T.default_artifact_location(uri) == (tmp_path.resolve() / "work" / "mlruns").as_uri()
    assert T.resolve_tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:1")) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    assert T.resolve_tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:1")) == "http://127.0.0.1:2"


def test_default_local_store_writes_db_and_artifacts_under_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with T.start_run(_params(), run_name="local") as tracker:
        tracker.log_metrics({"loss": 0.5}, step=3)
        tracker.log_dict({"a": 1}, "summary.json")
        run_id = tracker.run_id
    assert (tmp_path / "work" / "mlflow.db").is_file()
    assert list((tmp_path / "work" / "mlruns").rglob("summary.json"))
    assert not (tmp_path / "mlruns").exists()
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/work/mlflow.db")
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["loss"] == 0.5


def test_mlflow_and_null_trackers_match_the_one_tracker_protocol() -> None:
    import inspect

    names = [n for n, v in vars(T.Tracker).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert {
        "log_params",
        "log_metrics",
        "log_image",
        "log_dict",
        "log_figure",
        "log_artifact",
        "set_tags",
        "log_checkpoint",
        "register_model",
        "child_run",
    } <= set(names)
    for impl in (T.MlflowTracker, T.NullTracker):
        for name in names:
            want = list(inspect.signature(getattr(T.Tracker, name)).parameters)
            got = list(inspect.signature(getattr(impl, name)).parameters)
            assert got == want, (impl.__name__, name, got, want)
    assert isinstance(T.NullTracker(), T.Tracker)


# --------------------------------------------------------------------------- against the server


def test_params_flattened_redacted_and_secrets_never_reach_server_or_logs(
    client: MlflowClient,
    mlflow_server_info: object,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    params = _params(storage={"root": f"s3://minio:{FAKE_URI_PW}@bucket/prefix"})
    with T.start_run(params, run_name="secrets", tags={"api_token": FAKE_TOKEN, "note": f"id {FAKE_AKID}"}) as tracker:
        tracker.log_params(
            {"extra": {"aws_secret_access_key": FAKE_SECRET, "db": {"password": FAKE_PASSWORD}, "batch": 8}}
        )
        tracker.set_tags({"client_secret": FAKE_SECRET, "plain": "ok"})
        tracker.log_dict({"env": {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}, "n": 1}, "env.json")
        tracker.log_checkpoint(f"s3://u:{FAKE_URI_PW}@bucket/ckpt", step=1)
        run_id = tracker.run_id

    run = client.get_run(run_id)
    p, tags = run.data.params, run.data.tags
    # flattened config
    assert p["train.lr"] == "0.001"
    assert json.loads(p["score.rewards"]) == params.score.rewards
    assert p["tracking.experiment"] == params.tracking.experiment
    assert p["extra.batch"] == "8"
    # redacted
    assert p["storage.root"] == f"s3://minio:{T.REDACTED}@bucket/prefix"
    assert p["extra.aws_secret_access_key"] == T.REDACTED
    assert p["extra.db.password"] == T.REDACTED
    assert tags["api_token"] == T.REDACTED and tags["client_secret"] == T.REDACTED and tags["plain"] == "ok"
    assert FAKE_AKID not in tags["note"]
    env = json.loads(Path(client.download_artifacts(run_id, "env.json")).read_text())
    assert env == {"env": {"AWS_SECRET_ACCESS_KEY": T.REDACTED}, "n": 1}

    everything = json.dumps({"params": p, "tags": tags})
    stored = mlflow_server_info.stored_bytes()  # type: ignore[attr-defined]
    out, err = capfd.readouterr()
    for fake in FAKE_VALUES:
        assert fake not in everything, fake
        assert fake.encode() not in stored, f"{fake} reached the server's storage"
        assert fake not in caplog.text, f"{fake} reached the logs"
        assert fake not in out and fake not in err, f"{fake} reached stdout/stderr"
    # the logs did say something (so the capture is real)
    assert run_id in caplog.text


def test_metrics_by_step(client: MlflowClient) -> None:
    with T.start_run(_params(), run_name="metrics") as tracker:
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "reward/sharpness": 0.1 * step}, step=step)
        run_id = tracker.run_id
    hist = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1, 2]
    assert [m.value for m in hist] == pytest.approx([1.0, 0.5, 1.0 / 3])
    rew = sorted(client.get_metric_history(run_id, "reward/sharpness"), key=lambda m: m.step)
    assert [m.value for m in rew] == pytest.approx([0.0, 0.1, 0.2])


def test_tracked_run_is_a_null_tracker_when_off_or_off_rank0(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with T.tracked_run(_params(tracking={"enabled": False}), "off") as off:
        assert isinstance(off, T.NullTracker) and off.run_id is None  # tracking disabled: no run, no server call
        with off.child_run("child", params={"a": 1}) as child:
            assert isinstance(child, T.NullTracker)
        assert off.register_model("x", "y") is None
    monkeypatch.setenv("RANK", "1")
    with T.tracked_run(_params(), "rank1") as r1:
        assert isinstance(r1, T.NullTracker)  # only rank 0 records
    monkeypatch.delenv("RANK")
    with T.tracked_run(_params(), "on", tags={"stage": "evaluate"}) as tracker:
        assert isinstance(tracker, T.MlflowTracker)
        tracker.log_metrics({"eval/overall": 0.5})  # step defaults to 0
        tracker.log_metrics({"eval/overall": 0.25}, step=9)
        run_id = tracker.run_id
    hist = sorted(client.get_metric_history(run_id, "eval/overall"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(0, 0.5), (9, 0.25)]
    assert client.get_run(run_id).data.tags["stage"] == "evaluate"


def test_metrics_from_many_threads(client: MlflowClient) -> None:
    with T.start_run(_params(), run_name="threads") as tracker:

        def work(i: int) -> None:
            for s in range(5):
                tracker.log_metrics({f"m{i}": float(s)}, step=s)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        run_id = tracker.run_id
    for i in range(4):
        assert sorted(m.step for m in client.get_metric_history(run_id, f"m{i}")) == [0, 1, 2, 3, 4]


def test_image_series_under_key_has_both_steps(client: MlflowClient, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with T.start_run(_params(), run_name="images") as tracker:
        tracker.log_image(rng.random((16, 24, 3), dtype=np.float32), key="samples/ema", step=100)
        tracker.log_image((rng.random((3, 16, 24)) * 255).astype(np.uint8), key="samples/ema", step=200)  # CHW
        run_id = tracker.run_id
    files = [a.path for a in client.list_artifacts(run_id, "images")]
    pngs = [f for f in files if f.endswith(".png")]
    steps = sorted(int(m.group(1)) for f in pngs if (m := re.search(r"samples~ema\+step\+(\d+)\+", f)))
    assert steps == [100, 200], files
    from PIL import Image

    local = client.download_artifacts(run_id, pngs[0], str(tmp_path))
    with Image.open(local) as im:
        assert im.size == (24, 16) and im.mode == "RGB"
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages") == "True"


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((5, 7, 2), dtype=np.float32), r"\(5, 7, 2\)"),
        (np.zeros((2, 3, 4, 5), dtype=np.float32), r"\(2, 3, 4, 5\)"),
        (np.full((4, 4, 3), 2.0, dtype=np.float32), r"must be in \[0, 1\]"),
        (np.full((4, 4), np.nan, dtype=np.float32), r"NaN"),
    ],
)
def test_log_image_bad_input_raises_value_error_naming_the_problem(
    client: MlflowClient, image: np.ndarray, match: str
) -> None:
    with T.start_run(_params(), run_name="bad-image") as tracker:
        with pytest.raises(ValueError, match=match):
            tracker.log_image(image, key="samples", step=0)
        with pytest.raises(ValueError, match="key"):
            tracker.log_image(np.zeros((4, 4), dtype=np.uint8), key="bad#key", step=0)
        run_id = tracker.run_id
    assert client.list_artifacts(run_id, "images") == []


def test_checkpoint_uri_recorded(client: MlflowClient) -> None:
    with T.start_run(_params(), run_name="ckpt") as tracker:
        tracker.log_checkpoint("s3://bucket/runs/x/checkpoints/step-00000010", step=10)
        tracker.log_checkpoint("s3://bucket/runs/x/checkpoints/step-00000020", step=20)
        run_id = tracker.run_id
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint_uri"] == "s3://bucket/runs/x/checkpoints/step-00000020"
    assert tags["checkpoint_step"] == "20"
    data = json.loads(Path(client.download_artifacts(run_id, "checkpoints.json")).read_text())
    assert data["latest"] == tags["checkpoint_uri"]
    assert [(c["step"], c["uri"]) for c in data["checkpoints"]] == [
        (10, "s3://bucket/runs/x/checkpoints/step-00000010"),
        (20, "s3://bucket/runs/x/checkpoints/step-00000020"),
    ]


def test_relative_checkpoint_paths_are_recorded_absolute(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with T.start_run(_params(), run_name="ckpt-rel") as tracker:
        tracker.log_checkpoint("work/runs/x/checkpoints/step-00000010", step=10)
        tracker.log_checkpoint("file:///data/runs/x/final", step=20)  # a URI with a scheme stays as given
        run_id = tracker.run_id
    data = json.loads(Path(client.download_artifacts(run_id, "checkpoints.json")).read_text())
    assert [c["uri"] for c in data["checkpoints"]] == [
        str(tmp_path / "work/runs/x/checkpoints/step-00000010"),
        "file:///data/runs/x/final",
    ]
    assert T.absolute_uri("s3://bucket/k") == "s3://bucket/k" and T.absolute_uri("s3:/bad") == "s3:/bad"


def _fake_final_checkpoint(root: Path) -> Path:
    from safetensors.numpy import save_file

    final = root / "final"
    for sub in ("denoiser", "ema"):
        (final / sub).mkdir(parents=True)
        save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(final / sub / "model.safetensors"))
        (final / sub / "config.json").write_text(json.dumps({"size": "tiny"}))
    (final / "train_state.pt").write_bytes(b"optimizer state is not part of the model")
    (final / "miro.json").write_text(json.dumps({"format": 1, "step": 3}))
    return final


def test_register_model_version_exists(client: MlflowClient, tmp_path: Path) -> None:
    final = _fake_final_checkpoint(tmp_path)
    name = f"miro-test-{uuid.uuid4().hex[:8]}"
    with T.start_run(_params(), run_name="register") as tracker:
        v1 = tracker.register_model(final, name=name)
        run_id = tracker.run_id
    v2 = T.register_model(run_id, "final", name)  # an artifact already in the run -> next version
    assert (v1, v2) == ("1", "2")
    mv = client.get_model_version(name, v1)
    assert mv.run_id == run_id
    assert client.get_registered_model(name).name == name
    top = {Path(a.path).name for a in client.list_artifacts(run_id, "final")}
    assert top == {"denoiser", "ema", "miro.json"}  # train_state.pt is not part of the model
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "final/ema")} == {
        "model.safetensors",
        "config.json",
    }
    with pytest.raises(FileNotFoundError, match="nope"):
        T.register_model(run_id, "nope", name)


def test_nested_child_runs_under_parent(client: MlflowClient) -> None:
    params = _params()
    with T.start_run(params, run_name="sweep") as parent:
        for omega in (0.0, 1.0):
            with parent.child_run(f"omega={omega}", params={"omega": omega}) as child:
                child.log_metrics({"reward/sharpness": 0.5 + omega}, step=0)
        with T.child_run(parent, "module-level") as child:
            child.log_metrics({"x": 1.0}, step=0)
        with T.start_run(params, run_name="nested", nested=True) as nested:
            nested_id = nested.run_id
        with T.start_run(params, run_name="explicit", parent_run_id=parent.run_id) as explicit:
            explicit_id = explicit.run_id
        parent_id, exp_id = parent.run_id, parent.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    names = sorted(T.run_label(r) for r in runs)  # plain names (tag miroflow.run_name)
    assert names == ["explicit", "module-level", "nested", "omega=0.0", "omega=1.0"]
    assert re.fullmatch(r"nested-[0-9a-f]{6}", client.get_run(nested_id).info.run_name)  # top-level: unique names
    assert {nested_id, explicit_id} <= {r.info.run_id for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs)
    point = next(r for r in runs if r.info.run_name == "omega=1.0")
    assert point.data.params["omega"] == "1.0" and point.data.metrics["reward/sharpness"] == 1.5
    assert client.get_run(parent_id).data.tags.get("mlflow.parentRunId") is None


def test_nested_without_parent_is_an_error(server_env: str) -> None:
    with pytest.raises(ValueError, match="nested=True"):
        with T.start_run(_params(), run_name="orphan", nested=True):
            pass


def test_failed_run_is_marked_failed(client: MlflowClient) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with T.start_run(_params(), run_name="fails") as tracker:
            run_id = tracker.run_id
            raise RuntimeError("boom")
    assert client.get_run(run_id).info.status == "FAILED"


def test_git_commit_unknown_in_repo_without_commits(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    with T.start_run(_params(), run_name="nocommit") as tracker:
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.data.tags["git_commit"] == "unknown"
    assert run.data.params["git_commit"] == "unknown"
    assert "mlflow.source.git.commit" not in run.data.tags


def test_git_commit_dirty_flag_and_manifest_hash(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    (repo / "manifests").mkdir(parents=True)
    manifest = repo / "manifests" / "shards.json"
    manifest.write_text(json.dumps({"version": 1, "shards": []}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    with T.start_run(_params(), run_name="clean") as tracker:
        clean_id = tracker.run_id
    manifest.write_text(json.dumps({"version": 1, "shards": [{"uri": "x"}]}))  # tracked file changed
    with T.start_run(_params(), run_name="dirty") as tracker:
        dirty_id = tracker.run_id

    clean, dirty = client.get_run(clean_id).data, client.get_run(dirty_id).data
    assert clean.params["git_commit"] == head and clean.tags["git_commit"] == head
    assert clean.tags["mlflow.source.git.commit"] == head
    assert clean.tags["git_dirty"] == "false" and dirty.tags["git_dirty"] == "true"
    expected = hashlib.sha256(b'{"version": 1, "shards": []}').hexdigest()
    assert clean.params["data_manifest_sha256"] == expected == clean.tags["data_manifest_sha256"]
    assert dirty.params["data_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest() != expected


def test_log_artifact_file_and_dir_and_figure(client: MlflowClient, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with T.start_run(_params(), run_name="artifacts") as tracker:
        tracker.log_artifact(tmp_path / "d", "dir")
        tracker.log_artifact(tmp_path / "b.txt", "files")
        tracker.log_figure(fig, "plots/tradeoff.png")
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact(tmp_path / "missing.txt")
        run_id = tracker.run_id
    plt.close(fig)
    assert [a.path for a in client.list_artifacts(run_id, "dir")] == ["dir/a.txt"]
    assert [a.path for a in client.list_artifacts(run_id, "files")] == ["files/b.txt"]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/tradeoff.png"]
