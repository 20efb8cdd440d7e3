"""Where the update repository's files live: a directory, or an S3-compatible bucket.

:class:`~fleet.trust.repository.FleetRepository` reads and writes its signed metadata
(``metadata/N.root.json``, ``metadata/timestamp.json``, ...) and its bundles
(``targets/SHA256.NAME``) only through a :class:`Storage`, so the same signing code runs on
one worker's disk, on a directory every worker mounts (``EDGEFLEET_STORE_DIR``) or in a
bucket every worker reaches (``EDGEFLEET_STORE_URL=s3://BUCKET/PREFIX``: AWS S3, MinIO,
Ceph RGW; ``EDGEFLEET_S3_ENDPOINT_URL`` for the ones that are not AWS).

What the repository builds on, and every backend keeps:

* **a write is all or nothing**: a reader sees the old object or the new one, never a part
  (a directory: temp file, fsync, rename, fsync of the directory; a bucket: a PUT is
  visible only once complete);
* **read after write**: once a write returns, every worker reads the new bytes (S3 has
  been strongly consistent since December 2020; MinIO and Ceph RGW are too), so writing
  ``timestamp.json`` last means it never names a file a client cannot fetch yet;
* **every read is bounded**: :meth:`Storage.read_bytes` takes a limit, and an object over
  it is :class:`ObjectTooLargeError`, never read whole into memory.

Names are ``metadata/FILE`` or ``targets/FILE``, matched against a strict pattern before
they become a path or a key. **Signing keys are never here**: they stay on the worker's
disk (``EDGEFLEET_STORE_DIR``, else the data directory, under ``keys/``; in Kubernetes, a
Secret volume), because a bucket is readable by more than whoever may sign.

Backend failures are translated at this boundary into :class:`StoreError` subclasses,
each with a stable ``reason``; ``boto3`` is imported only when a bucket is configured.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

__all__ = [
    "CHUNK",
    "LocalStorage",
    "ObjectCorruptError",
    "ObjectMissingError",
    "ObjectTooLargeError",
    "RangeNotSatisfiableError",
    "RepositoryConfigError",
    "S3Storage",
    "Storage",
    "StoreBusyError",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "StoredObject",
]

CHUNK = 256 * 1024
# One PUT carries at most 5 GiB (S3's limit); bundles are far smaller.
MAX_PUT_BYTES = 5 * 1024**3
_NAME = re.compile(r"^(?:metadata|targets)/[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_FOLDERS = ("metadata", "targets")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class RepositoryConfigError(RuntimeError):
    """The repository is missing, already exists, a key is not where it must be, or its
    store cannot be used (a :class:`StoreError`). Defined here so that every store error
    is one: the CLI prints any of them as one line."""

    reason: ClassVar[str] = "repository_config"


class StoreError(RepositoryConfigError):
    """The repository's store could not do what was asked."""

    reason = "store_error"


class StoreConfigError(StoreError):
    """The store is set up wrong: a bad URL, a missing bucket, refused credentials, or the
    ``s3`` extra not installed. Retrying will not help; fixing the settings will."""

    reason = "store_config"


class StoreUnavailableError(StoreError):
    """The store did not answer, or answered with a server error: worth retrying later."""

    reason = "store_unavailable"


class StoreBusyError(StoreError):
    """Another worker held the repository's lock for longer than we would wait."""

    reason = "store_busy"


class ObjectMissingError(StoreError):
    reason = "store_object_missing"


class ObjectTooLargeError(StoreError):
    """An object is larger than the reader's limit: never read whole."""

    reason = "store_object_too_large"


class ObjectCorruptError(StoreError):
    """An object is there but is not what its name says (metadata that does not parse)."""

    reason = "store_object_corrupt"


class RangeNotSatisfiableError(StoreError):
    """A byte range starting at or past the object's end (HTTP 416)."""

    reason = "store_range_not_satisfiable"

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a repository file name: {name!r}")
    return name


@dataclass
class StoredObject:
    """An object opened for streaming: bytes ``start`` to ``start + length - 1`` of
    ``size``. Iterate :meth:`chunks` once, then :meth:`close` (a ``with`` block does)."""

    size: int
    start: int
    length: int
    _chunks: Iterator[bytes]
    _close: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def partial(self) -> bool:
        return self.length != self.size

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{self.size}"

    def chunks(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> StoredObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage(abc.ABC):
    """The repository's files: metadata and targets, by name (``FOLDER/FILE``)."""

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the files are, for messages: a directory or ``s3://BUCKET/PREFIX``."""

    @abc.abstractmethod
    def read_bytes(self, name: str, limit: int) -> bytes:
        """The whole object; :class:`ObjectTooLargeError` past ``limit`` bytes,
        :class:`ObjectMissingError` when there is none."""

    @abc.abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace the object atomically: readers see the old bytes or all the new ones."""

    @abc.abstractmethod
    def write_file(self, name: str, source: Path) -> None:
        """Store ``source``'s bytes under ``name`` atomically, streamed (bundles)."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def open(self, name: str, start: int = 0, end: int | None = None) -> StoredObject:
        """Stream bytes ``start``..``end`` (inclusive; None: to the end) of an object."""

    @abc.abstractmethod
    def list(self, folder: str) -> list[str]:
        """File names in ``folder`` (``metadata`` or ``targets``), sorted."""

    def local_path(self, name: str) -> Path | None:
        """The file's path when the store is a directory (served with sendfile and Range
        support by Starlette), else None."""
        return None

    def folder_location(self, folder: str) -> Path | str:
        """A folder's directory, or its URL (a str) in a bucket."""
        return f"{self.location.rstrip('/')}/{folder}"


# ---------------------------------------------------------------------------- directory


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """The files under ``root`` (the data directory's ``repo/``), each written to a temp
    file in its own directory, fsynced and renamed into place, then the directory fsynced:
    a power cut leaves the old file or the new one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root)

    def folder_location(self, folder: str) -> Path:
        return self.root / folder

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def local_path(self, name: str) -> Path:
        return self._path(name)

    def read_bytes(self, name: str, limit: int) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as source:
                size = os.fstat(source.fileno()).st_size
                if size > limit:
                    raise ObjectTooLargeError(f"{path}: {size} bytes, over the {limit}-byte "
                                              "limit for it")
                data = source.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissingError(f"{path}: no such file") from None
        except OSError as exc:
            raise StoreUnavailableError(f"{path}: {exc.strerror or exc}") from exc
        if len(data) > limit:  # grew while we read
            raise ObjectTooLargeError(f"{path}: over the {limit}-byte limit for it")
        return data

    def _replace(self, path: Path, fill) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._replace(self._path(name), lambda out: out.write(data))

    def write_file(self, name: str, source: Path) -> None:
        def copy(out) -> None:
            with open(source, "rb") as data:
                shutil.copyfileobj(data, out, CHUNK)

        self._replace(self._path(name), copy)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str, start: int = 0, end: int | None = None) -> StoredObject:
        path = self._path(name)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by StoredObject.close
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissingError(f"{path}: no such file") from None
        size = os.fstat(handle.fileno()).st_size
        if start < 0 or (start > 0 and start >= size):
            handle.close()
            raise RangeNotSatisfiableError(f"{path}: no byte {start} in {size}", size)
        last = size - 1 if end is None else min(end, size - 1)
        length = max(last - start + 1, 0)
        handle.seek(start)

        def chunks() -> Iterator[bytes]:
            left = length
            while left > 0 and (chunk := handle.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk

        return StoredObject(size, start, length, chunks(), handle.close)

    def list(self, folder: str) -> list[str]:
        if folder not in _FOLDERS:
            raise ValueError(f"not a repository folder: {folder!r}")
        directory = self.root / folder
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir()
                      if p.is_file() and not p.name.startswith("."))


# ------------------------------------------------------------------------------ bucket


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise StoreConfigError(
            "an S3 store (EDGEFLEET_STORE_URL=s3://...) needs boto3: "
            "pip install 'edgefleet[s3]'") from None
    return boto3


def parse_store_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreConfigError(f"EDGEFLEET_STORE_URL={url!r}: expected s3://BUCKET/PREFIX")
    if not _BUCKET.fullmatch(parts.netloc):
        raise StoreConfigError(f"EDGEFLEET_STORE_URL={url!r}: {parts.netloc!r} is not a "
                               "bucket name (3-63 of a-z, 0-9, '.', '-')")
    if parts.query or parts.fragment:
        raise StoreConfigError(f"EDGEFLEET_STORE_URL={url!r}: no query or fragment, please")
    prefix = parts.path.strip("/")
    if any(segment in ("", ".", "..") for segment in prefix.split("/")) and prefix:
        raise StoreConfigError(f"EDGEFLEET_STORE_URL={url!r}: empty, '.' or '..' in the "
                               "prefix")
    return parts.netloc, prefix


class S3Storage(Storage):
    """The files as objects ``PREFIX/metadata/FILE`` and ``PREFIX/targets/FILE`` in one
    bucket of any S3-compatible store. ``client`` is a boto3 S3 client (thread-safe: the
    API's threads share it); :meth:`from_url` makes one from the usual AWS chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role).

    The bucket must exist: the fleet never creates one (who may, and with which policy, is
    the operator's call)."""

    def __init__(self, bucket: str, prefix: str, client: Any, endpoint_url: str | None = None
                 ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.endpoint_url = endpoint_url
        _import_boto3()
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        self._client_error = ClientError
        self._boto_error = BotoCoreError
        self._no_credentials = NoCredentialsError

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> S3Storage:
        bucket, prefix = parse_store_url(url)
        boto3 = _import_boto3()
        from botocore.config import Config

        options: dict[str, Any] = {
            "connect_timeout": 5,
            "read_timeout": 30,
            "retries": {"max_attempts": 4, "mode": "standard"},
            # Every API thread may stream a bundle from the bucket at once.
            "max_pool_connections": 64,
        }
        if endpoint_url:
            # MinIO, Ceph, moto: path-style addressing (no bucket.HOST DNS), and checksums
            # only where the API requires them (older ones refuse the newer trailers).
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        try:
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, config=Config(**options))
        except Exception as exc:  # botocore's ValueError for a bad endpoint, a bad region
            raise StoreConfigError(f"S3 client for {url} (endpoint {endpoint_url or 'AWS'}): "
                                   f"{exc}") from exc
        return cls(bucket, prefix, client, endpoint_url)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _where(self, name: str) -> str:
        return f"{self.location}/{name}"

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        """botocore's exceptions, as this module's: the one place that reads them."""
        try:
            yield
        except self._client_error as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = f"{code or status}: {error.get('Message') or exc}"
            where = self._where(name)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissingError(f"{where}: no such object") from None
            if code == "InvalidRange":
                raise RangeNotSatisfiableError(f"{where}: {detail}", size=-1) from None
            if code == "NoSuchBucket":
                raise StoreConfigError(
                    f"bucket {self.bucket!r} does not exist at "
                    f"{self.endpoint_url or 'AWS'}: create it first") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "InvalidToken", "ExpiredToken", "AllAccessDisabled"):
                raise StoreConfigError(f"{where}: the store refused these credentials "
                                       f"({detail})") from None
            raise StoreUnavailableError(f"{where}: {detail}") from exc
        except self._no_credentials:
            raise StoreConfigError(
                f"{self.location}: no AWS credentials (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile or an instance role)") from None
        except self._boto_error as exc:  # endpoint unreachable, timeouts, broken streams
            raise StoreUnavailableError(f"{self._where(name)}: {exc}") from exc

    def read_bytes(self, name: str, limit: int) -> bytes:
        with self._errors(name):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            body = response["Body"]
            try:
                size = int(response.get("ContentLength", 0))
                if size > limit:
                    raise ObjectTooLargeError(f"{self._where(name)}: {size} bytes, over the "
                                              f"{limit}-byte limit for it")
                data = body.read(limit + 1)
            finally:
                body.close()
        if len(data) > limit:
            raise ObjectTooLargeError(f"{self._where(name)}: over the {limit}-byte limit")
        return data

    def write_bytes(self, name: str, data: bytes) -> None:
        with self._errors(name):
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                   ContentType=_content_type(name))

    def write_file(self, name: str, source: Path) -> None:
        size = source.stat().st_size
        if size > MAX_PUT_BYTES:
            raise ObjectTooLargeError(f"{source}: {size} bytes, over one PUT's {MAX_PUT_BYTES}")
        with self._errors(name), open(source, "rb") as data:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                   ContentLength=size, ContentType=_content_type(name))

    def exists(self, name: str) -> bool:
        try:
            with self._errors(name):
                self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ObjectMissingError:
            return False
        return True

    def open(self, name: str, start: int = 0, end: int | None = None) -> StoredObject:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(name)}
        if start or end is not None:
            arguments["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            with self._errors(name):
                response = self.client.get_object(**arguments)
        except RangeNotSatisfiableError:
            size = self._size(name)
            raise RangeNotSatisfiableError(f"{self._where(name)}: no byte {start} in {size}",
                                           size) from None
        body = response["Body"]
        length = int(response["ContentLength"])
        size = length
        content_range = response.get("ContentRange")  # "bytes START-END/SIZE"
        if content_range:
            size = int(content_range.rpartition("/")[2])
            start = int(content_range.split()[1].split("-")[0])
        else:
            start = 0

        def chunks() -> Iterator[bytes]:
            with self._errors(name):
                yield from body.iter_chunks(CHUNK)

        return StoredObject(size, start, length, chunks(), body.close)

    def _size(self, name: str) -> int:
        with self._errors(name):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        return int(head["ContentLength"])

    def list(self, folder: str) -> list[str]:
        if folder not in _FOLDERS:
            raise ValueError(f"not a repository folder: {folder!r}")
        prefix = self._key(f"{folder}/x")[:-1]
        names = []
        with self._errors(folder):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                names.extend(item["Key"][len(prefix):] for item in page.get("Contents", []))
        return sorted(n for n in names if "/" not in n)


def _content_type(name: str) -> str:
    return "application/json" if name.startswith("metadata/") else "application/octet-stream"
