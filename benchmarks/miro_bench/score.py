"""Section ``score``: the shard scorer (:func:`miroflow.score_engine.score_shard`) against its rewards and towers.

Two reward sets, each on the prepared shards:

* **weight-free** (the demo's five shapes rewards): *engine* = ``score_shard`` per shard (tar
  streaming + sha256, PNG decode, batching, every reward, normalisation, parquet + failures
  writes); *Σ forwards* = only ``reward.score(images, prompts)`` of every reward over the same
  batches, decoded ahead of time. Their ratio is the engine's overhead (CPU goal ≤ 1.15).
* **towers** (``clip_score``, ``laion_aesthetic``, ``hpsv2``: the library's reward classes around
  random-weight open_clip models; ViT-L/14, ViT-L/14 and ViT-H/14 at ``paper``, 64-px two-layer
  towers at ``tiny``): engine, Σ forwards, and the image towers alone on preprocessed batches (what
  the towers allow when decoding is overlapped). Ratio engine rate / tower rate (GPU goal ≥ 0.8).

Each side runs shard by shard in alternating order, best total of the blocks kept per side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from miroflow.data.shards import decode_image, iter_shard
from miroflow.rewards import Reward, clear_reward_cache, load_rewards
from miroflow.rewards.clip_models import (
    AestheticHead,
    ClipScoreReward,
    HPSv2Reward,
    LaionAestheticReward,
    OpenClipTowers,
    build_tiny_open_clip,
)
from miroflow.score_engine import score_shard, to_batch
from miroflow.storage import Storage

from .common import Section, SizeSpec, Timing, alternate, check, spread
from .data import BenchData

__all__ = ["run_score", "tower_rewards"]

Batches = list[tuple[Tensor, list[str]]]


def tower_rewards(spec: SizeSpec, device: torch.device) -> list[Reward]:
    """``clip_score``, ``laion_aesthetic`` and ``hpsv2`` around random-weight open_clip towers of ``spec``."""
    import open_clip

    def towers(model_name: str | None, seed: int) -> OpenClipTowers:
        if model_name is None:
            model, tok = build_tiny_open_clip(seed=seed)
        else:
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
            tok = open_clip.get_tokenizer(model_name)
        return OpenClipTowers(model, tok, device=device)

    cfg = spec.towers
    clip = ClipScoreReward(towers(cfg["clip_score"], 0), version="clip_score:bench-random")
    lt = towers(cfg["laion_aesthetic"], 1)
    head = AestheticHead(in_dim=int(lt.model.text_projection.shape[1]))
    aes = LaionAestheticReward(lt, head, version="laion_aesthetic:bench-random")
    hps = HPSv2Reward(towers(cfg["hpsv2"], 2), version="hpsv2:bench-random")
    return [clip, aes, hps]  # type: ignore[list-item]


def _decoded(shards: list[str], storage: Storage, batch: int) -> dict[str, Batches]:
    """Every shard decoded ahead of time into the engine's batches ``(images [B, 3, H, W], captions)``."""
    out: dict[str, Batches] = {}
    for uri in shards:
        recs = list(iter_shard(uri, storage))
        out[uri] = [
            (
                to_batch([decode_image(r["image_bytes"]) for r in recs[i : i + batch]]),
                [r["txt"] for r in recs[i : i + batch]],
            )
            for i in range(0, len(recs), batch)
        ]
    return out


def _pure(rewards: list[Reward], batches: dict[str, Batches]) -> Callable[[], float]:
    """A block of Σ ``reward.score`` over the pre-decoded batches; returns the images scored."""

    def run() -> float:
        n = 0
        with torch.inference_mode():
            for shard in batches.values():
                for images, prompts in shard:
                    for r in rewards:
                        r.score(images, prompts)
                    n += len(prompts)
        return float(n)

    return run


def _engine(
    rewards: list[Reward], shards: list[str], storage: Storage, out: Path, batch: int, expect: int
) -> Callable[[], float]:
    """A block of ``score_shard`` over every shard (fresh output URIs each block); returns the rows written."""
    calls = [0]

    def run() -> float:
        calls[0] += 1
        n = 0
        for j, uri in enumerate(shards):
            res = score_shard(uri, rewards, str(out / f"b{calls[0]}" / f"{j}.parquet"), storage, batch, progress=False)
            check(not res["skipped"] and res["failures"] == 0, f"engine scored every sample of {uri}")
            n += int(res["n"])
        check(n == expect, f"engine wrote {n} rows for {expect} samples")
        return float(n)

    return run


def _towers_only(rewards: list[Reward], batches: dict[str, Batches]) -> Callable[[], float]:
    """A block of the image towers alone on batches preprocessed ahead of time (224 px at paper size)."""
    towers = [r.towers for r in rewards]  # type: ignore[attr-defined]
    with torch.inference_mode():
        inputs = [[tw.preprocess(images) for shard in batches.values() for images, _ in shard] for tw in towers]
    n = sum(int(x.shape[0]) for x in inputs[0])

    def run() -> float:
        with torch.inference_mode():
            for tw, xs in zip(towers, inputs):
                for x in xs:
                    tw.model.encode_image(x)
        return float(n)

    return run


def _check_engine(rewards: list[Reward], shard: str, storage: Storage, out: Path, batch: int, pre: Batches) -> None:
    """The engine's raw columns equal the rewards' direct scores of the same images (float64 of float32)."""
    import pyarrow.parquet as pq

    res = score_shard(shard, rewards, str(out / "check.parquet"), storage, batch, progress=False)
    table = pq.read_table(str(out / "check.parquet")).to_pydict()
    check(len(table["key"]) == res["n"], "engine table rows == reported n")
    with torch.inference_mode():
        for r in rewards:
            direct = torch.cat(
                [torch.as_tensor(r.score(images, prompts)).double().reshape(-1) for images, prompts in pre]
            )
            got = torch.tensor(table[f"{r.name}.raw"], dtype=torch.float64)
            check(got.shape == direct.shape, f"{r.name}: {got.numel()} raw scores for {direct.numel()} images")
            check(
                torch.allclose(got, direct, rtol=1e-5, atol=1e-6, equal_nan=True), f"{r.name}: engine == direct forward"
            )


def _measure(
    sec: Section,
    label: str,
    rewards: list[Reward],
    shards: list[str],
    storage: Storage,
    root: Path,
    spec: SizeSpec,
    device: torch.device,
    with_towers: bool,
) -> dict[str, Timing]:
    batches = _decoded(shards, storage, spec.score_batch)
    n = sum(len(p) for b in batches.values() for _, p in b)
    _check_engine(rewards, shards[0], storage, root / f"{label}-check", spec.score_batch, batches[shards[0]])
    variants: dict[str, Callable[[], float]] = {
        "engine": _engine(rewards, shards, storage, root / label, spec.score_batch, n),
        "sum_forwards": _pure(rewards, batches),
    }
    if with_towers:
        variants["towers"] = _towers_only(rewards, batches)
    t = alternate(variants, spec.score_repeats, device)
    te, tp = t["engine"], t["sum_forwards"]
    sec.add(
        f"{label}: engine time / Σ reward forwards",
        te.seconds / tp.seconds * tp.units / te.units,
        detail=f"{n} images; " + spread(tp, te),
        goal="<= 1.15 (CPU)" if not with_towers else "",
    )
    if with_towers:
        tt = t["towers"]
        sec.add(
            f"{label}: engine rate / image-tower rate", te.rate / tt.rate, detail=spread(te, tt), goal=">= 0.8 (GPU)"
        )
    sec.add(f"{label}: engine", te.rate, "img/s", ", ".join(r.name for r in rewards))
    sec.numbers[label] = {"img_s": {k: v.rate for k, v in t.items()}, "images": n, "blocks": spec.score_repeats}
    return t


def run_score(spec: SizeSpec, device: torch.device, data: BenchData, root: Path) -> Section:
    """Check the engine's columns, then time engine, Σ forwards and towers side by side."""
    t_start = time.perf_counter()
    sec = Section(f"score ({spec.name}, {device.type}, batch {spec.score_batch})")
    storage = Storage()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clear_reward_cache()
    weight_free = load_rewards(data.params.score)
    _measure(sec, "weight-free", weight_free, data.shards, storage, root / "score", spec, device, False)
    towers = tower_rewards(spec, device)
    tower_shards = data.shards[: max(1, len(data.shards) // 2)] if spec.name == "tiny" else data.shards
    _measure(sec, "towers", towers, tower_shards, storage, root / "score", spec, device, True)
    sizes: dict[str, Any] = {
        r.name: round(sum(p.numel() for p in r.towers.model.visual.parameters()) / 1e6, 2)  # type: ignore[attr-defined]
        for r in towers
    }
    sec.numbers["image_tower_params_M"] = sizes
    sec.numbers["threads"] = torch.get_num_threads()
    sec.notes.append(
        "towers: "
        + ", ".join(f"{k} {v}M ({spec.towers[k] or 'tiny 64px'})" for k, v in sizes.items())
        + f"; images {spec.resolution} px; engine reads local shards inline (no decode thread)"
    )
    sec.seconds = time.perf_counter() - t_start
    return sec
