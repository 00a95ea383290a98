#!/usr/bin/env python3
"""mypy on src/ against a baseline that may only shrink.

``mypy-baseline.json`` holds the number of mypy errors per file. This script runs mypy, fails
(exit 1) when any file has more errors than its baseline (a new file's baseline is 0) and prints
each file that got better; ``--update`` rewrites the baseline (only ever to smaller numbers).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "mypy-baseline.json"
ERROR = re.compile(r"^(?P<file>[^:]+):\d+: error: ")


def current_errors() -> Counter[str]:
    """Errors per file of ``mypy src/miroflow`` (config from pyproject.toml)."""
    out = subprocess.run([sys.executable, "-m", "mypy", "src/miroflow"], cwd=REPO, capture_output=True, text=True)
    return Counter(m["file"] for line in out.stdout.splitlines() if (m := ERROR.match(line)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="shrink the baseline to the current counts")
    args = ap.parse_args()
    base: dict[str, int] = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    now = current_errors()
    worse = {f: (base.get(f, 0), n) for f, n in sorted(now.items()) if n > base.get(f, 0)}
    better = {f: (n, now.get(f, 0)) for f, n in sorted(base.items()) if now.get(f, 0) < n}
    for f, (b, n) in better.items():
        print(f"mypy: {f}: {b} -> {n} errors (run .ci/mypy_baseline.py --update to lock it in)")
    if args.update:
        if worse and BASELINE.exists():
            print("mypy: refusing to grow the baseline:", worse)
            return 1
        BASELINE.write_text(json.dumps(dict(sorted(now.items())), indent=2) + "\n")
        print(f"mypy: baseline written, {sum(now.values())} errors in {len(now)} files")
        return 0
    if worse:
        for f, (b, n) in worse.items():
            print(f"mypy: {f}: {n} errors, baseline allows {b}")
        print("mypy: new type errors (fix them; the baseline only shrinks)")
        return 1
    print(f"mypy: {sum(now.values())} errors, within the baseline ({sum(base.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
