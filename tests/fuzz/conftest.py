"""Property-based fuzzing (hypothesis) of the parsers that read untrusted input.

Profiles (``HYPOTHESIS_PROFILE`` selects one; ``fuzz-ci`` is the default):

- ``fuzz-ci``: derandomized (the examples are a function of the test, so CI is reproducible),
  no example database (failures are not replayed from ``.hypothesis/``; hypothesis still caches
  source constants there, a folder with its own ``.gitignore``), no deadline, few examples: the
  whole directory runs in seconds.
- ``fuzz-long``: random, 20x the examples, for a local hunt (``HYPOTHESIS_PROFILE=fuzz-long``);
  a failure prints the ``@reproduce_failure`` blob to paste into the test.

Shared strategies and guards live in ``tests/fuzz/fuzz_helpers.py``.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("fuzz-ci", max_examples=120, derandomize=True, **_COMMON)
settings.register_profile("fuzz-long", max_examples=2400, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz-ci"))
