"""Category groups (e.g. the critical set) chosen by name, id or supercategory, read from an annotation file.

The categories always come from the file's own ``categories`` list (COCO instances or panoptic JSON), never
from a table in the code, so the same call works on COCO, on a subset of it and on the synthetic set.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fxq.errors import InputError

AnnotationSource = str | os.PathLike | Mapping[str, Any] | Any
"""A path to an instances/panoptic JSON, its loaded dict, or a pycocotools ``COCO`` object."""


def load_categories(source: AnnotationSource) -> list[dict]:
    """The ``categories`` list (id, name, supercategory, ...) of an annotation file, sorted by id."""
    if isinstance(source, str | os.PathLike):
        data = _read_json(Path(source))
    elif isinstance(source, Mapping):
        data = source
    elif hasattr(source, "dataset"):  # pycocotools.coco.COCO
        data = source.dataset
    else:
        raise InputError(
            f"cannot read categories from a {type(source).__name__}: pass the annotation file path"
        )
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise InputError(
            f"{_describe(source)} has no 'categories' list: pass a COCO instances or panoptic JSON"
        )
    for cat in cats:
        if "id" not in cat or "name" not in cat:
            raise InputError(f"{_describe(source)}: category {cat!r} lacks 'id' or 'name'")
    return sorted(cats, key=lambda c: int(c["id"]))


def category_names(source: AnnotationSource) -> dict[int, str]:
    """Category id -> name, from the annotation file."""
    return {int(c["id"]): str(c["name"]) for c in load_categories(source)}


def resolve_categories(source: AnnotationSource, specs: Iterable[str | int]) -> list[int]:
    """Sorted category ids selected by names, ids or supercategory names (a supercategory adds all its
    members).

    Matching is case-insensitive. A name that is both a category and a supercategory (COCO's ``person``)
    selects the union. An unknown name or id raises :class:`InputError` suggesting the closest names.
    """
    cats = load_categories(source)
    by_name: dict[str, set[int]] = {}
    for cat in cats:
        by_name.setdefault(str(cat["name"]).lower(), set()).add(int(cat["id"]))
        if cat.get("supercategory"):
            by_name.setdefault(str(cat["supercategory"]).lower(), set()).add(int(cat["id"]))
    ids = {int(c["id"]) for c in cats}
    chosen: set[int] = set()
    for spec in specs:
        chosen |= _resolve_one(spec, by_name, ids, source, cats)
    return sorted(chosen)


def _resolve_one(
    spec: str | int,
    by_name: dict[str, set[int]],
    ids: set[int],
    source: AnnotationSource,
    cats: Sequence[dict],
) -> set[int]:
    text = str(spec).strip()
    if isinstance(spec, int) or text.isdigit():
        if int(text) in ids:
            return {int(text)}
        raise InputError(
            f"category id {text} is not in {_describe(source)} (ids {min(ids)}..{max(ids)}): "
            "use an id or name listed in its 'categories'"
        )
    key = text.lower()
    if key in by_name:
        return by_name[key]
    names = sorted(
        {str(c["name"]) for c in cats} | {str(c["supercategory"]) for c in cats if c.get("supercategory")}
    )
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    close = close or difflib.get_close_matches(key, [n.lower() for n in names], n=3, cutoff=0.5)
    hint = (
        f"did you mean {', '.join(repr(n) for n in close)}?" if close else f"known names include {names[:8]}"
    )
    raise InputError(
        f"unknown category {text!r} in {_describe(source)}: {hint} "
        "(category names, ids and supercategory names are accepted)"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"annotation file {path} does not exist: pass a COCO instances or panoptic JSON")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"annotation file {path} is not valid JSON ({exc}): re-create or re-download it"
        ) from exc


def _describe(source: AnnotationSource) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    return "the annotation set"
