"""Secrets never reach MLflow or the logs: redaction and flattening of params, tags and dicts.

:func:`redact` masks values under credential-like keys (``*secret*``, ``*password*``, ``*token*``,
``*key*``, ``AWS_*``, ...), passwords in URIs with userinfo (``user:pass@host``), ``NAME=value``
assignments of credential-like names and AWS access key ids inside strings; :func:`flatten_params`
turns a nested config into MLflow's dotted, length-limited params.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "REDACTED",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "MAX_KEY_LENGTH",
    "is_secret_key",
    "redact_text",
    "redact",
    "flatten_params",
    "sanitize_key",
    "truncate",
    "scalar_str",
]

#: What a redacted value is replaced with.
REDACTED = "***REDACTED***"
#: MLflow's limits (mlflow.utils.validation in 3.x): param values, tag values, key length, batch sizes.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
#: Characters MLflow accepts in param/metric/tag keys; anything else becomes "_".
_INVALID_KEY_CHARS = re.compile(r"[^\w.\- :/]")

#: Substrings of a key (lower-cased) that mark its value as a credential.
_SECRET_SUBSTRINGS = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "apikey",
    "api_key",
    "access_key",
    "accesskey",
    "private_key",
    "privatekey",
    "session_token",
    "auth_token",
    "bearer",
)
#: Whole key segments (split on non-alphanumerics and camelCase) that mark a credential.
_SECRET_SEGMENTS = frozenset({"token", "key", "pwd", "pass", "auth", "authorization", "cookie", "signature", "sig"})
#: ``user:password@`` inside URIs (any scheme).
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
#: ``NAME=value`` / ``NAME: value`` with a credential-like NAME inside free text.
_ASSIGNMENT = re.compile(
    r"(?i)\b(?P<name>(?:aws_[a-z_]+|[a-z0-9_]*(?:secret|password|passwd|token|api_?key|access_?key)[a-z0-9_]*))"
    r"(?P<sep>\s*[=:]\s*)(?P<q>['\"]?)(?P<val>[^\s'\",;&]+)"
)
#: AWS access key ids (AKIA..., ASIA...).
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")


# --------------------------------------------------------------------------- redaction


def _key_segments(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [s for s in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if s]


def is_secret_key(key: str) -> bool:
    """True if a (leaf) key name looks like it holds a credential.

    Matches ``AWS_*``, any key containing ``secret``/``password``/``credential``/``api_key``/...,
    and keys with a whole segment ``token``/``key``/``pwd``/``auth`` (``github_token``,
    ``apiKey``, ``key``), but not ``tokens`` or ``max_tokens`` or ``keys``.
    """
    leaf = key.rsplit(".", 1)[-1]
    low = leaf.lower()
    if low.startswith("aws_") or low == "aws":
        return True
    if any(s in low for s in _SECRET_SUBSTRINGS):
        return True
    return any(seg in _SECRET_SEGMENTS for seg in _key_segments(leaf))


def redact_text(text: str) -> str:
    """Mask credentials inside a free-text string.

    ``scheme://user:pass@host`` -> ``scheme://user:***REDACTED***@host``; ``AWS_SECRET_ACCESS_KEY=x``
    / ``password: x`` -> value masked; AWS access key ids masked. Other text is unchanged.
    """
    if not text:
        return text
    out = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    out = _ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{m['q']}{REDACTED}", out)
    return _AWS_KEY_ID.sub(REDACTED, out)


def _has_value(v: Any) -> bool:
    return not (v is None or (isinstance(v, (str, bytes, list, tuple, dict, set)) and len(v) == 0))


def _to_plain(obj: Any) -> Any:
    """Pydantic models -> dicts (JSON mode); everything else unchanged."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return obj


def redact(d: Any) -> Any:
    """A redacted deep copy of ``d`` (dict, list, pydantic model, str or scalar).

    Values under credential-like keys (:func:`is_secret_key`) with a non-empty value become
    :data:`REDACTED` (a whole sub-dict under such a key included); strings anywhere are passed
    through :func:`redact_text`. The input is never modified.
    """
    d = _to_plain(d)
    if isinstance(d, Mapping):
        out: dict[Any, Any] = {}
        for k, v in d.items():
            if is_secret_key(str(k)) and _has_value(v):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(d, (list, tuple)):
        return type(d)(redact(v) for v in d) if isinstance(d, list) else tuple(redact(v) for v in d)
    if isinstance(d, str):
        return redact_text(d)
    return d


# --------------------------------------------------------------------------- flattening


def sanitize_key(key: str) -> str:
    key = _INVALID_KEY_CHARS.sub("_", key)
    return key[:MAX_KEY_LENGTH]


def truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def scalar_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, (bool, int, float)):
        return str(v)
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(v)


def flatten_params(d: Any, prefix: str = "", max_value_length: int = MAX_PARAM_VALUE_LENGTH) -> dict[str, str]:
    """Flatten nested dicts (or a pydantic model) to ``{"a.b.c": str}`` for MLflow params.

    Lists/tuples become JSON (``["a", "b"]``), ``None`` becomes ``"None"``, an empty dict becomes
    ``"{}"``. Keys are sanitised to MLflow's alphabet (other characters -> ``_``) and cut to 250
    characters; values are truncated to ``max_value_length`` (MLflow's 6000). Does **not** redact:
    call :func:`redact` first (``MlflowTracker.log_params`` does).
    """
    d = _to_plain(d)
    out: dict[str, str] = {}
    if not isinstance(d, Mapping):
        raise TypeError(f"flatten_params expects a dict or pydantic model, got {type(d).__name__}")
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        v = _to_plain(v)
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key, max_value_length))
        elif isinstance(v, Mapping):
            out[sanitize_key(key)] = "{}"
        else:
            out[sanitize_key(key)] = truncate(scalar_str(v), max_value_length)
    return out
