"""The in-memory sample passed between dataset generators, importers and the shard writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One training sample.

    Attributes:
        key: unique sample key, ``[A-Za-z0-9_-]+`` (used as the webdataset key, never as a path).
        image: ``uint8`` array ``[H, W, 3]`` (RGB), or already-encoded bytes in ``encoded``.
        caption: the caption stored in ``{key}.txt``.
        meta: JSON-serialisable metadata stored in ``{key}.json`` (``caption`` is added if absent).
        encoded: optional pre-encoded image bytes (an import without a resolution keeps the original bytes).
        image_ext: ``"png"`` or ``"jpg"`` — the member extension for the image.
    """

    key: str
    image: np.ndarray | None
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    encoded: bytes | None = None
    image_ext: str = "png"
