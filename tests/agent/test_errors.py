"""Which failures are final is said by the error classes, once: the daemon asks them."""

from __future__ import annotations

import pytest

from agent import errors
from agent.errors import UpdateError

FINAL = {"hash_mismatch", "too_large", "unsafe_archive", "bad_manifest", "health_check_failed"}


def _classes() -> list[type[UpdateError]]:
    return [getattr(errors, name) for name in errors.__all__
            if issubclass(getattr(errors, name), UpdateError)]


@pytest.mark.parametrize("cls", _classes(), ids=lambda cls: cls.__name__)
def test_an_error_is_final_exactly_when_the_same_bytes_would_fail_again(cls):
    assert cls.final == (cls.reason in FINAL), cls


def test_reasons_are_unique_per_class():
    reasons = [cls.reason for cls in _classes()]
    assert len(reasons) == len(set(reasons))
