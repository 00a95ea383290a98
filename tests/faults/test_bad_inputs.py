"""The bad-input corpus: every kind of bad input the hardening issue lists, generated in tmp_path.

No binary fixture is committed: each kind builds its bad input (a tar, a shard, a manifest, a score
table, a checkpoint, a params or prompt file) and runs the real code path, through the real CLI
(``miroflow.cli.app`` with ``-S`` overrides pointing every output into tmp_path), then asserts one of
three outcomes:

- **error**: exit 2 (bad input) or 1 (operational failure), at most 3 message lines, no traceback,
  and a fragment naming the offending field, file, shard, column or key;
- **rejection**: the run succeeds, the bad sample is listed in the recorded rejections with a reason
  (an import: the data manifest's ``rejected`` list; the score stage: ``<table>.failures.jsonl`` next
  to the score table) and every good sample of the same tar / shard is still there;
- **accepted**: a valid image in another mode (16-bit grey, palette, grey, RGBA, CMYK JPEG, LA) is
  imported, converted to RGB faithfully and scored with finite values; NaN scores (the documented
  "absent" value) are left out of the bins and the bins count only the finite ones.

``test_corpus_has_at_least_25_kinds`` counts the kinds (the parametrize ids of this module).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from miroflow.cli import app
from miroflow.conditioning import load_bins
from miroflow.config import Params, apply_overrides
from miroflow.data.score_tables import failures_uri, load_score_table, table_bytes, table_hash_record, table_hash_uri
from miroflow.data.shards import decode_image, iter_shard, write_manifest
from miroflow.data.train_data import load_train_data
from miroflow.score import score_table_uri
from miroflow.storage import Storage, sha256_bytes

#: The rewards every score/bin/train case uses: weight-free, so no model weights are needed.
REWARDS = ["sharpness", "contrast"]
#: A tiny training run on the corpus' 16x16 images that stops after one step (learned text encoder: no download).
TRAIN = [
    "--max-steps",
    "1",
    "-S",
    "data.resolution=16",
    "-S",
    "train.text_encoder=learned",
    "-S",
    "train.batch_size=2",
    "-S",
    "train.steps=1",
]
#: A tiny evaluation: one prompt per category, one image, one step.
EVAL = ["-S", "eval.prompt_set=shapes:1", "-S", "eval.images_per_prompt=1", "-S", "eval.steps=1"]

# ------------------------------------------------------------------------------- the CLI


def _settings(tmp: Path) -> list[str]:
    return [
        "-S",
        f"storage.root={tmp / 'store'}",
        "-S",
        f"data.manifest={tmp / 'm' / 'shards.json'}",
        "-S",
        f"score.manifest={tmp / 'm' / 'scores.json'}",
        "-S",
        f"score.bins={tmp / 'm' / 'bins.json'}",
        "-S",
        f"score.rewards=[{','.join(REWARDS)}]",
        "-S",
        "score.num_bins=4",
        "-S",
        "tracking.enabled=false",
    ]


def _invoke(tmp: Path, command: str, *extra: str, params_file: Path | None = None) -> Result:
    """``miroflow <command> -p <params> <settings> <extra>`` (``extra`` comes last: its ``-S`` win)."""
    if params_file is None:
        params_file = tmp / "empty.yaml"
        params_file.write_text("{}\n")
    return CliRunner().invoke(app, [command, "-p", str(params_file), *_settings(tmp), *extra])


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROGRESS = re.compile(r"\[\d\d:\d\d")  # a tqdm redraw: "[00:03<00:01, 2.5it/s]" / "[00:00, ?img/s]"


def _message_lines(output: str) -> list[str]:
    """The lines a user reads: progress-bar redraws and blank lines left out."""
    lines = (_ANSI.sub("", line).strip() for line in output.replace("\r", "\n").splitlines())
    return [line for line in lines if line and not _PROGRESS.search(line)]


def _check_short(result: Result, code: int, *fragments: str) -> list[str]:
    out = result.output
    lines = _message_lines(out)
    assert result.exit_code == code, out
    assert 1 <= len(lines) <= 3, out
    assert "Traceback" not in out, out
    for f in fragments:
        assert f in out, f"{f!r} not in:\n{out}"
    return lines


def _ok(result: Result) -> None:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


# ------------------------------------------------------------------------------- tars and images


@dataclass(frozen=True)
class Member:
    """One tar member: a regular file with ``data``, or a symbolic / hard link to ``link``."""

    name: str
    data: bytes = b""
    link: str | None = None
    hard: bool = False


def _tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            if m.link is not None:
                info.type = tarfile.LNKTYPE if m.hard else tarfile.SYMTYPE
                info.linkname = m.link
                tf.addfile(info)
            else:
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
    return buf.getvalue()


def _rgb(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png(seed: int) -> bytes:
    return _encode(Image.fromarray(_rgb(seed)))


def _caption(key: str) -> str:
    return f"a photo of {key}"


def _sample(key: str, image: bytes | None = None, ext: str = "png") -> list[Member]:
    """A good sample: ``key.<ext>`` and its caption ``key.txt``."""
    img = image if image is not None else _png(sum(map(ord, key)))
    return [Member(f"{key}.{ext}", img), Member(f"{key}.txt", _caption(key).encode())]


class _Tripwire:
    """Unpickling this creates the file ``path``: proof that a pickle member was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------- stage helpers


def _shard_path(tmp: Path) -> Path:
    return tmp / "store" / "shards" / "ds" / "train-000000.tar"


def _table_path(tmp: Path) -> Path:
    """Where the score stage writes the table of :func:`_shard_path` (content-addressed folder)."""
    params = apply_overrides(Params(), [a for a in _settings(tmp) if a != "-S"])
    return Path(score_table_uri(params, str(_shard_path(tmp))))


def _write_shard(tmp: Path, data: bytes, n: int) -> str:
    """Put shard bytes ``data`` where the score stage reads it and list it in ``data.manifest``."""
    shard = _shard_path(tmp)
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(data)
    entry = {"uri": str(shard), "sha256": sha256_bytes(data), "n": n}
    (tmp / "m").mkdir(exist_ok=True)
    write_manifest(tmp / "m" / "shards.json", [entry], root=str(shard.parent))
    return str(shard)


def _scored(tmp: Path, keys: tuple[str, ...] = ("s0", "s1", "s2", "s3"), bins: bool = False) -> str:
    """A good shard of ``keys``, scored (and binned) through the CLI; returns the score table URI."""
    _write_shard(tmp, _tar([m for k in keys for m in _sample(k)]), len(keys))
    _ok(_invoke(tmp, "score"))
    if bins:
        _ok(_invoke(tmp, "bin"))
    return str(_table_path(tmp))


def _rewrite_table(uri: str, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Rewrite a score table (and its hash record) with ``change`` applied to its columns, as if written so."""
    table = pq.read_table(uri)
    meta = json.loads((table.schema.metadata or {})[b"miroflow"])
    cols: dict[str, np.ndarray] = {
        name: np.asarray(table.column(name).to_pylist(), dtype=object if name == "key" else np.float64)
        for name in table.column_names
    }
    change(cols)
    data = table_bytes(cols, meta)
    Path(table_hash_uri(uri)).write_bytes(table_hash_record(data, uri))
    Path(uri).write_bytes(data)


def _import(tmp: Path, tars: dict[str, bytes], *extra: str) -> Result:
    """``miroflow prepare`` importing the tars ``{file name: bytes}`` from ``tmp/incoming``."""
    src = tmp / "incoming"
    src.mkdir(exist_ok=True)
    for name, data in tars.items():
        (src / name).write_bytes(data)
    return _invoke(tmp, "prepare", "-S", "data.domain=import", "-S", f"data.import_uri={src}", *extra)


def _imported(tmp: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(records of the imported shards, recorded rejections)`` from the data manifest."""
    manifest = json.loads((tmp / "m" / "shards.json").read_text())
    storage = Storage(retries=0)
    records = [r for s in manifest["shards"] for r in iter_shard(s["uri"], storage)]
    return records, list(manifest["rejected"])


def _score_outputs(tmp: Path) -> tuple[Any, list[dict[str, Any]]]:
    """``(score table as a DataFrame, failure records)`` of the one shard."""
    table = str(_table_path(tmp))
    df = load_score_table(table)
    text = Path(failures_uri(table)).read_text(encoding="utf-8")
    return df, [json.loads(line) for line in text.splitlines() if line.strip()]


def _names(rec: dict[str, Any]) -> set[str]:
    return {str(rec[k]) for k in ("key", "member") if rec.get(k) is not None}


def _pipeline_dir(tmp: Path) -> Path:
    """A complete, loadable tiny pipeline directory (what ``eval.checkpoint`` may point at)."""
    from tests.tiny_models import tiny_random_pipeline

    d = tmp / "ckpt"
    tiny_random_pipeline(["sharpness"], "corpus", 1).save_pretrained(d)
    assert (d / "miro.json").is_file()
    return d


# ======================================================================== kind 1: one-line errors


@dataclass(frozen=True)
class ErrorCase:
    """A CLI call on a prepared bad input and what its one-line error must say."""

    command: str
    extra: list[str]
    code: int
    fragments: list[str]
    params_file: Path | None = None
    after: Callable[[], None] | None = None  # a check of what the failed run left behind


ERROR_KINDS: dict[str, Callable[[Path], ErrorCase]] = {}


def _absent(path: Path) -> Callable[[], None]:
    """A check that the failed run did not write ``path``."""

    def check() -> None:
        assert not path.exists(), f"the failed run wrote {path}"

    return check


def _error_kind(name: str) -> Callable[[Callable[[Path], ErrorCase]], Callable[[Path], ErrorCase]]:
    def register(build: Callable[[Path], ErrorCase]) -> Callable[[Path], ErrorCase]:
        ERROR_KINDS[name] = build
        return build

    return register


@_error_kind("latin1-params-file")
def _latin1_params(tmp: Path) -> ErrorCase:
    f = tmp / "params.yaml"
    f.write_bytes("data:\n  split: caf\xe9\n".encode("latin-1"))
    return ErrorCase("prepare", [], 2, [str(f), "not UTF-8"], params_file=f)


@_error_kind("unknown-reward")
def _unknown_reward(tmp: Path) -> ErrorCase:
    return ErrorCase(
        "prepare", ["-S", "score.rewards=[sharpness,nosuch]"], 2, ["score.rewards: unknown reward 'nosuch'"]
    )


@_error_kind("reward-target-out-of-range")
def _target_7(tmp: Path) -> ErrorCase:
    return ErrorCase("evaluate", ["-S", "eval.reward_targets.sharpness=7"], 2, ["eval.reward_targets.sharpness: 7"])


@_error_kind("model-huge")
def _model_huge(tmp: Path) -> ErrorCase:
    return ErrorCase("train", ["-S", "train.model=huge"], 2, ["train.model: unknown model size 'huge'"])


@_error_kind("import-without-uri")
def _import_without_uri(tmp: Path) -> ErrorCase:
    return ErrorCase("prepare", ["-S", "data.domain=import"], 2, ["data.import_uri: required"])


@_error_kind("max-steps-negative")
def _max_steps(tmp: Path) -> ErrorCase:
    return ErrorCase("train", ["--max-steps", "-1"], 2, ["--max-steps: must be >= 1"])


@_error_kind("unwritable-storage-root")
def _unwritable_root(tmp: Path) -> ErrorCase:
    blocker = tmp / "a-file"  # a folder cannot be made below a file, not even by root
    blocker.write_text("x")
    return ErrorCase(
        "prepare",
        ["-S", f"storage.root={blocker / 'store'}", "-S", "data.num_samples=2"],
        2,
        ["storage.root: cannot write to", str(blocker / "store")],
        after=_absent(tmp / "m" / "shards.json"),
    )


@_error_kind("shards-manifest-not-json")
def _shards_manifest_not_json(tmp: Path) -> ErrorCase:
    (tmp / "m").mkdir()
    (tmp / "m" / "shards.json").write_text("{ this is not json")
    return ErrorCase("score", [], 2, [str(tmp / "m" / "shards.json"), "not valid JSON"])


@_error_kind("score-manifest-not-json")
def _score_manifest_not_json(tmp: Path) -> ErrorCase:
    (tmp / "m").mkdir()
    (tmp / "m" / "scores.json").write_text('{"version": 1, "rewards": ')
    return ErrorCase("bin", [], 2, [str(tmp / "m" / "scores.json"), "not valid JSON"])


@_error_kind("bins-file-not-json")
def _bins_not_json(tmp: Path) -> ErrorCase:
    _write_shard(tmp, _tar(_sample("s0") + _sample("s1")), 2)
    (tmp / "m" / "bins.json").write_text("{ bins: [0, 1")
    return ErrorCase("train", TRAIN, 2, [str(tmp / "m" / "bins.json"), "invalid JSON"])


@_error_kind("shard-sha256-mismatch")
def _sha_mismatch(tmp: Path) -> ErrorCase:
    shard = _write_shard(tmp, _tar(_sample("s0") + _sample("s1")), 2)
    Path(shard).write_bytes(_tar(_sample("s0") + _sample("s9")))  # changed after the manifest was written
    return ErrorCase(
        "score",
        [],
        2,
        [f"shard {shard}: sha256", "does not match the manifest"],
        after=_absent(_table_path(tmp)),
    )


@_error_kind("truncated-shard")
def _truncated_shard(tmp: Path) -> ErrorCase:
    full = _tar(_sample("s0") + _sample("s1") + _sample("s2"))
    cut = full[: full.find(b"s2.png") + 512 + 100]  # inside the data of s2.png
    shard = _write_shard(tmp, cut, 3)
    return ErrorCase(
        "score",
        [],
        2,
        [f"shard {shard} is truncated or corrupt"],
        after=_absent(_table_path(tmp)),
    )


@_error_kind("inf-score-into-bin")
def _inf_into_bin(tmp: Path) -> ErrorCase:
    table = _scored(tmp)
    _rewrite_table(table, lambda c: c["sharpness"].__setitem__(1, np.inf))
    return ErrorCase(
        "bin",
        [],
        2,
        [f"score table {table}", "column 'sharpness'", "inf"],
        after=_absent(tmp / "m" / "bins.json"),
    )


@_error_kind("inf-score-into-training")
def _inf_into_train(tmp: Path) -> ErrorCase:
    table = _scored(tmp, bins=True)  # bins fitted on clean scores; then the table goes bad
    _rewrite_table(table, lambda c: c["contrast"].__setitem__(2, -np.inf))
    return ErrorCase("train", TRAIN, 2, [f"score table {table}", "column 'contrast'", "inf"])


@_error_kind("image-size-not-data-resolution")
def _wrong_resolution(tmp: Path) -> ErrorCase:
    _write_shard(tmp, _tar(_sample("s0") + _sample("s1")), 2)  # 16x16 images
    return ErrorCase(
        "train",
        [*TRAIN, "-S", "data.resolution=32", "-S", "train.rewards=[]"],
        2,
        ["data.resolution: 32", str(tmp / "m" / "shards.json"), "16x16"],
    )


@_error_kind("mixed-image-sizes-into-training")
def _mixed_sizes(tmp: Path) -> ErrorCase:
    wide = _encode(Image.fromarray(np.zeros((16, 24, 3), np.uint8)))
    shard = _write_shard(tmp, _tar(_sample("s0") + _sample("s1", wide) + _sample("s2")), 3)
    return ErrorCase("train", [*TRAIN, "-S", "train.rewards=[]"], 2, [f"shard {shard} key 's1'", "24x16"])


@_error_kind("nan-scores-only")
def _all_nan(tmp: Path) -> ErrorCase:
    table = _scored(tmp)
    _rewrite_table(table, lambda c: c["sharpness"].fill(np.nan))
    return ErrorCase("bin", [], 2, [str(tmp / "m" / "scores.json"), "reward 'sharpness'", "no finite values"])


@_error_kind("score-table-missing-column")
def _missing_column(tmp: Path) -> ErrorCase:
    table = _scored(tmp)

    def drop(cols: dict[str, np.ndarray]) -> None:
        del cols["contrast"]

    _rewrite_table(table, drop)
    return ErrorCase("bin", [], 2, [f"score table {table}", "no column 'contrast'"])


@_error_kind("import-only-an-empty-tar")
def _only_empty_tar(tmp: Path) -> ErrorCase:
    src = tmp / "incoming"
    src.mkdir()
    (src / "part-0.tar").write_bytes(_tar([]))  # a valid tar with no member
    return ErrorCase(
        "prepare",
        ["-S", "data.domain=import", "-S", f"data.import_uri={src}"],
        2,
        [f"import from {src}: no usable sample in 1 tar file(s)"],
    )


@_error_kind("import-folder-without-tars")
def _no_tars(tmp: Path) -> ErrorCase:
    src = tmp / "incoming"
    src.mkdir()
    (src / "README").write_text("no tar here\n")
    return ErrorCase(
        "prepare",
        ["-S", "data.domain=import", "-S", f"data.import_uri={src}"],
        2,
        ["no .tar files found under", str(src)],
    )


@_error_kind("garbage-safetensors-checkpoint")
def _garbage_safetensors(tmp: Path) -> ErrorCase:
    d = _pipeline_dir(tmp)
    weights = d / "denoiser" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file" * 3)
    return ErrorCase(
        "evaluate", [*EVAL, "-S", f"eval.checkpoint={d}"], 2, [str(weights), "is not a readable safetensors file"]
    )


@_error_kind("checkpoint-without-miro-json")
def _no_miro_json(tmp: Path) -> ErrorCase:
    d = _pipeline_dir(tmp)
    (d / "miro.json").unlink()
    return ErrorCase("evaluate", [*EVAL, "-S", f"eval.checkpoint={d}"], 2, [f"eval.checkpoint: {d}", "no miro.json"])


@_error_kind("bad-prompt-set-line")
def _bad_prompt_line(tmp: Path) -> ErrorCase:
    d = _pipeline_dir(tmp)
    good = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps(good) + "\n" + '{"tag": "single_object", "prompt": \n')
    return ErrorCase(
        "evaluate",
        [*EVAL, "-S", f"eval.checkpoint={d}", "-S", f"eval.prompt_set=geneval:{prompts}"],
        2,
        ["eval.prompt_set", f"{prompts} line 2", "invalid JSON"],
    )


@pytest.mark.parametrize("kind", list(ERROR_KINDS))
def test_bad_input_is_one_short_error_naming_it(tmp_path: Path, kind: str) -> None:
    case = ERROR_KINDS[kind](tmp_path)
    result = _invoke(tmp_path, case.command, *case.extra, params_file=case.params_file)
    _check_short(result, case.code, *case.fragments)
    if case.after is not None:
        case.after()


# ======================================================================== kind 2: recorded rejections


@dataclass(frozen=True)
class BadSample:
    """A bad sample put between two good ones in a tar: its members, the key or member name its
    rejection names, a fragment of the reason, and samples among its members that must be kept."""

    members: Callable[[Path], list[Member]]
    name: str
    reason: str
    kept: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # -S overrides the case needs
    stages: tuple[str, ...] = ("import", "score")


SAMPLE_KINDS: dict[str, BadSample] = {
    "zero-byte-image": BadSample(lambda t: _sample("zero", b""), "zero", "empty data"),
    "corrupt-image": BadSample(lambda t: _sample("cut", _png(7)[:60]), "cut", "cannot decode"),
    "duplicate-key-in-shard": BadSample(
        lambda t: _sample("dup") + _sample("mid") + [Member("dup.png", _png(3)), Member("dup.txt", b"second dup")],
        "dup",
        "duplicate key",
        kept=("dup", "mid"),  # the first "dup" and the sample between them stay
    ),
    "duplicate-member": BadSample(lambda t: [Member("twice.png", _png(4)), *_sample("twice")], "twice", "duplicate"),
    "traversal-member-name": BadSample(
        lambda t: [Member("../../evil.png", _png(5)), Member("../../evil.txt", b"escape")],
        "../../evil.png",
        "unsafe member name",
    ),
    "absolute-member-name": BadSample(
        lambda t: [Member("/tmp/abs.png", _png(6)), Member("/tmp/abs.txt", b"absolute")],
        "/tmp/abs.png",
        "absolute path",
    ),
    "symlink-member": BadSample(
        lambda t: [Member("link.png", link="/etc/passwd"), Member("link.txt", b"a symlink")],
        "link.png",
        "not a regular file",
    ),
    "hardlink-member": BadSample(
        lambda t: [Member("hard.png", link="good1.png", hard=True), Member("hard.txt", b"a hard link")],
        "hard.png",
        "not a regular file",
    ),
    "pyd-pickle-member": BadSample(
        lambda t: [*_sample("pk"), Member("pk.pyd", pickle.dumps(_Tripwire(str(t / "UNPICKLED"))))],
        "pk",
        "pickle member",
    ),
    "caption-not-utf8": BadSample(
        lambda t: [Member("lat.png", _png(8)), Member("lat.txt", "caf\xe9 au lait".encode("latin-1"))],
        "lat",
        "not valid UTF-8",
    ),
    "metadata-not-json": BadSample(lambda t: [*_sample("bj"), Member("bj.json", b"{not json")], "bj", "not valid JSON"),
    "missing-caption": BadSample(lambda t: [Member("nocap.png", _png(9))], "nocap", "missing or empty caption"),
    "image-over-max-pixels": BadSample(
        lambda t: [Member("big.png", _encode(Image.new("1", (2000, 1000), 1))), Member("big.txt", b"a bomb")],
        "big",
        "2,000,000 pixels exceeds the limit of 1,000,000",
        extra=("-S", "data.max_pixels=1000000"),
        stages=("import",),  # data.max_pixels is the import's decompression-bomb guard
    ),
}
SAMPLE_CASES = [
    pytest.param(kind, stage, id=f"{kind}-{stage}") for kind, bad in SAMPLE_KINDS.items() for stage in bad.stages
]


@pytest.mark.parametrize(("kind", "stage"), SAMPLE_CASES)
def test_bad_sample_is_recorded_and_no_good_sample_is_lost(tmp_path: Path, kind: str, stage: str) -> None:
    bad = SAMPLE_KINDS[kind]
    members = _sample("good1") + bad.members(tmp_path) + _sample("good2")
    good = {"good1", "good2", *bad.kept}
    if stage == "import":
        _ok(_import(tmp_path, {"part-0.tar": _tar(members)}, *bad.extra))
        records, rejected = _imported(tmp_path)
        assert sorted(r["txt"] for r in records) == sorted(_caption(k) for k in good)
        assert all(r["json"]["source"]["tar"].endswith("part-0.tar") for r in records)
    else:
        _write_shard(tmp_path, _tar(members), len(good) + 1)
        _ok(_invoke(tmp_path, "score", *bad.extra))
        df, rejected = _score_outputs(tmp_path)
        assert sorted(df["key"]) == sorted(good)
        assert np.isfinite(df[REWARDS].to_numpy()).all()
        assert df.attrs["miroflow"]["failures"] == len(rejected)
    hits = [r for r in rejected if bad.name in _names(r)]
    assert hits, f"{bad.name!r} not among the rejections {rejected}"
    assert any(bad.reason in str(r["reason"]) for r in hits), hits
    assert not any(_names(r) & {"good1", "good2"} for r in rejected), rejected
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle member was unpickled"


@dataclass(frozen=True)
class BadTar:
    """A bad import source tar next to a good one: its bytes, the reason fragment, salvaged keys."""

    data: Callable[[], bytes]
    reason: str
    kept: tuple[str, ...] = ()


def _cut_tar() -> bytes:
    full = _tar(_sample("t1") + _sample("t2") + _sample("t3"))
    return full[: full.find(b"t3.png") + 512 + 100]  # cut inside the data of t3.png


TAR_KINDS: dict[str, BadTar] = {
    "zero-byte-tar": BadTar(lambda: b"", "empty"),
    "non-tar-source": BadTar(lambda: b"this is not a tar file\n" * 40, "truncated or corrupt"),
    "truncated-tar-source": BadTar(_cut_tar, "truncated or corrupt", kept=("t1", "t2")),
}


@pytest.mark.parametrize("kind", list(TAR_KINDS))
def test_bad_source_tar_is_recorded_and_the_good_tars_are_imported(tmp_path: Path, kind: str) -> None:
    bad = TAR_KINDS[kind]
    _ok(_import(tmp_path, {"a-good.tar": _tar(_sample("good1") + _sample("good2")), "b-bad.tar": bad.data()}))
    records, rejected = _imported(tmp_path)
    assert sorted(r["txt"] for r in records) == sorted(_caption(k) for k in ("good1", "good2", *bad.kept))
    bad_uri = str(tmp_path / "incoming" / "b-bad.tar")
    whole = [r for r in rejected if r["source"] == bad_uri and not _names(r)]
    assert len(whole) == 1 and bad.reason in whole[0]["reason"], rejected
    assert all(r["source"] == bad_uri for r in rejected), rejected


# ======================================================================== kind 3: accepted


def _grey(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)


def _smooth_rgb() -> np.ndarray:
    y, x = np.mgrid[0:16, 0:16]
    return np.stack([x * 16, y * 16, (x + y) * 8], axis=-1).astype(np.uint8)


def _i16() -> tuple[bytes, np.ndarray]:
    g = _grey(1)
    img = Image.fromarray(g.astype(np.uint16) * 257)  # the full 16-bit range: 0..65535
    assert img.mode == "I;16"
    return _encode(img), np.repeat(g[..., None], 3, axis=2)


def _palette() -> tuple[bytes, np.ndarray]:
    colours = np.array([[255, 0, 0], [0, 128, 255], [20, 200, 40], [250, 250, 10]], dtype=np.uint8)
    rgb = colours[np.random.default_rng(2).integers(0, 4, (16, 16))]
    img = Image.fromarray(rgb).quantize(colors=4)
    assert img.mode == "P"
    return _encode(img), rgb


def _grey_l() -> tuple[bytes, np.ndarray]:
    g = _grey(3)
    return _encode(Image.fromarray(g, "L")), np.repeat(g[..., None], 3, axis=2)


def _rgba() -> tuple[bytes, np.ndarray]:
    rgb = _rgb(4)
    alpha = _grey(5)[..., None]
    return _encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")), rgb


def _la() -> tuple[bytes, np.ndarray]:
    g = _grey(6)
    return _encode(Image.fromarray(np.stack([g, _grey(7)], axis=2), "LA")), np.repeat(g[..., None], 3, axis=2)


def _cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    rgb = _smooth_rgb()
    return _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), rgb


@dataclass(frozen=True)
class ModeImage:
    """A valid image in another mode: ``(encoded bytes, the RGB it shows)``, its extension, the
    largest mean absolute difference allowed after decoding (0: lossless)."""

    build: Callable[[], tuple[bytes, np.ndarray]]
    ext: str = "png"
    tolerance: float = 0.0
    mode: str = ""


MODE_KINDS: dict[str, ModeImage] = {
    "mode-16bit-grey": ModeImage(_i16, mode="I;16"),
    "mode-palette": ModeImage(_palette, mode="P"),
    "mode-grey": ModeImage(_grey_l, mode="L"),
    "mode-rgba": ModeImage(_rgba, mode="RGBA"),
    "mode-cmyk-jpeg": ModeImage(_cmyk_jpeg, ext="jpg", tolerance=6.0, mode="CMYK"),
    "mode-grey-alpha": ModeImage(_la, mode="LA"),
}


@pytest.mark.parametrize("kind", list(MODE_KINDS))
def test_valid_image_in_another_mode_is_imported_as_rgb_and_scored(tmp_path: Path, kind: str) -> None:
    spec = MODE_KINDS[kind]
    data, shown = spec.build()
    assert Image.open(io.BytesIO(data)).mode == spec.mode
    tars = {"part-0.tar": _tar(_sample("good1") + _sample("odd", data, spec.ext))}
    _ok(_import(tmp_path, tars, "-S", "data.resolution=16"))  # 16x16 sources: converted, not resized
    records, rejected = _imported(tmp_path)
    assert rejected == []
    by_caption = {r["txt"]: r for r in records}
    assert set(by_caption) == {_caption("good1"), _caption("odd")}
    odd = by_caption[_caption("odd")]
    assert (odd["json"]["orig_width"], odd["json"]["orig_height"]) == (16, 16)
    rgb = decode_image(odd["image_bytes"])
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    diff = float(np.abs(rgb.astype(np.float64) - shown.astype(np.float64)).mean())
    assert diff <= spec.tolerance, f"decoded {spec.mode} image is {diff:.1f} grey levels off the picture it shows"

    _ok(_invoke(tmp_path, "score"))
    manifest = json.loads((tmp_path / "m" / "scores.json").read_text())
    [table] = manifest["tables"]
    df = load_score_table(table["uri"])
    assert sorted(df["key"]) == sorted(r["key"] for r in records)
    values = df[[f"{r}.raw" for r in REWARDS] + REWARDS].to_numpy()
    assert np.isfinite(values).all(), df
    assert table["failures"] == 0 and Path(table["failures_uri"]).read_text() == ""


SCORE_VALUE_KINDS = ["nan-scores-some"]


@pytest.mark.parametrize("kind", SCORE_VALUE_KINDS)
def test_nan_scores_are_absent_left_out_of_the_bins_and_counted(tmp_path: Path, kind: str) -> None:
    """NaN is the score tables' documented "absent" value: bins are fitted on the finite values only
    and record how many (``n``); a NaN never lands in a bin."""
    table = _scored(tmp_path)
    _rewrite_table(table, lambda c: c["sharpness"].__setitem__(0, np.nan))
    _ok(_invoke(tmp_path, "bin"))
    bins = json.loads((tmp_path / "m" / "bins.json").read_text())
    assert bins["rewards"]["sharpness"]["n"] == 3
    assert bins["rewards"]["contrast"]["n"] == 4
    for r in REWARDS:
        assert np.isfinite(bins["rewards"][r]["edges"]).all()
    # and in training's conditioning the NaN stays absent (NaN), never a bin
    binset = load_bins(tmp_path / "m" / "bins.json")
    data = load_train_data(
        tmp_path / "m" / "shards.json", Storage(retries=0), REWARDS, binset, tmp_path / "m" / "scores.json"
    )
    rows = dict(zip(data.keys, data.rewards.numpy()))
    assert np.isnan(rows["s0"][0]) and 0.0 <= rows["s0"][1] <= 1.0
    assert all(np.isfinite(rows[k]).all() for k in ("s1", "s2", "s3"))


# ======================================================================== the corpus


def test_corpus_has_at_least_25_kinds() -> None:
    groups = [list(ERROR_KINDS), list(SAMPLE_KINDS), list(TAR_KINDS), list(MODE_KINDS), SCORE_VALUE_KINDS]
    kinds = [k for g in groups for k in g]
    assert len(kinds) == len(set(kinds)), "a kind is listed twice"
    assert len(kinds) >= 25, kinds
    required = {
        "mode-16bit-grey",
        "mode-palette",
        "mode-grey",
        "mode-rgba",
        "mode-cmyk-jpeg",
        "mode-grey-alpha",
        "zero-byte-image",
        "duplicate-key-in-shard",
        "nan-scores-some",
        "nan-scores-only",
        "inf-score-into-bin",
        "inf-score-into-training",
        "score-table-missing-column",
        "shard-sha256-mismatch",
        "shards-manifest-not-json",
        "score-manifest-not-json",
        "bins-file-not-json",
        "latin1-params-file",
        "unknown-reward",
        "reward-target-out-of-range",
        "model-huge",
        "import-without-uri",
        "max-steps-negative",
        "import-only-an-empty-tar",
        "zero-byte-tar",
        "non-tar-source",
        "truncated-tar-source",
        "image-over-max-pixels",
        "traversal-member-name",
        "symlink-member",
        "pyd-pickle-member",
        "caption-not-utf8",
        "garbage-safetensors-checkpoint",
        "checkpoint-without-miro-json",
        "unwritable-storage-root",
        "bad-prompt-set-line",
    }
    assert required <= set(kinds), sorted(required - set(kinds))
