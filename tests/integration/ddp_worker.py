"""Run ``run_train`` in a fresh process (plain or under ``torchrun``) for the integration tests.

Usage: ``python ddp_worker.py OVERRIDES_JSON OUT_JSON [MAX_STEPS] [--resume]``. ``OVERRIDES_JSON``
holds a list of ``key=value`` param overrides; rank 0 writes the ``TrainOutput`` as JSON to ``OUT_JSON``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    """Parse the arguments, train, and write the result (rank 0 only)."""
    from miroflow.config import Params, apply_overrides
    from miroflow.train import run_train

    overrides = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    max_steps = int(argv[2]) if len(argv) > 2 and argv[2].isdigit() else None
    params = apply_overrides(Params(), overrides)
    result = run_train(params, resume="--resume" in argv, max_steps=max_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main(sys.argv[1:])
