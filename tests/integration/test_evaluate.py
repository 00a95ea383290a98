"""The evaluate stage end to end: tiny random pipelines, GenEval layout, results and summary."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from miroflow.checkpoint import run_uri
from miroflow.config import EvalConfig, Params, ScoreConfig, StorageConfig
from miroflow.content_keys import addressed, stage_hash
from miroflow.data.shapes import CATEGORIES
from miroflow.evaluate import generate, run_evaluate, sample_seed, score_images
from miroflow.models import LearnedTokenEncoder, MiroDenoiser, PixelCodec, create_denoiser
from miroflow.pipeline import MiroPipeline
from miroflow.storage import Storage

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
DIM = 32

GENEVAL = [
    {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"},
    {
        "tag": "counting",
        "include": [{"class": "square", "count": 2, "color": "blue"}],
        "exclude": [{"class": "square", "count": 3, "color": "blue"}],
        "prompt": "two blue squares",
    },
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
]


def _denoiser(seed: int = 0) -> MiroDenoiser:
    torch.manual_seed(seed)
    model = create_denoiser("tiny", REWARDS, text_dim=DIM, pooled_dim=DIM, num_layers=2)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _encoder() -> LearnedTokenEncoder:
    torch.manual_seed(0)
    captions = [r["prompt"] for r in GENEVAL] + ["a green triangle left of a yellow circle"]
    return LearnedTokenEncoder.from_captions(captions, dim=DIM, num_layers=1, num_heads=2, max_length=12).eval()


@pytest.fixture(scope="module")
def pipe() -> MiroPipeline:
    p = MiroPipeline(
        denoiser=_denoiser(),
        text_encoder=_encoder(),
        vae=PixelCodec(),
        spec={
            "text_encoder": "learned",
            "text_max_length": 12,
            "resolution": 32,
            "reward_names": REWARDS,
            "run_name": "tiny-run",
            "step": 40,
        },
    )
    p.set_progress_bar_config(disable=True)
    return p


def _params(root: Path | str, **eval_kw: Any) -> Params:
    ev = dict(images_per_prompt=2, steps=3, batch_size=4, seed=3, rewards=["sharpness", "shapes_alignment"])
    ev.update(eval_kw)
    return Params(eval=EvalConfig(**ev), storage=StorageConfig(root=str(root)), score=ScoreConfig())


class RecordingTracker:
    """A real implementation of the tracker Protocol that keeps what it is given."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.dicts: dict[str, dict[str, Any]] = {}
        self.images: list[tuple[str, tuple[int, ...]]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        self.dicts[artifact_file] = json.loads(json.dumps(dictionary))

    def log_image(self, image: np.ndarray, key: str, step: int | None = None) -> None:
        self.images.append((key, tuple(image.shape)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        self.dicts[artifact_file] = {k: list(v) for k, v in table.items()}

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.images.append((artifact_file, tuple(fig.get_size_inches())))


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_geneval_file_evaluation_writes_geneval_layout(tmp_path: Path, pipe: MiroPipeline) -> None:
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    out = tmp_path / "out"
    params = _params(tmp_path / "store", prompt_set=f"geneval:{meta}", reward_targets={"contrast": 0.5})
    summary = run_evaluate(params, pipeline=pipe, out_uri=str(out))

    for i, rec in enumerate(GENEVAL):
        lines = (out / f"{i:05d}" / "metadata.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == [rec]
        for j in range(2):
            img = _read_png(out / f"{i:05d}" / "samples" / f"{j:04d}.png")
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    for r in rows:
        rec = GENEVAL[r["prompt_index"]]
        assert r["tag"] == rec["tag"] and r["prompt"] == rec["prompt"]
        assert r["path"] == f"{r['prompt_index']:05d}/samples/{r['sample_index']:04d}.png"
        assert r["seed"] == sample_seed(3, r["prompt_index"], r["sample_index"])
        assert isinstance(r["sharpness"], float) and 0.0 <= r["sharpness"] <= 1.5
        if rec["prompt"] == "a photo of a bench":  # the judge cannot parse it: no verdict, absent alignment
            assert r["correct"] is None and r["judge_score"] is None and r["shapes_alignment"] is None
        else:
            assert isinstance(r["correct"], bool) and 0.0 <= r["judge_score"] <= 1.0
            assert r["shapes_alignment"] == pytest.approx(r["judge_score"])
    # the stored values are the rewards of the stored PNGs
    imgs = np.stack([_read_png(out / r["path"]) for r in rows])
    again = score_images(imgs, [r["prompt"] for r in rows], ["sharpness"])
    np.testing.assert_allclose(again["sharpness"], [r["sharpness"] for r in rows], rtol=1e-6)

    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["accuracy"]) == {"colors", "counting"}  # the bench prompt is not judged
    assert saved["n_judged"] == {"colors": 2, "counting": 2}
    assert saved["overall"] == pytest.approx(np.mean(list(saved["accuracy"].values())))
    assert saved["reward_targets"] == {"sharpness": 1.0, "contrast": 0.5, "shapes_alignment": 1.0}
    assert saved["negative_reward_targets"] == {"sharpness": 0.0, "contrast": 0.0, "shapes_alignment": 0.0}
    assert saved["n_images"] == 6 and saved["guidance_scale"] == 0.0
    assert saved["rewards"]["sharpness"]["n"] == 6 and saved["rewards"]["shapes_alignment"]["n"] == 4
    vals = np.array([r["sharpness"] for r in rows])
    assert saved["rewards"]["sharpness"]["mean"] == pytest.approx(vals.mean())
    assert saved["rewards"]["sharpness"]["std"] == pytest.approx(vals.std())


def test_shapes_evaluation_reports_per_category_accuracy(tmp_path: Path, pipe: MiroPipeline) -> None:
    tracker = RecordingTracker()
    params = _params(tmp_path / "store", prompt_set="shapes", num_prompts=12, images_per_prompt=1, guidance_scale=0.5)
    summary = run_evaluate(params, pipeline=pipe, tracker=tracker)
    out = tmp_path / "store" / "eval" / addressed("tiny-run", params, "evaluate")  # <root>/<eval.output>/<run>-<hash>
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["accuracy"]) == set(CATEGORIES)
    assert all(0.0 <= a <= 1.0 for a in saved["accuracy"].values())
    assert saved["n_judged"] == {c: 2 for c in CATEGORIES}
    assert saved["overall"] == pytest.approx(float(np.mean(list(saved["accuracy"].values()))))
    assert saved["guidance_scale"] == 0.5 and saved["prompt_set"] == "shapes"
    assert summary["output"] == str(out)
    assert (out / "00011" / "samples" / "0000.png").is_file() and (out / "grid.png").is_file()
    # tracker got the summary metrics and the summary itself
    assert {f"eval/{c}" for c in CATEGORIES} | {
        "eval/overall",
        "eval/reward/sharpness",
        "eval/reward/shapes_alignment",
    } <= set(tracker.metrics)
    assert tracker.metrics["eval/overall"] == pytest.approx(saved["overall"])
    assert tracker.dicts["eval/summary.json"] == saved
    assert tracker.images and tracker.images[0][0] == "eval/samples"
    h, w = tracker.images[0][1][:2]  # 12 prompts in 3 rows of 4, each 32 px sample upscaled 4x, captioned
    assert w == 4 * (128 + 4) + 4 and h > 3 * (128 + 4)
    # ... and the per-category tables and the bar plot (miroflow.eval_report)
    acc = tracker.dicts["eval/accuracy_table.json"]
    assert acc["category"] == [*sorted(CATEGORIES), "overall"] and acc["n_judged"] == [2] * 6 + [12]
    assert acc["accuracy"][-1] == pytest.approx(saved["overall"])
    assert tracker.dicts["eval/rewards_table.json"]["reward"] == ["shapes_alignment", "sharpness"]
    assert "eval/summary.png" in [k for k, _ in tracker.images]


def test_images_do_not_depend_on_batch_size(pipe: MiroPipeline) -> None:
    prompts = [r["prompt"] for r in GENEVAL] * 2
    seeds = [sample_seed(0, i, 0) for i in range(len(prompts))]
    a = generate(pipe, prompts, seeds, num_inference_steps=3, batch_size=2)
    b = generate(pipe, prompts, seeds, num_inference_steps=3, batch_size=5)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1  # float rounding only
    assert not np.array_equal(a[0], a[3])  # same prompt, different seed


def test_evaluate_loads_a_checkpoint_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    """eval.checkpoint = null -> newest complete checkpoint of train.run_name on S3; outputs on S3."""
    storage = Storage(retries=0)
    root = f"s3://{s3_bucket}/store"
    local = tmp_path / "ckpt"
    ema = _denoiser(seed=5)
    _denoiser(seed=6).save_pretrained(local / "denoiser")
    ema.save_pretrained(local / "ema")
    _encoder().save_pretrained(local / "ema_text_encoder")
    miro = {
        "format": 1,
        "step": 20,
        "run_name": "miro",
        "text_encoder": "learned",
        "text_max_length": 12,
        "latent": "pixel",
        "vae": None,
        "latent_stats": None,
        "resolution": 32,
        "reward_names": REWARDS,
        "bins": None,
        "text_dropout": 0.0,
        "denoiser": ema.config.model_dump(mode="json"),
    }
    (local / "miro.json").write_text(json.dumps(miro))
    params = _params(root, prompt_set="shapes", num_prompts=2, images_per_prompt=1)
    ckpt = f"{run_uri(params)}/checkpoints/step-00000020"
    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.write_bytes(f"{ckpt}/{f.relative_to(local).as_posix()}", f.read_bytes())
    # a newer but incomplete checkpoint (no miro.json) is ignored
    storage.write_bytes(f"{run_uri(params)}/checkpoints/step-00000030/ema/config.json", b"{}")

    summary = run_evaluate(params, storage=storage)
    assert summary["checkpoint"] == ckpt and summary["model"]["step"] == 20
    out = summary["output"]
    assert out == f"{root}/eval/miro-{stage_hash(params, 'evaluate')}"
    saved = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert saved["n_images"] == 2
    png = storage.read_bytes(f"{out}/00001/samples/0000.png")
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (32, 32, 3)
    assert len(storage.read_bytes(f"{out}/results.jsonl").decode().splitlines()) == 2


def test_pipeline_save_and_load_through_s3(s3_bucket: str, pipe: MiroPipeline) -> None:
    storage = Storage(retries=0)
    uri = f"s3://{s3_bucket}/pipelines/tiny"
    pipe.save_pretrained(uri, storage=storage)
    keys = storage.list(uri + "/")
    assert f"{uri}/miro.json" in keys and f"{uri}/denoiser/model.safetensors" in keys
    loaded = MiroPipeline.from_pretrained(uri, storage=storage, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    kw: dict[str, Any] = dict(guidance_scale=1.0, num_inference_steps=2)
    np.testing.assert_array_equal(
        pipe(["a red circle"], generator=torch.Generator().manual_seed(1), **kw).images,
        loaded(["a red circle"], generator=torch.Generator().manual_seed(1), **kw).images,
    )


class FailingStorage(Storage):
    """Real local storage whose disk 'fills up' after ``budget`` sample PNGs (an interrupted evaluation)."""

    def __init__(self, budget: int) -> None:
        super().__init__(retries=0)
        self.budget = budget

    def write_bytes(self, uri: str, data: bytes) -> None:
        if "/samples/" in uri:
            if self.budget <= 0:
                raise OSError(28, "No space left on device", uri)
            self.budget -= 1
        super().write_bytes(uri, data)


def test_interrupted_evaluation_resumes_finished_chunks(tmp_path: Path, pipe: MiroPipeline) -> None:
    # 6 prompts x 2 images in chunks of 4: the outage hits the 3rd chunk (after 9 PNGs)
    params = _params(tmp_path / "store", prompt_set="shapes:1", num_prompts=6)
    ref = run_evaluate(params, pipeline=pipe, out_uri=str(tmp_path / "ref"))
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        run_evaluate(params, pipeline=pipe, storage=FailingStorage(budget=9), out_uri=str(out))
    progress = sorted(p.name for p in (out / "_progress").iterdir())
    assert progress == ["chunk-0000000.json", "chunk-0000004.json"]  # two finished chunks kept
    first = {p: p.stat().st_mtime_ns for p in out.glob("*/samples/*.png")}

    summary = run_evaluate(params, pipeline=pipe, out_uri=str(out))
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/samples/*.png")}
    kept = [p for p in first if after[p] == first[p]]
    assert len(kept) == 8  # the 8 images of the two finished chunks were not generated again
    assert len(after) == 12 and not list((out / "_progress").glob("*"))  # progress removed once finished
    assert (out / "results.jsonl").read_text() == (tmp_path / "ref" / "results.jsonl").read_text()
    assert summary["accuracy"] == ref["accuracy"] and summary["rewards"] == ref["rewards"]


def test_progress_of_other_settings_or_garbage_is_not_reused(tmp_path: Path, pipe: MiroPipeline) -> None:
    params = _params(tmp_path / "store", prompt_set="shapes:1", num_prompts=5)
    out = tmp_path / "out"
    with pytest.raises(OSError):  # chunks 0 and 4 finish, chunk 8 fails
        run_evaluate(params, pipeline=pipe, storage=FailingStorage(budget=8), out_uri=str(out))
    assert (out / "_progress" / "chunk-0000004.json").exists()
    (out / "_progress" / "chunk-0000000.json").write_text("{not json")  # corrupt progress file
    other = _params(tmp_path / "store", prompt_set="shapes:1", num_prompts=5, seed=4)  # different sampling seed
    summary = run_evaluate(other, pipeline=pipe, out_uri=str(out))
    run_evaluate(other, pipeline=pipe, out_uri=str(tmp_path / "fresh"))
    assert (out / "results.jsonl").read_text() == (tmp_path / "fresh" / "results.jsonl").read_text()
    assert summary["seed"] == 4
