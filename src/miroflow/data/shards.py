"""Webdataset shards: deterministic writing, safe reading, manifests, and a webdataset reader.

Layout (see ``docs/architecture.md``): ``<prefix>/{split}-{i:06d}.tar``; each sample ``key`` has
members ``{key}.png`` (or ``.jpg``), ``{key}.json`` and ``{key}.txt``, in that order.

Writing is deterministic: the same samples give byte-identical shards (tar mtime 0, uid/gid 0,
empty owner names, mode 0644, USTAR headers, fixed member order, deterministic PNG encoding).

Reading never trusts tar member names: they are only split into ``key`` + ``ext`` strings and
validated; nothing is ever extracted to the filesystem. Pickle-bearing members (``.pyd``,
``.pickle``, ``.pkl``, ``.pt``, ``.pth``) are rejected and never unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import webdataset
from PIL import Image
from tqdm.auto import tqdm

from miroflow.data.sample import Sample
from miroflow.data.tar_reader import (
    KEY_RE,
    PICKLE_EXTS,
    SOURCE_KEY_RE,
    RejectFn,
    ShardError,
    iter_tar_groups,
    reject,
    split_member_name,
)
from miroflow.errors import InputError
from miroflow.storage import Storage, StorageError, join_uri, parse_uri

log = logging.getLogger(__name__)


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
#: The member extensions :func:`group_to_record` uses; readers skip every other member unread.
RECORD_EXTS = frozenset((*IMAGE_EXTS, "txt", "json"))
#: Largest image (width x height) decoded by default: about 64 megapixels (``data.max_pixels``).
DEFAULT_MAX_PIXELS = 64_000_000
#: Order of members within a sample when writing.
_EXT_ORDER = {"img": 0, "json": 1, "txt": 2}
#: Shards larger than this are spooled to a temp file instead of memory while being built.
_SPOOL_BYTES = 64 * 1024 * 1024


class ManifestError(InputError, ValueError):
    """A manifest file is missing or malformed. The message names the file."""


# ---------------------------------------------------------------------------------------- images


def encode_image(image: np.ndarray, image_format: str = "png") -> bytes:
    """Encode a ``uint8 [H, W, 3]`` RGB array as PNG (lossless) or JPEG (quality 95), deterministically."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    fmt = _norm_ext(image_format)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=95, optimize=False, progressive=False)
    else:
        raise ValueError(f"unsupported image_format {image_format!r}; use 'png' or 'jpg'")
    return buf.getvalue()


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to a ``uint8 [H, W, 3]`` RGB array (via PIL, fully loaded).

    The header's width × height is checked against ``max_pixels`` before any pixel is decoded, so
    a small file that would expand to gigabytes (a decompression bomb) costs nothing.

    Raises:
        ValueError: the bytes are not a decodable image, or exceed ``max_pixels`` (message names
            ``name``, the size and the limit).
    """
    if not data:
        raise ValueError(f"cannot decode {name}: empty data")

    def failed(e: Exception) -> ValueError:
        return ValueError(f"cannot decode {name} ({len(data)} bytes): {type(e).__name__}: {e}")

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise failed(e) from e
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(
                f"cannot decode {name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (data.max_pixels)"
            )
        try:
            img.load()  # force full decode: truncated/corrupt data fails here
            if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
                # 16-bit grey: keep the high byte (PIL's convert("RGB") clips at 255: a white image)
                grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
                rgb = Image.fromarray(grey, "L").convert("RGB")
            else:
                rgb = img.convert("RGB")
        except Exception as e:
            raise failed(e) from e
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot decode {name}: unexpected decoded shape {list(arr.shape)}")
    return arr


def _norm_ext(ext: str) -> str:
    e = ext.lower().lstrip(".")
    return "jpg" if e == "jpeg" else e


# ---------------------------------------------------------------------------------------- writing


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _sample_members(sample: Sample, image_format: str) -> list[tuple[str, bytes]]:
    """The ``(member name, bytes)`` list of one sample, in the fixed order img, json, txt."""
    key = sample.key
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ShardError(f"invalid sample key {key!r}: keys must match [A-Za-z0-9_-]+")
    if sample.encoded is not None:
        img_bytes, ext = bytes(sample.encoded), _norm_ext(sample.image_ext)
        if ext not in ("png", "jpg", "webp"):
            raise ShardError(f"sample {key!r}: unsupported image_ext {sample.image_ext!r}")
    elif sample.image is not None:
        ext = _norm_ext(image_format)
        try:
            img_bytes = encode_image(sample.image, ext)
        except ValueError as e:
            raise ShardError(f"sample {key!r}: {e}") from e
    else:
        raise ShardError(f"sample {key!r} has neither image nor encoded bytes")
    meta = dict(sample.meta)
    meta.setdefault("caption", sample.caption)
    try:
        meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ShardError(f"sample {key!r}: meta is not JSON-serialisable: {e}") from e
    members = {
        "img": (f"{key}.{ext}", img_bytes),
        "json": (f"{key}.json", meta_bytes),
        "txt": (f"{key}.txt", sample.caption.encode("utf-8")),
    }
    return [members[k] for k in sorted(members, key=_EXT_ORDER.__getitem__)]


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular-file member with fixed metadata (deterministic bytes)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tf.addfile(info, io.BytesIO(data))


def write_shard(samples: Iterable[Sample], uri: str, storage: Storage, image_format: str = "png") -> dict[str, Any]:
    """Write one shard holding ``samples`` to ``uri`` atomically; return ``{"uri", "sha256", "n"}``."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES, mode="w+b")
    try:
        n = 0
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for sample in samples:
                for name, data in _sample_members(sample, image_format):
                    try:
                        _add_member(tf, name, data)
                    except ValueError as e:  # e.g. name too long for USTAR
                        raise ShardError(f"shard {uri}: cannot add member {name!r}: {e}") from e
                n += 1
        spool.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: spool.read(1 << 20), b""):
            digest.update(chunk)
        spool.seek(0)
        with storage.open_write(uri) as out:
            shutil.copyfileobj(spool, out, 1 << 20)
    finally:
        spool.close()
    return {"uri": uri, "sha256": digest.hexdigest(), "n": n}


def write_shards(
    samples: Iterable[Sample],
    out_prefix: str,
    split: str,
    shard_size: int,
    storage: Storage,
    image_format: str = "png",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write ``samples`` as shards ``<out_prefix>/{split}-{i:06d}.tar`` of ``shard_size`` samples each.

    Each shard is built in memory (or a spooled temp file) and written atomically. Keys must be
    unique and match ``[A-Za-z0-9_-]+``. Images given as arrays are encoded as ``image_format``;
    pre-encoded bytes (``Sample.encoded``) are stored as they are with ``Sample.image_ext``.

    Returns:
        Manifest entries ``[{"uri": str, "sha256": hex str, "n": int}]``, one per shard, in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not KEY_RE.match(split):
        raise ValueError(f"split name {split!r} must match [A-Za-z0-9_-]+")
    if _norm_ext(image_format) not in ("png", "jpg"):
        raise ValueError(f"unsupported image_format {image_format!r}; use 'png' or 'jpg'")
    seen: set[str] = set()

    def checked(it: Iterable[Sample]) -> Iterator[Sample]:
        for s in it:
            if s.key in seen:
                raise ShardError(f"duplicate sample key {s.key!r} while writing {split} shards under {out_prefix}")
            seen.add(s.key)
            yield s

    entries: list[dict[str, Any]] = []
    stream = iter(checked(tqdm(samples, desc=f"shards {split}", unit="sample", disable=not progress)))
    for i in itertools.count():
        chunk = list(itertools.islice(stream, shard_size))
        if not chunk:
            break
        uri = join_uri(out_prefix, f"{split}-{i:06d}.tar")
        entries.append(write_shard(chunk, uri, storage, image_format))
    return entries


# ---------------------------------------------------------------------------------------- manifests


def write_manifest(
    path: str | Path, entries: list[dict[str, Any]], root: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the local shard manifest (JSON, sorted keys, atomic) and return it.

    Content: ``{"version": 1, "root": root, "shards": entries, "num_samples": sum(n), **extra}``
    (``extra`` typically holds ``params_hash``; it may not override the fixed fields).
    """
    manifest: dict[str, Any] = {
        "version": 1,
        "root": root,
        "shards": [{"uri": str(e["uri"]), "sha256": str(e["sha256"]), "n": int(e["n"])} for e in entries],
        "num_samples": int(sum(int(e["n"]) for e in entries)),
    }
    for k, v in (extra or {}).items():
        if k in manifest:
            raise ValueError(f"manifest extra key {k!r} would override a fixed field")
        manifest[k] = v
    text = json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    Storage(retries=0).write_bytes(str(Path(path)), text.encode("utf-8"))
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a shard manifest written by :func:`write_manifest`.

    Raises:
        ManifestError: the file is missing, not JSON, or lacks/garbles required fields.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ManifestError(f"manifest {p} does not exist (run the prepare stage first?)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest {p} is unreadable or not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {p}: top level must be a JSON object")
    if data.get("version") != 1:
        raise ManifestError(f"manifest {p}: unsupported version {data.get('version')!r} (expected 1)")
    shards = data.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"manifest {p}: 'shards' must be a list")
    for i, e in enumerate(shards):
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("uri"), str)
            and isinstance(e.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) is not None
            and isinstance(e.get("n"), int)
            and e["n"] >= 0
        )
        if not ok:
            raise ManifestError(
                f"manifest {p}: shards[{i}] must be {{'uri': str, 'sha256': 64 hex, 'n': int>=0}}, got {e!r}"
            )
    if not isinstance(data.get("root"), str):
        raise ManifestError(f"manifest {p}: 'root' must be a string")
    return data


def group_to_record(key: str, group: dict[str, bytes], shard: str) -> dict[str, Any] | str:
    """Turn one ``{ext: bytes}`` group into a record, or return a rejection reason.

    Record: ``{"key", "image_bytes", "image_ext" ("png"/"jpg"/"webp"), "txt" (str or None),
    "json" (dict, ``{}`` if absent), "shard"}``. Members with other extensions are dropped.
    """
    img_exts = [e for e in IMAGE_EXTS if e in group]
    if not img_exts:
        return f"missing image member (have {sorted(group)})"
    if len(img_exts) > 1:
        return f"several image members {img_exts}"
    txt: str | None = None
    if "txt" in group:
        try:
            txt = group["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "caption (.txt) is not valid UTF-8"
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, ints over 4300 digits, deep nesting
            return f"metadata (.json) is not valid JSON: {type(e).__name__}: {str(e)[:200]}"
        if not isinstance(meta, dict):
            return "metadata (.json) is not a JSON object"
    return {
        "key": key,
        "image_bytes": group[img_exts[0]],
        "image_ext": _norm_ext(img_exts[0]),
        "txt": txt,
        "json": meta,
        "shard": shard,
    }


def iter_shard(
    uri: str,
    storage: Storage,
    on_reject: RejectFn | None = None,
    key_re: re.Pattern[str] = KEY_RE,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of the shard at ``uri``.

    Yields ``{"key", "image_bytes", "image_ext", "txt", "json" (dict), "shard"}`` per sample.
    Problems (unsafe names, pickle members, bad keys, missing image, bad JSON, ...) raise
    ``ShardError`` naming the shard, or with ``on_reject`` are reported as
    ``{"source": uri, "member"|"key": ..., "reason": ...}`` and skipped. Images are not decoded.
    """
    stream = storage.open_read(uri)
    try:
        for key, group in iter_tar_groups(stream, uri, on_reject, key_re, keep=RECORD_EXTS):
            rec = group_to_record(key, group, uri)
            if isinstance(rec, str):
                reject(on_reject, uri, rec, key=key)
                continue
            yield rec
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------- webdataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset opener for ``s3://`` URLs: a fresh fsspec/s3fs file per call (fork-safe).

    The endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials from env.
    """
    if mode != "rb":
        raise ValueError(f"s3 gopen supports only mode 'rb', got {mode!r} for {url}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
        options["config_kwargs"] = {"s3": {"addressing_style": "path"}}
    try:
        return fsspec.open(url, "rb", **options).open()  # type: ignore[no-any-return]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such S3 object: {url}") from e


def register_s3_gopen() -> None:
    """Register an ``s3://`` opener in ``webdataset.gopen_schemes`` (idempotent)."""
    webdataset.gopen_schemes["s3"] = _gopen_s3


def wds_url(uri: str) -> str:
    """A URL webdataset can open for ``uri``: a local path for plain/``file://`` URIs, ``s3://...`` for S3.

    For S3 this also registers the ``s3`` opener (:func:`register_s3_gopen`).
    """
    p = parse_uri(uri)
    if p.kind == "file":
        return str(p.path)
    register_s3_gopen()
    return f"s3://{p.bucket}/{p.key}"


def _wds_to_record(sample: dict[str, Any], decode_images: bool) -> dict[str, Any] | None:
    """Map a raw webdataset sample (ext -> bytes) to our record; drop unsafe ones (returns None).

    Only image, ``txt`` and ``json`` members are looked at; pickle members are never decoded.
    """
    key = str(sample.get("__key__", ""))
    url = str(sample.get("__url__", ""))
    exts = {k for k in sample if not k.startswith("__")}
    bad = sorted(exts & PICKLE_EXTS)
    if bad:
        log.warning("shard %s key %r dropped: pickle member(s) %s (never unpickled)", url, key, bad)
        return None
    if not KEY_RE.match(key):
        log.warning("shard %s: dropped sample with invalid key %r", url, key)
        return None
    group = {k: v for k, v in sample.items() if k in IMAGE_EXTS or k in ("txt", "json")}
    rec = group_to_record(key, group, url)
    if isinstance(rec, str):
        log.warning("shard %s key %r dropped: %s", url, key, rec)
        return None
    if decode_images:
        rec["image"] = decode_image(rec["image_bytes"], name=f"{url} key {key!r}")
    return rec


def make_webdataset(uris: list[str], decode_images: bool = True, **wds_kwargs: Any) -> Any:
    """A ``webdataset.WebDataset`` over the shards ``uris`` (no shard shuffling), yielding our records.

    Records are as in :func:`iter_shard` plus ``"image"`` (``uint8 [H, W, 3]``) when
    ``decode_images``. No webdataset decoder is used, so nothing is ever unpickled; samples with
    pickle members or invalid keys are dropped with a warning. ``wds_kwargs`` go to ``WebDataset``
    (e.g. ``nodesplitter=webdataset.split_by_node`` under DDP).
    """
    if not uris:
        raise ValueError("make_webdataset needs at least one shard URI")
    urls = [wds_url(u) for u in uris]
    wds_kwargs.setdefault("shardshuffle", False)
    wds_kwargs.setdefault("empty_check", False)
    ds = webdataset.WebDataset(urls, **wds_kwargs)
    return ds.map(functools.partial(_wds_to_record, decode_images=decode_images))


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTS",
    "RECORD_EXTS",
    "KEY_RE",
    "PICKLE_EXTS",
    "SOURCE_KEY_RE",
    "ManifestError",
    "ShardError",
    "StorageError",
    "decode_image",
    "encode_image",
    "group_to_record",
    "iter_shard",
    "iter_tar_groups",
    "make_webdataset",
    "read_manifest",
    "register_s3_gopen",
    "split_member_name",
    "wds_url",
    "write_manifest",
    "write_shard",
    "write_shards",
]
