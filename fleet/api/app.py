"""Application factory: the app gets its engine and ingest worker handed in, never global."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.engine import Engine

from fleet import __version__
from fleet.api.routes import (
    audit,
    bundles,
    device_config,
    devices,
    drift,
    enrollment,
    repo,
    rollouts,
    system,
)
from fleet.api.routes.device_config import DeviceBroker
from fleet.broker.accounts import BrokerAccounts
from fleet.errors import FleetError
from fleet.ingest import IngestWorker
from fleet.publisher import Publisher
from fleet.trust.repository import FleetRepository

__all__ = ["create_app"]


def create_app(
    engine: Engine,
    ingest: IngestWorker | None = None,
    repository: FleetRepository | None = None,
    device_broker: DeviceBroker | None = None,
    publisher: Publisher | None = None,
    broker_accounts: BrokerAccounts | None = None,
) -> FastAPI:
    # FastAPIOffline: FastAPI with /docs and /redoc whose scripts and styles come from the
    # package, not a CDN: an operator on an offline network still gets the API explorer.
    app = FastAPIOffline(title="edgefleet", version=__version__)
    app.state.engine = engine
    app.state.ingest = ingest
    app.state.publisher = publisher
    app.state.repository = repository
    app.state.device_broker = device_broker
    app.state.broker_accounts = broker_accounts
    app.include_router(system.router)
    app.include_router(devices.router, prefix="/api/v1")
    app.include_router(enrollment.router, prefix="/api/v1")
    app.include_router(bundles.router, prefix="/api/v1")
    app.include_router(device_config.router, prefix="/api/v1")
    app.include_router(audit.router, prefix="/api/v1")
    app.include_router(rollouts.router, prefix="/api/v1")
    app.include_router(rollouts.groups_router, prefix="/api/v1")
    app.include_router(drift.router, prefix="/api/v1")
    app.include_router(repo.router)
    app.add_exception_handler(FleetError, _fleet_error)
    return app


async def _fleet_error(_request: Request, exc: Exception) -> JSONResponse:
    """Every domain error, answered the same way (see ``fleet.errors``)."""
    assert isinstance(exc, FleetError)
    return JSONResponse({"detail": str(exc), "reason": exc.reason}, status_code=exc.status)
