"""The streaming sample order (miroflow.data.stream_plan): a function of the data and the seed only."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from miroflow.data.stream_plan import PlanError, StreamPlan

SIZES = [10] * 15 + [7, 3, 10, 10, 4]  # 20 shards, 184 samples, uneven tail


def _plan(**kw: int) -> StreamPlan:
    args = {"batch_size": 8, "seed": 3, "partitions": 4, "window": 2} | kw
    return StreamPlan(SIZES, **args)


def test_order_is_a_function_of_the_seed_only() -> None:
    a, b = _plan(), _plan()
    assert [a.global_batch(s) for s in range(30)] == [b.global_batch(s) for s in range(30)]
    assert a.global_batch(0) != _plan(seed=4).global_batch(0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_rows_are_slices_of_the_global_batch(world: int) -> None:
    plan = _plan()
    for step in (0, 5, 23, 41):
        glob = plan.global_batch(step)
        per = plan.batch_size // world
        for rank in range(world):
            rows = [
                m
                for c in plan.rank_partitions(rank, world)
                for m in plan.members(c, plan.chunk_start(step), plan.per_partition)
            ]
            assert rows == glob[rank * per : (rank + 1) * per]


def test_every_partition_epoch_is_seen_exactly_once_and_batches_are_full() -> None:
    plan = _plan()
    for epoch in (0, 1, 2):
        seen: Counter[tuple[int, int]] = Counter()
        for c in range(plan.partitions):
            start = sum(plan.partition_size(e, c) for e in range(epoch))
            seen.update(plan.members(c, start, plan.partition_size(epoch, c)))
        assert sorted(seen) == [(s, i) for s, n in enumerate(SIZES) for i in range(n)]
        assert set(seen.values()) == {1}
    assert all(len(plan.global_batch(s)) == plan.batch_size for s in range(60))  # no partial batches


def test_epochs_are_shuffled_differently() -> None:
    plan = _plan()
    assert [list(p) for p in plan.partition_shards(0)] != [list(p) for p in plan.partition_shards(1)]
    w0 = plan.window(0, 0, 0, 0)
    assert sorted(w0.order.tolist()) == list(range(w0.size)) and w0.order.tolist() != list(range(w0.size))


def test_workers_split_a_ranks_partitions() -> None:
    plan = _plan(partitions=8, batch_size=16)
    for world, workers in ((1, 3), (2, 2), (4, 1)):
        for rank in range(world):
            got = sorted(c for w in range(workers) for c in plan.worker_partitions(rank, world, w, workers))
            assert got == list(plan.rank_partitions(rank, world))


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"batch_size": 6}, "train.batch_size 6 is not divisible by train.stream_partitions 4"),
        ({"partitions": 32, "batch_size": 32}, "need at least 32 non-empty shards, the data has 20"),
        ({"window": 0}, "train.stream_window (0) must be >= 1"),
    ],
)
def test_bad_settings_are_named(kw: dict[str, int], fragment: str) -> None:
    with pytest.raises(PlanError) as err:
        _plan(**kw)
    assert fragment in str(err.value)


def test_world_must_divide_the_partitions() -> None:
    with pytest.raises(PlanError, match="stream_partitions 4 is not divisible by the world size 3"):
        _plan().rank_partitions(0, 3)


def test_ten_thousand_shards_over_64_ranks_times_8_workers_every_sample_once() -> None:
    """The simulation behind docs/scaling.md: metadata only, 10,000 shards, 512 readers."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(80, 121, size=10_000)
    t0 = time.perf_counter()
    plan = StreamPlan(sizes.tolist(), batch_size=512 * 4, seed=1, partitions=512, window=1)
    owner = np.full(sizes.shape[0], -1)
    for rank in range(64):
        for worker in range(8):
            for c in plan.worker_partitions(rank, 64, worker, 8):
                shards = plan.partition_shards(0)[c]
                assert (owner[shards] == -1).all(), "a shard went to two readers"
                owner[shards] = rank * 8 + worker
    assert (owner >= 0).all() and np.bincount(owner, minlength=512).min() >= 19
    total = 0
    for c in range(0, 512, 37):  # every window's order is a permutation of its samples
        for index, (_, shards) in enumerate(plan.windows(c, 0)):
            w = plan.window(c, 0, index, 0)
            assert np.array_equal(np.sort(w.order), np.arange(int(sizes[list(shards)].sum())))
            total += w.size
    elapsed = time.perf_counter() - t0
    assert total == sum(plan.partition_size(0, c) for c in range(0, 512, 37))
    assert sum(plan.partition_size(0, c) for c in range(512)) == int(sizes.sum())
    print(f"planned 10,000 shards for 64x8 readers in {elapsed:.3f} s")  # reported by benchmarks/bench_stream.py
