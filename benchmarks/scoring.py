"""Benchmark: scoring-engine wall time vs. the rewards' pure forward time (goal: ratio ≤ 1.3).

Generates ``--shards`` × ``--size`` shapes samples into a temporary directory, then, in one run:

1. *pure*: decodes every image up front, builds the same batches as the engine (``--batch-size``)
   and times only ``reward.score(images [B, 3, H, W], prompts)`` for every reward (twice for
   prompt-dependent rewards when synthetic captions are on), summed;
2. *engine*: times :func:`miroflow.score.score_shard` on every shard (tar streaming + sha256, PNG
   decoding, batching, all rewards, normalisation, parquet + failures writes).

Rewards are built and warmed up before either measurement. Shard by shard, both sides run back to
back (alternating which goes first) and each keeps its best of ``--repeats`` per shard, so a busy
machine skews both sides alike. Prints per-reward forward times, the ratio engine / pure and images per second.

    .venv/bin/python benchmarks/scoring.py --shards 4 --size 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from miroflow.config import Params
from miroflow.data.shards import decode_image, iter_shard
from miroflow.prepare import run_prepare
from miroflow.rewards import Reward, clear_reward_cache, load_rewards
from miroflow.score_engine import score_shard, to_batch
from miroflow.storage import Storage, join_uri


def pure_forward(
    rewards: list[Reward], batches: list[tuple[torch.Tensor, list[str], list[str] | None]]
) -> dict[str, float]:
    """Seconds per reward spent in ``score`` over pre-decoded batches ``(images [B,3,H,W], prompts, synthetic)``."""
    times = {r.name: 0.0 for r in rewards}
    for images, prompts, synthetic in batches:
        for r in rewards:
            t0 = time.perf_counter()
            r.score(images, prompts)
            if r.uses_prompt and synthetic is not None:
                r.score(images, synthetic)
            times[r.name] += time.perf_counter() - t0
    return times


def main() -> None:
    """Parse arguments, generate data, measure both sides and print the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4, help="number of shards")
    ap.add_argument("--size", type=int, default=256, help="samples per shard")
    ap.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=64, help="images per reward call")
    ap.add_argument("--rewards", nargs="+", default=None, help="reward names (default: params.score.rewards)")
    ap.add_argument("--synthetic", action="store_true", help="shards carry synthetic captions")
    ap.add_argument("--repeats", type=int, default=3, help="best of N per shard for each side")
    ap.add_argument("--workdir", default=None, help="directory for data (default: a temporary one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="miroflow-bench-") as tmp:
        work = Path(args.workdir or tmp)
        score_cfg: dict[str, object] = {"batch_size": args.batch_size, "device": "cpu"}
        if args.rewards:
            score_cfg["rewards"] = args.rewards
        params = Params.model_validate(
            {
                "data": {
                    "num_samples": args.shards * args.size,
                    "shard_size": args.size,
                    "resolution": args.resolution,
                    "synthetic_captions": args.synthetic,
                    "manifest": str(work / "shards.json"),
                },
                "score": score_cfg,
                "storage": {"root": str(work / "store")},
            }
        )
        storage = Storage()
        shards = [s["uri"] for s in run_prepare(params, storage)["shards"]]

        clear_reward_cache()
        rewards = load_rewards(params.score)
        batches: dict[str, list[tuple[torch.Tensor, list[str], list[str] | None]]] = {}
        for uri in tqdm(shards, desc="pre-decode", unit="shard"):
            recs = list(iter_shard(uri, storage))
            batches[uri] = []
            for i in range(0, len(recs), args.batch_size):
                chunk = recs[i : i + args.batch_size]
                images = to_batch([decode_image(r["image_bytes"]) for r in chunk])
                syn = [r["json"]["captions"]["synthetic"] for r in chunk] if args.synthetic else None
                batches[uri].append((images, [r["txt"] for r in chunk], syn))
        pure_forward(rewards, batches[shards[0]][:1])  # build + warm up every reward

        # Shard by shard, pure and engine back to back (alternating which goes first), best of
        # --repeats per shard: both sides see the same machine load as far as possible.
        best_pure = {u: float("inf") for u in shards}
        best_engine = {u: float("inf") for u in shards}
        per_reward: dict[str, dict[str, float]] = {}
        for rep in tqdm(range(args.repeats), desc="measure", unit="repeat"):
            for j, uri in enumerate(shards):
                out = join_uri(str(work / "store"), f"bench-scores-{rep}", Path(uri).stem + ".parquet")
                for side in ("pure", "engine") if (rep + j) % 2 == 0 else ("engine", "pure"):
                    if side == "pure":
                        times = pure_forward(rewards, batches[uri])
                        if sum(times.values()) < best_pure[uri]:
                            best_pure[uri], per_reward[uri] = sum(times.values()), times
                    else:
                        t0 = time.perf_counter()
                        score_shard(uri, rewards, out, storage, batch_size=args.batch_size, progress=False)
                        best_engine[uri] = min(best_engine[uri], time.perf_counter() - t0)
        reward_totals = {r.name: sum(per_reward[u][r.name] for u in shards) for r in rewards}

        n = args.shards * args.size
        pure, engine = sum(best_pure.values()), sum(best_engine.values())
        print(
            f"\n{n} images ({args.shards} shards x {args.size}, {args.resolution}px, batch {args.batch_size}, "
            f"torch threads {torch.get_num_threads()}, synthetic captions {args.synthetic}, best of {args.repeats})"
        )
        for name, t in reward_totals.items():
            print(f"  {name:<22s} pure forward {t:7.3f} s")
        print(f"  sum of pure forward     {pure:7.3f} s   ({n / pure:7.1f} img/s)")
        print(f"  engine wall time        {engine:7.3f} s   ({n / engine:7.1f} img/s)")
        print(f"  ratio engine / pure     {engine / pure:7.3f}   (goal <= 1.3)")


if __name__ == "__main__":
    main()
