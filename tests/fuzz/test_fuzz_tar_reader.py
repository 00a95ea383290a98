"""Fuzzing the streaming tar reader (``iter_tar_groups``) and the shard reader (``iter_shard``).

Properties, on arbitrary bytes, on hand-assembled headers (pax records, GNU long names, base-256
sizes, every type flag) and on valid tars mutated by bit flips, truncation, overwrites and
re-checksummed header fields:

- nothing but :class:`ShardError` escapes; with an ``on_reject`` callback a raised ``ShardError``
  is about the stream itself (truncated/corrupt/not a tar), every member-level problem goes to
  the callback;
- no file is opened for writing or created (nothing is extracted);
- every ``read(n)`` asks for a bounded size: at most a member's size when it is kept (never more
  than ``max_member_bytes``), else at most one 1 MiB skip step, whatever size a header declares;
- on unmutated tars the yielded bytes are exactly what ``tarfile`` reads for the same member.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import IO, Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miroflow.data.shards import iter_shard
from miroflow.data.tar_reader import (
    KEY_RE,
    PICKLE_EXTS,
    SOURCE_KEY_RE,
    ShardError,
    iter_tar_groups,
    split_member_name,
)
from miroflow.storage import Storage
from tests.fuzz.fuzz_helpers import CountingStream, flip_bits, no_file_writes

SHARD = "fuzz.tar"
MAX_MEMBER = 2048
#: the reader's largest single read besides a kept member: one skip step / one metadata header
STEP = 1 << 20
STREAM_ERROR = re.compile(
    rf"^shard {re.escape(SHARD)}( is truncated or corrupt| is not a readable tar|: metadata header)"
)
EXTS = ["png", "jpg", "webp", "txt", "json", "npy", "pkl", "pt", "PNG", "tar.gz", "", "a/b"]


# --------------------------------------------------------------------------- the property
def check_reader(
    data: bytes,
    *,
    with_reject: bool,
    key_re: re.Pattern[str] = KEY_RE,
    keep: frozenset[str] | None = None,
) -> tuple[list[tuple[str, dict[str, bytes]]], list[dict[str, str]], ShardError | None]:
    """Run ``iter_tar_groups`` on ``data`` and assert the properties; return (groups, rejections, error)."""
    stream = CountingStream(data)
    rejected: list[dict[str, str]] = []
    groups: list[tuple[str, dict[str, bytes]]] = []
    error: ShardError | None = None
    with no_file_writes():
        try:
            it = iter_tar_groups(
                cast(IO[bytes], stream), SHARD, rejected.append if with_reject else None, key_re, MAX_MEMBER, keep
            )
            for key, group in it:
                groups.append((key, dict(group)))
        except ShardError as e:
            error = e
    if error is not None:
        msg = str(error)
        assert msg.startswith(f"shard {SHARD}"), msg
        if with_reject:
            assert STREAM_ERROR.match(msg), f"member-level error raised despite on_reject: {msg}"
    assert max(stream.requests, default=0) <= max(MAX_MEMBER, STEP), stream.requests
    keys = [k for k, _ in groups]
    assert len(keys) == len(set(keys)), f"a key was yielded twice: {keys}"
    for key, group in groups:
        assert key_re.match(key), key
        for ext, value in group.items():
            assert ext not in PICKLE_EXTS
            assert keep is None or ext in keep
            assert isinstance(value, bytes) and len(value) <= MAX_MEMBER
    for rec in rejected:
        assert rec["source"] == SHARD and rec["reason"]
        assert "member" in rec or "key" in rec, rec
    return groups, rejected, error


# --------------------------------------------------------------------------- strategies
keys = st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True)
good_names = st.builds(lambda k, e: f"{k}.{e}" if e else k, keys, st.sampled_from(EXTS))
nested_names = st.builds(lambda a, b: f"{a}/{b}", keys, good_names)
hostile_names = st.sampled_from(
    [
        "../x.png",
        "../../etc/passwd.txt",
        "a/../b.png",
        "/abs.png",
        "/etc/shadow.txt",
        "./k.png",
        "k/.png",
        "a\\b.png",
        ".png",
        "k..png",
        "k.",
        "d/",
        "d" * 99 + ".png",
        "x" * 150 + ".txt",
        "sub/" * 40 + "deep.png",
        "é.txt",
        "k\u2028.txt",
        "k\x85.png",
        "ke\ty.png",
        " k.png",
    ]
)
member_names = st.one_of(
    good_names,
    good_names,
    nested_names,
    hostile_names,
    st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=130),
)
member_data = st.one_of(
    st.binary(max_size=600),
    st.integers(MAX_MEMBER - 2, MAX_MEMBER + 600).map(lambda n: b"\xa5" * n),  # around the size limit
)
KINDS = [
    tarfile.REGTYPE,
    tarfile.REGTYPE,
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.DIRTYPE,
    tarfile.CHRTYPE,
    tarfile.FIFOTYPE,
]
members = st.lists(st.tuples(member_names, st.sampled_from(KINDS), member_data), max_size=8)
formats = st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
keeps = st.sampled_from([None, frozenset({"png", "txt", "json"}), frozenset({"txt"})])
key_res = st.sampled_from([KEY_RE, SOURCE_KEY_RE])


def build_tar(spec: list[tuple[str, bytes, bytes]], fmt: int) -> bytes:
    """A tar written by ``tarfile`` (falls back to PAX when ``fmt`` cannot hold a name)."""
    for attempt in (fmt, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        try:
            with tarfile.open(fileobj=buf, mode="w", format=attempt) as tf:
                for name, kind, data in spec:
                    info = tarfile.TarInfo(name)
                    info.type = kind
                    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                        info.linkname = "../../etc/passwd"
                    regular = kind in tarfile.REGULAR_TYPES
                    info.size = len(data) if regular else 0
                    tf.addfile(info, io.BytesIO(data) if regular else None)
        except ValueError:
            continue
        return buf.getvalue()
    raise AssertionError("tarfile could not write the spec in PAX format")


def _checksummed(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return block


def raw_header(name: bytes, size_field: bytes, typeflag: bytes, ustar: bool = True, prefix: bytes = b"") -> bytes:
    """One 512-byte header block with a correct checksum and the given (possibly hostile) fields."""
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\x00")
    h[100:124] = b"0000644\x000000000\x000000000\x00"
    h[124:136] = size_field[:12].ljust(12, b"\x00")
    h[136:148] = b"00000000000\x00"
    h[156:157] = typeflag[:1] or b"\x00"
    if ustar:
        h[257:265] = b"ustar\x0000"
        h[345:500] = prefix[:155].ljust(155, b"\x00")
    return bytes(_checksummed(h))


def octal(n: int) -> bytes:
    return b"%011o\x00" % n


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


size_fields = st.one_of(
    st.integers(0, 4000).map(octal),
    st.integers(0, 2**80).map(lambda n: b"\x80" + n.to_bytes(11, "big")),
    st.just(b"\xff" * 12),
    st.sampled_from([b"", b" 12 ", b"-5", b"0o17", b"1_0", b"9", b"\x00" * 12, b"777777777777", b"+1"]),
    st.binary(min_size=12, max_size=12),
)
pax_values = st.one_of(
    st.sampled_from([b"-5", b"-1", b"0", b"1e3", b" 12", b"10" * 20, b"\xff\xfe", b"../x.png", b"/abs.png", b""]),
    st.integers(0, 5000).map(lambda n: str(n).encode()),
    st.binary(max_size=40),
)
pax_keys = st.sampled_from([b"path", b"size", b"linkpath", b"mtime", b"uid", b"GNU.sparse.size", b"", b"pa=th"])
pax_bodies = st.one_of(
    st.builds(pax_record, st.sampled_from([b"size", b"path"]), pax_values),
    st.lists(st.builds(pax_record, pax_keys, pax_values), min_size=1, max_size=4).map(b"".join),
    st.binary(max_size=200),
    st.sampled_from([b"0 path=x\n", b"-3 a=b\n", b"99 path=x\n", b"5 p\n", b"abc path=x\n", b"6 =x\n\n"]),
)


@st.composite
def raw_member(draw: st.DrawFn) -> bytes:
    """One hand-assembled member: mostly well-formed, sometimes with hostile fields or a pax/long-name header."""

    def rarely() -> bool:  # one time in five; shrinks towards the well-formed case
        return draw(st.integers(0, 4)) == 4

    name = draw(member_names).encode("utf-8", "surrogateescape")
    payload = draw(member_data)
    size = draw(size_fields) if rarely() else octal(len(payload))
    kind = draw(st.sampled_from([b"0", b"\x00", b"7", b"1", b"2", b"3", b"4", b"5", b"6", b"S", b"V", b"g", b"Z"]))
    out = raw_header(name, size, kind if rarely() else b"0", ustar=not rarely()) + pad(payload)
    meta = draw(st.sampled_from(["none", "pax", "pax", "long", "huge"])) if draw(st.booleans()) else "none"
    if meta == "pax":
        if rarely():
            body = draw(pax_bodies)
        else:  # what tarfile writes for a long/unicode name or a size beyond the octal field
            path = draw(member_names).encode("utf-8", "surrogateescape")
            pax_size = draw(pax_values) if rarely() else str(len(payload)).encode()
            body = pax_record(b"path", path) + (pax_record(b"size", pax_size) if draw(st.booleans()) else b"")
        body_size = draw(size_fields) if rarely() else octal(len(body))
        out = raw_header(b"././@PaxHeader", body_size, b"x") + pad(body) + out
    elif meta == "long":
        long = draw(member_names).encode("utf-8", "surrogateescape")
        out = raw_header(b"././@LongLink", octal(len(long)), draw(st.sampled_from([b"L", b"K"]))) + pad(long) + out
    elif meta == "huge" and rarely():
        huge = draw(st.sampled_from([octal(2**20 + 1), b"\x80" + (2**70).to_bytes(11, "big"), octal(2**33 - 1)]))
        out = raw_header(b"././@PaxHeader", huge, draw(st.sampled_from([b"x", b"L"]))) + out
    return out


raw_tars = st.builds(
    lambda parts, end: b"".join(parts) + end,
    st.lists(raw_member(), max_size=6),
    st.sampled_from([b"", bytes(1024), bytes(512), b"\x00" * 100]),
)


@st.composite
def mutated_tars(draw: st.DrawFn) -> bytes:
    data = build_tar(draw(members), draw(formats))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "overwrite", "field"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data = flip_bits(data, [pos * 8 + draw(st.integers(0, 7))])
        elif op == "truncate":
            data = data[:pos]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data = data[:pos] + chunk + data[pos + len(chunk) :]
        else:  # rewrite a header field and fix the checksum, so the change gets past _check_header
            block = pos // 512 * 512
            if block + 512 > len(data):
                continue
            start, width = draw(st.sampled_from([(0, 100), (124, 12), (156, 1), (257, 8), (345, 155)]))
            value = draw(st.binary(min_size=width, max_size=width) | size_fields.map(lambda b: b[:width]))
            h = bytearray(data[block : block + 512])
            h[start : start + width] = value.ljust(width, b"\x00")
            data = data[:block] + bytes(_checksummed(h)) + data[block + 512 :]
    return data


# --------------------------------------------------------------------------- the fuzz tests
@given(data=st.binary(max_size=2048), with_reject=st.booleans(), keep=keeps)
def test_arbitrary_bytes(data: bytes, with_reject: bool, keep: frozenset[str] | None) -> None:
    check_reader(data, with_reject=with_reject, keep=keep)


@given(data=raw_tars, with_reject=st.booleans(), keep=keeps, key_re=key_res)
def test_hand_assembled_headers(
    data: bytes, with_reject: bool, keep: frozenset[str] | None, key_re: re.Pattern[str]
) -> None:
    check_reader(data, with_reject=with_reject, keep=keep, key_re=key_re)


@given(data=mutated_tars(), with_reject=st.booleans(), keep=keeps, key_re=key_res)
def test_mutated_valid_tars(
    data: bytes, with_reject: bool, keep: frozenset[str] | None, key_re: re.Pattern[str]
) -> None:
    check_reader(data, with_reject=with_reject, keep=keep, key_re=key_re)


def _tarfile_view(data: bytes) -> list[tuple[str, bool, bytes]]:
    """``(name, is_regular, data)`` per member, as the standard library reads the same tar."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for info in tf:
            f = tf.extractfile(info) if info.isreg() else None
            out.append((info.name, info.isreg(), f.read() if f is not None else b""))
    return out


@given(spec=members, fmt=formats, keep=keeps, key_re=key_res)
def test_valid_tars_agree_with_tarfile(
    spec: list[tuple[str, bytes, bytes]], fmt: int, keep: frozenset[str] | None, key_re: re.Pattern[str]
) -> None:
    # an AREGTYPE member whose name field ends in "/" is a V7 directory to every reader, but tarfile
    # still writes its data, which readers then parse as the next header: keep those members empty
    spec = [(name, kind, b"" if kind == tarfile.AREGTYPE else payload) for name, kind, payload in spec]
    data = build_tar(spec, fmt)
    groups, rejected, error = check_reader(data, with_reject=True, keep=keep, key_re=key_re)
    assert error is None, f"a valid tar was refused: {error}"
    view = _tarfile_view(data)
    yielded = dict(groups)
    first: dict[tuple[str, str], bytes] = {}
    for name, regular, payload in view:
        parsed = split_member_name(name, key_re)
        if regular and not isinstance(parsed, str):
            first.setdefault(parsed, payload)
    for key, group in groups:
        for ext, value in group.items():
            assert value == first[(key, ext)], f"{key}.{ext}: bytes differ from tarfile's"
    # tarfile strips a trailing "/" from every pax path; the reader keeps it (and rejects the name)
    named = {r["member"].rstrip("/") for r in rejected if "member" in r} | {r.get("key") for r in rejected}
    for name, regular, payload in view:
        parsed = split_member_name(name, key_re)
        if not regular or isinstance(parsed, str):
            assert name.rstrip("/") in named, f"member {name!r} neither yielded nor rejected"
            continue
        key, ext = parsed
        if ext in PICKLE_EXTS or (keep is not None and ext not in keep):
            assert ext not in yielded.get(key, {})
            continue
        assert key in named or ext in yielded.get(key, {}), f"member {name!r} neither yielded nor rejected"


# --------------------------------------------------------------------------- iter_shard on files
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)
json_members = st.one_of(
    st.dictionaries(st.text(max_size=6), json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"{", b"NaN", b'{"a": NaN}', b"\xff\xfe", b'{"\xc3\x28": 1}', b"", b"{}" * 2]),
    st.sampled_from([b"[" * 5000, b'{"a": ' + b"1" * 5000 + b"}"]),  # json.loads' RecursionError / ValueError
    member_data,
)
sample_exts = st.one_of(
    st.sampled_from([["png", "json", "txt"], ["jpg", "txt"], ["webp"], ["png", "json", "txt", "npy"]]),
    st.lists(st.sampled_from(["png", "jpg", "txt", "json", "npy", "pkl", "JPEG"]), max_size=4),
)


def _shard_spec(draw: st.DrawFn) -> list[tuple[str, bytes, bytes]]:
    spec: list[tuple[str, bytes, bytes]] = []
    for key in draw(st.lists(keys, max_size=4, unique=True)) + draw(st.lists(keys, max_size=1)):
        for ext in draw(sample_exts):
            if ext == "json":
                payload = draw(json_members)
            elif ext == "txt":
                payload = draw(st.text(max_size=20).map(str.encode) | member_data)
            else:
                payload = draw(member_data)
            spec.append((f"{key}.{ext}", tarfile.REGTYPE, payload))
    return spec


@st.composite
def shard_bytes(draw: st.DrawFn) -> bytes:
    data = build_tar(_shard_spec(draw), draw(formats))
    mutation = draw(st.sampled_from(["none", "none", "flip", "truncate"]))
    if mutation == "flip":
        data = flip_bits(data, draw(st.lists(st.integers(0, 8 * len(data)), min_size=1, max_size=3)))
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.fixture(scope="module")
def shard_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_shards") / "fuzz.tar"


@given(data=shard_bytes(), with_reject=st.booleans(), key_re=key_res)
def test_iter_shard(shard_file: Path, data: bytes, with_reject: bool, key_re: re.Pattern[str]) -> None:
    shard_file.write_bytes(data)
    uri = str(shard_file)
    rejected: list[dict[str, Any]] = []
    with no_file_writes():
        try:
            recs = list(iter_shard(uri, Storage(retries=0), rejected.append if with_reject else None, key_re))
        except ShardError as e:
            assert str(e).startswith(f"shard {uri}"), e
            if with_reject:
                assert re.match(rf"^shard {re.escape(uri)}( is truncated or corrupt| is not a readable tar)", str(e))
            return
    for rec in recs:
        assert isinstance(rec["json"], dict) and rec["image_ext"] in ("png", "jpg", "webp")
        assert rec["txt"] is None or isinstance(rec["txt"], str)
    assert sorted(shard_file.parent.iterdir()) == [shard_file]


# --------------------------------------------------------------------------- regressions (found by the fuzzing)
def _pax_then_members(pax_size: bytes) -> bytes:
    body = pax_record(b"size", pax_size)
    return (
        raw_header(b"././@PaxHeader", octal(len(body)), b"x")
        + pad(body)
        + raw_header(b"k.txt", octal(3), b"0")
        + pad(b"abc")
        + raw_header(b"j.txt", octal(2), b"0")
        + pad(b"de")
        + bytes(1024)
    )


@pytest.mark.parametrize("pax_size", [b"-5", b"-512", b"1_0", b" 3", b"+3", "\u0663".encode(), b""])
def test_pax_size_must_be_decimal_digits(pax_size: bytes) -> None:
    """A pax ``size`` of ``-512`` used to be taken as is: the member read b"" and the next header came from data."""
    for with_reject in (False, True):
        _, _, error = check_reader(_pax_then_members(pax_size), with_reject=with_reject)
        assert error is not None and "bad pax size" in str(error)


def test_pax_size_overrides_the_header_size() -> None:
    groups, rejected, error = check_reader(_pax_then_members(b"5"), with_reject=True)
    assert error is None and not rejected
    assert groups == [("k", {"txt": b"abc\x00\x00"}), ("j", {"txt": b"de"})]


def test_empty_member_name_is_logged_as_a_member(caplog: pytest.LogCaptureFixture) -> None:
    """``member=""`` used to be logged as ``key None``."""
    data = build_tar([("", tarfile.REGTYPE, b"x"), ("k.txt", tarfile.REGTYPE, b"y")], tarfile.GNU_FORMAT)
    with caplog.at_level("WARNING", logger="miroflow.data.tar_reader"):
        groups, rejected, _ = check_reader(data, with_reject=True)
    assert groups == [("k", {"txt": b"y"})]
    assert rejected == [{"source": SHARD, "reason": "unsafe member name", "member": ""}]
    assert "member ''" in caplog.text and "key None" not in caplog.text


@pytest.mark.parametrize("size_field", [b"\x80" + (2**80).to_bytes(11, "big"), octal(2**33 - 1), octal(MAX_MEMBER + 1)])
def test_declared_size_is_never_allocated(size_field: bytes) -> None:
    """A header declaring a huge size is rejected (or skipped) without a read of that size."""
    data = raw_header(b"k.png", size_field, b"0") + pad(b"tiny") + bytes(1024)
    for keep in (None, frozenset({"txt"})):
        groups, rejected, error = check_reader(data, with_reject=True, keep=keep)
        assert not groups
        assert error is not None or rejected


@pytest.mark.parametrize("kind", [b"x", b"L"])
def test_huge_metadata_header_is_refused(kind: bytes) -> None:
    _, _, error = check_reader(raw_header(b"././@PaxHeader", octal(2**20 + 1), kind), with_reject=True)
    assert error is not None and "metadata header of 1048577 bytes is too large" in str(error)


def test_v7_directory_is_judged_on_the_name_field_like_tarfile() -> None:
    """A GNU long name whose first 100 bytes end in "/" with type b"\\0": tarfile (webdataset) sees a
    directory; the reader used to apply the V7 rule to the long name and yield a sample tarfile never shows."""
    name = "sub/" * 40 + "deep.png"
    data = build_tar([(name, tarfile.AREGTYPE, b""), ("k.png", tarfile.REGTYPE, b"ok")], tarfile.GNU_FORMAT)
    assert [regular for _, regular, _ in _tarfile_view(data)] == [False, True]
    groups, rejected, error = check_reader(data, with_reject=True, key_re=SOURCE_KEY_RE)
    assert error is None and groups == [("k", {"png": b"ok"})]
    assert rejected == [{"source": SHARD, "reason": "not a regular file member (link/dir/device)", "member": name}]


def test_v7_directory_and_links_are_rejected_not_followed() -> None:
    data = (
        raw_header(b"d/", octal(0), b"\x00", ustar=False)
        + raw_header(b"l.png", octal(0), b"2")
        + raw_header(b"k.png", octal(2), b"0")
        + pad(b"ok")
        + bytes(1024)
    )
    groups, rejected, error = check_reader(data, with_reject=True)
    assert error is None and groups == [("k", {"png": b"ok"})]
    assert [r["member"] for r in rejected] == ["d", "l.png"]


@pytest.mark.parametrize("meta", [b'{"a": ' + b"1" * 5000 + b"}", b"[" * 100_000], ids=["long-int", "deep"])
def test_iter_shard_hostile_json_member(shard_file: Path, meta: bytes) -> None:
    """group_to_record caught only JSONDecodeError: json.loads' ValueError / RecursionError escaped iter_shard."""
    shard_file.write_bytes(
        build_tar([("k.png", tarfile.REGTYPE, b"x"), ("k.json", tarfile.REGTYPE, meta)], tarfile.USTAR_FORMAT)
    )
    rejected: list[dict[str, Any]] = []
    assert list(iter_shard(str(shard_file), Storage(retries=0), rejected.append)) == []
    assert "metadata (.json)" in rejected[0]["reason"]
