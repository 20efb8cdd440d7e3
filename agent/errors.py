"""The agent's error hierarchy for updates, after python-tuf's ``exceptions.py``.

Each error carries a stable ``reason`` code: the agent reports it in its ``failed`` event,
the fleet counts it, and tests assert on it. Errors are raised ``from`` their cause.

Each error class also says whether it is ``final``: the same bytes would fail the same way
again (a hash mismatch, an unsafe archive, a model that fails its own samples), so retrying
cannot help and only a newer desired state can. A failure that is not final (the network,
the disk, a fleet that is down) is retried with backoff. The daemon asks the class, never a
list of reason strings.

BundleError: the bundle or its authorisation cannot be trusted; nothing is installed.
InstallError: the bundle was trusted but could not be made the running model.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleTooLargeError",
    "CancelledError",
    "DesiredStateError",
    "DownloadError",
    "HealthCheckError",
    "InstallError",
    "InstallIOError",
    "LengthOrHashMismatchError",
    "ManifestError",
    "RollbackRefusedError",
    "StaleDesiredStateError",
    "TrustError",
    "UnknownTargetError",
    "UnsafeArchiveError",
    "UnsignedDesiredStateError",
    "UpdateError",
]


class UpdateError(Exception):
    reason = "update_error"
    final = False  # True: the same bytes would fail again; do not retry this generation


class BundleError(UpdateError):
    reason = "bundle_error"


class TrustError(BundleError):
    """TUF metadata could not be refreshed or verified (signature, expiry, rollback...)."""

    reason = "untrusted_metadata"


class UnknownTargetError(BundleError):
    reason = "unknown_target"


class DownloadError(BundleError):
    reason = "download_failed"


class LengthOrHashMismatchError(BundleError):
    reason = "hash_mismatch"
    final = True


class BundleTooLargeError(BundleError):
    reason = "too_large"
    final = True


class UnsafeArchiveError(BundleError):
    reason = "unsafe_archive"
    final = True


class ManifestError(BundleError):
    reason = "bad_manifest"
    final = True


class DesiredStateError(UpdateError):
    reason = "bad_desired_state"


class UnsignedDesiredStateError(DesiredStateError):
    reason = "unsigned_desired_state"


class StaleDesiredStateError(DesiredStateError):
    reason = "stale_generation"


class InstallError(UpdateError):
    reason = "install_failed"


class HealthCheckError(InstallError):
    reason = "health_check_failed"
    final = True


class InstallIOError(InstallError):
    """The device's disk failed us (full, read-only, gone): not the bundle's fault."""

    reason = "io_error"


class RollbackRefusedError(InstallError):
    """``edge-agent rollback`` with nothing to go back to, or when going "back" would go
    forward again (a second rollback in a row)."""

    reason = "rollback_refused"


class CancelledError(UpdateError):
    """An install stopped on purpose: a newer desired state or a local rollback came first.
    Not a failure of the bundle; reported as a ``cancelled`` event, never as ``failed``."""

    reason = "cancelled"
