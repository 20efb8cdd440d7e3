"""``/repo/``: the TUF repository over HTTP, for devices.

Open without a token on purpose: everything here is signed metadata or a bundle addressed
by its hash, and its integrity comes from the signatures, not from who may read it.
(Confidential models need device credentials on this route; that comes with enrollment
credentials.) File names are matched against a strict pattern before touching the disk;
Starlette's FileResponse serves HTTP Range requests, which agents use to resume.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from fleet.api.deps import ERROR_RESPONSES, OptionalRepositoryDep
from fleet.trust.repository import FleetRepository

router = APIRouter(prefix="/repo", tags=["repository"],
                   responses={404: ERROR_RESPONSES[404]})

_METADATA = re.compile(r"^(?:[0-9]{1,10}\.)?(?:root|targets|snapshot|timestamp)\.json$")
_TARGET = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def _serve(
    repository: FleetRepository | None, folder: str, name: str, pattern: re.Pattern[str]
) -> FileResponse:
    if repository is None or not pattern.fullmatch(name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "not found")
    path = (repository.metadata_dir if folder == "metadata" else repository.targets_dir) / name
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "not found")
    media = "application/json" if folder == "metadata" else "application/octet-stream"
    # Metadata must never come from a cache: a stale timestamp is a freeze attack's tool.
    headers = {"Cache-Control": "no-store"} if folder == "metadata" else None
    return FileResponse(path, media_type=media, headers=headers)


@router.get("/metadata/{name}")
def metadata(name: str, repository: OptionalRepositoryDep) -> FileResponse:
    return _serve(repository, "metadata", name, _METADATA)


@router.get("/targets/{name}")
def target(name: str, repository: OptionalRepositoryDep) -> FileResponse:
    return _serve(repository, "targets", name, _TARGET)
