"""Fault: one training run SIGKILLed five times at random steps, resumed each time with ``train --resume``.

The kills land at random moments (after a random checkpoint, plus a random fraction of the next
interval), so some land mid-step and some mid-checkpoint-write. The final EMA and raw weights must
be bit-identical to an uninterrupted run's (docs/architecture.md, "Resume").
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miroflow.checkpoint import list_checkpoints, run_uri
from miroflow.config import Params
from miroflow.storage import Storage
from miroflow.train import run_train
from tests.faults.conftest import tiny_train_params, write_params
from tests.tiny_models import checkpoint_weights

STEPS = 60
KILLS = 5


def _past(done: list[tuple[int, str]], step: int) -> bool:
    return bool(done) and done[-1][0] >= step


def _train_cmd(params_file: Path) -> list[str]:
    return [sys.executable, "-m", "miroflow.cli", "train", "--resume", "-p", str(params_file)]


@pytest.mark.slow
def test_five_kills_at_random_steps_then_resume_is_bit_identical(scored_root: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("MIROFLOW_FAULT_SEED", str(time.time_ns() % 10_000)))
    rng = random.Random(seed)
    tree = tiny_train_params(scored_root, "killed", steps=STEPS)
    params_file = write_params(tmp_path / "killed.yaml", tree)
    run = run_uri(Params.model_validate(tree))
    storage = Storage()
    thresholds = sorted(rng.sample(range(0, STEPS - 5, 5), KILLS))  # kill after the checkpoint >= t (0: the first step)
    resumed_from: list[int] = []
    for i, t in enumerate(thresholds):
        done = list_checkpoints(run, storage)
        resumed_from.append(done[-1][0] if done else 0)
        log = tmp_path / f"run-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(_train_cmd(params_file), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 300
            if t == 0:  # the first kill: during start-up or the first steps
                time.sleep(rng.uniform(4.0, 8.0))
            while t > 0 and not _past(list_checkpoints(run, storage), max(t, resumed_from[-1] + 1)):
                assert proc.poll() is None, f"seed {seed}: run ended before its kill: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"seed {seed}: no checkpoint at step >= {t} in 300 s"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))  # then into the next interval (maybe mid-checkpoint)
            assert proc.poll() is None, f"seed {seed}: run ended before its kill"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    final = subprocess.run(_train_cmd(params_file), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    done = list_checkpoints(run, storage)
    assert done[-1][0] == STEPS
    progress = [*resumed_from, done[-1][0]]
    assert progress == sorted(progress) and len(set(progress)) >= KILLS - 1, f"seed {seed}: {progress}"

    reference = run_train(Params.model_validate(tiny_train_params(scored_root, "uninterrupted", steps=STEPS)))
    a, b = checkpoint_weights(done[-1][1]), checkpoint_weights(reference.checkpoint)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"seed {seed} (kills after {thresholds}, resumed from {resumed_from}): {different[:5]}"
