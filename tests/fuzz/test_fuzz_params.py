"""Fuzzing ``miroflow.config.load_params``: params files and ``-S key=value`` overrides.

Property: on any file content (YAML-ish text built from params keys and YAML syntax, arbitrary
text, arbitrary bytes including latin-1 and invalid UTF-8) and any list of override strings,
``load_params`` returns a :class:`Params` or raises :class:`ParamsError` naming its source
(the file, or ``overrides``), never anything else. For bytes that are not UTF-8 the error names
the file and the offset of the first bad byte.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from miroflow.config import Params, ParamsError, load_params, parse_overrides
from tests.fuzz.fuzz_helpers import no_file_writes

SECTIONS = list(Params.model_fields)
FIELDS = [f"{s}.{f}" for s in SECTIONS for f in Params.model_fields[s].annotation.model_fields]  # type: ignore[union-attr]
#: YAML values that reach the constructors' corner cases (timestamps, tagged scalars, aliases...).
YAML_ATOMS = [
    "1",
    "-1",
    "0x1f",
    "0o17",
    "0b101",
    "1_000",
    "1e-3",
    "1e999",
    ".nan",
    "-.inf",
    "190:20:30",
    "yes",
    "off",
    "~",
    "null",
    "''",
    '""',
    "2001-12-14",
    "2001-13-45",
    "2001-02-30",
    "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10 +99:00",
    "!!int abc",
    "!!int 0x",
    "!!float x",
    "!!bool maybe",
    "!!timestamp 2001-99-99",
    "!!binary '!!'",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!python/object:os.system ls",
    "!!str 1",
    "&a [1, 2]",
    "*a",
    "*nope",
    "[1, [2, [3]]]",
    "{a: 1}",
    "{",
    "[",
    "'unterminated",
    "|\n  block",
    "? [a]\n: b",
    "<<: *a",
    "<<: 5",
    "\t",
    "%YAML 1.1",
    "---",
    "...",
    "# comment",
    "sharpness",
    "cuda:0",
    "s3://bucket/prefix",
]
yaml_atoms = st.sampled_from(YAML_ATOMS) | st.integers().map(str) | st.floats().map(str) | st.text(max_size=12)
keys = st.sampled_from(SECTIONS + [f.split(".")[1] for f in FIELDS] + ["bogus", "", "<<", "1", "a b"])


@st.composite
def yamlish(draw: st.DrawFn) -> str:
    """Text shaped like params.yaml: nested key: value lines, sometimes broken, with YAML syntax mixed in."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        indent = "  " * draw(st.integers(0, 3))
        kind = draw(st.sampled_from(["kv", "kv", "kv", "section", "item", "raw"]))
        if kind == "kv":
            lines.append(f"{indent}{draw(keys)}: {draw(yaml_atoms)}")
        elif kind == "section":
            lines.append(f"{indent}{draw(keys)}:")
        elif kind == "item":
            lines.append(f"{indent}- {draw(yaml_atoms)}")
        else:
            lines.append(draw(yaml_atoms))
    return "\n".join(lines)


def structured_params() -> st.SearchStrategy[str]:
    """A valid-looking tree (right sections and fields, random values) dumped by PyYAML."""
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=6,
    )
    section = st.dictionaries(st.sampled_from([f.split(".")[1] for f in FIELDS] + ["bogus"]), values, max_size=4)
    return st.dictionaries(st.sampled_from(SECTIONS + ["bogus"]), section, max_size=3).map(yaml.safe_dump)


file_texts = st.one_of(yamlish(), structured_params(), st.text(max_size=300))
file_bytes = st.one_of(
    file_texts.map(lambda t: t.encode("utf-8")),
    file_texts.map(lambda t: t.encode("latin-1", "replace")),
    file_texts.map(lambda t: t.encode("utf-16")),
    st.binary(max_size=300),
    st.builds(lambda a, b: a.encode() + b + a.encode(), yamlish(), st.binary(min_size=1, max_size=4)),
)
override_values = st.one_of(yaml_atoms, st.text(max_size=20))
override_keys = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(FIELDS).map(lambda f: f.split(".")[0]),
    st.sampled_from(FIELDS).map(lambda f: f + ".sub"),
    st.sampled_from(["", " ", ".", "..", "train..lr", ".train", "train.", "a=b", "score.reward_weights.x"]),
    st.text(max_size=15),
)
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), st.text(max_size=30)),
    max_size=5,
)


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_params") / "params.yaml"


def check_load(path: Path | None, ovr: list[str]) -> None:
    try:
        with no_file_writes():
            params = load_params(path, ovr)
    except ParamsError as e:
        assert e.source in (str(path), "overrides", "<defaults>"), e.source
        assert str(e).startswith(f"{e.source}: ") and e.problems
        origin = "overrides" if e.source == "overrides" else "file"
        event(f"ParamsError from {origin}: {e.problems[0][:6] if e.problems[0][0] == '<' else 'a field'}")
        return
    assert isinstance(params, Params)
    event("loaded")


@given(text=file_texts, ovr=overrides)
def test_params_text(params_file: Path, text: str, ovr: list[str]) -> None:
    params_file.write_text(text, encoding="utf-8")
    check_load(params_file, ovr)


@given(data=file_bytes)
def test_params_bytes(params_file: Path, data: bytes) -> None:
    params_file.write_bytes(data)
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError as err:
        text, bad_at = None, err.start
    try:
        load_params(params_file)
    except ParamsError as e:
        if text is None:
            assert str(params_file) in str(e) and f"byte {bad_at}" in str(e), str(e)
    else:
        assert text is not None, "bytes that are not UTF-8 were accepted"


@given(ovr=overrides)
def test_overrides_alone(ovr: list[str]) -> None:
    check_load(None, ovr)
    try:
        tree = parse_overrides(ovr)
    except ParamsError as e:
        assert e.source == "overrides"
    else:
        assert isinstance(tree, dict)


# --------------------------------------------------------------------------- regressions (found by the fuzzing)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("data:\n  seed: 2001-13-45\n", "month must be in 1..12"),  # YAML 1.1 resolves it as a timestamp
        ("train:\n  lr: !!float x\n", "could not convert string to float"),
        ("train:\n  seed: !!int abc\n", "invalid literal for int()"),
        ("train:\n  compile: !!bool maybe\n", "KeyError: 'maybe'"),
        ("data:\n  seed: " + "1" * 5000 + "\n", "4300 digits"),
        ("train: " + "[" * 3000, "nested too deeply"),
    ],
    ids=["timestamp", "float-tag", "int-tag", "bool-tag", "long-int", "deep"],
)
def test_yaml_constructor_errors_are_params_errors(params_file: Path, body: str, message: str) -> None:
    """These escaped as ValueError / RecursionError (PyYAML raises them, not YAMLError)."""
    params_file.write_text(body)
    with pytest.raises(ParamsError, match=rf"^{re.escape(str(params_file))}: <yaml>: .*{re.escape(message)}"):
        load_params(params_file)


@pytest.mark.parametrize(
    "item",
    ["train.seed=2001-13-45", "data.domain={", "train.lr=!!float x", "train.compile=!!bool maybe", "x=*a", "x=\x1b"],
)
def test_bad_override_values_are_params_errors(item: str) -> None:
    """Override values went through a bare yaml.safe_load: YAMLError and ValueError escaped."""
    with pytest.raises(ParamsError, match=rf"^overrides: {re.escape(item)}: ") as err:
        load_params(None, [item])
    assert err.value.source == "overrides"


def test_latin1_params_file_names_file_and_byte(params_file: Path) -> None:
    params_file.write_bytes("data:\n  split: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=rf"^{re.escape(str(params_file))}: <file>: not UTF-8 \(byte 18: 0xe9\)"):
        load_params(params_file)


def test_unreadable_params_path_is_a_params_error(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=rf"^{re.escape(str(tmp_path))}: <file>: cannot read"):
        load_params(tmp_path)  # a directory
