"""The score-dataset Prefect flow under a real temporary Prefect server (prefect_test_harness)."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import pytest

from miroflow.config import Params
from miroflow.data.score_tables import load_score_table
from miroflow.prepare import run_prepare
from miroflow.rewards import clear_reward_cache


def _params(tmp: Path, executor: str = "thread") -> Params:
    return Params.model_validate(
        {
            "data": {
                "num_samples": 24,
                "shard_size": 8,
                "synthetic_captions": True,
                "manifest": str(tmp / "manifests" / "shards.json"),
            },
            "score": {
                "rewards": ["sharpness", "contrast", "shapes_alignment"],
                "batch_size": 8,
                "device": "cpu",
                "num_bins": 8,
                "max_workers": 2,
                "executor": executor,
                "manifest": str(tmp / "manifests" / "scores.json"),
                "bins": str(tmp / "manifests" / "bins.json"),
            },
            "storage": {"root": str(tmp / "store")},
        }
    )


def _score_task_runs(flow_run_id: UUID) -> list[object]:
    """The score_shard task runs of the flow run (they run in its subflow ``score-shards``)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        assert len(children) == 1, children
        ids = [flow_run_id, children[0].id]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return [r for r in runs if r.name.startswith("score_shard-")]


def test_flow_scores_each_shard_once_then_bins(prefect_server: None, tmp_path: Path) -> None:
    from flows.score_dataset import make_task_runner, run, score_dataset

    p = _params(tmp_path)
    shards = run_prepare(p)["shards"]
    clear_reward_cache()
    state = score_dataset.with_options(task_runner=make_task_runner(p.score))(params=p, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["shards"] == 3 and result["scored"] == 3 and result["skipped"] == 0
    runs = _score_task_runs(state.state_details.flow_run_id)
    assert sorted(r.name for r in runs) == sorted(f"score_shard-{s['uri']}" for s in shards)
    assert all(r.state is not None and r.state.is_completed() for r in runs)

    manifest = json.loads(Path(p.score.manifest).read_text())
    assert [t["shard"] for t in manifest["tables"]] == [s["uri"] for s in shards]
    assert sum(len(load_score_table(t["uri"])) for t in manifest["tables"]) == 24
    bins = json.loads(Path(p.score.bins).read_text())
    assert bins["hash"] == result["bins"]["hash"] and list(bins["rewards"]) == p.score.rewards

    again = run(p)  # the helper path; everything is up to date now
    assert again["scored"] == 0 and again["skipped"] == 3 and again["bins"]["hash"] == result["bins"]["hash"]


def test_flow_parameters_render_a_typed_params_form() -> None:
    from flows.score_dataset import score_dataset

    schema = score_dataset.parameters.model_dump()
    assert set(schema["properties"]) == {"params_file", "overrides", "params"}
    assert "Params" in json.dumps(schema["properties"]["params"]) and "ScoreConfig" in schema["definitions"]


@pytest.mark.slow
def test_flow_on_dask(prefect_server: None, tmp_path: Path) -> None:
    from flows.score_dataset import run

    p = _params(tmp_path, executor="dask")
    run_prepare(p)
    result = run(p)
    assert result["scored"] == 3 and Path(p.score.bins).exists()


def test_only_transient_storage_errors_are_retried() -> None:
    from flows.score_dataset import is_transient
    from miroflow.storage import InvalidURIError, NoSuchBucketError, NotFoundError, StorageError

    assert is_transient(StorageError("read s3://b/k failed: 503", "s3://b/k"))
    assert is_transient(ConnectionError("reset"))
    assert not is_transient(NotFoundError("no such object", "s3://b/k"))
    assert not is_transient(NoSuchBucketError("no bucket", "s3://b/k", "b"))
    assert not is_transient(InvalidURIError("bad", "s4://x"))
    assert not is_transient(ValueError("a real bug"))
    assert not is_transient(None)
