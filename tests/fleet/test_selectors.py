"""Selectors: what they match, and that a mistyped one is an error naming the term (an empty
match would quietly target no device)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.errors import InvalidRequestError
from fleet.selectors import Selector, SelectorError, effective_labels, parse_keys, parse_labels

DEVICES = {
    "cam-1": {"site": "berlin", "ring": "canary"},
    "cam-2": {"site": "berlin", "ring": "lab"},
    "cam-3": {"site": "paris"},
    "cam-4": {"site": "berlin", "retired": "yes"},
}


@pytest.mark.parametrize(("text", "expected"), [
    ("site=berlin", {"cam-1", "cam-2", "cam-4"}),
    ("site=berlin,ring!=lab", {"cam-1", "cam-4"}),
    ("ring", {"cam-1", "cam-2"}),
    ("!ring", {"cam-3", "cam-4"}),
    ("site=berlin, !retired", {"cam-1", "cam-2"}),
    ("site=rome", set()),
])
def test_a_selector_matches_all_of_its_terms(text, expected):
    selector = Selector.parse(text)
    assert {d for d, labels in DEVICES.items() if selector.matches(labels)} == expected


@pytest.mark.parametrize(("text", "named"), [
    ("Site=berlin", "'Site'"),
    ("site=", "''"),
    ("site=ber lin", "'ber lin'"),
    ("site=berlin,,ring", "empty term"),
    ("", "empty term"),
    ("site==berlin", "'=berlin'"),
    ("a" * 64, "not a label key"),
    ("x=" + "v" * 64, "not a label value"),
    ("s" * 1025, "longer than 1024"),
])
def test_a_malformed_selector_is_refused_naming_the_term(text, named):
    with pytest.raises(SelectorError, match=named) as caught:
        Selector.parse(text)
    assert isinstance(caught.value, InvalidRequestError) and caught.value.reason == (
        "invalid_selector")


def test_operator_tags_win_over_what_the_device_reports():
    labels = effective_labels({"ring": "lab", "site": "berlin"}, {"ring": "canary"})
    assert labels == {"ring": "canary", "site": "berlin"}
    assert Selector.parse("ring=canary").matches(labels)


def test_labels_and_keys_are_checked():
    assert parse_labels(["site=berlin", "ring=canary"]) == {"site": "berlin", "ring": "canary"}
    with pytest.raises(SelectorError, match="KEY=VALUE"):
        parse_labels(["site"])
    with pytest.raises(SelectorError, match="more than 32"):
        parse_labels([f"k{i}=v" for i in range(33)])
    with pytest.raises(SelectorError, match="'Bad'"):
        parse_keys(["Bad"])


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_is_a_selector_or_a_named_refusal(text):
    try:
        selector = Selector.parse(text)
    except SelectorError:
        return
    assert Selector.parse(str(selector)) == selector  # it prints as it parses
    selector.matches({"site": "berlin"})
