"""Training on the streaming data path: exact resume after a kill, and resume with another world size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miroflow.checkpoint import list_checkpoints, run_uri
from miroflow.config import Params, apply_overrides
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score
from miroflow.storage import Storage
from miroflow.train import data_mode, run_train
from tests.tiny_models import assert_same_weights

WORKER = Path(__file__).with_name("ddp_worker.py")
VENV_BIN = Path(sys.executable).parent
N, B = 160, 8  # 16 shards of 10, 4 partitions of 4 shards: one epoch = 20 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("stream_train")
    ov = [
        f"storage.root={root}/store",
        f"data.num_samples={N}",
        "data.shard_size=10",
        "data.synthetic_captions=true",
        f"data.manifest={root}/m/shards.json",
        f"score.manifest={root}/m/scores.json",
        f"score.bins={root}/m/bins.json",
        "score.rewards=[sharpness,noise]",
        "score.num_bins=8",
    ]
    p = apply_overrides(Params(), ov)
    run_prepare(p)
    run_score(p)
    run_bin(p)
    return ov


def _ov(data: list[str], run: str, tmp: Path, *extra: str) -> list[str]:
    return [
        *data,
        f"train.run_name={run}",
        "train.model=tiny",
        "train.data=stream",
        "train.stream_partitions=4",
        "train.stream_window=2",
        "train.stream_workers=1",
        f"train.sample_log={tmp / run}.keys.jsonl",
        "train.steps=30",
        f"train.batch_size={B}",
        "train.warmup_steps=2",
        "train.log_every=5",
        "train.eval_every=1000",
        "train.checkpoint_every=5",
        "train.keep_last=3",
        "train.synthetic_caption_prob=0.5",
        "train.text_encoder=learned",
        "train.seed=2",
        *extra,
    ]


def _keys(path: Path) -> dict[int, list[str]]:
    """Step -> keys, from every rank's sample log; the last line of a step wins (a resume repeats steps)."""
    out: dict[int, dict[str, list[str]]] = {}
    for f in sorted(path.parent.glob(path.name + "*")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[f.name] = rec["keys"]
    return {s: [k for name in sorted(by) for k in by[name]] for s, by in sorted(out.items())}


def test_auto_streams_above_the_threshold(data: list[str], tmp_path: Path) -> None:
    p = apply_overrides(Params(), _ov(data, "auto", tmp_path, "train.data=auto", f"train.stream_above={N - 1}"))
    assert data_mode(p) == "stream"
    assert data_mode(apply_overrides(p, [f"train.stream_above={N}"])) == "memory"


def test_stream_resume_gives_the_uninterrupted_keys_and_weights(data: list[str], tmp_path: Path) -> None:
    ref = run_train(apply_overrides(Params(), _ov(data, "ref", tmp_path)))
    p = apply_overrides(Params(), _ov(data, "cut", tmp_path))
    run_train(p, max_steps=12)  # a checkpoint at 12, then the process "dies"
    out = run_train(p, resume=True)
    assert out.steps == 30 and len(out.losses) == 18
    ref_keys, cut_keys = _keys(tmp_path / "ref.keys.jsonl"), _keys(tmp_path / "cut.keys.jsonl")
    assert cut_keys == ref_keys and len(ref_keys) == 30
    epoch = [k for s in range(20) for k in ref_keys[s]]
    assert sorted(epoch) == [f"train-{i:08d}" for i in range(N)]  # one epoch: every sample once
    assert_same_weights(out.checkpoint, ref.checkpoint)


def test_resume_with_other_stream_settings_is_refused(data: list[str], tmp_path: Path) -> None:
    p = apply_overrides(Params(), _ov(data, "changed", tmp_path))
    run_train(p, max_steps=5)
    other = apply_overrides(p, ["train.stream_window=1"])
    # the order settings are part of the run's content key: other settings never touch this run ...
    assert run_uri(other) != run_uri(p)
    # ... and a run folder holding a checkpoint of other settings is refused on resume, naming them
    shutil.copytree(run_uri(p), run_uri(other))
    with pytest.raises(ValueError, match=r"train.stream_\*: .*window differ"):
        run_train(other, resume=True)


def _torchrun(ov: list[str], tmp: Path, max_steps: int, resume: bool) -> None:
    f = tmp / f"ov-{len(list(tmp.glob('ov-*')))}.json"
    f.write_text(json.dumps(ov))
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(f),
        str(tmp / "o.json"),
    ]
    cmd += [str(max_steps)] + (["--resume"] if resume else [])
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_sees_every_sample_once(
    data: list[str], tmp_path: Path, first: int, second: int
) -> None:
    run = f"world{first}to{second}"
    ov = _ov(data, run, tmp_path, "train.steps=20")  # exactly one epoch
    p = apply_overrides(Params(), ov)
    for world, stop, resume in ((first, 7, False), (second, 20, True)):
        if world == 2:
            _torchrun(ov, tmp_path, stop, resume)
        else:
            run_train(p, resume=resume, max_steps=stop)
    keys = _keys(tmp_path / f"{run}.keys.jsonl")
    assert sorted(keys) == list(range(20))
    seen = [k for s in range(20) for k in keys[s]]
    assert sorted(seen) == [f"train-{i:08d}" for i in range(N)], "a sample was repeated or skipped"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(data: list[str], tmp_path: Path) -> None:
    ov = _ov(data, "killed", tmp_path)
    p = apply_overrides(Params(), ov)
    (tmp_path / "ov.json").write_text(json.dumps(ov))
    cmd = [sys.executable, str(WORKER), str(tmp_path / "ov.json"), str(tmp_path / "o.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((c := list_checkpoints(run_uri(p), Storage())) and c[-1][0] >= 10):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out = run_train(p, resume=True)
    ref = run_train(apply_overrides(Params(), _ov(data, "unkilled", tmp_path)))
    assert _keys(tmp_path / "killed.keys.jsonl") == _keys(tmp_path / "unkilled.keys.jsonl")
    assert_same_weights(out.checkpoint, ref.checkpoint)
