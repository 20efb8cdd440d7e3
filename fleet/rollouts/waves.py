"""Which device goes in which wave: deterministic, so a restart never reshuffles a rollout.

Devices are ordered by SHA-256 of ``rollout_id/device_id`` (a fresh, even order per rollout:
the same canary is not hit by every rollout) and the waves take consecutive slices of that
order. A wave is a count (``1``) or a share of all targeted devices (``10%``); the last wave
always takes whatever is left. Devices that come to match a running rollout later join the
wave in progress (the controller's choice, not this module's), so a finished wave is never
reopened.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_WAVES", "WaveSpec", "assign_waves", "order", "parse_waves"]

_SPEC = re.compile(r"^(?:(\d{1,7})|(\d{1,3}(?:\.\d{1,3})?)%)$")


@dataclass(frozen=True)
class WaveSpec:
    """A wave's size: ``count`` devices, or ``percent`` of all targeted devices (cumulative
    sizes are what the operator means by "1 -> 10% -> 50% -> 100%")."""

    count: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("a wave is a count or a percentage")
        if self.count is not None and self.count < 1:
            raise ValueError(f"a wave needs at least one device, not {self.count}")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"a wave's share is in (0, 100], not {self.percent}")

    def reach(self, total: int) -> int:
        """How many devices have been offered the update once this wave is out."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, max(1, math.ceil(total * self.percent / 100)))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


DEFAULT_WAVES = (WaveSpec(count=1), WaveSpec(percent=10), WaveSpec(percent=50),
                 WaveSpec(percent=100))


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """``"1,10%,50%,100%"`` -> cumulative wave specs; the reach must grow wave by wave."""
    specs = []
    for raw in text.split(","):
        match = _SPEC.match(raw.strip())
        if match is None:
            raise ValueError(f"wave {raw.strip()!r} is not a count (5) or a share (10%)")
        specs.append(WaveSpec(count=int(match[1])) if match[1] else
                     WaveSpec(percent=float(match[2])))
    if not specs or len(specs) > 20:
        raise ValueError("give 1 to 20 waves")
    return tuple(specs)


def order(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """The rollout's device order: SHA-256 of rollout id and device id."""
    return sorted(device_ids,
                  key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest())


def assign_waves(
    rollout_id: str, device_ids: Iterable[str], specs: Sequence[WaveSpec]
) -> list[list[str]]:
    """Device ids per wave. Reach is cumulative and never shrinks; the last wave takes the
    rest, so every targeted device is in exactly one wave."""
    ordered = order(rollout_id, device_ids)
    total = len(ordered)
    waves: list[list[str]] = []
    start = 0
    for index, spec in enumerate(specs):
        end = total if index == len(specs) - 1 else max(start, spec.reach(total))
        waves.append(ordered[start:end])
        start = end
    return waves
