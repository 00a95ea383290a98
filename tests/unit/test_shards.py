"""miroflow.data.shards on local files: deterministic writing, safe reading, manifests, webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from miroflow.data.sample import Sample
from miroflow.data.shards import (
    ManifestError,
    ShardError,
    decode_image,
    encode_image,
    iter_shard,
    iter_tar_groups,
    make_webdataset,
    read_manifest,
    split_member_name,
    wds_url,
    write_manifest,
    write_shards,
)
from miroflow.storage import Storage


@pytest.fixture
def storage() -> Storage:
    return Storage(retries=0)


def make_samples(n: int, seed: int = 0, split: str = "train") -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(
            key=f"{split}-{i:08d}",
            image=rng.integers(0, 256, (6 + i % 3, 5, 3), dtype=np.uint8),
            caption=f"a red circle number {i} ✓",
            meta={"scene": {"objects": i}, "swapped": bool(i % 2), "score": np.float32(0.5)},
        )
        for i in range(n)
    ]


def add_member(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


class _Payload:
    """Unpickling this creates the file at ``path`` (stands in for arbitrary code execution)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_round_trip(tmp_path: Path, storage: Storage) -> None:
    samples = make_samples(5)
    entries = write_shards(samples, str(tmp_path / "shards"), "train", 2, storage, progress=False)
    assert [Path(e["uri"]).name for e in entries] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [e["n"] for e in entries] == [2, 2, 1]
    for e in entries:
        assert e["sha256"] == hashlib.sha256(Path(e["uri"]).read_bytes()).hexdigest()
    recs = [r for e in entries for r in iter_shard(e["uri"], storage)]
    assert [r["key"] for r in recs] == [s.key for s in samples]
    for r, s in zip(recs, samples, strict=True):
        assert r["image_ext"] == "png"
        np.testing.assert_array_equal(decode_image(r["image_bytes"]), s.image)
        assert r["txt"] == s.caption
        assert r["json"]["caption"] == s.caption
        assert r["json"]["scene"] == s.meta["scene"] and r["json"]["score"] == 0.5
        assert r["shard"] in {e["uri"] for e in entries}


def test_deterministic_bytes_and_member_layout(tmp_path: Path, storage: Storage) -> None:
    a = write_shards(make_samples(4), str(tmp_path / "a"), "train", 3, storage, progress=False)
    b = write_shards(make_samples(4), str(tmp_path / "b"), "train", 3, storage, progress=False)
    assert [e["sha256"] for e in a] == [e["sha256"] for e in b]
    c = write_shards(make_samples(4, seed=1), str(tmp_path / "c"), "train", 3, storage, progress=False)
    assert c[0]["sha256"] != a[0]["sha256"]
    with tarfile.open(a[0]["uri"]) as tf:
        members = tf.getmembers()
    assert [m.name for m in members][:3] == ["train-00000000.png", "train-00000000.json", "train-00000000.txt"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in members)


def test_encoded_jpeg_kept_verbatim(tmp_path: Path, storage: Storage) -> None:
    img = np.full((16, 16, 3), 120, np.uint8)
    jpg = encode_image(img, "jpg")
    s = Sample(key="val-00000000", image=None, caption="grey", encoded=jpg, image_ext="jpeg")
    (entry,) = write_shards([s], str(tmp_path), "val", 10, storage, progress=False)
    (rec,) = iter_shard(entry["uri"], storage)
    assert rec["image_ext"] == "jpg" and rec["image_bytes"] == jpg
    assert np.abs(decode_image(jpg).astype(int) - 120).max() <= 2


def test_write_rejects_bad_input(tmp_path: Path, storage: Storage) -> None:
    good = make_samples(1)[0]
    with pytest.raises(ShardError, match="invalid sample key '../x'"):
        write_shards(
            [Sample(key="../x", image=good.image, caption="c")], str(tmp_path), "t", 2, storage, progress=False
        )
    with pytest.raises(ShardError, match="duplicate sample key"):
        write_shards([good, good], str(tmp_path), "t", 5, storage, progress=False)
    with pytest.raises(ShardError, match="uint8"):
        bad = Sample(key="k", image=np.zeros((4, 4), np.float32), caption="c")
        write_shards([bad], str(tmp_path), "t", 5, storage, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        write_shards([good], str(tmp_path), "t", 0, storage, progress=False)
    assert write_shards([], str(tmp_path / "empty"), "t", 5, storage, progress=False) == []


def test_manifest_round_trip_and_errors(tmp_path: Path, storage: Storage) -> None:
    entries = write_shards(make_samples(3), str(tmp_path / "s"), "train", 2, storage, progress=False)
    path = tmp_path / "manifests" / "shards.json"
    m = write_manifest(path, entries, root=str(tmp_path), extra={"params_hash": "abc"})
    assert m["num_samples"] == 3 and m["version"] == 1 and m["params_hash"] == "abc"
    text = path.read_text()
    assert text == json.dumps(m, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert read_manifest(path) == m
    write_manifest(path, entries, root=str(tmp_path), extra={"params_hash": "abc"})
    assert path.read_text() == text  # deterministic

    with pytest.raises(ManifestError, match="missing.json"):
        read_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json"):
        read_manifest(bad)
    bad.write_text(json.dumps({"version": 1, "root": "x", "shards": [{"uri": "u", "sha256": "zz", "n": 1}]}))
    with pytest.raises(ManifestError, match=r"bad.json: shards\[0\]"):
        read_manifest(bad)
    with pytest.raises(ValueError, match="override"):
        write_manifest(path, entries, root="r", extra={"shards": []})


def test_decode_image_errors() -> None:
    with pytest.raises(ValueError, match="cannot decode thing.jpg"):
        decode_image(b"\xff\xd8\xff\xe0 garbage", name="thing.jpg")
    png = encode_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(png[: len(png) // 2])  # truncated
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    grey = io.BytesIO()
    from PIL import Image

    Image.new("L", (3, 2), 7).save(grey, format="PNG")
    out = decode_image(grey.getvalue())
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8 and (out == 7).all()


def _bomb_png(side: int = 10_000) -> bytes:
    """A 1-bit PNG of ``side`` x ``side`` zeros: a few KB on disk, ``3·side²`` bytes decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_refuses_a_decompression_bomb_from_its_header() -> None:
    bomb = _bomb_png()
    assert len(bomb) < 200_000  # small file, 100 megapixels
    with pytest.raises(ValueError, match=r"bomb.png: 10000x10000 = 100,000,000 pixels exceeds .*data\.max_pixels"):
        decode_image(bomb, name="bomb.png")
    small = encode_image(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="600 pixels exceeds the limit of 599"):
        decode_image(small, max_pixels=599)
    assert decode_image(small, max_pixels=600).shape == (20, 30, 3)  # the limit itself is allowed


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train-00000001.png", ("train-00000001", "png")),
        ("k.JSON", ("k", "json")),
        ("../../x", "unsafe"),
        ("../../x.jpg", "unsafe"),
        ("/etc/passwd.txt", "unsafe"),
        ("a\\b.txt", "unsafe"),
        ("dir/k.jpg", "invalid key 'dir/k'"),
        ("noext", "no '<key>.<ext>'"),
        ("bad key.txt", "invalid key"),
    ],
)
def test_split_member_name(name: str, expected: Any) -> None:
    got = split_member_name(name)
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert isinstance(got, str) and expected in got


def _evil_shard(path: Path, marker: Path) -> None:
    good = encode_image(np.zeros((4, 4, 3), np.uint8))
    with tarfile.open(path, "w") as tf:
        add_member(tf, "ok-0.png", good)
        add_member(tf, "ok-0.txt", b"fine")
        add_member(tf, "evil-1.png", good)
        add_member(tf, "evil-1.txt", b"evil")
        add_member(tf, "evil-1.pyd", pickle.dumps(_Payload(marker)))
        add_member(tf, "evil-2.pickle", pickle.dumps(_Payload(marker)))
        add_member(tf, "ok-3.png", good)
        add_member(tf, "ok-3.json", b'{"caption": "c3"}')


def test_payload_really_is_malicious(tmp_path: Path) -> None:
    """Sanity check for the tests below: unpickling the payload does create the file."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_iter_shard_rejects_pickle_members(tmp_path: Path, storage: Storage) -> None:
    marker = tmp_path / "pwned"
    shard = tmp_path / "evil.tar"
    _evil_shard(shard, marker)
    rejected: list[dict[str, str]] = []
    keys = [r["key"] for r in iter_shard(str(shard), storage, on_reject=rejected.append)]
    assert keys == ["ok-0", "ok-3"]
    assert {r["key"] for r in rejected} == {"evil-1", "evil-2"}
    assert all("pickle" in r["reason"] and r["source"] == str(shard) for r in rejected)
    with pytest.raises(ShardError, match=r"evil.tar key 'evil-1': pickle member"):
        list(iter_shard(str(shard), storage))
    assert not marker.exists()


def test_webdataset_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    shard = tmp_path / "evil.tar"
    _evil_shard(shard, marker)
    recs = list(make_webdataset([str(shard)]))
    assert [r["key"] for r in recs] == ["ok-0", "ok-3"]
    assert recs[1]["json"] == {"caption": "c3"} and recs[1]["txt"] is None
    assert recs[0]["image"].shape == (4, 4, 3)
    assert not marker.exists()


def test_iter_shard_rejects_unsafe_members(tmp_path: Path, storage: Storage) -> None:
    good = encode_image(np.zeros((4, 4, 3), np.uint8))
    shard = tmp_path / "unsafe.tar"
    with tarfile.open(shard, "w") as tf:
        add_member(tf, "../../x.png", good)
        add_member(tf, "/abs/y.png", good)
        add_member(tf, "link.png", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tf, "k-1.png", good)
        add_member(tf, "k-1.txt", b"ok")
        add_member(tf, "k-2.txt", b"no image")
        add_member(tf, "k-3.png", good)
        add_member(tf, "k-3.json", b"[1, 2]")
        add_member(tf, "k-1.txt", b"again")  # key seen before
    rejected: list[dict[str, str]] = []
    recs = list(iter_shard(str(shard), storage, on_reject=rejected.append))
    assert [r["key"] for r in recs] == ["k-1"]
    reasons = {r.get("member") or r.get("key"): r["reason"] for r in rejected}
    assert "unsafe" in reasons["../../x.png"]
    assert "unsafe" in reasons["/abs/y.png"]
    assert "not a regular file" in reasons["link.png"]
    assert "missing image" in reasons["k-2"]
    assert "not a JSON object" in reasons["k-3"]
    assert "duplicate key" in reasons["k-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsafe.tar"]  # nothing extracted


def test_iter_shard_corrupt_tar_names_shard(tmp_path: Path, storage: Storage) -> None:
    entries = write_shards(make_samples(2), str(tmp_path), "train", 5, storage, progress=False)
    data = Path(entries[0]["uri"]).read_bytes()
    bad = tmp_path / "trunc.tar"
    bad.write_bytes(data[:700])
    with pytest.raises(ShardError, match="trunc.tar"):
        list(iter_shard(str(bad), storage))


def test_webdataset_local_file_uris(tmp_path: Path, storage: Storage) -> None:
    samples = make_samples(5)
    entries = write_shards(samples, f"file://{tmp_path}/shards", "train", 2, storage, progress=False)
    assert entries[0]["uri"].startswith("file://")
    assert wds_url(entries[0]["uri"]) == f"{tmp_path}/shards/train-000000.tar"
    recs = list(make_webdataset([e["uri"] for e in entries], decode_images=False))
    assert [r["key"] for r in recs] == [s.key for s in samples]
    assert "image" not in recs[0] and recs[0]["image_bytes"].startswith(b"\x89PNG")


# --------------------------------------------------------------------------- the lean tar reader
def _tar_bytes(fmt: int, members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "../../etc/passwd"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_lean_reader_matches_tarfile(fmt: int) -> None:
    from miroflow.data.tar_reader import _iter_tar

    long_dir = "d" * 120  # ustar: split into prefix/name; GNU: ././@LongLink; pax: path record
    members = [
        ("k0.png", b"\x89PNG" * 100, tarfile.REGTYPE),
        ("k0.txt", b"", tarfile.REGTYPE),
        (f"{long_dir}/k1.txt", b"x" * 513, tarfile.REGTYPE),
        ("k2.json", b"{}", tarfile.REGTYPE),
        ("sub", b"", tarfile.DIRTYPE),
        ("k3.txt", b"", tarfile.SYMTYPE),
        ("k4.txt", b"after", tarfile.REGTYPE),
    ]
    if fmt == tarfile.PAX_FORMAT:
        members.append(("kä.txt", b"non-ascii name", tarfile.REGTYPE))
    raw = _tar_bytes(fmt, members)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tf:
        want = [(m.name, m.isfile(), m.size, tf.extractfile(m).read() if m.isfile() else None) for m in tf]  # type: ignore[union-attr]
    got = []
    for m in _iter_tar(io.BytesIO(raw), "s.tar"):
        got.append((m.name, m.regular, m.size, m.read() if m.regular else None))
    assert got == want and len(got) == len(members)
    # members skipped without reading still leave the stream aligned
    names = [m.name for m in _iter_tar(io.BytesIO(raw), "s.tar")]
    assert names == [w[0] for w in want]


def test_lean_reader_rejects_corrupt_tars() -> None:
    from miroflow.data.tar_reader import _iter_tar

    raw = _tar_bytes(tarfile.GNU_FORMAT, [("k0.txt", b"hello" * 300, tarfile.REGTYPE)])
    flipped = bytearray(raw)
    flipped[10] ^= 0x01  # name byte changed: checksum no longer matches
    with pytest.raises(ShardError, match="bad.tar.*checksum"):
        list(_iter_tar(io.BytesIO(bytes(flipped)), "bad.tar"))
    with pytest.raises(ShardError, match="cut.tar.*truncated"):
        for m in _iter_tar(io.BytesIO(raw[:700]), "cut.tar"):
            m.read()
    with pytest.raises(ShardError, match="empty.tar.*empty"):
        list(_iter_tar(io.BytesIO(b""), "empty.tar"))
    with pytest.raises(ShardError, match="junk.tar"):
        list(_iter_tar(io.BytesIO(b"not a tar at all" * 64), "junk.tar"))


def test_members_readers_do_not_use_are_skipped_unread() -> None:
    """A large side member (``.npy`` here) is skipped unread with ``keep``, not held nor refused."""
    png = encode_image(np.zeros((4, 4, 3), np.uint8))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("k1.png", png), ("k1.npy", b"\0" * 3_000_000), ("k1.txt", b"cap")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rejected: list[dict[str, Any]] = []
    every = list(iter_tar_groups(io.BytesIO(buf.getvalue()), "s.tar", rejected.append, max_member_bytes=1_000_000))
    assert every == [] and "too large" in rejected[0]["reason"]  # without keep: read and judged
    kept = list(
        iter_tar_groups(io.BytesIO(buf.getvalue()), "s.tar", None, max_member_bytes=1_000_000, keep={"png", "txt"})
    )
    assert [(k, sorted(g)) for k, g in kept] == [("k1", ["png", "txt"])]
    assert kept[0][1]["txt"] == b"cap"
