"""Application factory: the app gets its engine and ingest worker handed in, never global."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from fleet import __version__
from fleet.api.routes import devices, system
from fleet.ingest import IngestWorker

__all__ = ["create_app"]


def create_app(engine: Engine, ingest: IngestWorker | None = None) -> FastAPI:
    app = FastAPI(title="edgefleet", version=__version__)
    app.state.engine = engine
    app.state.ingest = ingest
    app.include_router(system.router)
    app.include_router(devices.router, prefix="/api/v1")
    return app
