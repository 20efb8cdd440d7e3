"""The agent's error hierarchy for updates, after python-tuf's ``exceptions.py``.

Each error carries a stable ``reason`` code: the agent reports it in its ``failed`` event,
the fleet counts it, and tests assert on it. Errors are raised ``from`` their cause.

BundleError: the bundle or its authorisation cannot be trusted; nothing is installed.
InstallError: the bundle was trusted but could not be made the running model.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleTooLargeError",
    "DesiredStateError",
    "DownloadError",
    "HealthCheckError",
    "InstallError",
    "LengthOrHashMismatchError",
    "ManifestError",
    "StaleDesiredStateError",
    "TrustError",
    "UnknownTargetError",
    "UnsafeArchiveError",
    "UnsignedDesiredStateError",
]


class UpdateError(Exception):
    reason = "update_error"


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


class BundleTooLargeError(BundleError):
    reason = "too_large"


class UnsafeArchiveError(BundleError):
    reason = "unsafe_archive"


class ManifestError(BundleError):
    reason = "bad_manifest"


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
