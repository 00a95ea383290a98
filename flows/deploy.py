"""Serve every miroflow flow as a deployment of a running Prefect server (the dashboard).

    prefect server start --host 127.0.0.1 --port 4200      # in one shell
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deploy.py                                  # in another: serves until Ctrl-C

Then trigger runs from the dashboard (typed parameter forms) or the CLI, e.g.
``prefect deployment run 'miro-pipeline/miro-pipeline' -p params_file=params.yaml --watch``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import serve  # noqa: E402
from prefect.utilities.callables import ParameterSchema  # noqa: E402

from flows._records import schema_with_code_defaults  # noqa: E402
from flows.evaluate import evaluate  # noqa: E402
from flows.pipeline import miro_pipeline  # noqa: E402
from flows.score_dataset import score_dataset  # noqa: E402
from flows.sweep import sweep, tts  # noqa: E402
from flows.train import train_model  # noqa: E402
from flows.tune import tune_targets  # noqa: E402

#: Every flow served; their results are persisted as JSON (flows/_records.py ``FLOW_RESULTS``).
FLOWS = (miro_pipeline, score_dataset, train_model, evaluate, sweep, tts, tune_targets)


def deployments() -> list[Any]:
    """One deployment per flow (named after the flow), its form showing every code default (list fields too)."""
    out = []
    for f in FLOWS:
        d = f.to_deployment(name=f.name)
        schema = schema_with_code_defaults(d._parameter_openapi_schema.model_dump())
        d._parameter_openapi_schema = ParameterSchema(**schema)
        out.append(d)
    return out


def main() -> None:
    """Register one deployment per flow and serve them."""
    serve(*deployments())


if __name__ == "__main__":
    main()
