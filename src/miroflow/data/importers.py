"""Importers: re-shard foreign webdataset-style tars into our shard layout.

``import_tars`` reads cc12m/img2dataset-style tars (members ``{key}.jpg``, ``{key}.txt``,
``{key}.json``) from any URI prefix, keeps the original image bytes, checks every sample
(decodable image, non-empty caption, safe member names, no pickle members) and writes our
shards ``<out_prefix>/{split}-{i:06d}.tar`` with keys ``{split}-{n:08d}``. Bad samples are
skipped and reported with their reasons. Member names are never used as filesystem paths, and
nothing is written anywhere but the shard URIs under ``out_prefix``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from miroflow.data.sample import Sample
from miroflow.data.shards import (
    DEFAULT_MAX_PIXELS,
    RECORD_EXTS,
    SOURCE_KEY_RE,
    ShardError,
    decode_image,
    group_to_record,
    iter_tar_groups,
    write_shards,
)
from miroflow.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    """What an import produced.

    Attributes:
        entries: manifest entries ``[{"uri", "sha256", "n"}]`` of the written shards.
        num_ok: number of samples imported.
        rejected: one ``{"source": tar URI, "member" or "key": str, "reason": str}`` per rejection.
        sources: the tar URIs that were read, in order.
    """

    entries: list[dict[str, Any]] = field(default_factory=list)
    num_ok: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def find_tars(source_prefix: str, storage: Storage) -> list[str]:
    """All ``.tar`` URIs under ``source_prefix`` (sorted); raises ``ValueError`` if there are none."""
    tars = [u for u in storage.list(source_prefix) if u.lower().endswith(".tar")]
    if not tars:
        raise ValueError(f"no .tar files found under {source_prefix!r}")
    return tars


def _caption(rec: dict[str, Any]) -> str | None:
    """The sample's caption: the ``.txt`` member, else ``json["caption"]``; ``None`` if empty/absent."""
    txt = rec.get("txt")
    if isinstance(txt, str) and txt.strip():
        return txt.strip()
    cap = rec.get("json", {}).get("caption")
    if isinstance(cap, str) and cap.strip():
        return cap.strip()
    return None


def iter_import_samples(
    tars: list[str], split: str, storage: Storage, report: ImportReport, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Sample]:
    """Yield checked ``Sample``s (original image bytes, new keys ``{split}-{n:08d}``) from ``tars``.

    Rejections are appended to ``report.rejected``; ``report.num_ok`` counts yielded samples.
    """
    n = 0
    for tar_uri in tars:
        report.sources.append(tar_uri)
        stream = storage.open_read(tar_uri)
        try:
            for key, group in iter_tar_groups(
                stream, tar_uri, report.rejected.append, key_re=SOURCE_KEY_RE, keep=RECORD_EXTS, salvage=True
            ):
                rec = group_to_record(key, group, tar_uri)
                if isinstance(rec, str):
                    report.rejected.append({"source": tar_uri, "key": key, "reason": rec})
                    continue
                caption = _caption(rec)
                if caption is None:
                    report.rejected.append({"source": tar_uri, "key": key, "reason": "missing or empty caption"})
                    continue
                try:
                    decode_image(rec["image_bytes"], name=f"{tar_uri} key {key!r}", max_pixels=max_pixels)
                except ValueError as e:
                    report.rejected.append({"source": tar_uri, "key": key, "reason": f"corrupt image: {e}"})
                    continue
                meta = {
                    "caption": caption,
                    "source": {"key": key, "tar": tar_uri, "json": rec["json"]},
                }
                yield Sample(
                    key=f"{split}-{n:08d}",
                    image=None,
                    caption=caption,
                    meta=meta,
                    encoded=rec["image_bytes"],
                    image_ext=rec["image_ext"],
                )
                n += 1
                report.num_ok += 1
        except ShardError as e:  # an unreadable/truncated tar: report it, keep what was read before
            report.rejected.append({"source": tar_uri, "reason": str(e)})
        finally:
            stream.close()


def import_tars(
    source_prefix: str,
    out_prefix: str,
    split: str,
    shard_size: int,
    storage: Storage,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImportReport:
    """Re-shard every cc12m-style ``.tar`` under ``source_prefix`` into ``<out_prefix>/{split}-*.tar``.

    Good samples keep their original image bytes (``image_ext`` "jpg" for JPEGs) and get keys
    ``{split}-{n:08d}``; ``meta`` keeps the caption and ``source`` = original key, tar URI and JSON.
    Skipped (and reported in ``ImportReport.rejected``): undecodable images, images over
    ``max_pixels`` (width x height, checked from the header before decoding), missing captions,
    unsafe member names (``../x``, absolute paths), invalid keys, non-regular members and samples
    with pickle members.

    Raises:
        ValueError: no ``.tar`` under ``source_prefix``. StorageError: reading/writing failed.
    """
    tars = find_tars(source_prefix, storage)
    report = ImportReport()
    report.entries = write_shards(
        iter_import_samples(tars, split, storage, report, max_pixels),
        out_prefix,
        split,
        shard_size,
        storage,
        image_format="jpg",
        progress=progress,
    )
    if report.num_ok == 0:
        reasons = "; ".join(
            f"{r.get('key') or r.get('member') or r['source']}: {r['reason']}" for r in report.rejected[:3]
        )
        raise ShardError(
            f"import from {source_prefix}: no usable sample in {len(tars)} tar file(s)"
            + (f" ({len(report.rejected)} rejected; first: {reasons})" if reasons else " (they are empty)")
        )
    log.info(
        "imported %d samples from %d tars into %d shards under %s; %d rejected",
        report.num_ok,
        len(tars),
        len(report.entries),
        out_prefix,
        len(report.rejected),
    )
    return report
