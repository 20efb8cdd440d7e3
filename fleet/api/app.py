"""Application factory: the app gets its engine and ingest worker handed in, never global."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from fleet import __version__
from fleet.api.routes import bundles, devices, repo, system
from fleet.ingest import IngestWorker
from fleet.trust.repository import FleetRepository

__all__ = ["create_app"]


def create_app(
    engine: Engine,
    ingest: IngestWorker | None = None,
    repository: FleetRepository | None = None,
) -> FastAPI:
    app = FastAPI(title="edgefleet", version=__version__)
    app.state.engine = engine
    app.state.ingest = ingest
    app.state.repository = repository
    app.include_router(system.router)
    app.include_router(devices.router, prefix="/api/v1")
    app.include_router(bundles.router, prefix="/api/v1")
    app.include_router(repo.router)
    return app
