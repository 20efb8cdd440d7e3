"""Faults injected into simulated devices: by flag (every device) or by a fault file.

The fault file is JSON, written by a test or an operator and re-read whenever it changes
(size or modification time), so faults can change in the middle of a run::

    {
      "defaults": {"latency_ms": 5},
      "devices": {
        "sim-0003": {"fail_health_check": true},
        "sim-0004": {"latency_ms": 40, "error_rate": 0.2, "labels": {"ring": "canary"}},
        "sim-0005": {"crash_after_install": true},
        "sim-0006": {"offline": true},
        "sim-0007": [{"fail_health_check": true, "only_versions": [3]},
                     {"latency_ms": 10, "only_versions": [4]}],
        "sim-0008": {"inputs": "/data/darker-images.npz"}
      }
    }

``inputs`` is what the device is fed: a ``.npz`` of arrays named as the model's inputs
(a ``.npy`` for a one-input model), batch first; each synthetic request is ``batch`` rows
(1 by default) drawn at random. Without it a device sends the first row of the bundle's
health-check samples over and over, and tracks no drift (one repeated sample is no
distribution): drift is tracked on a device whose faults name ``inputs`` when its model is
loaded. It is how a test shifts the input distribution of some devices.

A device's faults are the command-line flags, overridden by ``defaults``, overridden by
its own entry or entries, in order (only the fields given). An entry with
``only_versions`` applies only to a bundle of one of those versions: the one being
installed for the health-check and crash faults, the one serving for latency and errors,
the active one for the rest. That is how a test says "version 3 of the model fails its
health check on these devices" or "version 4 is twice as slow" without touching the
bundles themselves. A file that does not parse, or names an unknown
field or a bad value, is refused as a whole with the reason logged, and the faults in
force stay as they were: a typo never silently heals every device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import msgspec

from agent.labels import LabelError, check_labels

__all__ = ["DeviceFaults", "FaultFile", "FaultSpec", "FaultWatch", "parse_fault_file"]

log = logging.getLogger(__name__)

MAX_FAULT_FILE_BYTES = 4 * 1024 * 1024


class FaultSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fields a fault file may set; None: not set here (inherit)."""

    # Every install's health check fails (health_check_failed) after the real check ran.
    fail_health_check: bool | None = None
    # Added to every inference of the synthetic load (inside the timed call).
    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] | None = None
    # Share of inferences that raise a model (runtime) error instead of answering.
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    # Share of the synthetic requests sent malformed (a client error, the caller's fault:
    # the real engine refuses them before running the model).
    client_error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    # The device crashes right after an install switched its slots, then restarts.
    crash_after_install: bool | None = None
    # Off the network (the broker publishes its Last Will) until this is false again.
    offline: bool | None = None
    labels: dict[str, str] | None = None
    # Inputs fed to the synthetic load: a .npz (or .npy) file, one random row a request.
    inputs: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] | None = None
    # Rows per synthetic request drawn from ``inputs`` (a batch; 1 by default).
    batch: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    # This entry applies only to bundles of these versions (None: to every bundle).
    only_versions: Annotated[list[Annotated[int, msgspec.Meta(ge=1)]],
                             msgspec.Meta(max_length=64)] | None = None

    def applies_to(self, version: int | None) -> bool:
        return self.only_versions is None or version in self.only_versions


class FaultFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    defaults: FaultSpec = msgspec.field(default_factory=FaultSpec)
    devices: dict[str, FaultSpec | list[FaultSpec]] = msgspec.field(default_factory=dict)

    def entries_of(self, device_id: str) -> list[FaultSpec]:
        found = self.devices.get(device_id)
        if found is None:
            return []
        return found if isinstance(found, list) else [found]


@dataclass(frozen=True)
class DeviceFaults:
    """The faults in force on one device."""

    fail_health_check: bool = False
    latency_ms: float = 0.0
    error_rate: float = 0.0
    client_error_rate: float = 0.0
    crash_after_install: bool = False
    offline: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    inputs: str | None = None
    batch: int = 1

    def over(self, spec: FaultSpec) -> DeviceFaults:
        """These faults with what ``spec`` sets replacing them."""
        given = {name: getattr(spec, name) for name in spec.__struct_fields__
                 if name != "only_versions"}
        return replace(self, **{k: v for k, v in given.items() if v is not None})


def parse_fault_file(data: bytes) -> FaultFile:
    """The fault file's content, or ValueError naming what is wrong."""
    if len(data) > MAX_FAULT_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FAULT_FILE_BYTES} bytes")
    try:
        parsed = msgspec.json.decode(data, type=FaultFile)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    specs = [("defaults", parsed.defaults)] + [
        (device_id, spec) for device_id in parsed.devices
        for spec in parsed.entries_of(device_id)]
    for where, spec in specs:
        if spec.labels is not None:
            try:
                check_labels(spec.labels)
            except LabelError as exc:
                raise ValueError(f"{where}: {exc}") from None
    return parsed


class FaultWatch:
    """A fault file, re-read when its size or modification time changes."""

    def __init__(self, path: Path | None, flags: DeviceFaults) -> None:
        self.path = path
        self.flags = flags
        self.current = FaultFile()
        self._seen: tuple[int, int] | None = None

    def faults_for(self, device_id: str, version: int | None = None) -> DeviceFaults:
        """The faults in force on a device for a bundle of ``version`` (None: no bundle)."""
        current = self.current
        faults = self.flags
        for spec in (current.defaults, *current.entries_of(device_id)):
            if spec.applies_to(version):
                faults = faults.over(spec)
        return faults

    def poll(self) -> bool:
        """Re-read the file if it changed; True if the faults in force changed."""
        if self.path is None:
            return False
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            seen = None
            if seen == self._seen:
                return False
            self._seen = seen
            self.current = FaultFile()  # no file: no faults beyond the flags
            return True
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            parsed = parse_fault_file(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("fault file %s refused, faults unchanged: %s", self.path, exc)
            return False
        self.current = parsed
        log.info("fault file %s read: %d device(s) named", self.path, len(parsed.devices))
        return True
