"""Fault: the disk fills up mid-checkpoint and mid-score.

Two ways to fill it: a real, small tmpfs (where this process may mount one: root on Linux) — the
kernel answers ``ENOSPC`` to a write, to ``fsync`` or to the directory entry — and, everywhere
(CI included), :class:`FullDisk`: the real local :class:`~miroflow.storage.Storage` whose files
start answering ``ENOSPC`` from the Nth opened file on. Checked each time: a one-line error that
names the file and says the disk is full, the previous state intact (the last checkpoint verifies,
every visible score table is complete), no temporary file left, and a rerun after space is freed
completes — bit-identical to an uninterrupted run for training, every sample scored exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from miroflow import stages
from miroflow.checkpoint import list_checkpoints, run_uri, verify_checkpoint
from miroflow.config import Params
from miroflow.data.score_tables import check_score_table, load_score_table
from miroflow.errors import describe
from miroflow.prepare import run_prepare
from miroflow.score import run_score
from miroflow.storage import TMP_MARKER, Storage, StorageError
from tests.faults.conftest import message_lines, tiny_train_params, write_params
from tests.tiny_models import assert_same_weights

# ------------------------------------------------------------------ the two full disks


class _FullFile:
    """A writable file that answers ENOSPC to every write (the bytes never reach the disk)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FullDisk(Storage):
    """Local storage on a disk that is full from the ``full_at``-th file opened for writing on (1-based).

    ``free()`` makes room again. ``opened`` counts files opened for writing.
    """

    def __init__(self, full_at: int | None = None) -> None:
        super().__init__(retries=0)
        self.full_at = full_at
        self.opened = 0

    def free(self) -> None:
        """Make room: every later write succeeds."""
        self.full_at = None

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        self.opened += 1
        full = self.full_at is not None and self.opened >= self.full_at
        with super().open_write(uri) as f:
            yield _FullFile(f) if full else f  # type: ignore[misc]


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a ``size_bytes`` tmpfs at ``path`` for the block (skips the test where one cannot be mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux; the FullDisk tests cover the same paths")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize_tmpfs(path: Path, size_bytes: int) -> None:
    """Grow (or shrink, down to what is used) the tmpfs mounted at ``path``."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# ------------------------------------------------------------------ helpers


def _no_temp_files(root: Path) -> None:
    assert not [p for p in root.rglob("*") if TMP_MARKER in p.name]


def _assert_disk_full_error(err: BaseException, under: Path) -> None:
    code, line = describe(err)
    assert isinstance(err, StorageError), repr(err)
    assert code == 1 and "no space left on device" in line.lower() and str(under) in line, line


def _train_tree(root: Path, data_root: Path, run: str, **train: Any) -> dict[str, Any]:
    tree = tiny_train_params(data_root, run, steps=10, **train)
    tree["storage"]["root"] = str(root / "store")
    return tree


def _score_params(root: Path) -> Params:
    return Params.model_validate(
        {
            "storage": {"root": str(root / "store")},
            "data": {"num_samples": 40, "shard_size": 10, "manifest": str(root / "m" / "shards.json")},
            "score": {
                "rewards": ["sharpness", "noise"],
                "device": "cpu",
                "manifest": str(root / "m" / "scores.json"),
                "bins": str(root / "m" / "bins.json"),
            },
            "tracking": {"enabled": False},
        }
    )


def _assert_tables_complete(p: Params, n_tables: int | None = None) -> list[str]:
    tables = [u for u in Storage().list(str(Path(p.storage.root) / "scores")) if u.endswith(".parquet")]
    for t in tables:
        assert check_score_table(t, Storage()).verified and len(load_score_table(t)) == p.data.shard_size, t
    if n_tables is not None:
        assert len(tables) == n_tables
    return tables


def _assert_every_sample_once(p: Params) -> None:
    tables = _assert_tables_complete(p, p.data.num_samples // p.data.shard_size)
    keys = [k for t in tables for k in load_score_table(t)["key"]]
    assert sorted(keys) == [f"train-{i:08d}" for i in range(p.data.num_samples)]


# ------------------------------------------------------------------ FullDisk (runs everywhere)


def test_disk_full_mid_checkpoint_then_rerun_is_bit_identical(scored_root: Path, tmp_path: Path) -> None:
    counting = FullDisk()
    ref = stages.train(Params.model_validate(_train_tree(tmp_path / "ref", scored_root, "ref")), storage=counting)
    per_checkpoint = counting.opened // 2  # checkpoints at steps 5 and 10
    assert per_checkpoint >= 4

    full = FullDisk(full_at=per_checkpoint + 3)  # the second checkpoint's third file
    p = Params.model_validate(_train_tree(tmp_path / "cut", scored_root, "cut"))
    with pytest.raises(StorageError) as info:
        stages.train(p, storage=full)
    _assert_disk_full_error(info.value, Path(run_uri(p)) / "checkpoints" / "step-00000010")
    assert [s for s, _ in list_checkpoints(run_uri(p), Storage())] == [5]
    verify_checkpoint(list_checkpoints(run_uri(p), Storage())[0][1])  # the previous state, intact
    _no_temp_files(tmp_path / "cut")

    full.free()
    out = stages.train(p, resume=True, storage=full)
    assert out.steps == 10
    assert_same_weights(out.checkpoint, ref.checkpoint)


def test_disk_full_mid_score_then_rerun_scores_every_sample_once(tmp_path: Path) -> None:
    p = _score_params(tmp_path)
    run_prepare(p)
    full = FullDisk(full_at=5)  # shard 0's three files fit; shard 1 fails at its hash record
    with pytest.raises(StorageError) as info:
        run_score(p, full)
    _assert_disk_full_error(info.value, tmp_path / "store" / "scores")
    assert len(_assert_tables_complete(p)) == 1
    assert not Path(p.score.manifest).exists()
    _no_temp_files(tmp_path)
    done = _assert_tables_complete(p)[0]
    before = os.stat(done).st_mtime_ns

    full.free()
    full.opened = 0
    run_score(p, full)
    assert full.opened == 3 * 3 + 1  # the three missing shards only, + the reward-set registry
    assert os.stat(done).st_mtime_ns == before
    _assert_every_sample_once(p)


# ------------------------------------------------------------------ a real small filesystem


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MIROFLOW_DEBUG"}
    cmd = [sys.executable, "-m", "miroflow.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _assert_one_line_disk_full(res: subprocess.CompletedProcess[str]) -> None:
    lines = message_lines(res.stderr)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and 1 <= len(lines) <= 3, res.stderr[-3000:]
    assert "no space left on device" in res.stderr.lower(), res.stderr[-3000:]


def test_tmpfs_full_mid_checkpoint_then_rerun_completes(scored_root: Path, tmp_path: Path) -> None:
    ref_tree = _train_tree(tmp_path / "ref", scored_root, "ref")
    ref = stages.train(Params.model_validate(ref_tree))
    ckpt_bytes = sum(f.stat().st_size for f in Path(ref.checkpoint).rglob("*") if f.is_file())
    with small_tmpfs(tmp_path / "small", int(1.5 * ckpt_bytes) + 64 * 1024) as small:
        tree = _train_tree(small, scored_root, "cut")
        params_file = write_params(tmp_path / "cut.yaml", tree)
        failed = _cli("train", "-p", str(params_file), cwd=tmp_path)
        _assert_one_line_disk_full(failed)
        run = run_uri(Params.model_validate(tree))
        assert [s for s, _ in list_checkpoints(run, Storage())] == [5]
        verify_checkpoint(list_checkpoints(run, Storage())[0][1])
        _no_temp_files(small)

        resize_tmpfs(small, 8 * ckpt_bytes)
        rerun = _cli("train", "--resume", "-p", str(params_file), cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        done = list_checkpoints(run, Storage())
        assert done[-1][0] == 10
        assert_same_weights(done[-1][1], ref.checkpoint)


def test_tmpfs_full_mid_score_then_rerun_scores_every_sample_once(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", 32 * 1024 * 1024) as small:
        p = _score_params(small)
        run_prepare(p)
        params_file = write_params(tmp_path / "score.yaml", p.model_dump(mode="json"))
        resize_tmpfs(small, used_bytes(small) + 2 * 4096 * 3 + 4096)  # room for ~one shard's three files
        failed = _cli("score", "-p", str(params_file), cwd=tmp_path)
        _assert_one_line_disk_full(failed)
        assert 0 <= len(_assert_tables_complete(p)) < 4
        _no_temp_files(small)

        resize_tmpfs(small, 64 * 1024 * 1024)
        rerun = _cli("score", "-p", str(params_file), cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        _assert_every_sample_once(p)
