"""miroflow.preflight and miroflow.errors: every problem named before any work, one line per error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miroflow import stages
from miroflow.config import Params, ParamsError, load_params
from miroflow.data.shards import ManifestError, ShardError
from miroflow.errors import InputError, OperationalError, describe, one_line
from miroflow.preflight import PreflightError, check_params, preflight
from miroflow.prompts import PromptSetError
from miroflow.rewards.base import RewardNotFound
from miroflow.storage import NotFoundError, StorageError, UnsafeKeyError


def _params(tmp_path: Path, *overrides: str) -> Params:
    base = [
        f"storage.root={tmp_path / 'store'}",
        f"data.manifest={tmp_path / 'manifests' / 'shards.json'}",
        f"score.manifest={tmp_path / 'manifests' / 'scores.json'}",
        f"score.bins={tmp_path / 'manifests' / 'bins.json'}",
        "tracking.enabled=false",
        "data.num_samples=8",
        "data.shard_size=8",
    ]
    return load_params(None, [*base, *overrides])


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ShardError("shard s.tar: bad member"), 2, "shard s.tar: bad member"),
        (ManifestError("manifest m.json is not JSON"), 2, "m.json"),
        (PromptSetError("p.jsonl line 3: bad"), 2, "line 3"),
        (RewardNotFound("unknown reward 'x'"), 2, "unknown reward 'x'"),  # no KeyError quotes
        (NotFoundError("no such file: /a/b", "/a/b"), 2, "/a/b"),
        (UnsafeKeyError("key ../x escapes", "s3://b/../x"), 2, "escapes"),
        (StorageError("cannot reach s3://b/k", "s3://b/k"), 1, "s3://b/k"),
        (
            PermissionError(13, "Permission denied", "/srv/out"),
            1,
            "PermissionError: [Errno 13] Permission denied: '/srv/out'",
        ),
        (ValueError("train.lr: must be > 0"), 2, "ValueError: train.lr"),
        (KeyError("shapes_alignment"), 2, "KeyError: shapes_alignment"),
        (RuntimeError("boom"), 1, "internal error, RuntimeError: boom"),
    ],
)
def test_describe_gives_exit_status_and_one_line(exc: BaseException, code: int, text: str) -> None:
    status, line = describe(exc)
    assert status == code
    assert text in line and "\n" not in line


def test_one_line_collapses_and_truncates() -> None:
    assert one_line(ValueError("first\n\n  second   part\n")) == "first; second part"
    long = one_line(ValueError("x" * 5000), limit=100)
    assert len(long) == 100 and long.endswith("…")
    assert one_line(ValueError()) == "ValueError"


def test_error_classes_keep_their_builtin_bases() -> None:
    assert issubclass(ShardError, ValueError) and issubclass(ShardError, InputError)
    assert issubclass(StorageError, RuntimeError) and issubclass(StorageError, OperationalError)
    assert issubclass(PreflightError, ParamsError) and issubclass(RewardNotFound, KeyError)


# --------------------------------------------------------------------------- check_params (no I/O)
def test_defaults_have_no_semantic_problem() -> None:
    assert check_params(Params()) == []


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ("score.rewards=[sharpness,bogus]", "score.rewards", "unknown reward 'bogus'"),
        ("train.rewards=[nope]", "train.rewards", "unknown reward 'nope'"),
        ("eval.rewards=[nope]", "eval.rewards", "unknown reward 'nope'"),
        ("sweep.select_by=nope", "sweep.select_by", "unknown reward"),
        ("sweep.target_reward=nope", "sweep.target_reward", "unknown reward"),
        ("eval.reward_targets.sharpness=7", "eval.reward_targets.sharpness", "outside [0, 1]"),
        ("eval.negative_reward_targets.noise=-0.5", "eval.negative_reward_targets.noise", "outside [0, 1]"),
        ("sweep.target_values=[0.5,1.5]", "sweep.target_values[1]", "outside [0, 1]"),
        ("train.model=huge", "train.model", "unknown model size 'huge'"),
        ("train.text_encoder=bert", "train.text_encoder", "'bert'"),
        ("train.text_encoder='t5:'", "train.text_encoder", "'t5:'"),
        ("eval.prompt_set=drawbench", "eval.prompt_set", "unknown prompt set 'drawbench'"),
        ("data.domain=import", "data.import_uri", "required"),
        ("train.latent=vae", "train.vae", "required"),
    ],
)
def test_check_params_names_the_field(override: str, field: str, fragment: str) -> None:
    problems = check_params(load_params(None, [override]))
    assert any(p.startswith(f"{field}:") and fragment in p for p in problems), problems


def test_train_rewards_must_be_scored() -> None:
    problems = check_params(load_params(None, ["score.rewards=[sharpness]", "train.rewards=[sharpness,noise]"]))
    assert problems == ["train.rewards: 'noise' is not scored (add it to score.rewards)"]


# --------------------------------------------------------------------------- preflight (I/O)
def test_unwritable_storage_root_is_found_before_work(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    p = _params(tmp_path, f"storage.root={tmp_path / 'a-file' / 'store'}")
    with pytest.raises(PreflightError) as err:
        preflight(p, "prepare")
    assert any(line.startswith("storage.root: cannot write to") and "a-file" in line for line in err.value.problems)
    assert not (tmp_path / "manifests" / "shards.json").exists()


def test_unwritable_manifest_folder_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    p = _params(tmp_path, f"data.manifest={tmp_path / 'blocker' / 'shards.json'}")
    with pytest.raises(PreflightError, match=r"data\.manifest: cannot write to .*blocker"):
        preflight(p, "prepare")


def test_missing_inputs_are_named_per_stage(tmp_path: Path) -> None:
    p = _params(tmp_path)
    with pytest.raises(PreflightError, match=r"data\.manifest: .* does not exist \(run the prepare stage first\)"):
        preflight(p, "score")
    with pytest.raises(PreflightError, match=r"score\.manifest: .* does not exist"):
        preflight(p, "bin")
    with pytest.raises(PreflightError) as err:
        preflight(p, "train")
    assert any(line.startswith("score.bins:") for line in err.value.problems)
    baseline = _params(tmp_path, "train.rewards=[]")
    with pytest.raises(PreflightError) as err:
        preflight(baseline, "train")
    assert not any(line.startswith("score.bins:") for line in err.value.problems)  # a baseline needs no bins


def test_evaluate_needs_a_checkpoint_and_a_parsable_prompt_set(tmp_path: Path) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(
        json.dumps(
            {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
        )
        + "\n{not json\n"
    )
    p = _params(tmp_path, f"eval.prompt_set=geneval:{bad}")
    with pytest.raises(PreflightError) as err:
        preflight(p, "evaluate")
    lines = err.value.problems
    assert any(line.startswith("eval.checkpoint:") and "train first" in line for line in lines), lines
    assert any(line.startswith("eval.prompt_set:") and "line 2" in line for line in lines), lines
    # with a loaded model handed over, only the prompt set is checked
    with pytest.raises(PreflightError) as err:
        preflight(p, "evaluate", model_given=True)
    assert [line.split(":", 1)[0] for line in err.value.problems] == ["eval.prompt_set"]


def test_unknown_eval_reward_fails_before_generation(tmp_path: Path) -> None:
    p = _params(tmp_path, "eval.rewards=[sharpness,bogus]")
    with pytest.raises(PreflightError, match=r"eval\.rewards: unknown reward 'bogus'"):
        stages.evaluate(p, manifest=None)


def test_train_refuses_max_steps_below_one_before_any_work(tmp_path: Path) -> None:
    p = _params(tmp_path)
    with pytest.raises(PreflightError, match=r"--max-steps: must be >= 1, got -1"):
        stages.train(p, max_steps=-1, manifest=tmp_path / "train.json")
    assert not (tmp_path / "train.json").exists()
    assert not (tmp_path / "store" / "runs").exists()


def test_a_prepared_dataset_passes_the_score_preflight(tmp_path: Path) -> None:
    p = _params(tmp_path)
    stages.prepare(p)
    preflight(p, "score")  # no exception: inputs present, outputs writable
    assert not list((tmp_path / "store").glob(".miroflow-probe-*"))  # the probe is deleted


def test_unknown_stage_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        preflight(_params(tmp_path), "trian")


# --------------------------------------------------------------------------- data domains (issue 11 item 3)
def test_import_defaults_are_the_weight_free_image_rewards() -> None:
    from miroflow.config import IMPORT_DEFAULT_REWARDS
    from miroflow.rewards import weight_free_rewards

    # built-ins register first; other tests may register weight-free test rewards after them
    assert weight_free_rewards("import")[: len(IMPORT_DEFAULT_REWARDS)] == IMPORT_DEFAULT_REWARDS
    assert "shapes_alignment" in weight_free_rewards() and "shapes_alignment" in weight_free_rewards("shapes")
    p = load_params(None, ["data.domain=import", "data.import_uri=/in"])
    assert tuple(p.score.rewards) == IMPORT_DEFAULT_REWARDS and p.sweep.select_by == "sharpness"
    assert check_params(p) == []


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("score.rewards=[sharpness,shapes_alignment]", "score.rewards"),
        ("train.rewards=[shapes_alignment]", "train.rewards"),
        ("eval.rewards=[shapes_alignment]", "eval.rewards"),
        ("eval.reward_targets.shapes_alignment=1.0", "eval.reward_targets"),
        ("eval.negative_reward_targets.shapes_alignment=0.0", "eval.negative_reward_targets"),
        ("sweep.select_by=shapes_alignment", "sweep.select_by"),
        ("sweep.target_reward=shapes_alignment", "sweep.target_reward"),
    ],
)
def test_shapes_only_reward_is_refused_for_imported_data(override: str, field: str) -> None:
    p = load_params(None, ["data.domain=import", "data.import_uri=/in", override])
    expected = f"{field}: 'shapes_alignment' scores shapes captions only; not valid for data.domain=import"
    assert [line for line in check_params(p) if line.startswith(expected)], check_params(p)
    assert check_params(load_params(None, [override])) == []  # valid for data.domain=shapes


def test_shapes_prompt_set_is_refused_for_evaluating_imported_data(tmp_path: Path) -> None:
    p = _params(tmp_path, "data.domain=import", "data.import_uri=/in")
    with pytest.raises(PreflightError) as err:
        preflight(p, "evaluate")
    assert any(line.startswith("eval.prompt_set: 'shapes' holds shapes captions") for line in err.value.problems)
    assert check_params(p) == []  # only the stages that sample prompts refuse it
