"""Health gates: is the wave's update good enough to go on? Pure functions of figures.

Each gate looks only at the devices of the current wave, and only at what changed since
each device installed the new bundle, so a device's history before the update never counts
against it. A gate answers ``pass``, ``fail`` or ``wait`` (too few devices or too little
traffic to judge yet: ``min_devices``, ``min_inferences``); a wave advances only when every
gate passes, and is halted as soon as one fails.

* install failures: failed / (healthy + failed) devices;
* model errors: model/runtime errors per inference since the install. Client errors (a
  request that does not fit the model) are counted apart by the agent and never here: a
  buggy local application must not halt a good model;
* latency: p95 after the install over p95 before it, on the same devices, median over the
  wave (a slow device does not halt a rollout; a slow model does);
* offline: devices offline for longer than ``offline_grace_s``, or whose agent restarted
  (its uptime went back) since their install. A reconnection alone does not count: a
  broker restart reconnects every device;
* output drift (when ``max_output_drift`` is set): how far the new version's outputs are
  from the previous version's on the same devices (``fleet.drift.compare``: the largest
  Jensen-Shannon distance over output features), median over the wave. Off by default: a
  retrained model may answer differently on purpose; an operator who expects the same
  answers turns it on.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

__all__ = [
    "DEFAULT_GATES",
    "DeviceFigures",
    "Gate",
    "GatePolicy",
    "GateResult",
    "Verdict",
    "evaluate",
    "gates_for",
]


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"


@dataclass(frozen=True)
class GatePolicy:
    max_install_failure_rate: float = 0.1
    max_model_error_rate: float = 0.01
    max_latency_ratio: float = 1.5
    max_offline_rate: float = 0.2
    # A device counts as gone offline once it has been silent and offline this long: a
    # broker restart or a network blip makes every device reconnect, which is nobody's
    # model's fault. (A restarted agent counts at once: its uptime went back.)
    offline_grace_s: float = 60.0
    min_devices: int = 1  # devices with a verdict of their own before a gate may judge
    min_inferences: int = 20  # per device, before its errors and latency count
    # Once the bake time is over, a traffic gate (errors, latency) still without enough
    # inferences to judge passes, and says so: idle devices must not hold a rollout forever.
    # False: it keeps waiting. Install and offline gates always need their devices.
    pass_unjudged_after_bake: bool = True
    # The output-drift gate: off (None), or the largest median JS distance between the
    # new and the previous version's outputs on the wave's devices.
    max_output_drift: float | None = None


@dataclass(frozen=True)
class DeviceFigures:
    """One device of the wave, measured since it installed the rollout's bundle."""

    device_id: str
    installed: bool  # healthy on the new bundle
    failed: bool  # its install failed (health check, download, ...)
    inferences: int = 0
    model_errors: int = 0
    client_errors: int = 0  # shown, never judged
    latency_p95_before: float | None = None
    latency_p95_after: float | None = None
    went_offline: bool = False
    output_drift: float | None = None  # JS distance to the previous version's outputs
    output_drift_feature: str | None = None


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    value: float | None
    threshold: float
    devices: int  # how many devices the value is measured over
    detail: str = ""
    figures: dict[str, float | int] = field(default_factory=dict)

    def as_record(self) -> dict:
        """The figures behind a decision, for the audit log."""
        return {"gate": self.gate, "verdict": self.verdict.value, "value": self.value,
                "threshold": self.threshold, "devices": self.devices, "detail": self.detail,
                **({"figures": self.figures} if self.figures else {})}


class Gate(Protocol):
    name: str

    def evaluate(self, wave: Sequence[DeviceFigures], policy: GatePolicy) -> GateResult: ...


def _judge(name: str, value: float | None, threshold: float, devices: int, policy: GatePolicy,
           detail: str, **figures: float | int) -> GateResult:
    if value is None or devices < policy.min_devices:
        return GateResult(name, Verdict.WAIT, value, threshold, devices,
                          detail or f"needs {policy.min_devices} device(s), has {devices}",
                          figures)
    verdict = Verdict.FAIL if value > threshold else Verdict.PASS
    return GateResult(name, verdict, value, threshold, devices, detail, figures)


class InstallFailures:
    name = "install_failure_rate"

    def evaluate(self, wave: Sequence[DeviceFigures], policy: GatePolicy) -> GateResult:
        failed = sum(d.failed for d in wave)
        settled = failed + sum(d.installed for d in wave)
        value = failed / settled if settled else None
        return _judge(self.name, value, policy.max_install_failure_rate, settled, policy,
                      f"{failed} of {settled} installs failed", failed=failed, settled=settled)


class ModelErrors:
    name = "model_error_rate"
    needs_traffic = True

    def evaluate(self, wave: Sequence[DeviceFigures], policy: GatePolicy) -> GateResult:
        busy = [d for d in wave if d.installed and d.inferences >= policy.min_inferences]
        inferences = sum(d.inferences for d in busy)
        errors = sum(d.model_errors for d in busy)
        client = sum(d.client_errors for d in busy)
        value = errors / inferences if inferences else None
        return _judge(self.name, value, policy.max_model_error_rate, len(busy), policy,
                      f"{errors} model errors in {inferences} inferences "
                      f"({client} client errors, not judged)",
                      model_errors=errors, inferences=inferences, client_errors=client)


class Latency:
    name = "latency_p95_ratio"
    needs_traffic = True

    def evaluate(self, wave: Sequence[DeviceFigures], policy: GatePolicy) -> GateResult:
        installed = [d for d in wave if d.installed]
        if installed and all(d.latency_p95_before is None for d in installed):
            return GateResult(self.name, Verdict.PASS, None, policy.max_latency_ratio, 0,
                              "no previous version on these devices to compare with")
        ratios = [d.latency_p95_after / d.latency_p95_before for d in installed
                  if d.inferences >= policy.min_inferences
                  and d.latency_p95_before and d.latency_p95_after is not None]
        value = statistics.median(ratios) if ratios else None
        return _judge(self.name, value, policy.max_latency_ratio, len(ratios), policy,
                      "median p95 after / before, same devices" if ratios else
                      "no device has latency before and after its install yet")


class Offline:
    name = "offline_rate"

    def evaluate(self, wave: Sequence[DeviceFigures], policy: GatePolicy) -> GateResult:
        updated = [d for d in wave if d.installed or d.failed]
        gone = sum(d.went_offline for d in updated)
        value = gone / len(updated) if updated else None
        return _judge(self.name, value, policy.max_offline_rate, len(updated), policy,
                      f"{gone} of {len(updated)} gone offline or restarted since the install",
                      offline=gone)


class OutputDrift:
    name = "output_drift"
    needs_traffic = True

    def evaluate(self, wave: Sequence[DeviceFigures], policy: GatePolicy) -> GateResult:
        threshold = policy.max_output_drift
        assert threshold is not None
        judged = [d for d in wave if d.installed and d.output_drift is not None]
        value = statistics.median(d.output_drift for d in judged) if judged else None
        worst = max(judged, key=lambda d: d.output_drift or 0.0, default=None)
        return _judge(self.name, value, threshold, len(judged), policy,
                      f"median JS distance to the previous version's outputs over "
                      f"{len(judged)} device(s)" + (
                          f"; worst {worst.device_id} on {worst.output_drift_feature} "
                          f"({worst.output_drift:.3f})" if worst is not None else "")
                      if judged else "no device has enough outputs of both versions yet")


DEFAULT_GATES: tuple[Gate, ...] = (InstallFailures(), ModelErrors(), Latency(), Offline())


def gates_for(policy: GatePolicy, gates: Sequence[Gate] = DEFAULT_GATES) -> tuple[Gate, ...]:
    """The gates a policy asks for: the default ones, and the output-drift gate if set."""
    if policy.max_output_drift is None or any(g.name == OutputDrift.name for g in gates):
        return tuple(gates)
    return (*gates, OutputDrift())


def evaluate(
    wave: Sequence[DeviceFigures],
    policy: GatePolicy,
    gates: Sequence[Gate] = DEFAULT_GATES,
    bake_over: bool = False,
) -> tuple[Verdict, list[GateResult]]:
    """The wave's verdict: fail if any gate fails, pass if all pass, else wait."""
    gates = gates_for(policy, gates)
    results = [gate.evaluate(wave, policy) for gate in gates]
    if bake_over and policy.pass_unjudged_after_bake:
        results = [
            GateResult(r.gate, Verdict.PASS, r.value, r.threshold, r.devices,
                       f"not judged: {r.detail} by the end of the bake time", r.figures)
            if r.verdict is Verdict.WAIT and getattr(gate, "needs_traffic", False) else r
            for gate, r in zip(gates, results, strict=True)
        ]
    if any(r.verdict is Verdict.FAIL for r in results):
        return Verdict.FAIL, results
    if all(r.verdict is Verdict.PASS for r in results):
        return Verdict.PASS, results
    return Verdict.WAIT, results
