"""``/repo/``: the TUF repository over HTTP, for devices.

Open without a token on purpose: everything here is signed metadata or a bundle addressed
by its hash, and its integrity comes from the signatures, not from who may read it.
(Confidential models need device credentials on this route; that comes with enrollment
credentials.) File names are matched against a strict pattern before touching the store.

From a directory, Starlette's FileResponse serves the file (sendfile, HTTP Range requests,
which agents use to resume). From a bucket, the object is streamed through this worker with
its Content-Length, and a ``Range: bytes=N-`` (or ``N-M``) asks the bucket for just those
bytes (206), so a resumed download costs only what is left. Metadata objects larger than
any client takes are refused (502), not relayed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import FileResponse, Response, StreamingResponse

from fleet.api.deps import ERROR_RESPONSES, OptionalRepositoryDep
from fleet.errors import UnavailableError
from fleet.trust.repository import MAX_METADATA_BYTES, FleetRepository
from fleet.trust.storage import (
    ObjectMissingError,
    RangeNotSatisfiableError,
    StoredObject,
    StoreError,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/repo", tags=["repository"],
                   responses={404: ERROR_RESPONSES[404]})

_METADATA = re.compile(r"^(?:[0-9]{1,10}\.)?(?:root|targets|snapshot|timestamp)\.json$")
_TARGET = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_RANGE = re.compile(r"^bytes=([0-9]{1,15})-([0-9]{0,15})$")

RangeHeader = Annotated[str | None, Header(alias="Range", include_in_schema=False)]


def _byte_range(header: str | None) -> tuple[int, int | None]:
    """One ``bytes=START-[END]`` range; anything else (suffixes, several ranges) is
    answered whole with 200, as RFC 9110 lets a server do."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return 0, None
    start, end = int(match[1]), int(match[2]) if match[2] else None
    if end is not None and end < start:
        return 0, None
    return start, end


def _streamed(opened: StoredObject, where: str) -> Iterator[bytes]:
    """The object's chunks; a store failing mid-body ends the body short (the client's
    length check sees it, and an agent resumes with a Range) with one log line."""
    try:
        yield from opened.chunks()
    except StoreError as exc:
        log.warning("repo: %s broke off mid-body: %s", where, exc)
    finally:
        opened.close()


def _serve(
    repository: FleetRepository | None, folder: str, name: str, pattern: re.Pattern[str],
    range_header: str | None,
) -> Response:
    if repository is None or not pattern.fullmatch(name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "not found")
    media = "application/json" if folder == "metadata" else "application/octet-stream"
    # Metadata must never come from a cache: a stale timestamp is a freeze attack's tool.
    headers = {"Cache-Control": "no-store"} if folder == "metadata" else {}
    key = f"{folder}/{name}"
    path = repository.storage.local_path(key)
    if path is not None:
        if not path.is_file():
            raise HTTPException(status.HTTP_404_NOT_FOUND, "not found")
        return FileResponse(path, media_type=media, headers=headers or None)
    start, end = _byte_range(range_header)
    try:
        opened = repository.storage.open(key, start, end)
    except ObjectMissingError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "not found") from None
    except RangeNotSatisfiableError as exc:
        raise HTTPException(status.HTTP_416_RANGE_NOT_SATISFIABLE,
                            "range not satisfiable",
                            headers={"Content-Range": f"bytes */{exc.size}"}) from None
    except StoreError as exc:
        log.warning("repo: %s: %s", key, exc)
        raise UnavailableError("the update repository's store did not answer") from exc
    if folder == "metadata" and opened.size > MAX_METADATA_BYTES:
        opened.close()
        log.warning("repo: %s is %d bytes, over %d: refused", key, opened.size,
                    MAX_METADATA_BYTES)
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, "metadata object too large")
    headers.update({"Content-Length": str(opened.length), "Accept-Ranges": "bytes"})
    code = status.HTTP_200_OK
    if opened.partial:
        headers["Content-Range"] = opened.content_range
        code = status.HTTP_206_PARTIAL_CONTENT
    return StreamingResponse(_streamed(opened, key), status_code=code, media_type=media,
                             headers=headers)


@router.get("/metadata/{name}")
def metadata(name: str, repository: OptionalRepositoryDep,
             range_header: RangeHeader = None) -> Response:
    return _serve(repository, "metadata", name, _METADATA, range_header)


@router.get("/targets/{name}")
def target(name: str, repository: OptionalRepositoryDep,
           range_header: RangeHeader = None) -> Response:
    return _serve(repository, "targets", name, _TARGET, range_header)
