#!/usr/bin/env python
"""The streaming data path against the in-memory one, measured side by side in one run.

Reports (one JSON object):

* ``plan_s``: time to plan 10,000 shards (80–120 samples each) for 64 ranks × 8 loader workers
  (``StreamPlan`` with 512 partitions) and assign every shard to its reader;
* ``step``: img/s of ``make_batch`` + ``train_step`` fed by the stream and by in-memory batches on
  the same data, in alternating blocks (this machine is noisy), and their ratio;
* ``rss``: peak RSS and resident set after the steps (MiB) of a training process per data size and
  path (``--small`` and ``--large`` samples, fresh processes), and the growth ratios large/small per
  path — the stream's should stay near 1 whatever the size; the in-memory path grows with the
  decoded images (the peak is dominated by start-up: imports and model construction).

Tiny sizes (``train.model=tiny``, 32 px, the learned text encoder, a baseline without rewards so no
scoring is needed). Example: ``python benchmarks/bench_stream.py --small 2000 --large 20000``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from miroflow.config import Params, apply_overrides
from miroflow.data.stream_plan import StreamPlan
from miroflow.prepare import run_prepare


def _plan_time() -> float:
    sizes = np.random.default_rng(0).integers(80, 121, size=10_000).tolist()
    t0 = time.perf_counter()
    plan = StreamPlan(sizes, batch_size=2048, seed=1, partitions=512, window=1)
    owner = np.full(len(sizes), -1)
    for rank in range(64):
        for worker in range(8):
            for c in plan.worker_partitions(rank, 64, worker, 8):
                owner[plan.partition_shards(0)[c]] = rank * 8 + worker
    assert (owner >= 0).all()
    return time.perf_counter() - t0


def _overrides(root: Path, n: int, mode: str, run: str) -> list[str]:
    return [
        f"storage.root={root}/store",
        f"data.num_samples={n}",
        "data.shard_size=250",
        f"data.manifest={root}/m/shards.json",
        f"score.manifest={root}/m/scores.json",
        f"score.bins={root}/m/bins.json",
        "train.rewards=[]",
        "train.model=tiny",
        "train.text_encoder=learned",
        f"train.data={mode}",
        "train.stream_partitions=4",
        "train.stream_window=1",
        "train.stream_workers=1",
        f"train.run_name={run}",
        "train.batch_size=32",
        "train.steps=100000",
        "train.log_every=1000",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "tracking.enabled=false",
    ]


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from miroflow.config import Params, apply_overrides
    from miroflow.train import build_train_state
    from miroflow.train_step import make_batch, train_step
    state = build_train_state(apply_overrides(Params(), json.loads(sys.argv[1])))
    for _ in range(int(sys.argv[2])):
        train_step(state, make_batch(state))
    state.source.close()
    now = [l for l in open("/proc/self/status") if l.startswith("VmRSS:")]
    now_mib = float(now[0].split()[1]) / 1024 if now else float("nan")
    print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_end_mib": now_mib}))
    """
)


def _rss(ov: list[str], steps: int) -> dict[str, float]:
    """``{"rss_mib": peak, "rss_end_mib": resident after the steps}`` of a fresh training process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(ov), str(steps)], capture_output=True, text=True, env=env, check=True
    )
    return {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _step_ratio(root: Path, n: int, blocks: int, steps: int) -> dict[str, float]:
    import torch

    from miroflow.train import build_train_state
    from miroflow.train_step import make_batch, train_step

    torch.set_num_threads(1)
    states = {
        m: build_train_state(apply_overrides(Params(), _overrides(root, n, m, f"bench-{m}")))
        for m in ("memory", "stream")
    }
    for s in states.values():  # warm-up
        for _ in range(3):
            train_step(s, make_batch(s))
    spent = {m: 0.0 for m in states}
    for _ in range(blocks):
        for m, s in states.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(s, make_batch(s))
            spent[m] += time.perf_counter() - t0
    for s in states.values():
        s.source.close()
    bs = states["memory"].params.train.batch_size
    rate = {m: blocks * steps * bs / t for m, t in spent.items()}
    return {"memory_img_s": rate["memory"], "stream_img_s": rate["stream"], "ratio": rate["stream"] / rate["memory"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument(
        "--rss-steps", type=int, default=120, help="steps per RSS process (> one pass over the small data's windows)"
    )
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--block-steps", type=int, default=10)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"plan_s": _plan_time()}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        roots = {n: Path(tmp) / f"n{n}" for n in (args.small, args.large)}
        for n, root in roots.items():
            run_prepare(apply_overrides(Params(), _overrides(root, n, "memory", "prep")))
        out["step"] = _step_ratio(roots[args.small], args.small, args.blocks, args.block_steps)
        rss: dict[str, Any] = {}
        for mode in ("stream", "memory"):
            got = {n: _rss(_overrides(root, n, mode, f"rss-{mode}"), args.rss_steps) for n, root in roots.items()}
            small, large = got[args.small], got[args.large]
            rss[mode] = {
                "peak_small_mib": small["rss_mib"],
                "peak_large_mib": large["rss_mib"],
                "peak_growth": large["rss_mib"] / small["rss_mib"],
                "end_small_mib": small["rss_end_mib"],
                "end_large_mib": large["rss_end_mib"],
                "end_growth": large["rss_end_mib"] / small["rss_end_mib"],
            }
        out["rss"] = rss
    out["sizes"] = {"small": args.small, "large": args.large}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
