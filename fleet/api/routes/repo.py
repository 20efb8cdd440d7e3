"""``/repo/``: the TUF repository over HTTP, for devices.

Open without a token on purpose: everything here is signed metadata or a bundle addressed
by its hash, and its integrity comes from the signatures, not from who may read it.
(Confidential models need device credentials on this route; that comes with enrollment
credentials.) File names are matched against a strict pattern before touching the disk;
Starlette's FileResponse serves HTTP Range requests, which agents use to resume.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse

router = APIRouter(prefix="/repo", tags=["repository"])

_METADATA = re.compile(r"^(?:[0-9]{1,10}\.)?(?:root|targets|snapshot|timestamp)\.json$")
_TARGET = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def _serve(request: Request, folder: str, name: str, pattern: re.Pattern[str]) -> FileResponse:
    repository = request.app.state.repository
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
def metadata(name: str, request: Request) -> FileResponse:
    return _serve(request, "metadata", name, _METADATA)


@router.get("/targets/{name}")
def target(name: str, request: Request) -> FileResponse:
    return _serve(request, "targets", name, _TARGET)
