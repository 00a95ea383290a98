"""Scene graphs, captions and evaluation prompts of the synthetic *shapes* domain.

Rendering, degradations and dataset samples are in :mod:`miroflow.data.shapes` (which re-exports
the public names of this module).

Scene graph (a JSON-serialisable dict; coordinates are normalised to [0, 1], x to the right,
y *downwards*, so "above" means a smaller y)::

    {
      "category": "position",                      # one of CATEGORIES: the caption template
      "objects": [                                 # in caption order
        {"shape": "circle", "color": "red",
         "center": [0.31, 0.52],                   # bbox centre
         "size": 0.27,                             # bbox side (objects fit a square bbox)
         "bbox": [0.175, 0.385, 0.445, 0.655]},    # [x0, y0, x1, y1]
        ...
      ],
      "relation": {"subject": 0, "relation": "left of", "object": 1}   # or None
    }

Caption grammar (what :func:`caption_for` emits and ``miroflow.rewards.shapes_judge`` parses)::

    caption := [prefix] np | np " and " np | np " " rel " " np
    np      := "a" [colour] shape | number [colour] shape "s"
    number  := "one" | "two" | "three" | "four"
    rel     := "left of" | "right of" | "above" | "below"
    prefix  := "a photo of " | "a picture of " | "an image of "   (accepted by the judge only)

One template per GenEval category, so the category can be read back from the caption:

=============  ===================================  ====================================
category       template                             example
=============  ===================================  ====================================
single_object  ``a {shape}``                        a circle
colors         ``a {colour} {shape}``               a yellow square
two_object     ``a {shape} and a {shape}``          a circle and a square
color_attr     ``a {c} {shape} and a {c} {shape}``  a red circle and a green triangle
counting       ``{number} {colour} {shape}s``       three green triangles
position       ``a {c} {shape} {rel} a {c} {shape}``  a red circle left of a blue square
=============  ===================================  ====================================

As in GenEval, ``single_object`` and ``two_object`` do not name colours (the object colours are
random), ``colors`` tests the colour of one object and ``color_attr`` the binding of two colours to
two different shapes. Counting and position captions also name the colour (all counted objects
share one colour; position objects differ in shape or colour so each phrase is unambiguous).
Scenes contain exactly the objects the caption describes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "NUMBER_WORDS",
    "sample_scene",
    "caption_for",
    "noisy_caption",
    "eval_prompts",
    "relations_between",
]

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

# Geometry, in normalised units (at 32 px: size 7.7–10.9 px, gap ≥ 2.6 px, border ≥ 1.9 px).
MIN_SIZE = 0.24
MAX_SIZE = 0.34
GAP = 0.08  # minimum distance between object bboxes
BORDER = 0.06  # minimum distance of a bbox from the image border
POSITION_THRESHOLD = 0.1  # GenEval's slack, in units of (bbox side a + bbox side b)
_MAX_TRIES = 500

# ----------------------------------------------------------------------------- geometry


def relations_between(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> set[str]:
    """Spatial relations of box ``a`` relative to box ``b`` (GenEval's rule).

    Args:
        a, b: boxes ``[x0, y0, x1, y1]`` in any common unit (y downwards).

    Returns:
        Subset of :data:`RELATIONS` that hold for "a <rel> b": the centre offset, shrunk by
        ``POSITION_THRESHOLD * (dim_a + dim_b)`` per axis, must point within 60° of the direction.
        Diagonal layouts may give two relations; overlapping centres give none.
    """
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    offset = ca - cb
    norm = float(np.linalg.norm(offset))
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    if norm == 0.0 or np.all(np.abs(revised) < 1e-3 * max(norm, 1e-9)):
        return set()
    dx, dy = revised / norm
    out: set[str] = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def _bbox(center: tuple[float, float], size: float) -> list[float]:
    h = size / 2
    return [center[0] - h, center[1] - h, center[0] + h, center[1] + h]


def _separated(box: list[float], others: list[list[float]]) -> bool:
    for o in others:
        if not (box[2] + GAP <= o[0] or o[2] + GAP <= box[0] or box[3] + GAP <= o[1] or o[3] + GAP <= box[1]):
            return False
    return True


def _place(rng: np.random.Generator, sizes: list[float]) -> list[list[float]] | None:
    """Random centres for objects of the given sizes, bboxes ``GAP`` apart; None after many tries."""
    boxes: list[list[float]] = []
    centres: list[list[float]] = []
    for size in sizes:
        lo, hi = BORDER + size / 2, 1 - BORDER - size / 2
        for _ in range(_MAX_TRIES):
            c = [float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))]
            box = _bbox((c[0], c[1]), size)
            if _separated(box, boxes):
                boxes.append(box)
                centres.append(c)
                break
        else:
            return None
    return centres


def _place_pair(rng: np.random.Generator, sizes: list[float], relation: str) -> list[list[float]] | None:
    """Centres of two objects with object 0 ``relation`` object 1, unambiguously.

    The offset along the relation's axis leaves a ``GAP`` between the bboxes and the offset across
    it is at most half as long (within 27° of the axis), so exactly one relation holds.
    """
    s0, s1 = sizes
    reach = 1 - 2 * BORDER - (s0 + s1) / 2  # largest centre offset that keeps both in the image
    para_min = (s0 + s1) / 2 + GAP
    if reach < para_min:
        return None
    para = float(rng.uniform(para_min, reach))
    perp = float(rng.uniform(-0.5, 0.5)) * para
    sign = -1.0 if relation in ("left of", "above") else 1.0
    off = (sign * para, perp) if relation in ("left of", "right of") else (perp, sign * para)  # c0 − c1
    c1: list[float] = []
    for axis in (0, 1):
        lo = max(BORDER + s1 / 2, BORDER + s0 / 2 - off[axis])
        hi = min(1 - BORDER - s1 / 2, 1 - BORDER - s0 / 2 - off[axis])
        if lo > hi:
            return None
        c1.append(float(rng.uniform(lo, hi)))
    c0 = [c1[0] + off[0], c1[1] + off[1]]
    if relations_between(_bbox((c0[0], c0[1]), s0), _bbox((c1[0], c1[1]), s1)) != {relation}:
        return None
    return [c0, c1]


# ----------------------------------------------------------------------------- scenes


def _feasible(category: str, max_objects: int) -> bool:
    return category in ("single_object", "colors", "counting") or max_objects >= 2


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, category: str | None = None, max_objects: int = 4) -> dict[str, Any]:
    """Sample a scene graph (see the module docstring) for a GenEval category.

    Args:
        rng: numpy generator (the only source of randomness).
        category: one of :data:`CATEGORIES`; None samples uniformly among those feasible with
            ``max_objects``.
        max_objects: 1–4; counting uses 2..max_objects objects (1 if ``max_objects == 1``).

    Raises:
        ValueError: unknown category, or one that needs two objects when ``max_objects < 2``.
    """
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in 1..4, got {max_objects}")
    if category is None:
        options = [c for c in CATEGORIES if _feasible(c, max_objects)]
        category = _choice(rng, options)
    elif category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    elif not _feasible(category, max_objects):
        raise ValueError(f"category {category!r} needs 2 objects but max_objects={max_objects}")
    colours = tuple(COLORS)
    relation: str | None = None
    if category in ("single_object", "colors"):
        attrs = [(_choice(rng, SHAPES), _choice(rng, colours))]
    elif category in ("two_object", "color_attr"):
        s = rng.permutation(len(SHAPES))[:2]
        if category == "color_attr":
            c = rng.permutation(len(colours))[:2]
            attrs = [(SHAPES[s[0]], colours[c[0]]), (SHAPES[s[1]], colours[c[1]])]
        else:
            attrs = [(SHAPES[s[0]], _choice(rng, colours)), (SHAPES[s[1]], _choice(rng, colours))]
    elif category == "counting":
        n = int(rng.integers(2, max_objects + 1)) if max_objects >= 2 else 1
        shape, colour = _choice(rng, SHAPES), _choice(rng, colours)
        attrs = [(shape, colour)] * n
    else:  # position
        first = (_choice(rng, SHAPES), _choice(rng, colours))
        second = first
        while second == first:
            second = (_choice(rng, SHAPES), _choice(rng, colours))
        attrs = [first, second]
        relation = _choice(rng, RELATIONS)
    while True:
        hi = MAX_SIZE - 0.02 * (len(attrs) - 1)
        sizes = [float(rng.uniform(MIN_SIZE, hi)) for _ in attrs]
        centres = _place(rng, sizes) if relation is None else _place_pair(rng, sizes, relation)
        if centres is not None:
            break
    objects = [
        {"shape": sh, "color": co, "center": c, "size": sz, "bbox": _bbox((c[0], c[1]), sz)}
        for (sh, co), c, sz in zip(attrs, centres, sizes)
    ]
    rel = {"subject": 0, "relation": relation, "object": 1} if relation else None
    return {"category": category, "objects": objects, "relation": rel}


# ----------------------------------------------------------------------------- captions


def _np(shape: str, colour: str | None, count: int = 1, article: bool = True) -> str:
    """Noun phrase: ``a red circle`` / ``a circle`` / ``three red circles`` / ``one red circle``."""
    words = [colour] if colour else []
    if count == 1 and article:
        return " ".join(["a", *words, shape])
    return " ".join([NUMBER_WORDS[count], *words, shape + ("s" if count != 1 else "")])


def caption_for(scene: dict[str, Any]) -> str:
    """Accurate caption of a scene, from its category's template (module docstring)."""
    cat = scene["category"]
    objs = scene["objects"]
    if cat == "single_object":
        return _np(objs[0]["shape"], None)
    if cat == "colors":
        return _np(objs[0]["shape"], objs[0]["color"])
    if cat == "two_object":
        return f"{_np(objs[0]['shape'], None)} and {_np(objs[1]['shape'], None)}"
    if cat == "color_attr":
        return f"{_np(objs[0]['shape'], objs[0]['color'])} and {_np(objs[1]['shape'], objs[1]['color'])}"
    if cat == "counting":
        return _np(objs[0]["shape"], objs[0]["color"], len(objs), article=False)
    if cat == "position":
        rel = scene["relation"]
        a, b = objs[rel["subject"]], objs[rel["object"]]
        return f"{_np(a['shape'], a['color'])} {rel['relation']} {_np(b['shape'], b['color'])}"
    raise ValueError(f"unknown category {cat!r}; valid: {', '.join(CATEGORIES)}")


_GENERIC = ("some shapes", "shapes", "geometric shapes", "a simple drawing", "colourful shapes on a grey background")


def noisy_caption(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """A vaguer or partly wrong "original" caption (like web alt-text) for a scene.

    Mixture: 15 % accurate; 20 % generic (no checkable fact, e.g. "some shapes"); 20 % colours
    dropped; 15 % one of two objects dropped (vaguer but true); 30 % one fact wrong (wrong
    count, relation, colour or shape). Inapplicable corruptions fall back to a generic caption.
    """
    u = float(rng.random())
    objs = scene["objects"]
    cat = scene["category"]
    colours = tuple(COLORS)
    if u < 0.15:
        return caption_for(scene)
    if u < 0.35:
        return _choice(rng, _GENERIC)
    if u < 0.55:  # drop colours
        if cat == "counting":
            return _np(objs[0]["shape"], None, len(objs), article=False)
        if cat == "position":
            rel = scene["relation"]
            return f"{_np(objs[0]['shape'], None)} {rel['relation']} {_np(objs[1]['shape'], None)}"
        if len(objs) == 2:
            return f"{_np(objs[0]['shape'], None)} and {_np(objs[1]['shape'], None)}"
        return _np(objs[0]["shape"], None)
    if u < 0.70:  # drop an object
        if len(objs) == 2:
            o = objs[int(rng.integers(2))]
            return _np(o["shape"], o["color"] if cat in ("color_attr", "position") else None)
        return _choice(rng, _GENERIC)
    # one wrong fact
    if cat == "counting":
        wrong = [n for n in (1, 2, 3, 4) if n != len(objs)]
        return _np(objs[0]["shape"], objs[0]["color"], wrong[int(rng.integers(len(wrong)))], article=False)
    if cat == "position":
        rel = scene["relation"]
        other = _choice(rng, tuple(r for r in RELATIONS if r != rel["relation"]))
        a, b = objs[0], objs[1]
        return f"{_np(a['shape'], a['color'])} {other} {_np(b['shape'], b['color'])}"
    o = objs[0]
    if cat in ("colors", "color_attr"):
        bad = _choice(rng, tuple(c for c in colours if c != o["color"]))
        first = _np(o["shape"], bad)
        return first if cat == "colors" else f"{first} and {_np(objs[1]['shape'], objs[1]['color'])}"
    bad_shape = _choice(rng, tuple(s for s in SHAPES if s not in {x["shape"] for x in objs}))
    return (
        _np(bad_shape, None) if cat == "single_object" else f"{_np(bad_shape, None)} and {_np(objs[1]['shape'], None)}"
    )


# ----------------------------------------------------------------------------- evaluation prompts


def _include(scene: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """GenEval-style ``include`` / ``exclude`` requirements of a scene's accurate caption."""
    cat, objs = scene["category"], scene["objects"]
    if cat == "single_object":
        return [{"class": objs[0]["shape"], "count": 1}], []
    if cat == "colors":
        return [{"class": objs[0]["shape"], "count": 1, "color": objs[0]["color"]}], []
    if cat == "two_object":
        return [{"class": o["shape"], "count": 1} for o in objs], []
    if cat == "color_attr":
        return [{"class": o["shape"], "count": 1, "color": o["color"]} for o in objs], []
    if cat == "counting":
        o, n = objs[0], len(objs)
        return [{"class": o["shape"], "count": n, "color": o["color"]}], [
            {"class": o["shape"], "count": n + 1, "color": o["color"]}
        ]
    rel = scene["relation"]
    a, b = objs[rel["subject"]], objs[rel["object"]]
    return [
        {"class": b["shape"], "count": 1, "color": b["color"]},
        {"class": a["shape"], "count": 1, "color": a["color"], "position": [rel["relation"], 0]},
    ], []


def eval_prompts(n_per_category: int, seed: int = 1234) -> list[dict[str, Any]]:
    """The shapes evaluation set: ``n_per_category`` prompts for each of the six categories.

    Returns:
        GenEval-format records ``{"tag", "prompt", "scene", "include"[, "exclude"]}`` in category
        order; deterministic per ``seed``. Prompts may repeat (e.g. only 3 single-object prompts
        exist); each record carries its own reference scene.
    """
    out: list[dict[str, Any]] = []
    for ci, cat in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, ci])
        for _ in range(n_per_category):
            scene = sample_scene(rng, cat)
            include, exclude = _include(scene)
            rec: dict[str, Any] = {"tag": cat, "prompt": caption_for(scene), "scene": scene, "include": include}
            if exclude:
                rec["exclude"] = exclude
            out.append(rec)
    return out
