"""The evaluate stage: sample a prompt set with a :class:`~miroflow.pipeline.MiroPipeline`, score it.

Output (any storage URI, GenEval's layout so GenEval's own evaluator can read it)::

    <out>/<00000>/metadata.jsonl        the prompt's metadata record (one JSON line)
    <out>/<00000>/samples/0000.png      image j of prompt i (RGB, uint8)
    <out>/results.jsonl                 one line per image (see :func:`run_evaluate`)
    <out>/summary.json                  per-category accuracy, overall, reward means/stds, setup
    <out>/grid.png                      first image of up to 16 prompts (a quick look)
    <out>/_progress/chunk-NNNNNNN.json  rows of each finished chunk while the call runs (removed at the end)

Resume: an interrupted call (crash, kill, storage outage) leaves its finished chunks under
``_progress/``; the next call with the same fingerprint (settings, prompts, chunking and a
checksum of the model's weights, :func:`eval_fingerprint`) reuses them and generates only the
rest. A finished evaluation removes its progress, so rerunning it evaluates afresh.

Seeds: image ``j`` of prompt ``i`` starts from noise drawn by its own CPU generator seeded with
:func:`sample_seed` ``(eval.seed, i, j)``, so an image never depends on the batch it was
generated in (nor on ``eval.batch_size`` or the device).

Scoring: every image is scored by the configured rewards (``eval.rewards``, else
``score.rewards``; *normalised* values, as in the score tables) and, for ``data.domain=shapes``
where the shapes judge parses the prompt, judged GenEval-style (``correct``; ``judge_score`` =
fraction of facts that hold). Per-category accuracy is the mean of ``correct`` over judged images
of that tag; ``overall`` is the mean over categories (GenEval's convention). A model of imported
data (``data.domain=import``) is never judged: its summary has the reward metrics only
(``accuracy`` ``{}``, ``overall`` null; docs/architecture.md, "Imported data").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from miroflow.checkpoint import latest_checkpoint, run_uri
from miroflow.config import Params, ScoreConfig
from miroflow.content_keys import addressed
from miroflow.eval_report import log_eval_report
from miroflow.pipeline import GuidanceDecay, GuidanceSchedule, MiroPipeline, load_pipeline
from miroflow.prompts import PromptItem, load_prompt_set
from miroflow.results import eval_metrics
from miroflow.rewards import load_rewards
from miroflow.rewards.shapes_judge import judge, parse_caption
from miroflow.storage import Storage, from_config, join_uri
from miroflow.tracking import NullTracker, Tracker
from miroflow.tracking.images import captioned_grid
from miroflow.util import png_bytes, resolve_device

__all__ = [
    "sample_seed",
    "to_uint8",
    "generate",
    "score_images",
    "judge_images",
    "resolve_checkpoint",
    "run_evaluate",
    "eval_fingerprint",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- generation
def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of image ``sample_index`` of prompt ``prompt_index`` (a 63-bit int, hash-mixed).

    Independent of batch size and order; distinct (seed, i, j) give independent streams.
    """
    if prompt_index < 0 or sample_index < 0:
        raise ValueError(f"prompt_index and sample_index must be >= 0, got {prompt_index}, {sample_index}")
    ss = np.random.SeedSequence([abs(int(seed)), int(seed < 0), int(prompt_index), int(sample_index)])
    hi, lo = ss.generate_state(2, dtype=np.uint32)
    return int((int(hi) << 31) ^ int(lo))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (any shape) -> uint8 by rounding; uint8 input is returned as is."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def generate(
    pipeline: MiroPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = 0.0,
    num_inference_steps: int = 50,
    reward_targets: Mapping[str, float | None] | None = None,
    negative_reward_targets: Mapping[str, float | None] | None = None,
    batch_size: int = 64,
    guidance_schedule: GuidanceSchedule = "constant",
    guidance_interval: Sequence[float] | None = None,
    guidance_decay: GuidanceDecay = "linear",
) -> np.ndarray:
    """One image per ``(prompts[k], seeds[k])``, in batches of ``batch_size``.

    ``guidance_schedule`` / ``guidance_interval`` / ``guidance_decay`` go to the pipeline as is
    (:func:`miroflow.pipeline.guidance_weight`).

    Image ``k`` starts from ``torch.Generator("cpu").manual_seed(seeds[k])`` noise, so it does
    not depend on ``batch_size``.

    Returns:
        ``np.ndarray [N, H, W, 3]`` uint8, ``N = len(prompts)``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    res = pipeline.resolution
    if not prompts:
        return np.zeros((0, res, res, 3), dtype=np.uint8)
    chunks: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        ps = list(prompts[start : start + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipeline(
            ps,
            reward_targets=reward_targets,
            negative_reward_targets=negative_reward_targets,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=gens,
            output_type="np",
            guidance_schedule=guidance_schedule,
            guidance_interval=guidance_interval,
            guidance_decay=guidance_decay,
        )
        chunks.append(to_uint8(out.images))  # type: ignore[union-attr]
    return np.concatenate(chunks, axis=0)


# --------------------------------------------------------------------------- scoring
def _as_tensor(images: np.ndarray) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 or float in [0, 1] -> ``Tensor [B, 3, H, W]`` float32 in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {arr.shape}")
    x = torch.from_numpy(arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32))
    return x.permute(0, 3, 1, 2).contiguous()


def score_images(
    images: np.ndarray,
    prompts: Sequence[str],
    reward_names: Sequence[str],
    score_config: ScoreConfig | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Normalised reward values of generated images.

    Args:
        images: ``[N, H, W, 3]`` uint8 (or float in [0, 1]).
        prompts: N captions (used by prompt-dependent rewards).
        reward_names: registered reward names.
        score_config: weights/device per reward (``params.score``); defaults otherwise.

    Returns:
        ``{name: np.ndarray [N] float64}`` of ``reward.normalize(reward.score(...))`` (NaN where a
        reward could not score an image, e.g. an unparseable caption for ``shapes_alignment``).

    Raises:
        RewardNotFound: an unknown reward name (lists the valid ones).
    """
    n = int(np.asarray(images).shape[0]) if len(np.asarray(images).shape) else 0
    if len(prompts) != n:
        raise ValueError(f"score_images: {n} images but {len(prompts)} prompts")
    names = list(reward_names)
    if not names:
        return {}
    cfg = (score_config or ScoreConfig()).model_copy(update={"rewards": names})
    rewards = load_rewards(cfg)
    out = {r.name: np.full(n, np.nan, dtype=np.float64) for r in rewards}
    for start in range(0, n, batch_size):
        batch = _as_tensor(np.asarray(images)[start : start + batch_size])
        ps = list(prompts[start : start + batch_size])
        for r in rewards:
            raw = r.score(batch, ps)
            out[r.name][start : start + len(ps)] = r.normalize(raw).detach().cpu().double().numpy()
    return out


def judge_images(images: np.ndarray, prompts: Sequence[str]) -> list[dict[str, Any] | None]:
    """Shapes-judge verdicts: ``{"correct", "judge_score", "category"}`` per image, ``None`` if unparseable."""
    arr = np.asarray(images)
    out: list[dict[str, Any] | None] = []
    for img, prompt in zip(arr, prompts):
        if not parse_caption(prompt).parsed:
            out.append(None)
            continue
        res = judge(img, prompt)
        out.append({"correct": bool(res.correct), "judge_score": float(res.score), "category": res.category})
    return out


# --------------------------------------------------------------------------- helpers
def resolve_checkpoint(params: Params, storage: Storage) -> str:
    """``eval.checkpoint``, else ``<root>/runs/<train.run_name>-<hash>/final``, else its newest complete checkpoint
    whose files match their hash record (damaged newer ones are skipped with a warning).

    Raises:
        FileNotFoundError: nothing to evaluate (names the run directory).
    """
    if params.eval.checkpoint:
        return params.eval.checkpoint
    run = run_uri(params)
    final = join_uri(run, "final")
    if storage.exists(join_uri(final, "miro.json")):
        return final
    newest = latest_checkpoint(run, storage, verify=True)  # skips damaged ones, naming them in the log
    if newest is None:
        raise FileNotFoundError(
            f"eval.checkpoint is null and run {run} has no final/ or complete checkpoints/step-*/ (miro.json); "
            "train first or set eval.checkpoint"
        )
    return newest


def _clean(v: float) -> float | None:
    """JSON-safe float: NaN/inf -> None."""
    f = float(v)
    return f if math.isfinite(f) else None


def _grid(images: list[np.ndarray], cols: int = 4) -> np.ndarray:
    """Tile ``[H, W, 3]`` uint8 images row-major into one ``[rows·H, cols·W, 3]`` image."""
    h, w = images[0].shape[:2]
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return grid


def ensure_pipeline(
    params: Params, storage: Storage, pipeline: MiroPipeline | None = None
) -> tuple[MiroPipeline, str | None]:
    """The given pipeline, or the one loaded from ``eval.checkpoint`` / the latest checkpoint of
    ``train.run_name``; progress bars off. Returns ``(pipeline, checkpoint URI or None)``."""
    if pipeline is None:
        checkpoint = resolve_checkpoint(params, storage)
        pipeline = load_pipeline(checkpoint, storage=storage, device=str(resolve_device()))
    else:
        checkpoint = params.eval.checkpoint
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, checkpoint


# --------------------------------------------------------------------------- the stage
def run_evaluate(
    params: Params,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    out_uri: str | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Generate, store and score ``eval.images_per_prompt`` images per prompt of ``eval.prompt_set``.

    Args:
        params: the whole config (``eval``, ``score`` for reward weights, ``storage``, ``train.run_name``).
        pipeline: a loaded pipeline; ``None`` loads :func:`resolve_checkpoint` (EMA weights).
        storage: defaults to one built from ``params.storage``.
        out_uri: output prefix; default ``<storage.root>/<eval.output>/<run name>-<hash>`` (content-addressed, docs/reproducibility.md).
        tracker: optional; receives ``eval/<category>``, ``eval/overall``, ``eval/reward/<name>``,
            ``summary.json`` (as ``eval/summary.json``), a sample grid and a few tags.

    ``results.jsonl`` lines: ``tag``, ``prompt``, ``prompt_index``, ``sample_index``, ``seed``,
    ``path`` (relative to the output), ``correct`` (bool, null if the judge cannot parse the
    prompt or ``data.domain`` is not ``shapes``), ``judge_score`` (null likewise) and each reward's normalised value under its name
    (null = NaN).

    Returns:
        The summary dict (also written as ``summary.json``): ``accuracy`` {tag: acc},
        ``overall``, ``n_judged`` {tag: n}, ``rewards`` {name: {mean, std, n}}, ``n_images``,
        ``n_prompts``, ``guidance_scale``, ``reward_targets``, ``negative_reward_targets`` (as
        resolved for the model), ``checkpoint``, ``prompt_set``, ``steps``, ``seed``,
        ``images_per_prompt``, ``output``, ``model``.
    """
    ev = params.eval
    st = storage or from_config(params.storage)
    pipeline, checkpoint = ensure_pipeline(params, st, pipeline)
    spec = pipeline.spec
    run_label = spec.run_name or "model"
    out = out_uri or join_uri(params.storage.root, ev.output, addressed(run_label, params, "evaluate"))
    items: list[PromptItem] = load_prompt_set(ev.prompt_set, ev.num_prompts, storage=st)
    reward_names = list(ev.rewards if ev.rewards is not None else params.score.rewards)
    judged = params.data.domain == "shapes"  # the shapes judge parses shapes captions only
    pos_targets = pipeline.resolve_reward_targets(ev.reward_targets, 1.0, "eval.reward_targets")
    neg_targets = pipeline.resolve_reward_targets(ev.negative_reward_targets, 0.0, "eval.negative_reward_targets")

    # every (prompt i, sample j) in a fixed order; generated and scored in chunks
    jobs = [(i, j) for i in range(len(items)) for j in range(ev.images_per_prompt)]
    for i, item in enumerate(items):
        st.write_bytes(join_uri(out, f"{i:05d}", "metadata.jsonl"), (json.dumps(item.metadata) + "\n").encode())
    rows: list[dict[str, Any]] = []
    grid_images: list[np.ndarray] = []
    chunk = max(ev.batch_size, 1)
    fingerprint = eval_fingerprint(pipeline, checkpoint, ev, reward_names, items, chunk)
    progress = join_uri(out, "_progress")
    reused = 0
    log.info("evaluate: %d prompts x %d images -> %s", len(items), ev.images_per_prompt, out)
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        done = _load_chunk(st, join_uri(progress, f"chunk-{start:07d}.json"), fingerprint, len(part))
        if done is not None:  # resumed: this chunk was generated and scored by an interrupted earlier call
            rows.extend(done)
            reused += len(done)
            for r in done:
                if r["sample_index"] == 0 and len(grid_images) < 16:
                    grid_images.append(
                        np.asarray(Image.open(io.BytesIO(st.read_bytes(join_uri(out, r["path"])))).convert("RGB"))
                    )
            continue
        prompts = [items[i].prompt for i, _ in part]
        seeds = [sample_seed(ev.seed, i, j) for i, j in part]
        images = generate(
            pipeline,
            prompts,
            seeds,
            guidance_scale=ev.guidance_scale,
            num_inference_steps=ev.steps,
            reward_targets=ev.reward_targets,
            negative_reward_targets=ev.negative_reward_targets,
            batch_size=ev.batch_size,
            guidance_schedule=ev.guidance_schedule,
            guidance_interval=ev.guidance_interval,
            guidance_decay=ev.guidance_decay,
        )
        scores = score_images(images, prompts, reward_names, score_config=params.score, batch_size=ev.batch_size)
        verdicts = judge_images(images, prompts) if judged else [None] * len(prompts)
        for k, (i, j) in enumerate(part):
            rel = f"{i:05d}/samples/{j:04d}.png"
            st.write_bytes(join_uri(out, rel), png_bytes(images[k]))
            if j == 0 and len(grid_images) < 16:
                grid_images.append(images[k])
            v = verdicts[k]
            row: dict[str, Any] = {
                "tag": items[i].tag,
                "prompt": items[i].prompt,
                "prompt_index": i,
                "sample_index": j,
                "seed": seeds[k],
                "path": rel,
                "correct": None if v is None else v["correct"],
                "judge_score": None if v is None else _clean(v["judge_score"]),
            }
            for name in reward_names:
                row[name] = _clean(scores[name][k])
            rows.append(row)
        chunk_rows = rows[-len(part) :]
        st.write_bytes(
            join_uri(progress, f"chunk-{start:07d}.json"),
            json.dumps({"fingerprint": fingerprint, "rows": chunk_rows}).encode(),
        )
    if reused:
        log.info("evaluate: resumed, %d of %d images reused from %s", reused, len(jobs), progress)

    summary = _summarize(rows, reward_names)
    summary.update(
        {
            "n_images": len(rows),
            "n_prompts": len(items),
            "images_per_prompt": ev.images_per_prompt,
            "guidance_scale": ev.guidance_scale,
            "reward_targets": pos_targets,
            "negative_reward_targets": neg_targets,
            "guidance_mode": pipeline.guidance_mode,
            "checkpoint": checkpoint,
            "prompt_set": ev.prompt_set,
            "steps": ev.steps,
            "seed": ev.seed,
            "output": out,
            "model": {
                "run_name": spec.run_name,
                "step": spec.step,
                "reward_names": pipeline.reward_names,
                "text_encoder": spec.text_encoder,
                "latent": spec.latent,
                "resolution": spec.resolution,
            },
        }
    )
    results_text = "".join(json.dumps(r) + "\n" for r in rows)
    st.write_bytes(join_uri(out, "results.jsonl"), results_text.encode())
    grid = _grid(grid_images) if grid_images else None
    if grid is not None:
        st.write_bytes(join_uri(out, "grid.png"), png_bytes(grid))
    st.write_bytes(join_uri(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    for uri in st.list(progress):  # finished: a later call evaluates afresh (the model may have changed)
        st.delete(uri)

    tracker = tracker or NullTracker()
    reward_means = {name: stats["mean"] for name, stats in summary["rewards"].items()}
    tracker.set_tags({"eval.prompt_set": ev.prompt_set, "eval.checkpoint": str(checkpoint), "eval.output": out})
    tracker.log_metrics(eval_metrics(summary["accuracy"], summary["overall"], reward_means), step=spec.step or 0)
    tracker.log_dict(summary, "eval/summary.json")
    if grid is not None:  # in MLflow: upscaled, each image's prompt under it (rows are in grid order)
        captions = [r["prompt"] for r in rows if r["sample_index"] == 0][: len(grid_images)]
        card = captioned_grid(np.stack(grid_images), captions, columns=4)
        tracker.log_image(card, key="eval/samples", step=spec.step or 0)
    log_eval_report(tracker, summary)  # per-category tables + bar plot
    return summary


def eval_fingerprint(
    pipeline: MiroPipeline,
    checkpoint: str | None,
    ev: Any,
    reward_names: Sequence[str],
    items: Sequence[PromptItem],
    chunk: int,
) -> str:
    """sha256 of everything that decides an evaluation's rows: settings, prompts, chunking and a
    checksum of the pipeline's weights (so a retrained checkpoint at the same URI is never resumed)."""
    with torch.no_grad():
        weights = [
            float(sum(p.detach().double().sum().item() for p in m.parameters()))  # type: ignore[attr-defined]
            for m in (pipeline.denoiser, pipeline.text_encoder)
            if isinstance(m, torch.nn.Module)
        ]
    doc = {
        "checkpoint": checkpoint,
        "weights": weights,
        "prompts": [(it.tag, it.prompt) for it in items],
        "images_per_prompt": ev.images_per_prompt,
        "seed": ev.seed,
        "steps": ev.steps,
        "guidance_scale": ev.guidance_scale,
        "reward_targets": dict(ev.reward_targets),
        "negative_reward_targets": dict(ev.negative_reward_targets),
        "rewards": list(reward_names),
        "chunk": chunk,
    }
    if ev.guidance_schedule != "constant":  # constant keeps the fingerprints of earlier runs
        doc["guidance_schedule"] = [ev.guidance_schedule, list(ev.guidance_interval), ev.guidance_decay]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _load_chunk(st: Storage, uri: str, fingerprint: str, n: int) -> list[dict[str, Any]] | None:
    """The rows of a finished chunk of an interrupted call with the same fingerprint, else ``None``."""
    if not st.exists(uri):
        return None
    try:
        doc = json.loads(st.read_bytes(uri))
    except (ValueError, UnicodeDecodeError):
        log.warning("evaluate: unreadable progress file %s; that chunk is redone", uri)
        return None
    if doc.get("fingerprint") != fingerprint or len(doc.get("rows", [])) != n:
        return None
    return list(doc["rows"])


def _summarize(rows: list[dict[str, Any]], reward_names: list[str]) -> dict[str, Any]:
    """Per-category accuracy over judged rows, overall = mean over categories, reward stats."""
    by_tag: dict[str, list[bool]] = {}
    for r in rows:
        if r["correct"] is not None:
            by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
    accuracy = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
    overall = float(np.mean(list(accuracy.values()))) if accuracy else None
    rewards: dict[str, dict[str, float | int | None]] = {}
    for name in reward_names:
        vals = np.array([np.nan if r[name] is None else r[name] for r in rows], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        rewards[name] = {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "n": int(finite.size),
        }
    return {
        "accuracy": accuracy,
        "overall": overall,
        "n_judged": {tag: len(v) for tag, v in by_tag.items()},
        "rewards": rewards,
    }
