"""The error classes every miroflow error derives from, and their one-line form (docs/architecture.md, "Errors").

Two kinds, told apart by the CLI's exit status:

- :class:`InputError` (exit 2): the input is wrong — a params field, a file, a URI, a shard, a key,
  a prompt line. Fixing the input fixes the run.
- :class:`OperationalError` (exit 1): the input is fine but the world failed — storage unreachable,
  a reward model crashed, the disk is full. Rerunning (``--resume``) may succeed.

Module error classes (``ParamsError``, ``ShardError``, ``StorageError``, ...) derive from one of them
*and* from the builtin they always were (``ValueError``, ``RuntimeError``, ...), so existing
``except ValueError`` callers keep working. :func:`describe` turns any exception into
``(exit_status, one_line)`` for the CLI's error boundary and for Prefect state messages.
"""

from __future__ import annotations

__all__ = ["InputError", "MiroflowError", "OperationalError", "describe", "one_line"]

#: Longest message :func:`one_line` returns (characters); longer ones end in "…".
MAX_LINE = 600


class MiroflowError(Exception):
    """Base of every error miroflow raises on purpose; ``exit_code`` is the CLI's exit status."""

    exit_code: int = 1


class InputError(MiroflowError):
    """Bad input (params field, file, URI, shard, key, prompt line): the CLI exits 2."""

    exit_code = 2


class OperationalError(MiroflowError):
    """Good input, failed operation (storage, a model, the disk): the CLI exits 1."""

    exit_code = 1


def one_line(exc: BaseException, limit: int = MAX_LINE) -> str:
    """``exc``'s message on one line: newlines become "; ", runs of spaces shrink, at most ``limit`` chars.

    A ``KeyError``'s message is shown without the quotes ``str(KeyError)`` adds. An empty message
    becomes the class name.
    """
    if isinstance(exc, KeyError) and len(exc.args) == 1 and type(exc).__str__ is KeyError.__str__:
        text = str(exc.args[0])
    else:
        text = str(exc)
    parts = [" ".join(line.split()) for line in text.splitlines()]
    text = "; ".join(p for p in parts if p) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(exc: BaseException) -> tuple[int, str]:
    """``(exit_status, one_line)`` for an exception reaching the CLI's error boundary.

    miroflow errors use their ``exit_code``; a plain ``ValueError``/``KeyError`` (a check that
    names its field) is input (2); ``OSError`` (its message names the path) is operational (1);
    anything else is an internal error (1), labelled with its type so a bug report can quote it.
    """
    if isinstance(exc, MiroflowError):
        return exc.exit_code, one_line(exc)
    if isinstance(exc, (ValueError, KeyError)):
        return 2, f"{type(exc).__name__}: {one_line(exc)}"
    if isinstance(exc, OSError):
        return 1, f"{type(exc).__name__}: {one_line(exc)}"
    return 1, f"internal error, {type(exc).__name__}: {one_line(exc)}"
