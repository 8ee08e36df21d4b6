"""Pure helpers for the class list: resolving class references, value lookups, colours.

A class's id is its position in the class list. Config fields that name classes
(``ignore_classes``, ``class_map`` values) accept a class name or an integer id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pipeline.config import LABEL_NODATA, ClassInfo
from pipeline.errors import ConfigError

RGBA = tuple[int, int, int, int]


def resolve_class(ref: str | int, class_names: list[str], what: str, allow_raw: bool = False) -> int:
    """The id of a class given by name or id.

    Args:
        ref: a class name, an integer id, or the text of an integer id.
        what: the config field, for the error message.
        allow_raw: accept integers outside the class list (raw raster values).

    Raises:
        ConfigError: unknown name, or an id outside the class list (unless ``allow_raw``).
    """
    if isinstance(ref, str) and ref in class_names:
        return class_names.index(ref)
    try:
        value = int(ref)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {ref!r} is not a class; classes are {class_names}") from None
    if not allow_raw and not 0 <= value < len(class_names):
        raise ConfigError(f"{what}: id {value} is outside the class list 0..{len(class_names) - 1} {class_names}")
    return value


def resolve_ids(refs: Iterable[str | int], class_names: list[str], what: str, allow_raw: bool = False) -> list[int]:
    """:func:`resolve_class` for each reference, sorted and without duplicates."""
    return sorted({resolve_class(r, class_names, what, allow_raw) for r in refs})


def value_lookup(class_names: list[str], class_map: Mapping[str, str | int] | None) -> dict[str, int]:
    """Ground-truth value (as text) -> class id.

    Without a map, a value matches a class by name or by its id written as text
    (``"water"`` or ``"6"``). With a map, only its keys match, each to the class its
    value names (a name or an id).

    Raises:
        ConfigError: a map value is not a class.
    """
    if class_map is None:
        lookup = {str(i): i for i in range(len(class_names))}
        lookup.update({name: i for i, name in enumerate(class_names)})
        return lookup
    return {str(k): resolve_class(v, class_names, f"class_map[{k!r}]") for k, v in class_map.items()}


def class_colormap(class_names: list[str], classes: list[ClassInfo] | None) -> dict[int, RGBA]:
    """Class id -> RGBA: the class's ``color``, else matplotlib's ``tab20`` palette by id;
    ``LABEL_NODATA`` transparent. This is the colour table written into label COGs."""
    from matplotlib import colormaps

    colours = {c.name: c.color for c in classes or [] if c.color}
    palette = colormaps["tab20"]
    cmap: dict[int, RGBA] = {}
    for i, name in enumerate(class_names):
        hexcol = colours.get(name)
        if hexcol:
            cmap[i] = (int(hexcol[1:3], 16), int(hexcol[3:5], 16), int(hexcol[5:7], 16), 255)
        else:
            r, g, b, _ = palette(i % 20)
            cmap[i] = (round(r * 255), round(g * 255), round(b * 255), 255)
    cmap[LABEL_NODATA] = (0, 0, 0, 0)
    return cmap
