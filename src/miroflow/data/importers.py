"""Importers: re-shard foreign webdataset-style tars into our shard layout.

``import_tars`` reads cc12m/img2dataset-style tars (members ``{key}.jpg``, ``{key}.txt``,
``{key}.json``) from any URI prefix, checks every sample (decodable image, non-empty caption, safe
member names, no pickle members, optionally a minimum side) and writes our shards
``<out_prefix>/{split}-{i:06d}.tar`` with keys ``{split}-{n:08d}``. Bad samples are skipped and
reported with their reasons. Member names are never used as filesystem paths, and nothing is
written anywhere but the shard URIs under ``out_prefix``.

Preprocessing (docs/architecture.md, "Imported data"), with a ``resolution``: every image is
decoded to RGB by :func:`~miroflow.data.shards.decode_image` (CMYK, palette, grey, grey+alpha,
RGBA and 16-bit grey converted; the ``max_pixels`` bomb guard runs on the header first), centre
cropped to the largest square (:func:`center_crop_box`) and resized to ``resolution x resolution``
with PIL's Lanczos filter and ``reducing_gap=3.0`` (:func:`preprocess_image`; small images are
upscaled, never dropped), then re-encoded losslessly (PNG by default). The sample's ``.json``
records ``orig_width`` / ``orig_height`` (pixels of the source image). Without a ``resolution``
the original image bytes are kept (a plain re-shard).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

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

#: PIL filter of the import resize: Lanczos (windowed sinc, a = 3), anti-aliased when downscaling.
RESIZE_FILTER = Image.Resampling.LANCZOS
#: ``reducing_gap`` of the import resize: a large downscale first reduces by an integer factor (box
#: filter) to at most 3x the target, then resamples; PIL documents 3.0 as indistinguishable from
#: fair resampling, at a fraction of its cost on multi-megapixel photos.
RESIZE_REDUCING_GAP = 3.0


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square of a ``width x height`` image as a PIL box ``(left, top, right, bottom)``.

    Pixels; an odd surplus leaves the extra pixel on the right/bottom (``left = (width - side) // 2``).
    """
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def preprocess_image(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Centre crop ``rgb`` to a square and resize it to ``resolution x resolution`` (the import preprocessing).

    Args:
        rgb: ``uint8 [H, W, 3]`` RGB (as :func:`~miroflow.data.shards.decode_image` returns it).
        resolution: output side in pixels (``data.resolution``).

    Returns:
        ``uint8 [resolution, resolution, 3]``; :data:`RESIZE_FILTER` with :data:`RESIZE_REDUCING_GAP`
        (deterministic). An image already ``resolution`` square is returned unchanged.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"preprocess_image: expected uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if resolution < 1:
        raise ValueError(f"preprocess_image: resolution must be >= 1, got {resolution}")
    h, w = arr.shape[:2]
    if (h, w) == (resolution, resolution):
        return arr
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    out = img.resize(
        (resolution, resolution),
        resample=RESIZE_FILTER,
        box=center_crop_box(w, h),
        reducing_gap=RESIZE_REDUCING_GAP,
    )
    return np.asarray(out, dtype=np.uint8)


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
    tars: list[str],
    split: str,
    storage: Storage,
    report: ImportReport,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resolution: int | None = None,
    min_side: int | None = None,
    image_format: str = "png",
) -> Iterator[Sample]:
    """Yield checked ``Sample``s (new keys ``{split}-{n:08d}``) from ``tars``.

    Args:
        resolution: bring every image to ``uint8 [resolution, resolution, 3]`` (:func:`preprocess_image`;
            the sample carries the array, encoded as ``image_format`` by the shard writer); ``None`` =
            keep the original image bytes.
        min_side: reject images whose shorter side (pixels) is below it; ``None`` = keep all.

    ``meta`` = ``{"caption", "orig_width", "orig_height", "source": {"key", "tar", "json"}}``.
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
                try:  # the header's size is checked against max_pixels before any pixel is decoded
                    rgb = decode_image(rec["image_bytes"], name=f"{tar_uri} key {key!r}", max_pixels=max_pixels)
                except ValueError as e:
                    report.rejected.append({"source": tar_uri, "key": key, "reason": f"corrupt image: {e}"})
                    continue
                height, width = (int(d) for d in rgb.shape[:2])
                if min_side is not None and min(width, height) < min_side:
                    reason = f"image {width}x{height}: shorter side {min(width, height)} px is below data.min_side={min_side}"
                    report.rejected.append({"source": tar_uri, "key": key, "reason": reason})
                    continue
                meta = {
                    "caption": caption,
                    "orig_width": width,
                    "orig_height": height,
                    "source": {"key": key, "tar": tar_uri, "json": rec["json"]},
                }
                if resolution is None:
                    yield Sample(
                        key=f"{split}-{n:08d}",
                        image=None,
                        caption=caption,
                        meta=meta,
                        encoded=rec["image_bytes"],
                        image_ext=rec["image_ext"],
                    )
                else:
                    yield Sample(
                        key=f"{split}-{n:08d}",
                        image=preprocess_image(rgb, resolution),
                        caption=caption,
                        meta=meta,
                        image_ext=image_format,
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
    resolution: int | None = None,
    min_side: int | None = None,
    image_format: str = "png",
) -> ImportReport:
    """Re-shard every cc12m-style ``.tar`` under ``source_prefix`` into ``<out_prefix>/{split}-*.tar``.

    Good samples get keys ``{split}-{n:08d}``; with ``resolution`` (what the prepare stage passes:
    ``data.resolution``) their images are centre cropped and resized to ``resolution`` square RGB and
    encoded as ``image_format`` (``data.image_format``, PNG by default: lossless), without it they keep
    their original image bytes (``image_ext`` "jpg" for JPEGs). ``meta`` keeps the caption,
    ``orig_width`` / ``orig_height`` and ``source`` = original key, tar URI and JSON.
    Skipped (and reported in ``ImportReport.rejected``): undecodable images, images over
    ``max_pixels`` (width x height, checked from the header before decoding), images whose shorter
    side is below ``min_side`` (``data.min_side``; ``None`` keeps every size), missing captions,
    unsafe member names (``../x``, absolute paths), invalid keys, non-regular members and samples
    with pickle members.

    Raises:
        ValueError: no ``.tar`` under ``source_prefix``. StorageError: reading/writing failed.
    """
    tars = find_tars(source_prefix, storage)
    report = ImportReport()
    report.entries = write_shards(
        iter_import_samples(tars, split, storage, report, max_pixels, resolution, min_side, image_format),
        out_prefix,
        split,
        shard_size,
        storage,
        image_format=image_format,
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
