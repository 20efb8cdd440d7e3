"""The fleet's REST API (FastAPI): thin routes over the service modules."""

from fleet.api.app import create_app

__all__ = ["create_app"]
