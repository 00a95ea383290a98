#!/usr/bin/env python
"""miroflow's one benchmark: training, sampling and scoring, each as ratios measured side by side.

Sections (default: all three, in this order):

* ``train``  — the library's ``train_step`` fed by the streaming loader and by in-memory batches,
  the full MIRO step beside a bare diffusers SD3 backbone step, MFU against a matmul of the same run;
* ``sample`` — ``MiroPipeline`` at batch 1 (latency) and batch 64 (throughput), 50 Euler steps with
  batched guidance, against the denoiser's and the bare backbone's forward-only rates;
* ``score``  — the shard scorer against Σ of its rewards' forwards (weight-free rewards) and against
  the image-tower rate (random-weight open_clip towers: ViT-L/14 + ViT-H/14 at ``paper``).

Correctness comes first (finite losses, shapes, the first loss of a fresh model, the guidance formula
against a direct computation, the engine's scores against direct forwards): a failed check exits 1
without a table. Variants run in alternating blocks in one process (this machine is noisy); each
table row gives the ratio of the totals and the spread of the per-block ratios.

    .venv/bin/python benchmarks/bench.py --size tiny                     # CPU, < 2 min on 2 cores
    .venv/bin/python benchmarks/bench.py --size paper --device cuda      # one GPU, < 5 min
    .venv/bin/python benchmarks/bench.py train --size paper --compile --json bench-paper.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars would drown the tables

import torch  # noqa: E402
from miro_bench.common import SIZES, BenchFailure, Section, SizeSpec, resolve_device  # noqa: E402

SECTIONS = ("train", "sample", "score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI flags (see the module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (CPU, the demo's model) or paper (GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the training steps (train.compile)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: 64 tiny, 128 paper)")
    p.add_argument("--samples", type=int, default=None, help="prepared samples (default: 1024 tiny, 512 paper)")
    p.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument("--workdir", type=Path, default=None, help="keep the prepared data here (default: a temp dir)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="code-path check only (e.g. --size paper on a CPU): one-layer denoisers, a few samples and steps; "
        "the numbers mean nothing",
    )
    args = p.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    for name in ("batch", "samples", "sample_steps", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    args.sections = list(dict.fromkeys(args.sections)) or list(SECTIONS)
    return args


def machine(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device name, CPU model and cores, torch version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def smoke_spec(spec: SizeSpec) -> SizeSpec:
    """``spec`` cut to a code-path check: one-layer denoisers (this process only), few samples and steps."""
    from miroflow.models.denoiser import MODEL_SIZES

    MODEL_SIZES[spec.name] = dict(MODEL_SIZES[spec.name], num_layers=1)
    shards, per = (2, 8) if spec.name == "tiny" else (8, 4)
    towers = {k: (v and "ViT-B-32") for k, v in spec.towers.items()}  # the towers' code path, a tenth of the FLOPs
    return dataclasses.replace(
        spec,
        towers=towers,
        samples=shards * per,
        shard_size=per,
        train_batch=8,
        blocks=1,
        block_steps=1,
        sample_batch=2,
        sample_steps=2,
        sample_blocks=1,
        score_batch=8,
        score_repeats=1,
        matmul_n=256,
    )


def run(args: argparse.Namespace, root: Path) -> list[Section]:
    """Prepare the data once, then run the requested sections in order."""
    from miro_bench.data import prepare_data

    spec = smoke_spec(SIZES[args.size]) if args.smoke else SIZES[args.size]
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sections: list[Section] = []
    data = None
    if {"train", "score"} & set(args.sections):
        t0 = time.perf_counter()
        data = prepare_data(spec, root, device, args.samples)
        print(
            f"[bench] data: {len(data.shards)} shards prepared, scored, binned, embedded in {time.perf_counter() - t0:.0f} s"
        )
    for name in args.sections:
        if name == "train":
            from miro_bench.train import run_train

            assert data is not None
            sec = run_train(spec, device, data, args.batch or spec.train_batch, args.compile, args.threads)
        elif name == "sample":
            from miro_bench.sample import run_sample

            sec = run_sample(spec, device, root, args.sample_steps)
        else:
            from miro_bench.score import run_score

            assert data is not None
            sec = run_score(spec, device, data, root)
        if args.threads:
            torch.set_num_threads(args.threads)
        print("\n" + sec.table(), flush=True)
        sections.append(sec)
    return sections


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; write ``--json``. Exit 1 when a correctness check fails."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="miroflow-bench-") as tmp:
            root = args.workdir or Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            sections = run(args, root)
    except BenchFailure as err:
        print(f"bench: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    device = resolve_device(args.device)
    out = {
        "size": args.size,
        "machine": machine(device),
        "compile": args.compile,
        "smoke": args.smoke,
        "wall_s": time.perf_counter() - t0,
        "sections": {s.title.split()[0]: s.to_json() for s in sections},
    }
    m = out["machine"]
    print(
        f"\n[bench] {args.size} on {m['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"{m['threads']} threads, OMP_WAIT_POLICY={m['omp_wait_policy']}, load {m['load_avg_1m']:.1f}) "
        f"in {out['wall_s']:.0f} s"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"[bench] numbers -> {args.json}")
    return out


if __name__ == "__main__":
    main()
