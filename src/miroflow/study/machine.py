"""The machine side of a study: load average, CPU model and the torch thread count per stage."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["load_average", "cpu_model", "choose_threads", "torch_threads"]


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def choose_threads(setting: int | str, own_load: float = 0.0) -> int:
    """Torch threads for the next stage: ``setting``, or for ``auto`` all cores unless OTHER work fills them.

    ``own_load`` is what this process itself put into the 1-min load average (the threads of the
    training it just finished); without subtracting it, every run after the first would see its
    predecessor's load and drop to one thread (measured 0.42 vs 0.26 s/step on 2 idle cores).
    """
    cores = os.cpu_count() or 1
    if setting != "auto":
        return max(1, int(setting))
    others = max(0.0, load_average() - own_load)
    # with other work already filling the cores, one thread avoids oversubscription (measured ~4x faster)
    return 1 if others >= cores - 0.5 else cores


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch (and ``OMP_NUM_THREADS``, which training reads) at ``n`` threads; restored on exit."""
    old_env, old_n = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_n)
        if old_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_env
