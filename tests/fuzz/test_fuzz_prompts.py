"""Fuzzing the prompt-set parsers of ``miroflow.prompts``.

Parsers: the spec (``load_prompt_set("<name>[:<arg>]")``, including the ``shapes:<k>`` argument),
GenEval metadata JSON lines (``parse_geneval``), PartiPrompts TSV (``parse_parti``) and the file
decoding in front of both (``geneval:<path>`` / ``parti:<path>`` on arbitrary bytes).

Properties: nothing but :class:`PromptSetError` escapes; an error about file content names the
file and the line, and that line is the first one that is bad on its own (every line before it
parses, alone or with the header); no file is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from miroflow.prompts import (
    PARTI_HEADER,
    PROMPT_SETS,
    PromptItem,
    PromptSetError,
    load_prompt_set,
    parse_geneval,
    parse_parti,
)
from tests.fuzz.fuzz_helpers import no_file_writes

SOURCE = "fuzz.jsonl"
LINE = re.compile(rf"^{re.escape(SOURCE)} line (\d+): ")
#: characters str.splitlines() treats as line ends besides \n and \r (editors and JSON do not)
ODD_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]

texts = st.text(max_size=12) | st.sampled_from(["", " ", "a red circle", "colors", *ODD_BREAKS, "\t", '"', "\\"])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=6
)
objects = st.fixed_dictionaries(
    {"class": st.one_of(texts, json_values), "count": st.one_of(st.integers(-2, 5), json_values)},
    optional={"color": texts, "position": json_values},
)
includes = st.one_of(st.lists(objects, max_size=3), json_values)
records = st.fixed_dictionaries(
    {},
    optional={
        "tag": st.one_of(texts, json_values),
        "include": includes,
        "prompt": st.one_of(texts, json_values),
        "exclude": includes,
        "extra": json_values,
    },
)
good_records = st.fixed_dictionaries(
    {
        "tag": st.sampled_from(["single_object", "colors", "position"]),
        "include": st.lists(
            st.fixed_dictionaries({"class": st.sampled_from(["circle", "square"]), "count": st.integers(0, 4)}),
            max_size=2,
        ),
        "prompt": st.sampled_from(["a red circle", "two blue squares"]) | texts.map(lambda t: f"p{t}"),
    }
)
geneval_lines = st.one_of(
    good_records.map(json.dumps),
    good_records.map(json.dumps),
    good_records.map(lambda r: json.dumps(r, ensure_ascii=False)),
    records.map(json.dumps),
    json_values.map(json.dumps),
    st.sampled_from(["", "   ", "{", "not json", "[]", "null", '{"tag": 1}', "NaN", '{"a": 1}{"b": 2}', "\ufeff{}"]),
    st.sampled_from(["[" * 5000, '{"tag": ' + "9" * 5000 + "}"]),  # json.loads' ValueError / RecursionError
    texts,
)
geneval_texts = st.builds(
    lambda lines, end: end.join(lines), st.lists(geneval_lines, max_size=6), st.sampled_from(["\n", "\r\n", "\r"])
)
parti_cells = texts | st.sampled_from(["", " ", "Abstract", "bond", "\t", *ODD_BREAKS])
parti_rows = st.one_of(
    st.builds(
        lambda p, c, rest: "\t".join([f"p{p}", f"c{c}", *rest]),
        parti_cells,
        parti_cells,
        st.lists(parti_cells, max_size=2),
    ),
    st.lists(parti_cells, min_size=0, max_size=6).map("\t".join),
)
parti_headers = st.one_of(
    st.just("\t".join(PARTI_HEADER)),
    st.just("\t".join(PARTI_HEADER) + "\tExtra"),
    st.just(" Prompt \tCategory\tChallenge\tNote "),
    parti_rows,
)
parti_texts = st.builds(
    lambda h, rows, end: end.join([h, *rows]),
    parti_headers,
    st.lists(parti_rows, max_size=6),
    st.sampled_from(["\n", "\r\n"]),
)


def first_bad_line(text: str, parse_one) -> int | None:  # type: ignore[no-untyped-def]
    """1-based number of the first line that does not parse on its own (``\\n``/``\\r`` ends lines)."""
    for lineno, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        try:
            parse_one(line, lineno)
        except PromptSetError:
            return lineno
    return None


def check_items(items: list[PromptItem]) -> None:
    for it in items:
        assert isinstance(it.tag, str) and it.tag and isinstance(it.prompt, str) and it.prompt.strip()
        assert isinstance(it.metadata, dict)


@given(text=geneval_texts)
def test_parse_geneval(text: str) -> None:
    try:
        items = parse_geneval(text, SOURCE)
    except PromptSetError as e:
        m = LINE.match(str(e))
        assert m, f"error does not name the line: {e}"
        expected = first_bad_line(text, lambda line, n: parse_geneval(line, SOURCE))
        assert int(m.group(1)) == expected, f"named line {m.group(1)}, first bad line is {expected}: {e}"
        event("PromptSetError")
        return
    check_items(items)
    assert first_bad_line(text, lambda line, n: parse_geneval(line, SOURCE)) is None
    event(f"parsed {min(len(items), 3)}+ items")


@given(text=parti_texts)
def test_parse_parti(text: str) -> None:
    try:
        items = parse_parti(text, SOURCE)
    except PromptSetError as e:
        m = LINE.match(str(e))
        assert m, f"error does not name the line: {e}"
        header = re.split(r"\r\n|\r|\n", text)[0]

        def one(line: str, n: int) -> None:
            parse_parti(header if n == 1 else f"{header}\n{line}", SOURCE)

        assert int(m.group(1)) == first_bad_line(text, one), str(e)
        event("PromptSetError")
        return
    check_items(items)
    event(f"parsed {min(len(items), 3)}+ items")


file_bytes = st.one_of(
    geneval_texts.map(str.encode),
    parti_texts.map(str.encode),
    geneval_texts.map(lambda t: t.encode("latin-1", "replace")),
    parti_texts.map(lambda t: t.encode("utf-16")),
    st.builds(lambda a, b, c: a.encode() + b + c.encode(), geneval_texts, st.binary(min_size=1, max_size=3), texts),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_prompts") / SOURCE


@given(data=file_bytes, kind=st.sampled_from(["geneval", "parti"]), n=st.none() | st.integers(1, 3))
def test_prompt_files(prompt_file: Path, data: bytes, kind: str, n: int | None) -> None:
    prompt_file.write_bytes(data)
    try:
        with no_file_writes():
            items = load_prompt_set(f"{kind}:{prompt_file}", n=n)
    except PromptSetError as e:
        assert str(prompt_file) in str(e), str(e)
        assert re.search(r" line \d+", str(e)) or "is empty" in str(e), f"error does not name the line: {e}"
        event("PromptSetError")
        return
    check_items(items)
    assert n is None or len(items) <= n


specs = st.one_of(
    st.builds(lambda name, arg: f"{name}:{arg}", st.sampled_from(sorted(PROMPT_SETS)), st.text(max_size=8)),
    st.builds(lambda k: f"shapes:{k}", st.integers(-3, 3) | st.sampled_from(["1_0", " 2", "0x2", "1e1", "٣", "-0"])),
    st.text(max_size=12),
    st.sampled_from(["", " ", ":", "shapes:", "geneval", "geneval:", "parti:", "nope:x", "SHAPES"]),
)


@given(spec=specs, n=st.none() | st.integers(-1, 20) | st.booleans())
def test_specs(spec: str, n: int | None) -> None:
    try:
        with no_file_writes():
            items = load_prompt_set(spec, n=n)
    except PromptSetError:
        event("PromptSetError")
        return
    check_items(items)


# --------------------------------------------------------------------------- regressions (found by the fuzzing)
GOOD = '{"tag": "colors", "include": [{"class": "circle", "count": 1}], "prompt": "%s"}'


@pytest.mark.parametrize("sep", ODD_BREAKS)
def test_unicode_line_separators_do_not_split_lines(sep: str) -> None:
    """str.splitlines() cut lines at these: a form feed line shifted later line numbers by one."""
    text = f"{sep}\n{GOOD % 'a'}\n{{bad\n"
    with pytest.raises(PromptSetError, match=rf"^{SOURCE} line 3: invalid JSON"):
        parse_geneval(text, SOURCE)


@pytest.mark.parametrize("sep", ["\x85", "\u2028", "\u2029"])
def test_line_separator_inside_a_json_string_is_kept(sep: str) -> None:
    """Raw U+2028/U+2029/NEL are valid inside a JSON string; the line used to be cut there and refused."""
    (item,) = parse_geneval(GOOD % f"a{sep}b" + "\n", SOURCE)
    assert item.prompt == f"a{sep}b"
    (row,) = parse_parti("\t".join(PARTI_HEADER) + f"\na{sep}b\tAbstract\n", SOURCE)
    assert row.prompt == f"a{sep}b" and row.tag == "Abstract"


@pytest.mark.parametrize(
    ("line", "message"),
    [("[" * 5000, "nested too deeply"), ('{"tag": ' + "9" * 5000 + "}", "4300 digits")],
    ids=["deep", "long-int"],
)
def test_hostile_json_is_a_prompt_set_error(line: str, message: str) -> None:
    """These escaped as RecursionError / ValueError (json.loads raises them, not JSONDecodeError)."""
    with pytest.raises(PromptSetError, match=rf"^{SOURCE} line 2: invalid JSON .*{message}"):
        parse_geneval(GOOD % "a" + "\n" + line, SOURCE)


def test_latin1_prompt_file_names_file_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "PartiPrompts.tsv"
    path.write_bytes(("\t".join(PARTI_HEADER) + "\ncaf\u00e9\tFood\n").encode("latin-1"))
    with pytest.raises(PromptSetError, match=rf"^{re.escape(str(path))} line 2: not UTF-8 text \(byte 34: 0xe9"):
        load_prompt_set(f"parti:{path}")


def test_empty_parti_file_names_line_1(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_bytes(b"")
    with pytest.raises(PromptSetError, match=rf"{re.escape(str(path))} line 1: empty file"):
        load_prompt_set(f"parti:{path}")


def test_shapes_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``shapes:99999999`` (or a huge ``n``) used to render scenes for hours."""
    with pytest.raises(PromptSetError, match="at most 10000 prompts per category"):
        load_prompt_set("shapes:99999999")
    monkeypatch.setattr("miroflow.prompts.SHAPES_MAX_PER_CATEGORY", 2)
    assert len(load_prompt_set("shapes", n=10**12)) == 12
