"""Shared fixtures for the Prefect flow tests.

- makes the repository's top-level ``flows`` package importable (ahead of the ``tests/flows``
  namespace directory that would otherwise shadow it);
- ``prefect_server`` (session): one temporary Prefect API + database (``prefect_test_harness``)
  shared by every flow test. Never start a second harness while this one is alive: nested
  harnesses break the outer one's event and task-run bookkeeping.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if "flows" in sys.modules and getattr(sys.modules["flows"], "__file__", None) is None:
    del sys.modules["flows"]


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A temporary Prefect API + database for the whole session (a start takes 15-25 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
