"""Map detector class names to Label Studio labels (`predicted_values`)."""
from __future__ import annotations

import re

from .label_config import RegionTarget

_SEPARATORS = re.compile(r"[\s_]+")


def normalize_class_name(name: str) -> str:
    """Case-insensitive, `_` and spaces equal: 'cell_phone' == 'Cell Phone'."""
    return _SEPARATORS.sub(" ", name.strip().lower()).strip()


def build_label_map(target: RegionTarget) -> dict[str, str]:
    """Normalised detector class name -> Label Studio label value.

    When two labels claim the same class, the first one in the config wins,
    as a user reading the config top to bottom would expect.
    """
    mapping: dict[str, str] = {}
    for label in target.labels:
        for predicted in label.predicted_values:
            mapping.setdefault(normalize_class_name(predicted), label.value)
    return mapping
