"""miroflow.data.importers: re-sharding cc12m-style tars, locally and from S3."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from miroflow.data.importers import center_crop_box, import_tars, preprocess_image
from miroflow.data.shards import ShardError, decode_image, encode_image, iter_shard
from miroflow.storage import Storage


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _jpeg(value: int) -> bytes:
    return encode_image(np.full((12, 10, 3), value, np.uint8), "jpg")


def cc12m_tar(good: int, start: int = 0, extra: bool = True) -> bytes:
    """A cc12m/img2dataset-style tar: ``good`` valid samples, plus (if ``extra``) bad ones."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(start, start + good):
            key = f"{i:09d}"
            _add(tf, f"{key}.jpg", _jpeg(10 * i % 250))
            _add(tf, f"{key}.txt", f"photo number {i}".encode())
            _add(tf, f"{key}.json", json.dumps({"url": f"http://example.invalid/{i}.jpg", "key": key}).encode())
        if extra:
            jpg = _jpeg(50)
            _add(tf, "100000001.jpg", jpg[: len(jpg) // 3])  # corrupt (truncated) JPEG
            _add(tf, "100000001.txt", b"a corrupt one")
            _add(tf, "../../x", b"escape attempt")  # unsafe member name
            _add(tf, "100000002.jpg", _jpeg(60))  # no caption anywhere
            _add(tf, "100000002.json", b"{}")
            _add(tf, "100000003.jpg", _jpeg(70))
            _add(tf, "100000003.txt", b"with pickle")
            _add(tf, "100000003.pyd", pickle.dumps({"x": 1}))
    return buf.getvalue()


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_import_local_keeps_good_reports_bad_writes_only_target(tmp_path: Path) -> None:
    storage = Storage(retries=0)
    work = tmp_path / "work"
    src = work / "incoming"
    target = work / "store" / "shards"
    src.mkdir(parents=True)
    (src / "part-00000.tar").write_bytes(cc12m_tar(good=5))
    (src / "part-00001.tar").write_bytes(cc12m_tar(good=2, start=5, extra=False))
    (src / "README").write_text("not a tar")
    before = _snapshot(tmp_path)
    outside_before = set(os.listdir(tmp_path.parent))
    cwd_x_existed = (Path.cwd().parent.parent / "x").exists()

    report = import_tars(str(src), str(target), "train", 3, storage, progress=False)

    assert report.num_ok == 7
    assert [Path(e["uri"]).name for e in report.entries] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sum(e["n"] for e in report.entries) == 7
    by_what = {r.get("member") or r.get("key"): r for r in report.rejected}
    assert set(by_what) == {"100000001", "../../x", "100000002", "100000003"}
    assert "corrupt image" in by_what["100000001"]["reason"]
    assert "unsafe member name" in by_what["../../x"]["reason"]
    assert "caption" in by_what["100000002"]["reason"]
    assert "pickle" in by_what["100000003"]["reason"]
    assert all(r["source"] == str(src / "part-00000.tar") for r in report.rejected)

    # only the target shards appeared; nothing next to the tmp dir or above the target
    after = _snapshot(tmp_path)
    assert after - before == {"work/store", "work/store/shards"} | {
        f"work/store/shards/train-00000{i}.tar" for i in range(3)
    }
    assert set(os.listdir(tmp_path.parent)) == outside_before
    assert not (Path.cwd().parent.parent / "x").exists() or cwd_x_existed

    recs = [r for e in report.entries for r in iter_shard(e["uri"], storage)]
    assert [r["key"] for r in recs] == [f"train-{n:08d}" for n in range(7)]
    first = recs[0]
    assert first["image_ext"] == "jpg"
    assert first["image_bytes"] == _jpeg(0)  # original JPEG bytes kept
    assert first["txt"] == "photo number 0"
    assert first["json"]["source"]["key"] == "000000000"
    assert first["json"]["source"]["json"]["url"] == "http://example.invalid/0.jpg"
    assert decode_image(recs[6]["image_bytes"]).shape == (12, 10, 3)


def test_import_is_deterministic(tmp_path: Path) -> None:
    storage = Storage(retries=0)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.tar").write_bytes(cc12m_tar(good=4))
    r1 = import_tars(str(tmp_path / "src"), str(tmp_path / "o1"), "train", 10, storage, progress=False)
    r2 = import_tars(str(tmp_path / "src"), str(tmp_path / "o2"), "train", 10, storage, progress=False)
    assert r1.entries[0]["sha256"] == r2.entries[0]["sha256"]


def test_import_rejects_images_over_max_pixels_and_keeps_the_rest(tmp_path: Path) -> None:
    from PIL import Image

    big = io.BytesIO()
    Image.new("1", (4000, 3000), 1).save(big, format="PNG")  # 12 MP from a tiny file
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "000000001.jpg", _jpeg(10))
        _add(tf, "000000001.txt", b"an ordinary photo")
        _add(tf, "000000002.png", big.getvalue())
        _add(tf, "000000002.txt", b"a decompression bomb")
        _add(tf, "000000003.jpg", _jpeg(30))
        _add(tf, "000000003.txt", b"another ordinary photo")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.tar").write_bytes(buf.getvalue())
    storage = Storage(retries=0)
    report = import_tars(
        str(tmp_path / "src"), str(tmp_path / "out"), "train", 10, storage, progress=False, max_pixels=1_000_000
    )
    assert report.num_ok == 2
    assert [r["key"] for r in report.rejected] == ["000000002"]
    assert "12,000,000 pixels exceeds the limit of 1,000,000" in report.rejected[0]["reason"]
    captions = [r["txt"] for r in iter_shard(report.entries[0]["uri"], storage)]
    assert captions == ["an ordinary photo", "another ordinary photo"]
    # with the default limit (64 MP) the same image is kept
    assert import_tars(str(tmp_path / "src"), str(tmp_path / "o2"), "train", 10, storage, progress=False).num_ok == 3


def test_import_no_tars_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .tar files found under"):
        import_tars(str(tmp_path), str(tmp_path / "out"), "train", 10, Storage(retries=0), progress=False)


def test_import_from_s3_to_s3(moto_server: str, s3_bucket: str) -> None:
    storage = Storage(retries=1, backoff_s=0.01)
    storage.write_bytes(f"s3://{s3_bucket}/raw/cc12m/00000.tar", cc12m_tar(good=3))
    report = import_tars(
        f"s3://{s3_bucket}/raw/cc12m/", f"s3://{s3_bucket}/store/shards", "train", 2, storage, progress=False
    )
    assert report.num_ok == 3 and len(report.rejected) == 4
    assert storage.list(f"s3://{s3_bucket}/") == sorted(
        [f"s3://{s3_bucket}/raw/cc12m/00000.tar"] + [e["uri"] for e in report.entries]
    )
    recs = [r for e in report.entries for r in iter_shard(e["uri"], storage)]
    assert [r["txt"] for r in recs] == ["photo number 0", "photo number 1", "photo number 2"]


def test_truncated_tar_keeps_the_complete_sample_before_the_cut(tmp_path: Path) -> None:
    whole = cc12m_tar(good=3, extra=False)
    # cut inside the header of the third sample's first member: samples 0 and 1 are whole
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        offsets = [m.offset for m in tf.getmembers()]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.tar").write_bytes(whole[: offsets[6] + 100])
    report = import_tars(str(tmp_path / "src"), str(tmp_path / "out"), "train", 10, Storage(retries=0), progress=False)
    assert report.num_ok == 2
    assert [r["txt"] for r in iter_shard(report.entries[0]["uri"], Storage(retries=0))] == [
        "photo number 0",
        "photo number 1",
    ]
    assert any("truncated" in r["reason"] for r in report.rejected)


@pytest.mark.parametrize("content", [b"", b"this is not a tar file at all" * 40, tarfile.BLOCKSIZE * 2 * b"\0"])
def test_empty_or_non_tar_source_is_an_error_not_zero_samples(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.tar").write_bytes(content)
    with pytest.raises(ShardError, match=r"no usable sample in 1 tar file"):
        import_tars(str(tmp_path / "src"), str(tmp_path / "out"), "train", 10, Storage(retries=0), progress=False)


# --------------------------------------------------------------------------- preprocessing (data.resolution)
@pytest.mark.parametrize(
    ("size", "box"),
    [((100, 50), (25, 0, 75, 50)), ((33, 77), (0, 22, 33, 55)), ((64, 64), (0, 0, 64, 64)), ((41, 30), (5, 0, 35, 30))],
)
def test_center_crop_box_is_the_largest_centred_square(size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    assert center_crop_box(*size) == box


def test_preprocess_image_keeps_the_centre_square_only() -> None:
    # red | blue | green bands, 100x50: the centre square is the blue band
    bands = np.zeros((50, 100, 3), np.uint8)
    bands[:, :25] = [255, 0, 0]
    bands[:, 25:75] = [0, 0, 255]
    bands[:, 75:] = [0, 255, 0]
    for res in (16, 64):  # down- and upscaled
        out = preprocess_image(bands, res)
        assert out.shape == (res, res, 3) and out.dtype == np.uint8
        assert out[..., :2].max() <= 32 and out[..., 2].min() >= 224  # Lanczos's support barely reaches past the box
    square = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert preprocess_image(square, 32) is square  # already at the resolution: untouched
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        preprocess_image(square[..., 0], 32)


def test_import_with_resolution_resizes_records_sizes_and_rejects_below_min_side(tmp_path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    sizes = {"000000001": (12, 10), "000000002": (80, 40), "000000003": (30, 90)}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, (w, h) in sizes.items():
            png = io.BytesIO()
            Image.new("P", (w, h), 3).save(png, format="PNG")
            _add(tf, f"{key}.png", png.getvalue())
            _add(tf, f"{key}.txt", f"image {key}".encode())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.tar").write_bytes(buf.getvalue())
    storage = Storage(retries=0)
    report = import_tars(
        str(tmp_path / "src"), str(tmp_path / "out"), "train", 10, storage, progress=False, resolution=16, min_side=20
    )
    assert report.num_ok == 2
    assert report.rejected == [
        {
            "source": str(tmp_path / "src" / "a.tar"),
            "key": "000000001",
            "reason": "image 12x10: shorter side 10 px is below data.min_side=20",
        }
    ]
    recs = list(iter_shard(report.entries[0]["uri"], storage))
    assert [(r["json"]["orig_width"], r["json"]["orig_height"]) for r in recs] == [(80, 40), (30, 90)]
    for r in recs:
        assert r["image_ext"] == "png" and decode_image(r["image_bytes"]).shape == (16, 16, 3)
    # min_side off (the default): nothing is dropped, the 12x10 image is upscaled
    kept = import_tars(str(tmp_path / "src"), str(tmp_path / "o2"), "train", 10, storage, progress=False, resolution=16)
    assert kept.num_ok == 3 and kept.rejected == []
