"""One small interface over artifact URIs: plain paths, ``file://`` URIs and ``s3://bucket/key``.

``miroflow.storage`` is the only module that talks to a storage backend. Every artifact is
addressed by a URI string:

- a plain path (``work/store/shards/a.tar``, relative or absolute),
- ``file:///abs/path`` (``file://localhost/abs/path`` is accepted too),
- ``s3://bucket/key``.

S3 goes through boto3. The endpoint comes from the standard environment variables
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (which boto3 honours itself), credentials from the
``AWS_*`` environment only; nothing here ever logs a secret.

Writes are atomic: a local file is written to a temporary file in the same directory and moved
into place with ``os.replace``; an S3 object is uploaded with one PUT (or one multipart upload),
and S3 makes an object visible only once that request completes. Transient errors (connection
errors, HTTP 5xx, throttling) are retried with exponential backoff; 403/404/missing buckets are not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeVar, cast
from urllib.parse import unquote

from miroflow.errors import InputError, OperationalError

if TYPE_CHECKING:  # pragma: no cover
    from miroflow.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Marker in the names of our temporary files; ``list`` never returns such files.
TMP_MARKER = ".miroflow-tmp-"
#: errno values that mean "the disk (or quota, or file-size limit) is full": a write error naming the URI.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: Files above this size are spooled to disk (not memory) before an S3 upload.
_SPOOL_MAX_BYTES = 16 * 1024 * 1024
#: Uploads above this size use a multipart upload (parts of this size); either way the object
#: only becomes visible once the upload completes.
_MULTIPART_BYTES = 16 * 1024 * 1024

_BUCKET_RE = re.compile(r"^[a-z0-9](?:[a-z0-9.\-]{0,61}[a-z0-9])?$")  # lenient on length (S3 wants 3..63)
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BandwidthLimitExceeded",
    }
)


class StorageError(OperationalError, RuntimeError):
    """A storage operation failed. The message always names the URI (and the bucket if missing).

    Attributes:
        uri: the URI the failed operation was about.
    """

    def __init__(self, message: str, uri: str) -> None:
        super().__init__(message)
        self.uri = uri


class NotFoundError(StorageError):
    """The object or file does not exist (its bucket or directory may exist). Bad input: exit 2."""

    exit_code = 2


class NoSuchBucketError(StorageError):
    """The S3 bucket does not exist. ``bucket`` names it. Bad input: exit 2."""

    exit_code = 2

    def __init__(self, message: str, uri: str, bucket: str) -> None:
        super().__init__(message, uri)
        self.bucket = bucket


class InvalidURIError(StorageError, ValueError):
    """The URI cannot be parsed (unknown scheme, no bucket, bad bucket name, ...). Exit 2."""

    exit_code = 2


class UnsafeKeyError(StorageError, ValueError):
    """An object key cannot become a local path safely (absolute, ``..``, empty segments, outside the target)."""

    exit_code = 2


def local_target(root: Path, rel: str, uri: str) -> Path:
    """``root / rel`` for the part ``rel`` of a storage key below a prefix, checked: the one way a key
    becomes a local path (``docs/architecture.md``, "Storage keys as local paths").

    Refused with :class:`UnsafeKeyError` naming ``uri``: an empty ``rel``, a leading ``/``, a
    backslash or NUL, an empty, ``.`` or ``..`` segment (``a//b``, ``a/./b``, ``a/../b``), and any
    result whose resolved path is not inside ``root`` (e.g. through a symlink already in ``root``).
    """
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise UnsafeKeyError(f"{uri}: key suffix {rel!r} is not a safe relative path", uri)
    if any(seg in ("", ".", "..") for seg in rel.split("/")):
        raise UnsafeKeyError(f"{uri}: key suffix {rel!r} has an empty, '.' or '..' segment", uri)
    base = root.resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UnsafeKeyError(f"{uri}: key suffix {rel!r} resolves outside {root}", uri)
    return target


@dataclass(frozen=True)
class ParsedURI:
    """A parsed storage URI.

    Attributes:
        kind: ``"file"`` or ``"s3"``.
        path: the local path (``kind == "file"``); for s3, ``Path()``.
        bucket: the S3 bucket (``kind == "s3"``), else ``""``.
        key: the S3 key, possibly empty for a bucket-level prefix (``kind == "s3"``), else ``""``.
        file_scheme: whether a local URI was written as ``file://`` (kept when listing).
    """

    kind: str
    path: Path = Path()
    bucket: str = ""
    key: str = ""
    file_scheme: bool = False


def parse_uri(uri: str) -> ParsedURI:
    """Parse ``uri`` strictly.

    Raises:
        InvalidURIError: empty URI, unknown scheme, ``s3://`` without a valid bucket,
            ``file://`` with a remote host or a relative path.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURIError(f"empty storage URI {uri!r}", str(uri))
    m = _SCHEME_RE.match(uri)
    if m is None:
        if uri.startswith("s3:") or uri.startswith("file:"):
            raise InvalidURIError(f"malformed storage URI {uri!r} (expected 's3://bucket/key' or 'file:///path')", uri)
        return ParsedURI(kind="file", path=Path(uri))
    scheme = m.group(1).lower()
    rest = uri[m.end() :]
    if scheme == "file":
        host, sep, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise InvalidURIError(f"file URI {uri!r} names host {host!r}; only local files are supported", uri)
        if not sep:
            raise InvalidURIError(f"file URI {uri!r} has no absolute path (expected 'file:///abs/path')", uri)
        return ParsedURI(kind="file", path=Path("/" + unquote(path)), file_scheme=True)
    if scheme in ("s3", "s3a"):
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidURIError(f"S3 URI {uri!r} has no bucket (expected 's3://bucket/key')", uri)
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidURIError(f"S3 URI {uri!r} has an invalid bucket name {bucket!r}", uri)
        return ParsedURI(kind="s3", bucket=bucket, key=key)
    raise InvalidURIError(
        f"unsupported URI scheme {scheme!r} in {uri!r}; use a plain path, 'file:///path' or 's3://bucket/key'", uri
    )


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a URI.

    ``join_uri("work/store", "shards", "a.tar") == "work/store/shards/a.tar"``;
    ``join_uri("s3://b/p", "x") == "s3://b/p/x"``. Parts may contain ``/`` but no ``..`` or ``.``
    segment (a join never climbs out of ``base``).

    Raises:
        InvalidURIError: ``base`` is not a valid URI or a part holds a ``..``/``.`` segment.
    """
    parse_uri(base)
    segments: list[str] = []
    for part in parts:
        for seg in str(part).split("/"):
            if seg == "":
                continue
            if seg in (".", ".."):
                raise InvalidURIError(f"refusing to join segment {seg!r} (from {part!r}) onto {base!r}", base)
            segments.append(seg)
    if not segments:
        return base
    joined = "/".join(segments)
    head = base.rstrip("/")
    if head == "":  # base was "/"
        return "/" + joined
    if head.endswith(":"):  # base was "file:///"
        return head + "///" + joined
    return head + "/" + joined


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (64 lowercase hex characters)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of the local file ``path``, read in chunks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


class IntegrityError(InputError, ValueError):
    """A stored file does not match the sha256/size recorded for it (or is missing, or unparseable).

    Attributes:
        uri: the artifact (e.g. a checkpoint directory) the file belongs to.
        file: the file, relative to ``uri``.
    """

    def __init__(self, message: str, uri: str, file: str) -> None:
        super().__init__(message)
        self.uri = uri
        self.file = file


def file_record(data: bytes) -> dict[str, Any]:
    """The hash record of one file's bytes: ``{"sha256": hex, "size": bytes}``."""
    return {"sha256": sha256_bytes(data), "size": len(data)}


def verify_file_records(
    root: Path, records: Any, uri: str, select: Callable[[str], bool] | None = None, kind: str = "directory"
) -> list[str]:
    """Check local copies of ``uri``'s files under ``root`` against ``records`` ``{rel: {"sha256", "size"}}``.

    Only the entries ``select(rel)`` picks (default all) are checked: each must exist, have the
    recorded size and the recorded sha256. Returns the checked ``rel`` paths, sorted.

    Raises:
        IntegrityError: naming ``kind uri`` and the first file that is missing, has another size or
            another sha256, or a malformed record.
        UnsafeKeyError: a recorded path that is not a safe relative path (see :func:`local_target`).
    """
    if not isinstance(records, dict):
        raise IntegrityError(f"{kind} {uri}: malformed hash record (expected a mapping, got {records!r:.80})", uri, "")
    checked = []
    for rel in sorted(records):
        if select is not None and not select(rel):
            continue
        rec = records[rel]
        if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("size"), int)):
            raise IntegrityError(f"{kind} {uri}: malformed hash record for {rel}: {rec!r:.120}", uri, rel)
        path = local_target(root, rel, join_uri(uri, rel))
        if not path.is_file():
            raise IntegrityError(f"{kind} {uri}: file {rel} is missing (listed in its hash record)", uri, rel)
        size = path.stat().st_size
        if size != rec["size"]:
            raise IntegrityError(
                f"{kind} {uri}: file {rel} has {size} bytes, its hash record says {rec['size']} (truncated or replaced)",
                uri,
                rel,
            )
        digest = sha256_file(path)
        if digest != rec["sha256"]:
            raise IntegrityError(
                f"{kind} {uri}: file {rel} does not match its hash record "
                f"(sha256 {digest[:12]}…, recorded {rec['sha256'][:12]}…): the file is damaged",
                uri,
                rel,
            )
        checked.append(rel)
    return checked


def _is_transient_client_error(exc: Exception) -> bool:
    """Whether a botocore ``ClientError`` is worth retrying (5xx or throttling)."""
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code in _TRANSIENT_CODES or status >= 500 or status == 429


def _error_code(exc: Exception) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ``ClientError``; ``("", 0)`` otherwise."""
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class _ResumingS3Reader(io.RawIOBase):
    """S3 object stream that resumes after a mid-stream connection drop (see :meth:`Storage.open_read`)."""

    def __init__(self, storage: "Storage", uri: str, p: "ParsedURI") -> None:
        super().__init__()
        self._st, self._uri, self._p = storage, uri, p
        self.pos = 0  # bytes delivered so far
        self.resumes = 0  # how many times the stream was re-opened mid-object
        resp = storage._s3_call(uri, p, "read", lambda: storage._client().get_object(Bucket=p.bucket, Key=p.key))
        self._etag: str = resp.get("ETag", "")
        self._size = int(resp.get("ContentLength", -1))
        self._body: Any = resp["Body"]

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        p = self._p

        def get() -> Any:
            kw: dict[str, Any] = {"Bucket": p.bucket, "Key": p.key, "Range": f"bytes={self.pos}-"}
            if self._etag:
                kw["IfMatch"] = self._etag
            try:
                return self._st._client().get_object(**kw)["Body"]
            except Exception as e:
                code, status = _error_code(e)
                if code == "PreconditionFailed" or status == 412:
                    raise StorageError(
                        f"{self._uri} was replaced while being read (at byte {self.pos}); read it again from the start",
                        self._uri,
                    ) from e
                raise

        with contextlib.suppress(Exception):
            self._body.close()
        self._body = self._st._s3_call(self._uri, p, "resume reading", get)

    def readinto(self, buf: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError as Urllib3Error

        view = memoryview(buf).cast("B")
        attempt = 0
        while True:
            try:
                data = self._body.read(len(view))
                if not data and 0 <= self.pos < self._size:  # a silently short body counts as a drop
                    raise ConnectionError(f"stream ended at byte {self.pos}")
            except (BotoCoreError, Urllib3Error, ConnectionError, TimeoutError) as e:
                if attempt >= self._st.retries:
                    raise StorageError(
                        f"cannot read {self._uri}: connection dropped at byte {self.pos} of "
                        f"{self._size} after {attempt + 1} attempt(s): {type(e).__name__}",
                        self._uri,
                    ) from e
                delay = self._st.backoff_s * (2**attempt)
                attempt += 1
                log.warning(
                    "stream of %s dropped at byte %d (%s); resuming %d/%d in %.2fs",
                    self._uri,
                    self.pos,
                    type(e).__name__,
                    attempt,
                    self._st.retries,
                    delay,
                )
                time.sleep(delay)
                self._reopen()
                self.resumes += 1
                continue
            n = len(data)
            view[:n] = data
            self.pos += n
            return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


def _write_error(uri: str, e: OSError) -> StorageError:
    """A :class:`StorageError` for a failed write of ``uri`` (a full disk said so in plain words)."""
    if e.errno in _FULL_ERRNOS:
        return StorageError(
            f"cannot write {uri}: {e.strerror or 'no space left on device'} (nothing was written there; "
            "free some space and rerun)",
            uri,
        )
    return StorageError(f"cannot write {uri}: {e.strerror or e}", uri)


@contextlib.contextmanager
def _disk_full_is_storage_error(uri: str) -> Iterator[None]:
    """Turn a full-disk ``OSError`` raised while writing ``uri`` into a :class:`StorageError` naming it."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise _write_error(uri, e) from e
        raise


class _AtomicS3Writer:
    """File object that spools writes locally and uploads on successful close (one object, atomically)."""

    def __init__(self, storage: Storage, uri: str, parsed: ParsedURI) -> None:
        self._storage = storage
        self._uri = uri
        self._parsed = parsed
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX_BYTES, mode="w+b")

    def commit(self) -> None:
        """Upload the spooled bytes as the final object."""
        self.file.flush()

        def upload() -> None:
            self.file.seek(0)
            self._storage._client().upload_fileobj(
                self.file, self._parsed.bucket, self._parsed.key, Config=self._storage._transfer_config()
            )

        self._storage._s3_call(self._uri, self._parsed, "write", upload)

    def close(self) -> None:
        """Discard the spooled data."""
        self.file.close()


class Storage:
    """Read, write, list and delete artifacts addressed by URI (local paths, ``file://``, ``s3://``).

    Args:
        retries: how many times a transient S3 error is retried (0 = try once).
        backoff_s: first retry delay in seconds; it doubles on each further retry.

    Thread-safe: one boto3 client is shared per process and endpoint.
    """

    #: Keys requested per S3 list page (S3's maximum is 1000).
    list_page_size: int = 1000

    def __init__(self, retries: int = 5, backoff_s: float = 0.2) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self._lock = threading.Lock()
        self._clients: dict[tuple[int, str | None], Any] = {}
        self._known_buckets: set[str] = set()

    # ------------------------------------------------------------------ public API

    def read_bytes(self, uri: str) -> bytes:
        """Return the whole content of ``uri``.

        Raises:
            NotFoundError: no such file/object. NoSuchBucketError: the bucket is missing.
            StorageError: any other failure (after retries for transient errors).
        """
        p = parse_uri(uri)
        if p.kind == "file":
            self._reject_dir_key(uri, p)
            try:
                return p.path.read_bytes()
            except FileNotFoundError as e:
                raise NotFoundError(f"no such file: {uri}", uri) from e
            except OSError as e:
                raise StorageError(f"cannot read {uri}: {e.strerror or e}", uri) from e
        self._require_key(uri, p)

        def get() -> bytes:
            body = self._client().get_object(Bucket=p.bucket, Key=p.key)["Body"]
            try:
                return cast(bytes, body.read())
            finally:
                body.close()

        return self._s3_call(uri, p, "read", get)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` to ``uri`` atomically (readers see the old content, or all of the new).

        Parent directories of local files are created.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write_bytes({uri!r}) needs bytes, got {type(data).__name__}")
        p = parse_uri(uri)
        if p.kind == "file":
            with self.open_write(uri) as f:
                f.write(bytes(data))
            return
        self._require_key(uri, p)
        payload = bytes(data)
        self._s3_call(uri, p, "write", lambda: self._client().put_object(Bucket=p.bucket, Key=p.key, Body=payload))

    def open_read(self, uri: str) -> BinaryIO:
        """Open ``uri`` for streaming reads. The caller closes the returned file object.

        For local files this is a regular binary file; for S3 a read-only stream (``read(n)``, no
        ``seek``) that survives a dropped connection: it re-requests the rest of the object from
        the byte it reached (``Range``, pinned to the first response's ETag so a replaced object is
        an error, never a splice), up to ``retries`` times per drop with backoff.
        """
        p = parse_uri(uri)
        if p.kind == "file":
            self._reject_dir_key(uri, p)
            try:
                return open(p.path, "rb")  # noqa: SIM115 - returned to the caller
            except FileNotFoundError as e:
                raise NotFoundError(f"no such file: {uri}", uri) from e
            except OSError as e:
                raise StorageError(f"cannot open {uri}: {e.strerror or e}", uri) from e
        self._require_key(uri, p)
        return cast(BinaryIO, _ResumingS3Reader(self, uri, p))

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        """Context manager yielding a binary file; the object appears at ``uri`` only on a clean exit.

        If the ``with`` body raises, nothing becomes visible and no temporary file is left behind.
        """
        p = parse_uri(uri)
        if p.kind == "file":
            self._reject_dir_key(uri, p)
            yield from self._open_write_local(uri, p.path)
            return
        self._require_key(uri, p)
        writer = _AtomicS3Writer(self, uri, p)
        try:
            with _disk_full_is_storage_error(uri):  # the local spool can fill the disk too
                yield cast(BinaryIO, writer.file)
            writer.commit()
        finally:
            writer.close()

    def exists(self, uri: str) -> bool:
        """Whether a file/object exists at ``uri`` (a local directory counts as existing).

        Raises:
            NoSuchBucketError: the S3 bucket does not exist (a misconfiguration, not a "no").
        """
        p = parse_uri(uri)
        if p.kind == "file":
            return p.path.exists()
        self._require_key(uri, p)

        def head() -> bool:
            try:
                self._client().head_object(Bucket=p.bucket, Key=p.key)
                return True
            except Exception as e:
                code, status = _error_code(e)
                if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                    self._check_bucket(uri, p)
                    return False
                raise

        return self._s3_call(uri, p, "check", head)

    def list(self, prefix: str) -> list[str]:
        """All files/objects under ``prefix``, recursively, as full URIs, sorted.

        Local: if ``prefix`` is a directory, every file below it; otherwise every file whose path
        starts with ``prefix`` (so ``shards/train-`` matches ``shards/train-000000.tar``). Returned
        URIs keep the prefix's form (plain path or ``file://``). Our temporary files are skipped.
        S3: every key starting with the prefix's key (plain string prefix, no delimiter).
        """
        p = parse_uri(prefix)
        if p.kind == "file":
            return self._list_local(prefix, p)

        def run() -> list[str]:
            out: list[str] = []
            paginator = self._client().get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=p.bucket, Prefix=p.key, PaginationConfig={"PageSize": self.list_page_size}
            )
            for page in pages:
                for obj in page.get("Contents", []) or []:
                    out.append(f"s3://{p.bucket}/{obj['Key']}")
            return out

        return sorted(self._s3_call(prefix, p, "list", run))

    def delete(self, uri: str) -> None:
        """Delete the file/object at ``uri``. Deleting something that does not exist is a no-op.

        Raises:
            NoSuchBucketError: the S3 bucket does not exist. StorageError: ``uri`` is a directory.
        """
        p = parse_uri(uri)
        if p.kind == "file":
            if p.path.is_dir():
                raise StorageError(f"refusing to delete directory {uri} (delete files one by one)", uri)
            try:
                p.path.unlink(missing_ok=True)
            except OSError as e:
                raise StorageError(f"cannot delete {uri}: {e.strerror or e}", uri) from e
            return
        self._require_key(uri, p)
        self._s3_call(uri, p, "delete", lambda: self._client().delete_object(Bucket=p.bucket, Key=p.key))

    def local_path(self, uri: str) -> Path | None:
        """The local path behind ``uri`` (plain path or ``file://``), or ``None`` for remote URIs."""
        p = parse_uri(uri)
        return p.path if p.kind == "file" else None

    def download_tree(self, prefix: str, dest: Path, select: Callable[[str], bool] | None = None) -> tuple[Path, ...]:
        """Copy every object under ``prefix`` (``<prefix>/<rel>``) to ``dest/<rel>``; returns the files written.

        ``select(rel)`` picks which ones (default all). Every ``rel`` under the prefix, selected or not,
        goes through :func:`local_target` before anything is written: a prefix holding an unsafe key
        is refused as a whole (:class:`UnsafeKeyError`) and nothing is written.
        """
        base = prefix.rstrip("/") + "/"
        listed = [(r := u[len(base) :], local_target(dest, r, u), u) for u in self.list(base) if u.startswith(base)]
        targets = [(t, u) for r, t, u in listed if select is None or select(r)]
        for target, u in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(u))
        return tuple(t for t, _ in targets)

    # ------------------------------------------------------------------ local helpers

    @staticmethod
    def _reject_dir_key(uri: str, p: ParsedURI) -> None:
        if p.path.is_dir():
            raise StorageError(f"{uri} is a directory, not a file", uri)

    @staticmethod
    def _open_write_local(uri: str, path: Path) -> Iterator[BinaryIO]:
        """Yield a temp file next to ``path``; fsync + ``os.replace`` it onto ``path`` on success.

        On any failure (the caller's block raising, a full disk at write, flush or fsync time) the
        temp file is removed and ``path`` keeps its old content (or stays absent).
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
        except OSError as e:
            raise _write_error(uri, e) from e
        tmp = Path(tmp_name)
        f = os.fdopen(fd, "wb")
        ok = False
        try:
            with _disk_full_is_storage_error(uri):
                yield cast(BinaryIO, f)  # other errors raised by the caller's block propagate unchanged
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except OSError as e:
                raise _write_error(uri, e) from e
            ok = True
        finally:
            with contextlib.suppress(OSError):  # the partial buffer of a failed write need not reach the disk
                f.close()
            if not ok:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _list_local(prefix: str, p: ParsedURI) -> list[str]:
        def fmt(path: Path) -> str:
            return "file://" + str(path.absolute()) if p.file_scheme else str(path)

        if p.path.is_dir():
            root, name_prefix = p.path, None
        else:
            root, name_prefix = p.path.parent, str(p.path)
            if not root.is_dir():
                return []
        out: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for fn in filenames:
                if TMP_MARKER in fn:
                    continue
                full = Path(dirpath) / fn
                if name_prefix is not None and not str(full).startswith(name_prefix):
                    continue
                out.append(fmt(full))
        return sorted(out)

    # ------------------------------------------------------------------ s3 helpers

    @staticmethod
    def _require_key(uri: str, p: ParsedURI) -> None:
        if not p.key or p.key.endswith("/"):
            raise InvalidURIError(f"S3 URI {uri!r} names no object key (expected 's3://bucket/key')", uri)

    def _client(self) -> Any:
        """The boto3 S3 client for this process and endpoint (created lazily; fork-safe by pid)."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cache_key = (os.getpid(), endpoint)
        with self._lock:
            client = self._clients.get(cache_key)
            if client is None:
                import boto3
                from botocore.config import Config

                cfg = Config(
                    retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves
                    connect_timeout=10,
                    read_timeout=60,
                    s3={"addressing_style": "path" if endpoint else "auto"},
                )
                # boto3 reads the endpoint from AWS_ENDPOINT_URL(_S3) itself; credentials from env.
                client = boto3.session.Session().client("s3", config=cfg)
                self._clients = {k: v for k, v in self._clients.items() if k[0] == os.getpid()}
                self._clients[cache_key] = client
            return client

    @staticmethod
    def _transfer_config() -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES, use_threads=False
        )

    def _check_bucket(self, uri: str, p: ParsedURI) -> None:
        """Raise ``NoSuchBucketError`` if ``p.bucket`` does not exist (cached once seen)."""
        if p.bucket in self._known_buckets:
            return
        try:
            self._client().head_bucket(Bucket=p.bucket)
        except Exception as e:
            code, status = _error_code(e)
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise NoSuchBucketError(
                    f"S3 bucket {p.bucket!r} does not exist (while accessing {uri})", uri, p.bucket
                ) from e
            raise
        self._known_buckets.add(p.bucket)

    def _s3_call(self, uri: str, p: ParsedURI, op: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on transient errors; translate botocore errors to StorageError."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            HTTPClientError,
            NoCredentialsError,
        )

        attempt = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except ClientError as e:
                code, status = _error_code(e)
                if code == "NoSuchBucket":
                    raise NoSuchBucketError(
                        f"S3 bucket {p.bucket!r} does not exist (while trying to {op} {uri})", uri, p.bucket
                    ) from e
                if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                    raise NotFoundError(f"no such S3 object: {uri}", uri) from e
                if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StorageError(
                        f"access denied to {uri} (bucket {p.bucket!r}) while trying to {op} it: {code}", uri
                    ) from e
                if not _is_transient_client_error(e) or attempt >= self.retries:
                    raise StorageError(
                        f"cannot {op} {uri}: {code or 'error'} (HTTP {status}) after {attempt + 1} attempt(s)", uri
                    ) from e
                reason = f"{code} (HTTP {status})"
            except NoCredentialsError as e:
                raise StorageError(
                    f"cannot {op} {uri}: no AWS credentials in the environment (set AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY)",
                    uri,
                ) from e
            except (EndpointConnectionError, ConnectionClosedError, HTTPClientError) as e:
                if attempt >= self.retries:
                    raise StorageError(
                        f"cannot {op} {uri}: connection failed after {attempt + 1} attempt(s): {type(e).__name__}", uri
                    ) from e
                reason = type(e).__name__
            except BotoCoreError as e:
                raise StorageError(f"cannot {op} {uri}: {type(e).__name__}: {e}", uri) from e
            delay = self.backoff_s * (2**attempt)
            attempt += 1
            log.warning(
                "transient storage error on %s (%s); retry %d/%d in %.2fs", uri, reason, attempt, self.retries, delay
            )
            time.sleep(delay)


def from_config(cfg: StorageConfig) -> Storage:
    """Build a :class:`Storage` from ``params.storage`` (retries and backoff; endpoints come from env)."""
    return Storage(retries=cfg.retries, backoff_s=cfg.backoff_s)
