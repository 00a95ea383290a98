"""Prompt-set registry: shapes, GenEval metadata jsonl, PartiPrompts tsv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miroflow.data.shapes import CATEGORIES
from miroflow.prompts import PromptItem, PromptSetError, load_prompt_set

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {
        "tag": "counting",
        "include": [{"class": "square", "count": 2, "color": "blue"}],
        "exclude": [{"class": "square", "count": 3, "color": "blue"}],
        "prompt": "two blue squares",
    },
    {
        "tag": "position",
        "include": [
            {"class": "circle", "count": 1, "color": "yellow"},
            {"class": "triangle", "count": 1, "color": "green", "position": ["left of", 0]},
        ],
        "prompt": "a green triangle left of a yellow circle",
    },
]


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_unknown_prompt_set_lists_valid_ones() -> None:
    with pytest.raises(
        PromptSetError, match=r"unknown prompt set 'drawbench'.*shapes.*geneval:<path-or-uri>.*parti:<path-or-uri>"
    ):
        load_prompt_set("drawbench")
    with pytest.raises(PromptSetError, match="needs a path"):
        load_prompt_set("geneval:")


def test_shapes_set_interleaves_categories_and_prefixes_are_stable() -> None:
    items = load_prompt_set("shapes")
    assert len(items) == 25 * len(CATEGORIES)
    assert [it.tag for it in items[: len(CATEGORIES)]] == list(CATEGORIES)
    assert all(
        isinstance(it, PromptItem) and it.metadata["prompt"] == it.prompt and "include" in it.metadata for it in items
    )
    first = load_prompt_set("shapes", n=8)
    assert [it.prompt for it in first] == [it.prompt for it in items[:8]]
    small = load_prompt_set("shapes:2")
    assert len(small) == 12 and [it.prompt for it in small[:6]] == [it.prompt for it in items[:6]]
    json.dumps([it.metadata for it in small])  # GenEval metadata lines are JSON
    with pytest.raises(PromptSetError, match="shapes:x"):
        load_prompt_set("shapes:x")


def test_geneval_file_loads_with_metadata(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "evaluation_metadata.jsonl", GENEVAL_LINES)
    items = load_prompt_set(f"geneval:{path}")
    assert [(it.tag, it.prompt) for it in items] == [(r["tag"], r["prompt"]) for r in GENEVAL_LINES]
    assert items[1].metadata == GENEVAL_LINES[1]
    assert [it.prompt for it in load_prompt_set(f"geneval:file://{path}", n=2)] == [
        r["prompt"] for r in GENEVAL_LINES[:2]
    ]


def test_geneval_line_missing_include_names_file_and_line(tmp_path: Path) -> None:
    bad = dict(GENEVAL_LINES[2])
    del bad["include"]
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(GENEVAL_LINES[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(PromptSetError, match=rf"{path} line 3: missing key\(s\) \['include'\]"):
        load_prompt_set(f"geneval:{path}")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"tag": "colors", "include": []}', r"line 1: missing key\(s\) \['prompt'\]"),
        ("not json", "line 1: invalid JSON"),
        (
            '{"tag": "colors", "include": [{"count": 1}], "prompt": "a red circle"}',
            r"line 1: include\[0\] is missing 'class'",
        ),
        ('{"tag": "colors", "include": {"class": "x"}, "prompt": "a red circle"}', "line 1: 'include' must be a list"),
    ],
)
def test_geneval_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PromptSetError, match=message):
        load_prompt_set(f"geneval:{path}")


def test_geneval_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="nope.jsonl"):
        load_prompt_set(f"geneval:{tmp_path / 'nope.jsonl'}")


def test_parti_tsv_tag_is_category(tmp_path: Path) -> None:
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\t\n"
        "a red circle left of a blue square\tIllustrations\tSpatial\tshapes\n"
        "an astronaut riding a horse\tPeople\tImagination\n"
    )
    items = load_prompt_set(f"parti:{path}")
    assert [(it.tag, it.prompt) for it in items] == [
        ("Abstract", "bond"),
        ("Illustrations", "a red circle left of a blue square"),
        ("People", "an astronaut riding a horse"),
    ]
    assert items[1].metadata["challenge"] == "Spatial" and items[2].metadata["note"] == ""
    assert len(load_prompt_set(f"parti:{path}", n=1)) == 1


def test_parti_bad_header_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_text("Text\tCategory\n a\tb\n")
    with pytest.raises(PromptSetError, match="line 1: header"):
        load_prompt_set(f"parti:{path}")
    path.write_text("Prompt\tCategory\tChallenge\tNote\nhello\t\tBasic\t\n")
    with pytest.raises(PromptSetError, match=r"p.tsv line 2: empty Category"):
        load_prompt_set(f"parti:{path}")


def test_n_must_be_positive() -> None:
    with pytest.raises(PromptSetError, match="n must be"):
        load_prompt_set("shapes", n=0)


# --------------------------------------------------------------------------- txt (your own prompts)
def test_txt_prompt_file_is_one_prompt_per_line(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_bytes("# my prompts\r\na dog on the beach\r\n\r\n  a red car  \r\ncafé au lait\n".encode())
    items = load_prompt_set(f"txt:{f}")
    assert [it.prompt for it in items] == ["a dog on the beach", "a red car", "café au lait"]
    assert {it.tag for it in items} == {"txt"}
    assert items[1].metadata == {"tag": "txt", "prompt": "a red car", "line": 4}
    assert [it.prompt for it in load_prompt_set(f"txt:{f}", 2)] == ["a dog on the beach", "a red car"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"# only a comment\n\n", "is empty"),
        (b"ok\nbin\x00ary\n", r"line 2: control character '\\x00'"),
        (b"ok\n\xff\xfe\n", "line 2: not UTF-8"),
    ],
)
def test_bad_txt_prompt_file_names_file_and_line(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(PromptSetError, match=match):
        load_prompt_set(f"txt:{f}")
    with pytest.raises(PromptSetError, match="needs a path"):
        load_prompt_set("txt:")
