"""The streaming sample order: which sample every rank and worker trains on at every step.

A pure function of ``(seed, shard sizes, batch size, partitions, window)`` — never of the world
size or the number of loader workers — computed from the shard manifest's metadata alone
(docs/architecture.md, "Streaming"):

* **Partitions.** Epoch ``e`` permutes the shards (``π_e``, seeded by ``(seed, e)``); canonical
  partition ``c`` of ``P`` gets shards ``π_e[c], π_e[c+P], …``. Its *sequence* is the epochs'
  sample orders concatenated: epoch 0 of ``c``, then epoch 1 of ``c``, … (partitions are not
  aligned: a smaller partition starts its next epoch a few steps earlier; nothing is dropped).
* **Windows.** Within an epoch a partition's shards are read ``window`` at a time; the samples of
  one window (its shards' samples, in shard order) are permuted by a generator seeded by
  ``(seed, e, c, window index)``. A window is the shuffle buffer.
* **Global batches.** Step ``k`` takes ``b = B / P`` consecutive samples ``[k·b, (k+1)·b)`` of
  every partition's sequence; the global batch is partition 0's chunk, then partition 1's, …
  Rank ``r`` of ``W`` (``W`` divides ``P``) reads partitions ``[r·P/W, (r+1)·P/W)`` only, so its
  rows are exactly rows ``[r·B/W, (r+1)·B/W)`` of the global batch (:func:`rank_slice`), and a
  rank's loader workers split its partitions between them. Every batch is full; an epoch of a
  partition is seen exactly once, whatever the world size and across a resume (the position is
  the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PlanError", "StreamPlan", "Window"]


class PlanError(ValueError):
    """The stream settings do not fit the data or the world size (the message names the setting)."""


@dataclass(frozen=True)
class Window:
    """One shuffle window of a partition's epoch.

    Attributes:
        epoch: the partition's epoch.
        start: position of the window's first sample in the partition's sequence.
        shards: indices (into the manifest's shard list) of its shards, in read order.
        order: ``int64 [n]`` permutation of the window's ``n`` samples (indices into its shards'
            samples concatenated in shard order).
    """

    epoch: int
    start: int
    shards: tuple[int, ...]
    order: np.ndarray = field(repr=False)

    @property
    def size(self) -> int:
        """Samples in the window."""
        return int(self.order.shape[0])


class StreamPlan:
    """The global sample order of a streamed dataset (see the module docstring).

    Args:
        shard_sizes: samples per shard, in manifest order.
        batch_size: global batch ``B``; divisible by ``partitions``.
        seed: the order's seed (``train.seed``).
        partitions: canonical partitions ``P`` (at most the number of non-empty shards).
        window: shards per shuffle window (>= 1).
    """

    def __init__(self, shard_sizes: Sequence[int], batch_size: int, seed: int, partitions: int, window: int) -> None:
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        if self.sizes.ndim != 1 or (self.sizes < 0).any():
            raise PlanError("stream plan: shard sizes must be a list of counts >= 0")
        nonempty = int((self.sizes > 0).sum())
        if partitions < 1 or window < 1:
            raise PlanError(f"train.stream_partitions ({partitions}) and train.stream_window ({window}) must be >= 1")
        if nonempty < partitions:
            raise PlanError(
                f"train.stream_partitions: {partitions} partitions need at least {partitions} non-empty shards, "
                f"the data has {nonempty} (lower it, or write smaller shards with data.shard_size)"
            )
        if batch_size % partitions:
            raise PlanError(f"train.batch_size {batch_size} is not divisible by train.stream_partitions {partitions}")
        self.batch_size, self.seed, self.partitions = int(batch_size), int(seed), int(partitions)
        self.window_shards = int(window)
        self.per_partition = self.batch_size // self.partitions
        self._nonempty = np.flatnonzero(self.sizes > 0)
        self._epoch_cache: dict[int, list[np.ndarray]] = {}

    # ------------------------------------------------------------------ assignment

    def partition_shards(self, epoch: int) -> list[np.ndarray]:
        """``P`` arrays: the shard indices of each partition in epoch ``epoch``, in read order."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 8:
                self._epoch_cache.pop(min(self._epoch_cache))
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            perm = self._nonempty[rng.permutation(self._nonempty.shape[0])]
            self._epoch_cache[epoch] = [perm[c :: self.partitions] for c in range(self.partitions)]
        return self._epoch_cache[epoch]

    def partition_size(self, epoch: int, partition: int) -> int:
        """Samples of ``partition`` in ``epoch``."""
        return int(self.sizes[self.partition_shards(epoch)[partition]].sum())

    def rank_partitions(self, rank: int, world: int) -> range:
        """The partitions rank ``rank`` of ``world`` reads: ``[rank·P/W, (rank+1)·P/W)``."""
        if world < 1 or not 0 <= rank < world:
            raise PlanError(f"stream plan: rank {rank} is not in a world of {world}")
        if self.partitions % world:
            raise PlanError(
                f"train.stream_partitions {self.partitions} is not divisible by the world size {world} "
                "(choose a multiple of every world size you will train or resume with)"
            )
        per = self.partitions // world
        return range(rank * per, (rank + 1) * per)

    def worker_partitions(self, rank: int, world: int, worker: int, workers: int) -> list[int]:
        """The partitions loader worker ``worker`` of ``workers`` on rank ``rank`` reads (round-robin)."""
        mine = list(self.rank_partitions(rank, world))
        if workers < 1 or not 0 <= worker < workers:
            raise PlanError(f"stream plan: worker {worker} is not one of {workers}")
        return mine[worker::workers]

    # ------------------------------------------------------------------ positions

    def chunk_start(self, step: int) -> int:
        """Position in every partition's sequence of step ``step``'s first sample (``step·b``)."""
        if step < 0:
            raise PlanError(f"stream plan: step {step} < 0")
        return step * self.per_partition

    def locate(self, partition: int, position: int) -> tuple[int, int]:
        """``(epoch, offset within that epoch)`` of ``position`` in ``partition``'s sequence."""
        epoch, start = 0, 0
        while True:
            n = self.partition_size(epoch, partition)
            if position < start + n:
                return epoch, position - start
            start += n
            epoch += 1

    def windows(self, partition: int, epoch: int) -> list[tuple[int, tuple[int, ...]]]:
        """``[(offset of the window within the epoch, shard indices)]`` of ``partition`` in ``epoch``."""
        shards = self.partition_shards(epoch)[partition]
        out: list[tuple[int, tuple[int, ...]]] = []
        offset = 0
        for i in range(0, shards.shape[0], self.window_shards):
            group = tuple(int(s) for s in shards[i : i + self.window_shards])
            out.append((offset, group))
            offset += int(self.sizes[list(group)].sum())
        return out

    def window(self, partition: int, epoch: int, index: int, epoch_start: int) -> Window:
        """Window ``index`` of ``partition`` in ``epoch`` whose epoch starts at ``epoch_start`` in the sequence."""
        offset, shards = self.windows(partition, epoch)[index]
        n = int(self.sizes[list(shards)].sum())
        rng = np.random.default_rng([self.seed, epoch, partition, index])
        return Window(epoch=epoch, start=epoch_start + offset, shards=shards, order=rng.permutation(n))

    def window_at(self, partition: int, position: int) -> tuple[Window, int]:
        """The window holding ``position`` of ``partition``'s sequence and the position's index in it."""
        epoch, offset = self.locate(partition, position)
        epoch_start = position - offset
        wins = self.windows(partition, epoch)
        index = max(i for i, (o, _) in enumerate(wins) if o <= offset)
        w = self.window(partition, epoch, index, epoch_start)
        return w, position - w.start

    def next_window(self, partition: int, w: Window) -> Window:
        """The window after ``w`` in ``partition``'s sequence (into the next epoch when ``w`` is the last)."""
        return self.window_at(partition, w.start + w.size)[0]

    def members(self, partition: int, position: int, count: int) -> list[tuple[int, int]]:
        """``[(shard index, sample index within the shard)]`` of positions ``[position, position+count)``.

        For tests and simulations (the loader walks windows itself, reading each shard once).
        """
        out: list[tuple[int, int]] = []
        w, i = self.window_at(partition, position)
        while len(out) < count:
            if i >= w.size:
                w, i = self.next_window(partition, w), 0
                continue
            flat = int(w.order[i])
            for s in w.shards:
                n = int(self.sizes[s])
                if flat < n:
                    out.append((s, flat))
                    break
                flat -= n
            i += 1
        return out

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """``B`` ``(shard, sample)`` members of global step ``step``, partition-major (rank slices are rows)."""
        start = self.chunk_start(step)
        return [m for c in range(self.partitions) for m in self.members(c, start, self.per_partition)]
