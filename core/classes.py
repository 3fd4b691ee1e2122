"""A model's class names as ``models.classes`` stores them: a JSON list of strings. Apart
from core/classifier.py so that reading them (every report does) needs no torch."""

from __future__ import annotations

import json


def classes_to_json(classes: tuple[str, ...]) -> str:
    return json.dumps(list(classes))


def classes_from_json(text: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError("stored classes must be a JSON list of strings")
    return tuple(value)
