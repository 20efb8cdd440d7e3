"""Device labels from the agent's own configuration (``--label site=berlin``,
``EDGE_AGENT_LABELS=site=berlin,ring=canary``), reported in every ``ReportedState``.

The contract bounds them (``LABEL_KEY_PATTERN``, ``LABEL_VALUE_PATTERN``, ``MAX_LABELS``):
a label the fleet would refuse would make every reported state of this device unsendable,
so a bad one stops the agent at start-up (exit 2) with the label named, never later.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.contract import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS

__all__ = ["LabelError", "check_labels", "labels_from_env", "parse_labels"]

_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)


class LabelError(ValueError):
    """A label that does not fit the contract; the message names it and says why."""


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["site=berlin", "ring=canary"]`` -> ``{"site": "berlin", "ring": "canary"}``."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LabelError(f"label {item[:80]!r}: expected KEY=VALUE")
        if key in labels and labels[key] != value:
            raise LabelError(f"label {key!r} given twice ({labels[key]!r} and {value[:80]!r})")
        labels[key] = value
    return check_labels(labels)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """``labels`` if every key and value fits the contract, else :class:`LabelError`."""
    if len(labels) > MAX_LABELS:
        raise LabelError(f"{len(labels)} labels: at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _KEY.search(key):
            raise LabelError(
                f"label key {str(key)[:80]!r}: 1-63 of a-z 0-9 _ . - (starting with a letter "
                "or digit)")
        if not isinstance(value, str) or not _VALUE.search(value):
            raise LabelError(
                f"label {key}={str(value)[:80]!r}: value must be 1-63 of A-Z a-z 0-9 _ . : - "
                "(starting with a letter or digit)")
    return dict(labels)


def labels_from_env(text: str | None) -> list[str]:
    """``EDGE_AGENT_LABELS=site=berlin,ring=canary`` as ``--label`` items."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]
