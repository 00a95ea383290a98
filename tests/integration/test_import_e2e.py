"""Imported data trains (issue 11 item 3): a cc12m-style tar of mixed sizes and modes goes through
prepare -> score -> bin -> embed -> train -> evaluate via the stage entry points, and the bad inputs
of that path (a shapes-only reward, the shapes prompt set, ``data.min_side``) are refused or recorded.

See docs/architecture.md, "Imported data": the import brings every image to ``data.resolution``
(RGB, centre crop, Lanczos resize, PNG), records ``orig_width``/``orig_height``, and the import
domain's default rewards are the weight-free image rewards.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from miroflow import stages
from miroflow.cli import app
from miroflow.config import IMPORT_DEFAULT_REWARDS, Params, load_params
from miroflow.data.importers import preprocess_image
from miroflow.data.shards import decode_image, iter_shard
from miroflow.storage import Storage

RES = 32
#: (width, height, PIL mode, member extension) of the source images, cycled over the samples.
SIZES = [(40, 30), (64, 64), (100, 50), (33, 77)]
MODES = [("RGB", "jpg"), ("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")]
CAPTIONS = [
    "a red car parked on a street",
    "a dog running on the beach",
    "a bowl of fruit on a wooden table",
    "mountains under a cloudy sky",
    "a city skyline at night",
    "a cat sleeping on a sofa",
    "a bicycle leaning against a wall",
    "a plate of pasta with tomato sauce",
]
N_SAMPLES = 20
PROMPTS = "# prompts for the imported-data model\na dog on the beach\n\na red car\na bowl of fruit\n"


def _picture(i: int, width: int, height: int) -> np.ndarray:
    """A deterministic ``uint8 [height, width, 3]`` photo stand-in: a colour gradient, a bar and some noise."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(0, 255, 3)
    img = base + 120 * np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(-1, 1, 3)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    img[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.uniform(0, 255, 3)
    img += rng.normal(0, rng.uniform(0, 20), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(rgb: np.ndarray, mode: str, ext: str) -> bytes:
    """``rgb`` saved in PIL ``mode`` as PNG or JPEG (CMYK only as JPEG)."""
    img = Image.fromarray(rgb, "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.quantize(colors=16)
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(np.full(rgb.shape[:2], 200, np.uint8), "L"))
    elif mode == "CMYK":
        img = img.convert("CMYK")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if ext == "jpg" else "PNG", **({"quality": 95} if ext == "jpg" else {}))
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def cc12m_source(folder: Path, n: int = N_SAMPLES) -> dict[str, tuple[int, int, bytes]]:
    """Write ``folder/00000.tar`` (img2dataset layout: ``{key}.jpg|png``, ``.txt``, ``.json``) of ``n``
    samples; returns ``{caption: (width, height, image bytes)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[int, int, bytes]] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(n):
            (w, h), (mode, ext) = SIZES[i % len(SIZES)], MODES[i % len(MODES)]
            key = f"{i:09d}"
            data = _encode(_picture(i, w, h), mode, ext)
            caption = f"{CAPTIONS[i % len(CAPTIONS)]}, photo {i}"
            _add(tf, f"{key}.{ext}", data)
            _add(tf, f"{key}.txt", caption.encode())
            meta = {"key": key, "url": f"http://example.invalid/{key}.{ext}", "width": w, "height": h}
            _add(tf, f"{key}.json", json.dumps(meta).encode())
            out[caption] = (w, h, data)
    (folder / "00000.tar").write_bytes(buf.getvalue())
    return out


def _overrides(tmp: Path, *extra: str) -> list[str]:
    m = tmp / "manifests"
    return [
        f"storage.root={tmp / 'store'}",
        "data.domain=import",
        f"data.import_uri={tmp / 'incoming'}",
        f"data.resolution={RES}",
        "data.shard_size=8",
        f"data.manifest={m / 'shards.json'}",
        f"score.manifest={m / 'scores.json'}",
        f"score.bins={m / 'bins.json'}",
        "score.num_bins=4",
        "score.device=cpu",
        "train.run_name=imported",
        "train.model=tiny",
        "train.device=cpu",
        "train.steps=24",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.log_every=4",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        "train.sample_steps=2",
        "tracking.enabled=false",
        f"eval.prompt_set=txt:{tmp / 'prompts.txt'}",
        "eval.images_per_prompt=2",
        "eval.steps=2",
        *extra,
    ]


def test_imported_cc12m_tar_trains_and_evaluates_end_to_end(tmp_path: Path) -> None:
    source = cc12m_source(tmp_path / "incoming")
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    params = load_params(None, _overrides(tmp_path))
    # score.rewards / train.rewards / sweep.select_by not given: the import domain's defaults
    assert tuple(params.score.rewards) == IMPORT_DEFAULT_REWARDS and params.train.rewards is None
    assert params.sweep.select_by == IMPORT_DEFAULT_REWARDS[0]
    assert stages.check_params(params) == []

    # prepare: every image is RGB at data.resolution, its original size recorded
    prep = stages.prepare(params)
    assert prep.domain == "import" and prep.num_samples == N_SAMPLES and prep.rejected == ()
    manifest = json.loads(Path(params.data.manifest).read_text())
    assert manifest["preprocess"]["resolution"] == RES and manifest["preprocess"]["filter"] == "lanczos"
    storage = Storage(retries=0)
    records = [r for s in prep.shards for r in iter_shard(s.uri, storage)]
    assert len(records) == N_SAMPLES
    seen_sizes = set()
    for rec in records:
        assert rec["image_ext"] == "png"
        with Image.open(io.BytesIO(rec["image_bytes"])) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (RES, RES))
        w, h, original = source[rec["txt"]]
        assert (rec["json"]["orig_width"], rec["json"]["orig_height"]) == (w, h)
        seen_sizes.add((w, h))
        # exactly the documented preprocessing of the decoded original (PNG is lossless)
        assert np.array_equal(decode_image(rec["image_bytes"]), preprocess_image(decode_image(original), RES))
    assert seen_sizes == set(SIZES)

    # score + bin: the weight-free image rewards, all finite, bins fitted on every sample
    sc = stages.score(params)
    assert set(sc.rewards) == set(IMPORT_DEFAULT_REWARDS) and sc.num_rows == N_SAMPLES and sc.failures == 0
    bins = stages.bin_scores(params)
    assert bins.names == IMPORT_DEFAULT_REWARDS and bins.num_bins == 4
    assert bins.counts == dict.fromkeys(IMPORT_DEFAULT_REWARDS, N_SAMPLES)

    # embed + train (tiny model, pixel space at 32 px)
    assert stages.embed(params).sidecars == len(prep.shards)
    tr = stages.train(params)
    assert tr.steps == params.train.steps and tr.loss is not None and math.isfinite(tr.loss) and tr.kind == "miro"

    # evaluate: the user's prompt file, the reward metrics, no shapes judge
    ev = stages.evaluate(params)
    assert ev.n_prompts == 3 and ev.n_images == 6 and ev.prompt_set.startswith("txt:")
    assert set(ev.rewards) == set(IMPORT_DEFAULT_REWARDS)
    for name, stat in ev.rewards.items():
        assert stat.n == 6 and stat.mean is not None and 0.0 <= stat.mean <= 1.0, (name, stat)
    assert ev.accuracy == {} and ev.overall is None
    assert set(ev.metrics()) == {f"eval/reward/{n}" for n in IMPORT_DEFAULT_REWARDS}
    assert ev.model["reward_names"] == list(IMPORT_DEFAULT_REWARDS)


# --------------------------------------------------------------------------- bad inputs


def test_shapes_only_reward_for_imported_data_is_one_line_naming_reward_and_domain(tmp_path: Path) -> None:
    cc12m_source(tmp_path / "incoming", n=2)
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = ["prepare", "-p", str(tmp_path / "empty.yaml")]
    for item in _overrides(tmp_path, "score.rewards=[sharpness,shapes_alignment]"):
        args += ["-S", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "score.rewards: 'shapes_alignment' scores shapes captions only; not valid for data.domain=import" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "manifests" / "shards.json").exists()  # refused before any work


def test_shapes_prompt_set_is_refused_when_evaluating_imported_data(tmp_path: Path) -> None:
    params = load_params(None, _overrides(tmp_path, "eval.prompt_set=shapes:1"))
    with pytest.raises(stages.PreflightError) as err:
        stages.evaluate(params)
    line = next(p for p in err.value.problems if p.startswith("eval.prompt_set:"))
    assert "shapes captions; not valid for data.domain=import" in line and "txt:<file>" in line


def test_min_side_rejections_are_recorded_never_dropped(tmp_path: Path) -> None:
    cc12m_source(tmp_path / "incoming", n=8)
    params = load_params(None, _overrides(tmp_path, "data.min_side=40"))
    prep = stages.prepare(params)
    small = [(w, h) for i in range(8) for (w, h) in [SIZES[i % len(SIZES)]] if min(w, h) < 40]
    assert prep.num_samples == 8 - len(small) and len(prep.rejected) == len(small) == 4
    reasons = [str(r["reason"]) for r in prep.rejected]
    assert all(str(r["source"]).endswith("00000.tar") and r["key"] for r in prep.rejected), prep.rejected
    assert all("below data.min_side=40" in reason for reason in reasons), reasons
    assert {reason.split(":")[0] for reason in reasons} == {"image 40x30", "image 33x77"}
    manifest = json.loads(Path(params.data.manifest).read_text())
    assert manifest["rejected"] == list(prep.rejected) and manifest["preprocess"]["min_side"] == 40
    kept = [r for s in prep.shards for r in iter_shard(s.uri, Storage(retries=0))]
    assert sorted((r["json"]["orig_width"], r["json"]["orig_height"]) for r in kept) == sorted(
        [(64, 64), (100, 50)] * 2
    )


def test_default_params_stay_the_shapes_defaults() -> None:
    p = Params()
    assert "shapes_alignment" in p.score.rewards and p.sweep.select_by == "shapes_alignment"
