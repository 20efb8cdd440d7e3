"""The device's TUF client: refresh metadata, then fetch a bundle verifying as it streams.

Metadata goes through python-tuf's ``ngclient.Updater``, which gives root rotation,
rollback-, freeze- and mix-and-match protection. The bundle itself is fetched here, not by
``Updater.download_target``, for two reasons the device cares about:

* **resume**: a dropped connection continues with an HTTP ``Range`` request from the bytes
  already on disk (after re-hashing them), instead of starting a large download over.
  Every chunk read is written through to the file at once (flushed), so whatever
  arrived before a drop counts. Drops are retried within the same download, without a
  ``failed`` event each: a try that got further is followed by a short pause, tries in a
  row that got no byte further by a doubling one, and the download gives up after
  ``download_attempts`` of those (or at its deadline);
* **one pass**: the SHA-256 is computed while the bytes arrive, and the download stops the
  moment the server sends more than the signed length (endless-data attack); nothing is
  ever held in memory beyond one chunk;
* **bounded in time** (slow-retrieval attack, or just a bad link): an overall deadline
  and a throughput floor (:mod:`agent.trust.download`), and a cancel that ends it at once
  when a newer desired state or a rollback makes it pointless. TUF's metadata is fetched
  under the same bounds (:class:`_BoundedFetcher`).

Every TUF failure is raised as :class:`TrustError` naming the python-tuf error class, so an
event says e.g. ``untrusted_metadata: ExpiredMetadataError: timestamp.json is expired``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.bundle import fsync_dir
from agent.cancel import Cancel
from agent.errors import (
    BundleTooLargeError,
    DownloadError,
    LengthOrHashMismatchError,
    TrustError,
    UnknownTargetError,
)
from agent.trust.desired import DirectorKeys
from agent.trust.download import DownloadLimits, DownloadWatch, TokenBucket, retry_pause

__all__ = ["BundleClient", "HashingWriter", "enroll", "fetch_device_broker", "fetch_root",
           "http_pool", "let_go", "pin_root", "read_capped"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
ProgressCallback = Callable[[int, int], None]


def http_pool() -> urllib3.PoolManager:
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=30), retries=False
    )


_MAX_ROOT_BYTES = 512 * 1024


def fetch_root(fleet_url: str) -> tuple[bytes, Root]:
    """The fleet's current root, as served, checked to be self-signed to its own
    threshold (whether to trust it is the caller's decision); bounded in size."""
    url = f"{fleet_url.rstrip('/')}/repo/metadata/root.json"
    try:
        response = http_pool().request("GET", url, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise TrustError(f"cannot fetch {url}: {exc}") from exc
    if response.status != 200:
        let_go(response, complete=False)
        raise TrustError(f"cannot fetch {url}: HTTP {response.status}")
    data = read_capped(response, _MAX_ROOT_BYTES)
    if data is None:
        raise TrustError(f"{url} is larger than {_MAX_ROOT_BYTES} bytes: not a root")
    try:
        root_md = Metadata[Root].from_bytes(data)
        root_md.verify_delegate(Root.type, root_md)  # self-signed to its own threshold
    except Exception as exc:
        raise TrustError(f"{url} is not a valid self-signed TUF root: {exc}") from exc
    return data, root_md.signed


def pin_root(data: bytes, metadata_dir: Path) -> None:
    """Make ``data`` the trusted root every later refresh starts its chain from."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    tmp = metadata_dir / ".root.json.tmp"
    tmp.write_bytes(data)
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, metadata_dir / "root.json")
    fsync_dir(metadata_dir)


def enroll(fleet_url: str, metadata_dir: Path) -> Root:
    """Pin the fleet's current root on first use, unchecked (``--trust-first-root``; a code
    checks it instead: :mod:`agent.enroll_cmd`)."""
    data, root = fetch_root(fleet_url)
    pin_root(data, metadata_dir)
    return root


_MAX_DEVICE_CONFIG_BYTES = 4096
# Host (name, IPv4, or [IPv6]) and port only: no credentials, path or query.
_BROKER_URL = re.compile(r"mqtts?://(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")


def fetch_device_broker(fleet_url: str) -> str | None:
    """The broker the fleet tells devices to use (``GET /api/v1/device-config``), as
    ``mqtt://HOST:PORT``; None if this fleet does not say (an older fleet: 404, or one
    without a broker). A broken answer raises :class:`ValueError` naming what is wrong.

    Not signed, and needs not be: a wrong broker cannot make the device accept anything
    (desired states are checked against the pinned root), only keep it away from its
    fleet, which the daemon warns about."""
    import json

    from agent.mqtt import BrokerAddress

    url = f"{fleet_url.rstrip('/')}/api/v1/device-config"
    try:
        response = http_pool().request("GET", url, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise ValueError(f"cannot fetch {url}: {exc}") from exc
    if response.status != 200:
        let_go(response, complete=False)
        if response.status == 404:
            return None
        raise ValueError(f"{url}: HTTP {response.status}")
    body = read_capped(response, _MAX_DEVICE_CONFIG_BYTES)
    if body is None:
        raise ValueError(f"{url}: answer larger than {_MAX_DEVICE_CONFIG_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"{url}: not JSON: {exc}") from exc
    broker = document.get("broker") if isinstance(document, dict) else None
    if broker is None:
        return None
    if not isinstance(broker, str):
        raise ValueError(f"{url}: broker must be a string, given {type(broker).__name__}")
    if len(broker) > 300 or not _BROKER_URL.fullmatch(broker):
        raise ValueError(f"{url}: broker {broker[:100]!r} is not mqtt://HOST:PORT")
    BrokerAddress.parse(broker)  # ValueError names the URL and the problem (a bad port)
    return broker


class BundleClient:
    def __init__(
        self,
        fleet_url: str,
        state_dir: Path,
        *,
        max_bundle_bytes: int,
        download_attempts: int = 5,
        limits: DownloadLimits | None = None,
    ) -> None:
        self.fleet_url = fleet_url.rstrip("/")
        self.metadata_dir = state_dir / "tuf"
        self.downloads_dir = state_dir / "downloads"
        self.max_bundle_bytes = max_bundle_bytes
        self.download_attempts = download_attempts
        self.limits = limits or DownloadLimits()
        self._updater: Updater | None = None
        # The daemon refreshes from two threads (desired-state intake, installs): one
        # refresh at a time writes the metadata directory.
        self._metadata_lock = threading.Lock()
        self._http = http_pool()
        self._fetcher = _BoundedFetcher(self._http, self.limits)

    @property
    def enrolled(self) -> bool:
        return (self.metadata_dir / "root.json").is_file()

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (a new Updater: one refresh per instance)."""
        if not self.enrolled:
            raise TrustError("not enrolled: run `edge-agent enroll --fleet URL` first")
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        updater = Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=f"{self.fleet_url}/repo/metadata/",
            target_base_url=f"{self.fleet_url}/repo/targets/",
            target_dir=str(self.downloads_dir),
            config=UpdaterConfig(),
            fetcher=self._fetcher,
            # The trusted root is the one pinned at enrollment, as TUF has since rotated
            # it in metadata_dir: never anything fetched without that chain.
            bootstrap=None,
        )
        with self._metadata_lock:
            try:
                updater.refresh()
            except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
                raise TrustError(f"{type(exc).__name__}: {exc}") from exc
            self._updater = updater

    def director_keys(self) -> DirectorKeys:
        return DirectorKeys.from_root_file(self.metadata_dir / "root.json")

    def target_info(self, name: str) -> TargetFile:
        if self._updater is None:
            raise RuntimeError("refresh() must come before target_info()")
        try:
            with self._metadata_lock:
                info = self._updater.get_targetinfo(name)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise TrustError(f"{type(exc).__name__}: {exc}") from exc
        if info is None:
            raise UnknownTargetError(f"the fleet's signed targets have no {name!r}")
        if info.length > self.max_bundle_bytes:
            raise BundleTooLargeError(
                f"{name} is {info.length} bytes, over this device's "
                f"{self.max_bundle_bytes}-byte limit"
            )
        if "sha256" not in info.hashes:
            raise TrustError(f"{name}: signed target has no sha256")
        return info

    def download(
        self,
        info: TargetFile,
        progress: ProgressCallback | None = None,
        cancel: Cancel | None = None,
    ) -> Path:
        """Fetch ``info`` into the downloads directory, verified; resume after drops.

        Bounded by :attr:`limits` (deadline, throughput floor: ``DownloadError``) and ended
        early by ``cancel`` (``CancelledError``); the partial file stays for a resume.
        """
        sha256 = info.hashes["sha256"]
        final = self.downloads_dir / f"{sha256}.{info.path}"
        if final.is_file() and final.stat().st_size == info.length:
            return final  # completed and verified before a crash
        part = final.with_name(final.name + ".part")
        self._remove_stale_downloads(keep={final.name, part.name})
        url = f"{self.fleet_url}/repo/targets/{sha256}.{info.path}"
        stream = HashingWriter(part, info.length)
        rate = self.limits.max_rate_bps
        bucket = TokenBucket(rate, time.monotonic()) if rate > 0 else None
        stalled = 0  # tries in a row that got no byte further
        tries = 0
        best = -1
        with DownloadWatch(self.limits, info.length, cancel) as watch:
            while True:
                tries += 1
                try:
                    self._fetch(url, stream, progress, watch, bucket)
                    break
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    watch.check()  # an interrupted read: too slow, deadline, or cancel
                    stalled = 0 if stream.size > best else stalled + 1
                    best = max(best, stream.size)
                    log.warning(
                        "download of %s interrupted at %d/%d bytes (%s); try %d, %d in a "
                        "row without progress (at most %d)", info.path, stream.size,
                        info.length, exc, tries, stalled, self.download_attempts,
                    )
                    if stalled >= self.download_attempts:
                        raise DownloadError(
                            f"{info.path}: gave up at {stream.size}/{info.length} bytes "
                            f"after {stalled} tries in a row without progress ({tries} in "
                            f"all): {exc}"
                        ) from exc
                    watch.sleep(retry_pause(stalled, random.uniform(0.5, 1.0)))
        if tries > 1:
            log.info("downloaded %s in %d tries", info.path, tries)
        digest = stream.digest.hexdigest()
        if digest != sha256:
            part.unlink()
            raise LengthOrHashMismatchError(
                f"{info.path}: sha256 {digest[:16]}… does not match the signed {sha256[:16]}…"
            )
        os.replace(part, final)
        fsync_dir(self.downloads_dir)
        return final

    def _remove_stale_downloads(self, keep: set[str]) -> None:
        """One download at a time: a partial file of a bundle no longer wanted (a desired
        state superseded mid-download) would otherwise hold its disk space for ever."""
        for entry in self.downloads_dir.iterdir():
            if entry.name not in keep and entry.is_file():
                log.info("removing stale download %s", entry.name)
                entry.unlink(missing_ok=True)

    def _fetch(
        self,
        url: str,
        stream: HashingWriter,
        progress: ProgressCallback | None,
        watch: DownloadWatch,
        bucket: TokenBucket | None = None,
    ) -> None:
        stream.resync()
        if stream.size == stream.length:
            return
        watch.check()
        headers = {"Range": f"bytes={stream.size}-"} if stream.size else {}
        # No single wait may outlast the deadline (the watch cannot interrupt a request
        # still waiting for its headers, only a body being read).
        remaining = watch.remaining()
        response = self._http.request(
            "GET", url, headers=headers, preload_content=False, decode_content=False,
            timeout=urllib3.Timeout(connect=min(10, remaining), read=min(30, remaining)),
        )
        watch.attach(response)
        complete = False
        try:
            if response.status == 200:
                stream.restart()  # the server ignored our Range
            elif response.status != 206 or not stream.size:
                raise DownloadError(f"GET {url}: HTTP {response.status}")
            most = min(_CHUNK, bucket.burst) if bucket is not None else _CHUNK
            with stream.open() as out:
                # read1: whatever has arrived, so the watch sees a trickle as it comes
                while chunk := response.read1(most, decode_content=False):
                    stream.append(out, chunk)
                    watch.received += len(chunk)
                    if progress is not None:
                        progress(stream.size, stream.length)
                    watch.check()
                    if bucket is not None and (wait := bucket.take(len(chunk),
                                                                   time.monotonic())):
                        watch.sleep(wait)  # ends early (raising) if the download must stop
            complete = True
        finally:
            watch.attach(None)
            let_go(response, complete)
        if stream.size < stream.length:
            raise urllib3.exceptions.ProtocolError(
                f"connection closed at {stream.size}/{stream.length} bytes"
            )


def read_capped(response, limit: int) -> bytes | None:
    """The whole body when it is at most ``limit`` bytes, else None (never more than
    ``limit + 1`` bytes read); the connection is let go either way."""
    complete = False
    try:
        body = response.read(limit + 1)
        complete = len(body) <= limit
    finally:
        let_go(response, complete)
    return body if complete else None


def let_go(response, complete: bool) -> None:
    """Hand the connection back to the pool only when its response was read to the end.

    A response left half-read (an error status whose body nobody wants, a download stopped
    by its watch) leaves bytes on the socket; pooled as it is, the next request on that
    connection reads them as its own status line (``BadStatusLine('{"detail":"not
    found"}HTTP/1.1 200 OK')``). Draining could take as long as a hostile server likes, so
    such a connection is closed instead."""
    if not complete:
        response.close()
    response.release_conn()


class _BoundedFetcher(FetcherInterface):
    """python-tuf's metadata fetcher, bounded like a bundle download.

    TUF bounds each metadata file's length, and its own fetcher each socket read, but not
    the time: a ``timestamp.json`` dripped at one byte per second would hold every refresh
    (and so every install and desired-state check) for ever. Each metadata file gets the
    same :class:`DownloadWatch` as a bundle, with the base deadline (its signed length is
    not known yet); a stop is TUF's own ``SlowRetrievalError``.
    """

    def __init__(self, http: urllib3.PoolManager, limits: DownloadLimits) -> None:
        self._http = http
        self.limits = limits

    def _fetch(self, url: str) -> Iterator[bytes]:
        watch = DownloadWatch(self.limits, 0).__enter__()
        try:
            remaining = watch.remaining()
            response = self._http.request(
                "GET", url, preload_content=False,
                timeout=urllib3.Timeout(connect=min(10, remaining), read=min(30, remaining)),
            )
        except urllib3.exceptions.HTTPError as exc:
            watch.__exit__(None, None, None)
            slow = isinstance(exc, urllib3.exceptions.TimeoutError)
            error = tuf_errors.SlowRetrievalError if slow else tuf_errors.DownloadError
            raise error(f"{url}: {exc}") from exc
        if response.status >= 400:
            let_go(response, complete=False)
            watch.__exit__(None, None, None)
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status}",
                                               response.status)
        return self._chunks(url, response, watch)

    @staticmethod
    def _chunks(url: str, response, watch: DownloadWatch) -> Iterator[bytes]:
        watch.attach(response)
        complete = False
        try:
            while chunk := response.read1(_CHUNK):
                watch.received += len(chunk)
                watch.check()
                yield chunk
            complete = True
        except DownloadError as exc:  # the watch's verdict: too slow, deadline
            raise tuf_errors.SlowRetrievalError(f"{url}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            try:
                watch.check()
            except DownloadError as verdict:
                raise tuf_errors.SlowRetrievalError(f"{url}: {verdict}") from exc
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        finally:
            watch.attach(None)
            let_go(response, complete)
            watch.__exit__(None, None, None)


class HashingWriter:
    """A partial download and the SHA-256 of exactly the bytes in it, kept in step.

    Bytes are hashed as they are written; after a crash or a failed write the digest is
    rebuilt from the file once (``resync``), never on every attempt.
    """

    def __init__(self, path: Path, length: int) -> None:
        self.path = path
        self.length = length
        self.digest = hashlib.sha256()
        self.size = 0
        self._synced = False

    def resync(self) -> None:
        on_disk = self.path.stat().st_size if self.path.exists() else 0
        if self._synced and on_disk == self.size:
            return
        if on_disk > self.length:
            self.path.unlink()
            on_disk = 0
        self.digest = hashlib.sha256()
        self.size = 0
        if on_disk:
            with open(self.path, "rb") as data:
                while chunk := data.read(1024 * 1024):
                    self.digest.update(chunk)
                    self.size += len(chunk)
        self._synced = True

    def restart(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.path.write_bytes(b"")

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        self._synced = False  # until the writes below are flushed and fsynced
        with open(self.path, "r+b" if self.path.exists() else "wb") as out:
            out.seek(self.size)
            out.truncate()
            try:
                yield out
            finally:  # also after a dropped connection: keep what arrived, hashed
                out.flush()
                os.fsync(out.fileno())
                self._synced = os.fstat(out.fileno()).st_size == self.size

    def append(self, out: IO[bytes], chunk: bytes) -> None:
        if self.size + len(chunk) > self.length:
            raise LengthOrHashMismatchError(
                f"{self.path.name}: server sent more than the signed {self.length} bytes"
            )
        out.write(chunk)
        # In the file at once: a dropped connection (or a killed process) loses nothing
        # that was received (fsynced when the connection ends).
        out.flush()
        self.digest.update(chunk)
        self.size += len(chunk)
