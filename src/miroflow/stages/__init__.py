"""The one entry point per stage (docs/design.md §7.12): run + track + manifest, typed results.

The CLI commands, the Prefect tasks, the demo and the study call these functions and nothing
else; each returns a frozen result from :mod:`miroflow.results` (``to_json()`` / ``from_json()``).
Stages that run once per model write a per-run manifest (``<manifests>/<stage>-<run name>.json``).

| function | CLI | result |
|---|---|---|
| :func:`prepare` | ``miroflow prepare`` | :class:`~miroflow.results.PrepareResult` |
| :func:`score` | ``miroflow score`` | :class:`~miroflow.results.ScoreResult` |
| :func:`bin_scores` | ``miroflow bin`` | :class:`~miroflow.results.BinResult` |
| :func:`embed` | ``miroflow embed`` | :class:`~miroflow.results.EmbedResult` |
| :func:`train` | ``miroflow train`` | :class:`~miroflow.results.TrainResult` |
| :func:`evaluate` | ``miroflow evaluate`` | :class:`~miroflow.results.EvalSummary` |
| :func:`tts` | ``miroflow tts`` | :class:`~miroflow.results.BestOfNResult` |
| :func:`sweep` | ``miroflow sweep`` | :class:`~miroflow.results.SweepResult` |
| :func:`demo` | ``miroflow demo`` | :class:`DemoResult` |
"""

from miroflow.preflight import PreflightError, check_params, preflight
from miroflow.stages._common import DEFAULT, is_main_process, run_manifest_path
from miroflow.stages.data import bin_scores, embed, prepare, score, score_one_shard, score_result, write_scores
from miroflow.stages.evaluate import evaluate, sweep, tts
from miroflow.stages.pipeline import DEMO_MANIFESTS, DataResult, DemoResult, data_stages, demo
from miroflow.stages.train import model_kind, train

__all__ = [
    "DEFAULT",
    "DataResult",
    "PreflightError",
    "DemoResult",
    "bin_scores",
    "check_params",
    "data_stages",
    "demo",
    "DEMO_MANIFESTS",
    "embed",
    "evaluate",
    "is_main_process",
    "model_kind",
    "preflight",
    "prepare",
    "run_manifest_path",
    "score",
    "score_one_shard",
    "score_result",
    "write_scores",
    "sweep",
    "train",
    "tts",
]
