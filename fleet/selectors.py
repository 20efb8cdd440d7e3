"""Device selectors: which devices a rollout (or a listing) means.

A selector is a comma-separated list of terms, all of which must hold (``site=berlin,
ring!=lab,gpu,!retired``):

* ``key=value``: the label is present with that value;
* ``key!=value``: the label is absent or has another value;
* ``key``: the label is present (any value); ``!key``: it is absent.

A device's labels are those it reports from its own configuration (``edge-agent run
--label``) overlaid by the tags an operator set (``edge-fleet devices tag``): the operator
has the last word. Keys and values have the contract's label shape, so a selector can name
nothing a device could not carry, and a typo is an error naming the term, not an empty
match that quietly targets no device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.contract import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS
from fleet.errors import InvalidRequestError

__all__ = [
    "MAX_SELECTOR_CHARS",
    "Selector",
    "SelectorError",
    "effective_labels",
    "parse_keys",
    "parse_labels",
]

MAX_SELECTOR_CHARS = 1024
_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)


class SelectorError(InvalidRequestError):
    reason = "invalid_selector"


@dataclass(frozen=True)
class _Term:
    key: str
    op: str  # "=", "!=", "exists", "absent"
    value: str | None = None

    def holds(self, labels: dict[str, str]) -> bool:
        if self.op == "=":
            return labels.get(self.key) == self.value
        if self.op == "!=":
            return labels.get(self.key) != self.value
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.value}"
        return self.key if self.op == "exists" else f"!{self.key}"


@dataclass(frozen=True)
class Selector:
    terms: tuple[_Term, ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        if len(text) > MAX_SELECTOR_CHARS:
            raise SelectorError(f"selector longer than {MAX_SELECTOR_CHARS} characters")
        terms = []
        for raw in text.split(","):
            term = raw.strip()
            if not term:
                raise SelectorError(f"empty term in selector {text!r}")
            terms.append(_parse_term(term))
        return cls(tuple(terms))

    def matches(self, labels: dict[str, str]) -> bool:
        return all(term.holds(labels) for term in self.terms)

    def __str__(self) -> str:
        return ",".join(str(term) for term in self.terms)


def _parse_term(term: str) -> _Term:
    if "!=" in term:
        key, _, value = term.partition("!=")
        return _Term(_key(key, term), "!=", _value(value, term))
    if "=" in term:
        key, _, value = term.partition("=")
        return _Term(_key(key, term), "=", _value(value, term))
    if term.startswith("!"):
        return _Term(_key(term[1:], term), "absent")
    return _Term(_key(term, term), "exists")


def _key(key: str, term: str) -> str:
    if not _KEY.match(key):
        raise SelectorError(f"term {term!r}: {key!r} is not a label key "
                            "(lower-case letters, digits, '_', '.', '-'; up to 63)")
    return key


def _value(value: str, term: str) -> str:
    if not _VALUE.match(value):
        raise SelectorError(f"term {term!r}: {value!r} is not a label value "
                            "(letters, digits, '_', '.', ':', '-'; up to 63)")
    return value


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """``["site=berlin", "ring=canary"]`` -> a dict, each key and value checked."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SelectorError(f"{pair!r} is not KEY=VALUE")
        labels[_key(key, pair)] = _value(value, pair)
    if len(labels) > MAX_LABELS:
        raise SelectorError(f"more than {MAX_LABELS} labels")
    return labels


def parse_keys(keys: list[str]) -> list[str]:
    """Label keys (e.g. tags to remove), each checked."""
    return [_key(key, key) for key in keys]


def effective_labels(reported: dict | None, tags: dict | None) -> dict[str, str]:
    """What selectors match against: the device's own labels, the operator's tags over them."""
    return {**(reported or {}), **(tags or {})}
