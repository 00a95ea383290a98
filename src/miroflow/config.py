"""Typed configuration tree mirroring ``params.yaml``.

One pydantic v2 model per section; ``extra="forbid"`` everywhere so an unknown key is an
error naming its dotted path. Load once with :func:`load_params` and pass the result
explicitly; flows use the same models so the Prefect UI renders typed forms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import to_jsonable_python

from miroflow.errors import InputError

__all__ = [
    "DataConfig",
    "DegradationConfig",
    "ScoreConfig",
    "TrainConfig",
    "EvalConfig",
    "SweepConfig",
    "StorageConfig",
    "TrackingConfig",
    "TuneConfig",
    "Params",
    "ParamsError",
    "load_params",
    "parse_overrides",
    "apply_overrides",
    "format_validation_error",
    "resolve_params",
    "form_values",
    "SHAPES_DEFAULT_REWARDS",
    "IMPORT_DEFAULT_REWARDS",
    "SHAPES_DEFAULT_SELECT_BY",
]

#: ``score.rewards`` of ``data.domain=shapes`` when not given: the weight-free rewards and the shapes judge.
SHAPES_DEFAULT_REWARDS: tuple[str, ...] = ("sharpness", "noise", "contrast", "compressibility", "shapes_alignment")
#: ``score.rewards`` of ``data.domain=import`` when not given: the weight-free *image* rewards
#: (``miroflow.rewards.weight_free_rewards("import")``; a test keeps the two equal), followed by every
#: reward named in ``score.reward_weights`` (docs/architecture.md, "Imported data").
IMPORT_DEFAULT_REWARDS: tuple[str, ...] = ("sharpness", "noise", "contrast", "compressibility")
#: ``sweep.select_by`` of ``data.domain=shapes`` when not given (import: the first of ``score.rewards``).
SHAPES_DEFAULT_SELECT_BY = "shapes_alignment"


def _factory_defaults_in_schema(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """JSON-schema hook of every section: the value of each ``default_factory`` field becomes its ``default``.

    pydantic leaves ``default`` out of the schema of such fields (lists and dicts, e.g.
    ``train.sample_prompts``), so Prefect's parameter form (``flow.serve``, ``flows/deploy.py`` and
    ``prefect deploy`` alike) showed "No items in this list". Nested sections (``$ref``) keep theirs.
    """
    props = schema.get("properties", {})
    for name, field in cls.model_fields.items():
        prop = props.get(field.alias or name)
        if prop is None or "default" in prop or field.default_factory is None:
            continue
        if "$ref" in prop or any("$ref" in alt for alt in [*prop.get("anyOf", []), *prop.get("allOf", [])]):
            continue
        prop["default"] = to_jsonable_python(field.default_factory())  # type: ignore[call-arg]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_factory_defaults_in_schema)


class DegradationConfig(_Section):
    """Controlled degradations applied to the synthetic shapes images."""

    blur_prob: float = Field(0.5, ge=0, le=1, description="Probability a sample is Gaussian-blurred.")
    blur_sigma: tuple[float, float] = Field(
        (0.6, 2.0), description="Range of blur sigma in pixels (at 32 px; scaled with resolution)."
    )
    noise_prob: float = Field(0.2, ge=0, le=1, description="Probability additive Gaussian noise is applied.")
    noise_std: tuple[float, float] = Field((0.05, 0.2), description="Range of noise std in [0,1] intensity units.")
    low_contrast_prob: float = Field(0.2, ge=0, le=1, description="Probability the contrast is reduced.")
    contrast_factor: tuple[float, float] = Field(
        (0.2, 0.5), description="Range of the contrast factor (1 = unchanged)."
    )
    jpeg_prob: float = Field(0.0, ge=0, le=1, description="Probability the image is JPEG-compressed.")
    jpeg_quality: tuple[int, int] = Field((5, 30), description="Range of JPEG quality for compressed samples.")


class DataConfig(_Section):
    """The prepare stage: which dataset, how big, how it is sharded."""

    domain: Literal["shapes", "import"] = Field(
        "shapes",
        description="'shapes' renders the synthetic domain; 'import' re-shards cc12m-style tars from data.import_uri.",
    )
    import_uri: str | None = Field(
        None,
        description="URI prefix (file path, file:// or s3://) holding cc12m-style .tar files to import when domain=import.",
    )
    num_samples: int = Field(4000, ge=1, description="Number of samples to render (shapes).")
    resolution: int = Field(32, ge=16, le=512, description="Image side in pixels.")
    seed: int = Field(0, description="Seed for rendering, degradations and caption swaps.")
    shard_size: int = Field(1000, ge=1, description="Samples per webdataset shard.")
    split: str = Field("train", pattern=r"^[a-z0-9_]+$", description="Split name used in shard file names.")
    image_format: Literal["png", "jpg"] = Field("png", description="Encoding of images inside shards.")
    max_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Largest image (width x height) import decodes; larger ones are rejected from the header, "
        "before decoding (decompression-bomb guard).",
    )
    min_side: int | None = Field(
        None,
        ge=1,
        description="Import only: images whose shorter side (pixels, before the centre crop) is below this are "
        "rejected and recorded in the manifest's 'rejected' list; null = keep every image (upscaled if small).",
    )
    swap_caption_fraction: float = Field(
        0.3, ge=0, le=1, description="Fraction of samples whose caption is replaced by another scene's caption."
    )
    synthetic_captions: bool = Field(
        False, description="If true every sample carries a noisy 'original' and an accurate 'synthetic' caption."
    )
    max_objects: int = Field(4, ge=1, le=4, description="Maximum number of objects per scene.")
    degradations: DegradationConfig = Field(
        default_factory=DegradationConfig, description="Degradations of the shapes images."
    )
    manifest: str = Field("manifests/shards.json", description="Local path of the shard manifest DVC tracks.")


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def _host_port(v: str | None, example: str, scheme: bool = False) -> str | None:
    """``v`` when it is ``host:port`` (``[v6]:port``; with ``scheme`` also ``proto://host:port``), else a
    ValueError showing ``example``."""
    if v is None:
        return v
    rest = v.split("://", 1)[1] if scheme and "://" in v else v
    m = _HOST_PORT.match(rest)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{v!r} is not host:port (e.g. {example})")
    return v


class ScoreConfig(_Section):
    """The score and bin stages."""

    rewards: list[str] = Field(
        default_factory=lambda: list(SHAPES_DEFAULT_REWARDS),
        description="Reward names from the reward registry to score every sample with; unset or null = the "
        "domain's default (shapes: SHAPES_DEFAULT_REWARDS; import: the weight-free image rewards plus every "
        "reward in score.reward_weights).",
    )
    reward_weights: dict[str, str] = Field(
        default_factory=dict, description="Local path or hub id of weights per reward name (real reward models only)."
    )
    batch_size: int = Field(64, ge=1, description="Images per scoring batch.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:i]'.")
    executor: Literal["thread", "dask"] = Field("thread", description="Prefect task runner for per-shard scoring.")
    max_workers: int = Field(
        2, ge=1, description="Concurrent shard tasks (threads, or the local Dask cluster's worker processes)."
    )
    dask_address: str | None = Field(
        default=None,  # a keyword default: mypy (no pydantic plugin) sees the field as optional
        description="With score.executor=dask: address of a running Dask scheduler (tcp://host:8786) to score "
        "on; null = a LocalCluster of score.max_workers processes on 127.0.0.1.",
    )
    num_bins: int = Field(64, ge=2, description="Quantile bins per reward.")
    bin_max_samples: int = Field(
        100_000, ge=1, description="At most this many values per reward are used to estimate bin edges."
    )
    manifest: str = Field("manifests/scores.json", description="Local manifest of score tables (DVC out).")
    bins: str = Field("manifests/bins.json", description="Local path of the bin-edge JSON (DVC out).")

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, v: str | None) -> str | None:
        return _host_port(v, "tcp://10.0.0.5:8786", scheme=True)


class TrainConfig(_Section):
    """The train stage: model size, conditioning, optimisation, checkpoints."""

    run_name: str = Field(
        "miro",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the run; checkpoints go under <storage.root>/runs/<run_name>-<hash> (hash of the params the weights depend on).",
    )
    model: str = Field("tiny", description="Denoiser size from the model registry (tiny, small, paper).")
    text_encoder: str = Field(
        "minilm", description="'minilm' (offline default), 'learned', 't5:<path-or-id>' or 'clip:<path-or-id>'."
    )
    latent: Literal["pixel", "vae"] = Field(
        "pixel", description="Pixel space for tiny domains; 'vae' uses AutoencoderKL latents."
    )
    vae: str | None = Field(None, description="Path or hub id of the AutoencoderKL when latent=vae.")
    rewards: list[str] | None = Field(
        None,
        description="Rewards the model is conditioned on; null = every scored reward; [] = baseline without rewards.",
    )
    steps: int = Field(1500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch size (samples per optimizer step).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer (AdamW; LAMB is not implemented).")
    grad_clip: float = Field(2.0, gt=0, description="Gradient norm clip.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of weights (0.9999 at full scale).")
    ema_warmup: bool = Field(
        True,
        description="Warm the EMA decay up as min(ema_decay, (1+t)/(10+t)) (t = EMA updates - 1; 0 at the first); "
        "false = ema_decay from the first update, as the reference does. The decay applied is logged as "
        "train/ema_decay.",
    )
    reward_features: Literal["fourier", "grid_interp"] = Field(
        "grid_interp",
        description="Reward embedding of new models: 'grid_interp' interpolates between the embeddings of the two "
        "neighbouring k/(score.num_bins-1) values; 'fourier' is the original embedding (resume of runs made with it).",
    )
    reward_dropout: float = Field(0.1, ge=0, le=1, description="Probability each reward is independently set absent.")
    all_reward_dropout: float = Field(0.05, ge=0, le=1, description="Probability the whole reward vector is absent.")
    text_dropout: float = Field(0.0, ge=0, le=1, description="Probability the caption is dropped (enables text CFG).")
    synthetic_caption_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability the synthetic caption is used instead of the original (0.5 = 50/50 mix).",
    )
    seed: int = Field(0, description="Seed for init, data order and noise.")
    data: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="'memory' decodes every sample into RAM once; 'stream' reads shards one shuffle window at a "
        "time (bounded memory, docs/architecture.md 'Streaming'); 'auto' streams above train.stream_above samples.",
    )
    stream_above: int = Field(200_000, ge=0, description="With train.data=auto: stream when the data has more samples.")
    stream_partitions: int = Field(
        8,
        ge=1,
        description="Canonical stream partitions P: the sample order depends on P, not on the world size; "
        "train.batch_size and every world size you train or resume with must divide it (batch) / be divided by it.",
    )
    stream_window: int = Field(4, ge=1, description="Shards per shuffle window of a stream partition.")
    stream_workers: int = Field(2, ge=0, description="Loader threads reading the next windows ahead (0 = inline).")
    sample_log: str | None = Field(
        None,
        description="Write each step's sample keys (this rank's rows) as JSON lines to this file ('.rank<r>' "
        "appended on ranks > 0): an audit of the data order.",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="bf16 autocast on GPU when 'auto'.")
    compile: bool = Field(False, description="torch.compile the denoiser.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:i]'.")
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Training processes per machine (one per GPU). Above 1, or with train.nnodes above 1, "
        "`miroflow train` and the train flow launch torchrun (DDP: nccl on GPU, gloo on CPU). Execution only: "
        "the weights do not depend on it.",
    )
    nnodes: int = Field(
        1,
        ge=1,
        description="Machines of a multi-node torchrun job; above 1 needs train.rdzv_endpoint, and every machine "
        "starts the same training (same params).",
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="host:port of the c10d rendezvous (one of the machines; reachable from all) when train.nnodes > 1.",
    )
    rdzv_timeout_s: int = Field(
        600, ge=1, description="Seconds torchrun waits for every machine to join the rendezvous (train.nnodes > 1)."
    )
    log_every: int = Field(50, ge=1, description="Metric logging interval in steps.")
    eval_every: int = Field(500, ge=1, description="Interval for EMA sample grids and reward means.")
    checkpoint_every: int = Field(500, ge=1, description="Checkpoint interval in steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: [
            "a red circle",
            "two blue squares",
            "a green triangle left of a yellow circle",
            "three red squares",
        ],
        description="Fixed prompts for the sample grids.",
    )
    sample_steps: int = Field(20, ge=1, description="Euler steps for training-time samples.")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _rdzv_endpoint(cls, v: str | None) -> str | None:
        return _host_port(v, "10.0.0.5:29400")


def _unit_interval(v: tuple[float, float], rule: str) -> tuple[float, float]:
    """``v`` when ``0 <= lo < hi <= 1``, else a ValueError stating ``rule``."""
    lo, hi = v
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"[{lo}, {hi}] must satisfy {rule}")
    return v


class EvalConfig(_Section):
    """The evaluate stage."""

    checkpoint: str | None = Field(
        None, description="Checkpoint or pipeline URI; null = latest checkpoint of train.run_name."
    )
    prompt_set: str = Field(
        "shapes", description="Prompt set from the registry (shapes, geneval:<path>, parti:<path>)."
    )
    num_prompts: int | None = Field(None, ge=1, description="Evaluate only the first N prompts.")
    images_per_prompt: int = Field(4, ge=1, description="Images generated per prompt.")
    steps: int = Field(50, ge=1, description="Euler sampling steps.")
    guidance_scale: float = Field(0.0, ge=0, description="ω in v+ + ω(v+ − v−).")
    guidance_schedule: Literal["constant", "interval", "damped"] = Field(
        "constant",
        description="How ω varies with the flow time t (1 = noise, 0 = data): constant; interval = ω only for t "
        "in guidance_interval; damped = ω·f(t), f from guidance_decay (MiroPipeline.__call__).",
    )
    guidance_interval: tuple[float, float] = Field(
        (0.0, 1.0), description="[t_lo, t_hi] of the interval schedule, 0 <= t_lo < t_hi <= 1."
    )
    guidance_decay: Literal["linear", "cosine"] = Field(
        "linear", description="f of the damped schedule: linear f(t) = t, cosine f(t) = (1 − cos πt)/2."
    )
    reward_targets: dict[str, float] = Field(
        default_factory=dict, description="Positive reward targets (unspecified = 1.0)."
    )
    negative_reward_targets: dict[str, float] = Field(
        default_factory=dict, description="Negative reward targets (unspecified = 0.0)."
    )
    rewards: list[str] | None = Field(None, description="Rewards to score generated images with; null = score.rewards.")
    batch_size: int = Field(64, ge=1, description="Images per sampling batch.")
    seed: int = Field(0, description="Sampling seed.")
    output: str = Field("eval", description="Output prefix under storage.root.")

    @field_validator("guidance_interval")
    @classmethod
    def _guidance_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _unit_interval(v, "0 <= t_lo < t_hi <= 1 (flow time, 1 = noise)")


class SweepConfig(_Section):
    """Guidance, reward-target and best-of-N sweeps."""

    guidance_scales: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], description="ω grid.")
    target_reward: str | None = Field("sharpness", description="Reward whose target is swept (others at 1).")
    target_values: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="Target grid in [0,1]."
    )
    best_of_n: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], description="N grid for best-of-N.")
    select_by: str = Field(
        SHAPES_DEFAULT_SELECT_BY,
        description="Reward used to select the best of N; unset or null = the domain's default (shapes: "
        "shapes_alignment; import: the first of score.rewards).",
    )
    output: str = Field("sweeps", description="Output prefix under storage.root.")


class StorageConfig(_Section):
    """Where artifacts live. Endpoints and credentials come only from the environment."""

    root: str = Field("work/store", description="Artifact root URI: a path, file://... or s3://bucket/prefix.")
    retries: int = Field(5, ge=0, description="Retries on transient storage errors.")
    backoff_s: float = Field(0.2, ge=0, description="Initial retry backoff in seconds (doubles each retry).")


class TrackingConfig(_Section):
    """MLflow. The tracking URI comes from MLFLOW_TRACKING_URI if set."""

    experiment: str = Field("miroflow", description="MLflow experiment name (one per study).")
    tracking_uri: str | None = Field(
        None, description="Default tracking URI when MLFLOW_TRACKING_URI is unset; null = sqlite:///work/mlflow.db."
    )
    register_model: str | None = Field(
        None, description="Registered model name for the final checkpoint; null = do not register."
    )
    enabled: bool = Field(True, description="Log to MLflow at all.")
    parent_run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description=(
            "MLflow run id under which every top-level run of this invocation nests; set by the pipeline flow "
            "and the demo (null = top-level runs). Execution-only: it changes no output key."
        ),
    )


class TuneConfig(_Section):
    """``miroflow tune-targets``: an Optuna search of the reward-target vector (and ω) of a trained model
    (docs/tune.md)."""

    objective: str = Field(
        "accuracy",
        pattern=r"^(accuracy|mix|reward:[A-Za-z0-9_.-]+)$",
        description="What the search maximises: 'accuracy' (the judge's eval/overall), 'reward:<name>' (one "
        "scored reward's mean) or 'mix' (sum of tune.weights x component).",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        validate_default=True,
        description="objective=mix only: weight per component, 'accuracy' or a scored reward name (negative = penalise).",
    )
    rewards: list[str] | None = Field(
        None,
        description="Rewards whose targets are searched; null = every reward of the model (others as eval.reward_targets).",
    )
    target_range: tuple[float, float] = Field(
        (0.0, 1.0), description="[low, high] of every searched target, inside [0, 1]."
    )
    guidance_range: tuple[float, float] | None = Field(
        None,
        description="[low, high] of ω = eval.guidance_scale to search as well; null = ω fixed at eval.guidance_scale.",
    )
    trials: int = Field(
        20, ge=1, description="Trial budget of the study (completed trials): a rerun only runs the missing ones."
    )
    startup_trials: int = Field(
        5, ge=0, description="Random trials before TPE models the results (the sampler's n_startup_trials)."
    )
    seed: int = Field(0, description="Seed of the TPE sampler.")
    search_prompts: int = Field(24, ge=1, description="Trials evaluate the first N prompts of eval.prompt_set.")
    heldout_prompts: int = Field(
        48, ge=1, description="The best and the default vector are re-evaluated on the next N prompts (disjoint)."
    )
    search_seed: int | None = Field(None, description="Sampling seed of the trials; null = eval.seed.")
    heldout_seed: int = Field(
        1000, description="Sampling seed of the held-out re-evaluation (must differ from the search seed)."
    )
    images_per_prompt: int | None = Field(None, ge=1, description="Images per prompt; null = eval.images_per_prompt.")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Level of the held-out confidence intervals (t over prompts)."
    )
    enqueue_default: bool = Field(
        True, description="Trial 0 of a new study is the default vector (searched targets 1, ω = eval.guidance_scale)."
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL; null = optuna.db next to a sqlite:/// MLflow database, else "
        "sqlite:///<cwd>/work/optuna.db.",
    )
    study_name: str | None = Field(
        None,
        description="Optuna study name; null = <model run>-<objective>-<hash of the search setup> (reruns resume).",
    )
    output: str = Field("tune", description="Output prefix under storage.root.")

    @field_validator("target_range")
    @classmethod
    def _target_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _unit_interval(v, "0 <= low < high <= 1")

    @field_validator("guidance_range")
    @classmethod
    def _guidance_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.0 <= v[0] < v[1]):
            raise ValueError(f"[{v[0]}, {v[1]}] must satisfy 0 <= low < high")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        objective = info.data.get("objective")
        bad = [k for k, w in v.items() if w != w or w in (float("inf"), float("-inf"))]
        if bad:
            raise ValueError(f"weight of {bad[0]!r} is not a finite number")
        if objective == "mix" and not any(w != 0 for w in v.values()):
            raise ValueError("needs at least one non-zero weight when tune.objective is 'mix'")
        if objective not in (None, "mix") and v:
            raise ValueError(f"only used with tune.objective 'mix' (it is {objective!r})")
        return v


class Params(_Section):
    """The whole params.yaml."""

    data: DataConfig = Field(default_factory=DataConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig = Field(default_factory=lambda: TuneConfig.model_validate({}))

    @model_validator(mode="before")
    @classmethod
    def _domain_defaults(cls, data: Any) -> Any:
        """Resolve the ``data.domain``-dependent defaults of ``score.rewards`` and ``sweep.select_by``.

        Only where the key was not given (absent from the input, not in a section model's
        ``model_fields_set``) or given as null; a given value is kept and checked by preflight (a
        shapes-only reward under ``data.domain=import`` is refused there). For ``shapes`` the field
        defaults apply (a null is dropped); for ``import`` the values are filled in:
        ``score.rewards`` = :data:`IMPORT_DEFAULT_REWARDS` + the rewards of ``score.reward_weights``,
        ``sweep.select_by`` = the first of ``score.rewards``. Runs on the raw input, so it applies to
        :func:`load_params`, :func:`apply_overrides` and ``model_validate``; a value filled in for
        ``import`` counts as given afterwards (docs/architecture.md, "Imported data").
        """
        if not isinstance(data, dict):
            return data
        domain = _section_value(data.get("data"), "domain")[1]
        score = data.get("score", {})
        given, rewards = _section_value(score, "rewards")
        if not given or rewards is None:
            if domain == "import":
                weights = _section_value(score, "reward_weights")[1]
                extra = [n for n in weights if n not in IMPORT_DEFAULT_REWARDS] if isinstance(weights, dict) else []
                rewards = [*IMPORT_DEFAULT_REWARDS, *extra]
                data = {**data, "score": _with_value(score, "rewards", rewards)}
            elif given:  # null: the field default
                data = {**data, "score": _with_value(score, "rewards", None)}
        sweep = data.get("sweep", {})
        given, select_by = _section_value(sweep, "select_by")
        if not given or select_by is None:
            if domain == "import":
                first = rewards[0] if isinstance(rewards, list) and rewards else None
                data = {
                    **data,
                    "sweep": _with_value(
                        sweep, "select_by", first if isinstance(first, str) else IMPORT_DEFAULT_REWARDS[0]
                    ),
                }
            elif given:
                data = {**data, "sweep": _with_value(sweep, "select_by", None)}
        return data


def _section_value(section: Any, key: str) -> tuple[bool, Any]:
    """``(given, value)`` of ``key`` in a raw section: a dict (given = present) or a section model
    (given = in its ``model_fields_set``); ``(False, None)`` for anything else."""
    if isinstance(section, BaseModel):
        return key in section.model_fields_set, getattr(section, key, None)
    if isinstance(section, dict):
        return key in section, section.get(key)
    return False, None


def _with_value(section: Any, key: str, value: Any) -> Any:
    """``section`` (a dict or section model) with ``key`` set to ``value``; ``None`` removes a dict's ``key``
    (so the field default applies). Anything else is returned as it is, for validation to report."""
    if isinstance(section, BaseModel):
        return section if value is None else section.model_copy(update={key: value})
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k != key} if value is None else {**section, key: value}
    return section


class ParamsError(InputError, ValueError):
    """Invalid params; ``problems`` holds one ``dotted.key: message`` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def format_validation_error(err: ValidationError) -> list[str]:
    """One ``dotted.key: message`` line per pydantic error."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return lines


def _load_yaml(text: str, source: str, where: str) -> Any:
    """``yaml.safe_load(text)``; any failure is a ``ParamsError(source, ["<where>: ..."])``.

    Besides ``YAMLError``, PyYAML's constructors raise builtin errors for scalars they resolve
    but cannot build (``ValueError``: ``2001-13-45`` is a timestamp, ``!!int abc``, an int of more
    than 4300 digits; ``KeyError``: ``!!bool maybe``), and deep nesting raises ``RecursionError``.
    ``safe_load`` has no side effects, so whatever it raises is a problem of the text.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(source, [f"{where}: {err}"]) from None
    except RecursionError:
        raise ParamsError(source, [f"{where}: nested too deeply"]) from None
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise ParamsError(source, [f"{where}: invalid value ({type(err).__name__}: {err})"]) from None


def _parse_scalar(raw: str, item: str = "<value>") -> Any:
    """YAML-parse an override value; '1e-3' (a string to YAML 1.1) becomes a float.

    Raises:
        ParamsError: (source ``overrides``) naming ``item`` when ``raw`` is not valid YAML.
    """
    if not raw.strip():
        return ""
    value = _load_yaml(raw, "overrides", item)
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Parse DVC-style ``key.sub=value`` overrides (values parsed as YAML) into a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError("overrides", [f"{item}: expected KEY=VALUE"])
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ParamsError("overrides", [f"{item}: empty key"])
        value = _parse_scalar(raw, item)
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError("overrides", [f"{key}: conflicts with another override"])
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(params: Params, overrides: list[str] | None) -> Params:
    """Return a new validated Params with overrides applied."""
    # only what was given: defaults (the domain-dependent ones too) are resolved again for the merged tree
    merged = _deep_merge(params.model_dump(mode="json", exclude_unset=True), parse_overrides(overrides))
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ParamsError("overrides", format_validation_error(err)) from None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load and validate params.yaml (missing file = defaults) plus overrides.

    Raises:
        ParamsError: listing every problem as ``dotted.key: message``.
    """
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None and Path(path).exists():
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ParamsError(source, [f"<file>: not UTF-8 (byte {err.start}: {err.object[err.start]:#04x})"]) from None
        except OSError as err:
            raise ParamsError(source, [f"<file>: cannot read ({type(err).__name__}: {err.strerror or err})"]) from None
        loaded = _load_yaml(text, source, "<yaml>") or {}
        if not isinstance(loaded, dict):
            raise ParamsError(source, ["<root>: expected a mapping"])
        raw = loaded
    elif path is not None and str(path) != "params.yaml":
        raise ParamsError(source, ["<file>: not found"])
    raw = _deep_merge(raw, parse_overrides(overrides))
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(source, format_validation_error(err)) from None


def form_values(model: BaseModel) -> dict[str, Any]:
    """The part of a (typed-form) params model the user set: a nested JSON dict of the fields in each
    section's ``model_fields_set`` whose value differs from the code default, recursively per section.

    A form may submit every field pre-filled with its code default; those are not "set", so they never
    mask the value of the params file. (To put a field back to its code default over a file that says
    otherwise, use an override.)
    """
    out: dict[str, Any] = {}
    fields = type(model).model_fields
    for name in sorted(model.model_fields_set):
        if name not in fields:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sub = form_values(value)
            if sub:
                out[name] = sub
            continue
        field = fields[name]
        if not field.is_required() and value == field.get_default(call_default_factory=True):
            continue
        out[name] = model.model_dump(mode="json", include={name})[name]
    return out


def _override_keys(overrides: list[str]) -> list[tuple[str, str]]:
    """``(dotted key, item)`` of each well-formed ``KEY=VALUE`` override."""
    return [(item.split("=", 1)[0].strip(), item) for item in overrides if "=" in item]


def _blame_overrides(err: ValidationError, overrides: list[str]) -> list[str]:
    """One problem line per validation error, prefixed with the override(s) that caused it
    (the override whose key is the error's dotted location, or a prefix of it, or under it)."""
    keys = _override_keys(overrides)
    lines = []
    for e, line in zip(err.errors(), format_validation_error(err), strict=True):
        loc = ".".join(str(p) for p in e["loc"])
        hit = [
            item for key, item in keys if loc and (loc == key or loc.startswith(key + ".") or key.startswith(loc + "."))
        ]
        lines.append(f"{', '.join(hit or [i for _, i in keys])}: {line}")
    return lines


def resolve_params(params_file: str | Path | None, overrides: list[str] | None, params: Params | None = None) -> Params:
    """Flow/CLI parameter resolution: ``params_file``, then the typed ``params`` as a partial, then ``overrides``.

    - ``params_file`` (``None``: code defaults) is loaded and validated on its own: its problems name the file.
    - ``params`` (the Prefect form) is a *partial*: only :func:`form_values` (fields set to something other
      than the code default) are merged onto the file's values; problems are reported as ``params (form)``.
    - ``overrides`` (``section.key=value``) are applied last; a problem names the override
      (``overrides: train.lr=abc: train.lr: Input should be a valid number ...``), not the file.

    Raises:
        ParamsError: listing every problem of the first layer that fails.
    """
    merged = load_params(params_file).model_dump(mode="json", exclude_unset=True)
    if params is not None:
        merged = _deep_merge(merged, form_values(params))
        try:
            Params.model_validate(merged)
        except ValidationError as err:
            raise ParamsError("params (form)", format_validation_error(err)) from None
    if not overrides:
        return Params.model_validate(merged)
    merged = _deep_merge(merged, parse_overrides(overrides))
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ParamsError("overrides", _blame_overrides(err, list(overrides))) from None
