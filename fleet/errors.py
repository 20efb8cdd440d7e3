"""The fleet's domain errors: one root, a subclass per rule, each with a stable ``reason``
(for logs, metrics and API clients) and the HTTP status it answers with.

Routes and services raise these; ``fleet.api.app`` turns every one into an HTTP answer in
one place (``{"detail": message, "reason": reason}``), so no route picks a status code by
reading an error's text, and the OpenAPI document can say what each answer looks like.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar

__all__ = [
    "EnrollmentRefusedError",
    "ExpiredCodeError",
    "FleetError",
    "InvalidProofError",
    "InvalidRequestError",
    "NotFoundError",
    "UnavailableError",
    "UnknownBundleError",
    "UnknownCodeError",
    "UnknownDevicesError",
    "UsedCodeError",
]


class FleetError(Exception):
    reason: ClassVar[str] = "fleet_error"
    status: ClassVar[HTTPStatus] = HTTPStatus.BAD_REQUEST


class InvalidRequestError(FleetError):
    """A request the schema let through but a domain rule refuses."""

    reason = "invalid_request"
    status = HTTPStatus.BAD_REQUEST


class NotFoundError(FleetError):
    reason = "not_found"
    status = HTTPStatus.NOT_FOUND


class UnknownBundleError(NotFoundError):
    reason = "unknown_bundle"


class UnknownDevicesError(NotFoundError):
    """A deployment names devices the registry has never seen (a typo deploys nothing)."""

    reason = "unknown_devices"


class UnavailableError(FleetError):
    """A part the request needs (broker, repository) is not running."""

    reason = "unavailable"
    status = HTTPStatus.SERVICE_UNAVAILABLE


class EnrollmentRefusedError(FleetError):
    """An enrollment the fleet does not accept; each subclass names why."""

    reason = "enrollment_refused"
    status = HTTPStatus.FORBIDDEN


class UnknownCodeError(EnrollmentRefusedError):
    reason = "enrollment_code_unknown"


class UsedCodeError(EnrollmentRefusedError):
    reason = "enrollment_code_used"


class ExpiredCodeError(EnrollmentRefusedError):
    reason = "enrollment_code_expired"


class InvalidProofError(EnrollmentRefusedError):
    """The public key is not Ed25519, or the signature over the code does not verify."""

    reason = "enrollment_proof_invalid"
    status = HTTPStatus.BAD_REQUEST
