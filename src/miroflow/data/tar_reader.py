"""The hardened streaming tar reader behind every shard read: member names judged as strings, never paths.

:func:`iter_tar_groups` reads a tar stream once, front to back, and yields ``(key, {ext: bytes})`` per
sample. Nothing is extracted to the filesystem; absolute names, ``..`` segments, links, devices,
oversized members (> :data:`MAX_MEMBER_BYTES`) and pickle-bearing members (:data:`PICKLE_EXTS`) are
rejected without being decoded. Rejections raise :class:`ShardError` naming the shard and member, or
are reported through ``on_reject`` so one bad sample does not stop a shard (``docs/architecture.md``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterator
from typing import IO

from miroflow.errors import InputError

log = logging.getLogger(__name__)

#: Our sample keys: ``[A-Za-z0-9_-]+``.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
#: Keys accepted from foreign tars (importers): safe relative segments, no ``..``.
SOURCE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*$")
#: webdataset's split of a member name into key and extension(s).
_NAME_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
#: Member extensions whose decoding would unpickle (never read, always rejected).
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pt", "pth"})
#: Largest member read from a tar (bytes); larger members are rejected, not read.
MAX_MEMBER_BYTES = 256 * 1024 * 1024

RejectFn = Callable[[dict[str, str]], None]


class ShardError(InputError, ValueError):
    """A shard (or one of its members) is invalid. The message names the shard and member/key."""


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


def reject(
    on_reject: RejectFn | None, shard: str, reason: str, member: str | None = None, key: str | None = None
) -> None:
    """Report a rejection through ``on_reject`` or raise ``ShardError`` when there is none."""
    rec = {"source": shard, "reason": reason}
    if member is not None:
        rec["member"] = member
    if key is not None:
        rec["key"] = key
    # "is not None": an empty member name is still a member (it used to be logged as "key None")
    what = f" member {member!r}" if member is not None else (f" key {key!r}" if key is not None else "")
    if on_reject is None:
        raise ShardError(f"shard {shard}{what}: {reason}")
    log.warning("shard %s%s rejected: %s", shard, what, reason)
    on_reject(rec)


def iter_tar_groups(
    stream: IO[bytes],
    shard: str,
    on_reject: RejectFn | None = None,
    key_re: re.Pattern[str] = KEY_RE,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    keep: Collection[str] | None = None,
    salvage: bool = False,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar and yield ``(key, {ext: bytes})`` for each group of consecutive same-key members.

    Rejected (reported via ``on_reject``, or ``ShardError`` raised if it is ``None``): non-regular
    members (links, devices, ...), unsafe names, invalid keys, oversized members, a duplicate
    ``ext`` within a key, a key seen again after other keys, and every sample with a pickle member
    (that member is never read). Members are never extracted to disk.

    With ``keep`` (lower-case extensions), members with any other extension are skipped unread —
    they cost no memory and their size is not checked — so a caller that only uses images and
    captions never holds, say, a 200 MB ``.npy`` side member in RAM.

    With ``salvage``, a truncated or corrupt stream first yields the sample in progress (made of
    the members read completely before the damage), then raises ``ShardError`` as usual.
    """
    seen: set[str] = set()
    cur_key: str | None = None
    cur: dict[str, bytes] = {}
    cur_bad: str | None = None

    def flush() -> Iterator[tuple[str, dict[str, bytes]]]:
        if cur_key is None:
            return
        if cur_bad is not None:
            reject(on_reject, shard, cur_bad, key=cur_key)
        else:
            yield cur_key, cur

    try:
        for member in _iter_tar(stream, shard):
            name = member.name
            if not member.regular:
                reject(on_reject, shard, "not a regular file member (link/dir/device)", member=name)
                continue
            parsed = split_member_name(name, key_re)
            if isinstance(parsed, str):
                reject(on_reject, shard, parsed, member=name)
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
            if keep is not None and ext not in keep:
                continue  # skipped unread by _iter_tar after this loop step
            if member.size > max_member_bytes:
                cur_bad = f"member {name!r} too large ({member.size} bytes > {max_member_bytes})"
                continue
            if ext in cur:
                cur_bad = f"duplicate member {name!r}"
                continue
            cur[ext] = member.read()
    except ShardError:
        if salvage:  # a cut-off tar: the members read so far are whole, keep the sample they form
            yield from flush()
        raise
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
_PAX_SIZE_RE = re.compile(r"[0-9]{1,30}")  # a pax "size" record: ASCII decimal digits


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
        if kind == b"\x00" and name.endswith("/"):
            # old V7 style directory, judged on the 100-byte name field as tarfile (and so webdataset)
            # does, not on a GNU long name / pax path: both readers then see the same members
            kind = b"5"
        if hdr[257:262] == b"ustar":
            prefix = _field_str(hdr[345:500])
            if prefix:
                name = prefix + "/" + name
        name = pax.get("path", long_name if long_name is not None else name)
        if "size" in pax:
            # decimal digits only: int() would also take "-5" (a negative size desynchronises the
            # stream: the next "header" is read from member data), "1_0", " 7" and non-ASCII digits
            if not _PAX_SIZE_RE.fullmatch(pax["size"]):
                raise ShardError(f"shard {shard} is truncated or corrupt: bad pax size {pax['size']!r}")
            size = int(pax["size"])
            padded = -(-size // _BLOCK) * _BLOCK
        long_name, pax = None, {}
        if kind == b"5":
            name = name.rstrip("/")
        regular = kind in _REGULAR
        member = _TarMember(name, regular, size, padded, stream, shard)
        yield member
        if regular or kind not in _NO_DATA:
            member.skip()
