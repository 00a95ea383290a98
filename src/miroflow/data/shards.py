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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import webdataset
from PIL import Image
from tqdm.auto import tqdm

from miroflow.data.sample import Sample
from miroflow.storage import Storage, StorageError, join_uri, parse_uri

log = logging.getLogger(__name__)

#: Our sample keys: ``[A-Za-z0-9_-]+``.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
#: Keys accepted from foreign tars (importers): safe relative segments, no ``..``.
SOURCE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*$")
#: webdataset's split of a member name into key and extension(s).
_NAME_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
#: Member extensions whose decoding would unpickle (never read, always rejected).
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pt", "pth"})
#: Order of members within a sample when writing.
_EXT_ORDER = {"img": 0, "json": 1, "txt": 2}
#: Largest member read from a tar (bytes); larger members are rejected, not read.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Shards larger than this are spooled to a temp file instead of memory while being built.
_SPOOL_BYTES = 64 * 1024 * 1024

RejectFn = Callable[[dict[str, str]], None]


class ShardError(ValueError):
    """A shard (or one of its members) is invalid. The message names the shard and member/key."""


class ManifestError(ValueError):
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


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes to a ``uint8 [H, W, 3]`` RGB array (via PIL, fully loaded).

    Raises:
        ValueError: the bytes are not a decodable image (message names ``name`` and the cause).
    """
    if not data:
        raise ValueError(f"cannot decode {name}: empty data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # force full decode: truncated/corrupt data fails here
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"cannot decode {name} ({len(data)} bytes): {type(e).__name__}: {e}") from e
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


# ---------------------------------------------------------------------------------------- reading


def split_member_name(name: str, key_re: re.Pattern[str] = KEY_RE) -> tuple[str, str] | str:
    """Split a tar member name into ``(key, ext)`` (ext lower-cased), or return a rejection reason.

    Member names are never used as paths: this only checks them as strings.
    """
    if not name or "\x00" in name or "\\" in name:
        return "unsafe member name"
    if name.startswith("/") or any(seg == ".." for seg in name.split("/")):
        return "unsafe member name (absolute path or '..' segment)"
    m = _NAME_RE.match(name)
    if m is None:
        return "member name has no '<key>.<ext>' form"
    key, ext = m.group(1), m.group(2).lower()
    if not key_re.match(key):
        return f"invalid key {key!r}"
    return key, ext


def _reject(
    on_reject: RejectFn | None, shard: str, reason: str, member: str | None = None, key: str | None = None
) -> None:
    """Report a rejection through ``on_reject`` or raise ``ShardError`` when there is none."""
    rec = {"source": shard, "reason": reason}
    if member is not None:
        rec["member"] = member
    if key is not None:
        rec["key"] = key
    if on_reject is None:
        what = f" member {member!r}" if member is not None else (f" key {key!r}" if key is not None else "")
        raise ShardError(f"shard {shard}{what}: {reason}")
    log.warning("shard %s%s rejected: %s", shard, f" member {member!r}" if member else f" key {key!r}", reason)
    on_reject(rec)


def iter_tar_groups(
    stream: IO[bytes],
    shard: str,
    on_reject: RejectFn | None = None,
    key_re: re.Pattern[str] = KEY_RE,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar and yield ``(key, {ext: bytes})`` for each group of consecutive same-key members.

    Rejected (reported via ``on_reject``, or ``ShardError`` raised if it is ``None``): non-regular
    members (links, devices, ...), unsafe names, invalid keys, oversized members, a duplicate
    ``ext`` within a key, a key seen again after other keys, and every sample with a pickle member
    (that member is never read). Members are never extracted to disk.
    """
    seen: set[str] = set()
    cur_key: str | None = None
    cur: dict[str, bytes] = {}
    cur_bad: str | None = None

    def flush() -> Iterator[tuple[str, dict[str, bytes]]]:
        if cur_key is None:
            return
        if cur_bad is not None:
            _reject(on_reject, shard, cur_bad, key=cur_key)
        else:
            yield cur_key, cur

    for member in _iter_tar(stream, shard):
        name = member.name
        if not member.regular:
            _reject(on_reject, shard, "not a regular file member (link/dir/device)", member=name)
            continue
        parsed = split_member_name(name, key_re)
        if isinstance(parsed, str):
            _reject(on_reject, shard, parsed, member=name)
            continue
        key, ext = parsed
        if key != cur_key:
            yield from flush()
            if key in seen:
                cur_key, cur, cur_bad = key, {}, "duplicate key (members not contiguous)"
            else:
                cur_key, cur, cur_bad = key, {}, None
            seen.add(key)
        if ext in PICKLE_EXTS:
            cur_bad = f"pickle member {name!r} (never unpickled)"
            continue
        if member.size > max_member_bytes:
            cur_bad = f"member {name!r} too large ({member.size} bytes > {max_member_bytes})"
            continue
        if ext in cur:
            cur_bad = f"duplicate member {name!r}"
            continue
        cur[ext] = member.read()
    yield from flush()


# ------------------------------------------------------------------------ a lean streaming tar reader
# Python's tarfile costs ~0.1 ms per member header in stream mode, most of a shard's read time;
# this reader parses the ustar/GNU/pax headers webdataset shards use with a few slices. It never
# extracts anything: names are returned as strings for split_member_name to judge.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = frozenset({b"0", b"\x00", b"7"})  # regular file, old-style regular, contiguous file
_NO_DATA = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})  # links, devices, directories, FIFOs
_MAX_META_BYTES = 1024 * 1024  # pax / GNU long-name records


class _TarMember:
    """One member of :func:`_iter_tar`: ``name``, ``regular`` (a file), ``size`` (bytes).

    :meth:`read` returns the data once, before the iterator advances; unread data is skipped.
    """

    __slots__ = ("name", "regular", "size", "_padded", "_stream", "_shard", "consumed")

    def __init__(self, name: str, regular: bool, size: int, padded: int, stream: IO[bytes], shard: str) -> None:
        self.name, self.regular, self.size = name, regular, size
        self._padded, self._stream, self._shard = padded, stream, shard
        self.consumed = False

    def read(self) -> bytes:
        """The member's data (the stream moves past its padding)."""
        if self.consumed:
            raise ShardError(f"shard {self._shard}: member {self.name!r} read twice")
        self.consumed = True
        data = _read_exact(self._stream, self.size, self._shard, f"member {self.name!r}")
        _skip(self._stream, self._padded - self.size, self._shard, f"member {self.name!r}")
        return data

    def skip(self) -> None:
        """Move the stream past the (unread) data."""
        if not self.consumed:
            self.consumed = True
            _skip(self._stream, self._padded, self._shard, f"member {self.name!r}")


def _read_exact(stream: IO[bytes], n: int, shard: str, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            b = stream.read(n - got)
        except (OSError, EOFError) as e:
            raise ShardError(f"shard {shard} is truncated or corrupt: cannot read {what}: {e}") from e
        if not b:
            raise ShardError(f"shard {shard} is truncated or corrupt: unexpected end of data in {what}")
        chunks.append(b)
        got += len(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _skip(stream: IO[bytes], n: int, shard: str, what: str) -> None:
    while n > 0:
        step = min(n, 1 << 20)
        _read_exact(stream, step, shard, what)
        n -= step


def _field_str(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _field_num(raw: bytes, shard: str, what: str) -> int:
    if raw[:1] and raw[0] & 0x80:  # GNU base-256 (huge values)
        return int.from_bytes(raw[1:], "big") if raw[0] == 0x80 else -1
    text = raw.split(b"\x00", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"shard {shard} is truncated or corrupt: bad {what} field {raw!r}") from None


def _check_header(hdr: bytes, shard: str) -> None:
    want = _field_num(hdr[148:156], shard, "checksum")
    unsigned = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    if want != unsigned and want != unsigned - 256 * sum(1 for b in hdr if b > 127):
        raise ShardError(f"shard {shard} is truncated or corrupt: header checksum mismatch (not a tar?)")


def _pax_records(data: bytes, shard: str) -> dict[str, str]:
    """``"<len> key=value\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] not in (b"", b"\x00"):
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise ShardError(f"shard {shard} is truncated or corrupt: bad pax record") from None
        rec = data[sp + 1 : pos + length]
        if length <= 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise ShardError(f"shard {shard} is truncated or corrupt: bad pax record")
        k, _, v = rec[:-1].partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _iter_tar(stream: IO[bytes], shard: str) -> Iterator[_TarMember]:
    """Stream the members of a tar (ustar, GNU long names, pax) from a non-seekable ``stream``.

    Raises ShardError (naming the shard) for anything that is not a well-formed tar: bad checksum,
    bad numeric field, truncated header or data. An empty stream is an error too.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        try:
            hdr = stream.read(_BLOCK)
        except (OSError, EOFError) as e:
            raise ShardError(f"shard {shard} is truncated or corrupt: {e}") from e
        if len(hdr) < _BLOCK and hdr:
            hdr += _read_exact(stream, _BLOCK - len(hdr), shard, "a header")
        if not hdr:
            if first:
                raise ShardError(f"shard {shard} is not a readable tar: empty")
            return  # end of data without the two zero blocks: tolerated, as tarfile does
        if hdr == _ZERO_BLOCK:
            return
        _check_header(hdr, shard)
        first = False
        kind = hdr[156:157]
        size = _field_num(hdr[124:136], shard, "size")
        if size < 0:
            raise ShardError(f"shard {shard} is truncated or corrupt: negative member size")
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            if size > _MAX_META_BYTES:
                raise ShardError(f"shard {shard}: metadata header of {size} bytes is too large")
            data = _read_exact(stream, padded, shard, "a metadata header")[:size]
            if kind == b"L":
                long_name = _field_str(data)
            elif kind == b"x":
                pax = _pax_records(data, shard)
            continue  # 'g' (global pax) and 'K' (long link name) carry nothing we use
        name = _field_str(hdr[0:100])
        if hdr[257:262] == b"ustar":
            prefix = _field_str(hdr[345:500])
            if prefix:
                name = prefix + "/" + name
        name = pax.get("path", long_name if long_name is not None else name)
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise ShardError(f"shard {shard} is truncated or corrupt: bad pax size") from None
            padded = -(-size // _BLOCK) * _BLOCK
        long_name, pax = None, {}
        if kind == b"\x00" and name.endswith("/"):  # old V7 style directory
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        regular = kind in _REGULAR
        member = _TarMember(name, regular, size, padded, stream, shard)
        yield member
        if regular or kind not in _NO_DATA:
            member.skip()


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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"metadata (.json) is not valid JSON: {e}"
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
        for key, group in iter_tar_groups(stream, uri, on_reject, key_re):
            rec = group_to_record(key, group, uri)
            if isinstance(rec, str):
                _reject(on_reject, uri, rec, key=key)
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
    "IMAGE_EXTS",
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
