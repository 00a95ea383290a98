"""Prompt-set registry for evaluation (docs/design.md §2 "evaluate", §7.3 registries keyed by name).

A prompt set is named by a *spec* string:

=============================  ===============================================================
spec                           prompts
=============================  ===============================================================
``shapes``                     the shapes evaluation set (:func:`miroflow.data.shapes.eval_prompts`),
                               25 prompts per GenEval category, categories interleaved
``shapes:<k>``                 the same with ``k`` prompts per category
``geneval:<path-or-uri>``      a GenEval metadata file (JSON lines, one object per prompt:
                               ``{"tag", "include": [{"class", "count", "color"?, "position"?}],
                               "prompt"[, "exclude"]}``)
``parti:<path-or-uri>``        PartiPrompts TSV with the header ``Prompt\\tCategory\\tChallenge\\tNote``
                               (``tag`` = Category)
``txt:<path-or-uri>``          a plain UTF-8 text file, one prompt per line (blank lines and lines
                               starting with ``#`` are skipped; ``tag`` = ``txt``): the prompts of
                               your own data (``data.domain=import``, docs/architecture.md,
                               "Imported data"), scored by the rewards only (no judge)
=============================  ===============================================================

Paths may be plain paths, ``file://`` or ``s3://`` URIs (read through :mod:`miroflow.storage`).
``n`` keeps the first ``n`` prompts. For ``shapes`` the categories are interleaved
(round-robin), so any prefix covers every category and the first ``n`` prompts are the same
whatever the per-category count.

Every loader returns :class:`PromptItem` s; ``metadata`` is the prompt's GenEval-style record
(written verbatim as ``metadata.jsonl`` by the evaluate stage).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from miroflow.errors import InputError
from miroflow.storage import Storage

__all__ = [
    "PromptItem",
    "PromptSetError",
    "PROMPT_SETS",
    "load_prompt_set",
    "register_prompt_set",
    "SHAPES_DEFAULT_PER_CATEGORY",
]

#: Prompts per category of the plain ``shapes`` spec.
SHAPES_DEFAULT_PER_CATEGORY = 25
#: Seed of the shapes evaluation scenes (fixed: the set must not change between runs).
SHAPES_SEED = 1234
#: Most prompts per category ``shapes:<k>`` renders (60,000 prompts; ~6 s): a larger ``k`` is an error,
#: a larger ``n`` is capped, instead of a spec like ``shapes:99999999`` rendering for hours.
SHAPES_MAX_PER_CATEGORY = 10_000
#: Line ends of prompt files: LF, CRLF or CR only. ``str.splitlines`` also splits at
#: \x0b, \x0c, \x1c-\x1e, \x85, U+2028 and U+2029, which may sit inside a JSON string or a TSV cell
#: and would shift every line number after them.
_LINE_END = re.compile(r"\r\n|\r|\n")

PARTI_HEADER: tuple[str, ...] = ("Prompt", "Category", "Challenge", "Note")


class PromptSetError(InputError, ValueError):
    """A prompt-set spec or file is invalid; the message names the spec, file and line."""


@dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt.

    Attributes:
        tag: category (GenEval tag, PartiPrompts Category, shapes category).
        prompt: the caption given to the model.
        metadata: JSON-serialisable record of the prompt (GenEval format where it applies).
    """

    tag: str
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


PromptSetLoader = Callable[[str, "Storage | None"], list[PromptItem]]
"""``loader(argument_after_colon, storage) -> items`` (argument is ``""`` when the spec has none)."""

#: name -> (loader, usage string shown in error messages).
PROMPT_SETS: dict[str, tuple[PromptSetLoader, str]] = {}


def register_prompt_set(name: str, usage: str) -> Callable[[PromptSetLoader], PromptSetLoader]:
    """Decorator registering a loader under ``name`` (``usage`` is listed on unknown specs)."""

    def deco(fn: PromptSetLoader) -> PromptSetLoader:
        if name in PROMPT_SETS:
            raise ValueError(f"prompt set {name!r} registered twice")
        PROMPT_SETS[name] = (fn, usage)
        return fn

    return deco


def _valid() -> str:
    return ", ".join(usage for _, usage in PROMPT_SETS.values())


def load_prompt_set(spec: str, n: int | None = None, storage: Storage | None = None) -> list[PromptItem]:
    """Load the prompt set named by ``spec`` (see the module table), keeping the first ``n``.

    Raises:
        PromptSetError: unknown spec (lists the valid ones), missing argument, bad file content
            (names the file and line), or ``n < 1``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PromptSetError(f"empty prompt-set spec {spec!r}; valid: {_valid()}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PromptSetError(f"n must be a positive int or None, got {n!r}")
    name, _, arg = spec.strip().partition(":")
    if name not in PROMPT_SETS:
        raise PromptSetError(f"unknown prompt set {spec!r}; valid: {_valid()}")
    loader, _usage = PROMPT_SETS[name]
    if name == "shapes" and n is not None and not arg:
        # enough scenes per category for the first n of the interleaved order
        arg = str(min(SHAPES_MAX_PER_CATEGORY, max(SHAPES_DEFAULT_PER_CATEGORY, math.ceil(n / 6))))
    items = loader(arg, storage)
    if not items:
        raise PromptSetError(f"prompt set {spec!r} is empty")
    return items[:n] if n is not None else items


def _read_text(uri: str, spec: str, storage: Storage | None) -> str:
    if not uri:
        raise PromptSetError(f"prompt set {spec!r} needs a path: use {spec}:<path-or-uri>")
    st = storage or Storage()
    try:
        data = st.read_bytes(uri)
    except Exception as err:  # NotFoundError / StorageError name the URI
        raise PromptSetError(f"cannot read prompt file {uri}: {err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = len(_LINE_END.findall(data[: err.start].decode("utf-8", "replace"))) + 1
        raise PromptSetError(
            f"{uri} line {line}: not UTF-8 text (byte {err.start}: {data[err.start]:#04x}, {err.reason})"
        ) from None


def _split_lines(text: str) -> list[str]:
    """``text`` split at LF, CRLF and CR only (see :data:`_LINE_END`); no trailing empty line."""
    lines = _LINE_END.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines


# --------------------------------------------------------------------------- shapes
@register_prompt_set("shapes", "shapes[:<prompts-per-category>]")
def _load_shapes(arg: str, storage: Storage | None) -> list[PromptItem]:
    from miroflow.data.shapes import CATEGORIES, eval_prompts

    if arg:
        try:
            per_cat = int(arg)
        except ValueError:
            raise PromptSetError(f"shapes:{arg}: expected an integer number of prompts per category") from None
        if per_cat < 1:
            raise PromptSetError(f"shapes:{arg}: prompts per category must be >= 1")
        if per_cat > SHAPES_MAX_PER_CATEGORY:
            raise PromptSetError(f"shapes:{arg}: at most {SHAPES_MAX_PER_CATEGORY} prompts per category")
    else:
        per_cat = SHAPES_DEFAULT_PER_CATEGORY
    records = eval_prompts(per_cat, seed=SHAPES_SEED)
    by_cat: dict[str, list[dict[str, Any]]] = {c: [] for c in CATEGORIES}
    for rec in records:
        by_cat[rec["tag"]].append(rec)
    out: list[PromptItem] = []
    for k in range(per_cat):  # round-robin over categories
        for cat in CATEGORIES:
            if k < len(by_cat[cat]):
                rec = by_cat[cat][k]
                out.append(PromptItem(tag=rec["tag"], prompt=rec["prompt"], metadata=dict(rec)))
    return out


# --------------------------------------------------------------------------- geneval
def _check_include(value: Any, where: str, key: str) -> None:
    if not isinstance(value, list):
        raise PromptSetError(f"{where}: {key!r} must be a list of objects, got {type(value).__name__}")
    for j, obj in enumerate(value):
        if not isinstance(obj, dict):
            raise PromptSetError(f"{where}: {key}[{j}] must be an object, got {type(obj).__name__}")
        if not isinstance(obj.get("class"), str) or not obj["class"]:
            raise PromptSetError(f"{where}: {key}[{j}] is missing 'class' (a non-empty string)")
        count = obj.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PromptSetError(f"{where}: {key}[{j}].count must be a non-negative int, got {count!r}")


def parse_geneval(text: str, source: str) -> list[PromptItem]:
    """Parse GenEval metadata JSON lines (blank lines are skipped).

    Raises:
        PromptSetError: ``"<source> line <k>: ..."`` for invalid JSON, a non-object line, or a
            missing/invalid ``tag``, ``prompt`` or ``include``.
    """
    out: list[PromptItem] = []
    for lineno, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSetError(f"{where}: invalid JSON ({err.msg})") from None
        except ValueError as err:  # json's own: an integer of more than 4300 digits
            raise PromptSetError(f"{where}: invalid JSON ({err})") from None
        except RecursionError:
            raise PromptSetError(f"{where}: invalid JSON (nested too deeply)") from None
        if not isinstance(rec, dict):
            raise PromptSetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in ("tag", "include", "prompt") if k not in rec]
        if missing:
            raise PromptSetError(f"{where}: missing key(s) {missing} (GenEval metadata needs tag, include, prompt)")
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise PromptSetError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(rec["tag"], str) or not rec["tag"]:
            raise PromptSetError(f"{where}: 'tag' must be a non-empty string")
        _check_include(rec["include"], where, "include")
        if "exclude" in rec:
            _check_include(rec["exclude"], where, "exclude")
        out.append(PromptItem(tag=rec["tag"], prompt=rec["prompt"], metadata=rec))
    return out


@register_prompt_set("geneval", "geneval:<path-or-uri>")
def _load_geneval(arg: str, storage: Storage | None) -> list[PromptItem]:
    return parse_geneval(_read_text(arg, "geneval", storage), arg)


# --------------------------------------------------------------------------- parti
def parse_parti(text: str, source: str) -> list[PromptItem]:
    """Parse a PartiPrompts TSV (header ``Prompt\\tCategory\\tChallenge\\tNote``).

    Missing trailing columns are empty. Raises :class:`PromptSetError` naming the file and line
    for a wrong header, an empty prompt or category, or too many columns.
    """
    lines = _split_lines(text)
    if not lines:
        expected = "\t".join(PARTI_HEADER)
        raise PromptSetError(f"{source} line 1: empty file (expected the header {expected!r})")
    header = tuple(h.strip() for h in lines[0].split("\t"))
    if header[: len(PARTI_HEADER)] != PARTI_HEADER:
        raise PromptSetError(f"{source} line 1: header {header!r} is not {PARTI_HEADER!r}")
    width = len(header)
    out: list[PromptItem] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) > width:
            raise PromptSetError(f"{source} line {lineno}: {len(cols)} columns, the header has {width}")
        cols += [""] * (width - len(cols))
        row = dict(zip(header, cols))
        prompt, category = row["Prompt"].strip(), row["Category"].strip()
        if not prompt:
            raise PromptSetError(f"{source} line {lineno}: empty Prompt")
        if not category:
            raise PromptSetError(f"{source} line {lineno}: empty Category")
        meta: dict[str, Any] = {
            "tag": category,
            "prompt": prompt,
            "category": category,
            "challenge": row["Challenge"].strip(),
            "note": row["Note"].strip(),
        }
        out.append(PromptItem(tag=category, prompt=prompt, metadata=meta))
    return out


@register_prompt_set("parti", "parti:<path-or-uri>")
def _load_parti(arg: str, storage: Storage | None) -> list[PromptItem]:
    return parse_parti(_read_text(arg, "parti", storage), arg)


# --------------------------------------------------------------------------- txt
#: Tag of every prompt of a ``txt:`` prompt set.
TXT_TAG = "txt"


def parse_txt(text: str, source: str) -> list[PromptItem]:
    """Parse a plain prompt list: one prompt per line (stripped); blank lines and ``#`` comments are skipped.

    Each prompt becomes ``PromptItem(tag="txt", prompt, metadata={"tag": "txt", "prompt", "line"})``
    (``line`` = 1-based line number in ``source``).

    Raises:
        PromptSetError: a line holds a NUL or another control character (``"<source> line <k>: ..."``:
            most likely a binary file given by mistake).
    """
    out: list[PromptItem] = []
    for lineno, line in enumerate(_split_lines(text), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        bad = next((c for c in prompt if ord(c) < 32 and c != "\t"), None)
        if bad is not None:
            raise PromptSetError(f"{source} line {lineno}: control character {bad!r} in a prompt (not a text file?)")
        out.append(PromptItem(tag=TXT_TAG, prompt=prompt, metadata={"tag": TXT_TAG, "prompt": prompt, "line": lineno}))
    return out


@register_prompt_set("txt", "txt:<path-or-uri>")
def _load_txt(arg: str, storage: Storage | None) -> list[PromptItem]:
    return parse_txt(_read_text(arg, "txt", storage), arg)
