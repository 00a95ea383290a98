"""Small helpers every layer shares, written once: JSON safety, PNG bytes, manifests, devices.

This module sits at the bottom of the layers (docs/design.md §6): it imports only the standard
library, numpy, PIL, torch and :mod:`miroflow.storage`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from miroflow.storage import Storage

__all__ = ["json_safe", "json_text", "png_bytes", "write_manifest", "resolve_device"]


def json_safe(v: Any) -> Any:
    """Recursively make a value JSON-safe: numpy scalars/arrays -> Python, NaN/inf -> ``None``,
    tuples -> lists, mapping keys -> ``str``, paths -> ``str``."""
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Path):
        return str(v)
    return v


def json_text(doc: Any, *, sort_keys: bool = False) -> str:
    """``doc`` (made :func:`json_safe`) as indented JSON text with a trailing newline."""
    return json.dumps(json_safe(doc), indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image ``[H, W, 3]`` (or ``[H, W]``)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_manifest(path: str | Path, doc: Any, *, sort_keys: bool = True) -> Path:
    """Write a small local manifest (JSON, atomic: a reader never sees half a file); returns its path.

    Raises:
        OSError: the manifest's directory cannot be created or written (the message names the path).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the manifest directory {p.parent}: {err}") from err
    Storage(retries=0).write_bytes(str(p), json_text(doc, sort_keys=sort_keys).encode("utf-8"))
    return p


def resolve_device(want: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """``'auto'`` (or ``None``) -> ``cuda[:local_rank]`` when a GPU is available, else ``cpu``;
    ``'cuda'`` -> ``cuda:<local_rank>`` when ``local_rank`` is given; anything else as is."""
    if isinstance(want, torch.device):
        return want
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else int(local_rank)
    if want is None or want == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        want = "cuda"
    if want == "cuda":
        return torch.device(f"cuda:{rank}")
    return torch.device(want)
