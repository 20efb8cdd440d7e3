"""The install workflow: desired bundle -> verified, unpacked, healthy, active. All IO.

Order of an install, each step reported as an ``events`` message:

1. ``downloading``: refresh TUF metadata, look up the signed target, stream it to disk
   verifying length and SHA-256 (resumable); a download running longer than
   ``progress_every_s`` repeats ``downloading`` with ``received``/``total`` bytes at most
   that often (a small bundle sends only the first);
2. ``verified``: the file is exactly the signed target;
3. ``installed``: unpacked into the inactive slot (safe unpack, every file re-hashed);
4. health check: the slot's model is loaded and must reproduce its samples;
5. ``healthy``: the slots are switched atomically; the new model serves.

A desired bundle that is already active (a newer generation naming it, or an install a
crash ended after the switch) emits ``healthy`` with ``already_active``: the fleet hears
once per generation that it is served.

Any failure emits ``failed`` with the error's reason code and leaves ``current`` where it
was: the previous model never stops serving. A cancelled install (a newer desired state or
a rollback came first) emits ``cancelled`` instead: nothing was wrong with the bundle.
A bundle already sitting complete in the inactive slot (the previous version, after an
update) is reused without a download, which is what makes a rollback instant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle import extract_bundle, read_manifest, verify_slot
from agent.cancel import Cancel
from agent.contract import BundleManifest, BundleRef, to_data
from agent.errors import (
    CancelledError,
    InstallError,
    InstallIOError,
    ManifestError,
    UpdateError,
)
from agent.faults import crash_point
from agent.health import open_checked_engine
from agent.runtime import Engine, EngineOptions
from agent.slots import SLOT_NAMES, Slots

if TYPE_CHECKING:  # imported on first download: TUF is not needed to serve a model
    from agent.trust.client import BundleClient

__all__ = ["Installer", "LoadedModel"]

log = logging.getLogger(__name__)

EventSink = Callable[..., None]


@dataclass
class LoadedModel:
    slot: str
    manifest: BundleManifest
    engine: Engine


class Installer:
    progress_every_s = 5.0  # at most one progress event this often

    def __init__(
        self,
        state_dir: Path,
        client: Callable[[], BundleClient | None],
        emit: EventSink,
        max_bundle_bytes: int,
        engine_options: EngineOptions | None = None,
    ) -> None:
        self.slots = Slots(state_dir)
        self.engine_options = engine_options or EngineOptions()
        self._client = client  # a factory: the TUF client is built on first use
        self.emit = emit
        self.max_bundle_bytes = max_bundle_bytes
        self.last_error: UpdateError | None = None  # why the last install failed
        # Injected faults (the device simulator): called with "health_check" after the real
        # check passed (may raise HealthCheckError) and "switched" after the switch (may
        # end the device as a crash would). None on a real device.
        self.fault: Callable[[str, BundleManifest], None] | None = None

    # ------------------------------------------------------------------ start-up

    def load_active(self) -> LoadedModel | None:
        """Recover from any crash and load what ``current`` points at, verified.

        If the active slot fails verification (disk corruption), fall back to the other
        slot when that one is complete and healthy: serving a verified older model beats
        serving nothing.
        """
        self.slots.recover()
        active = self.slots.active()
        candidates = [active] if active else []
        candidates += [n for n in SLOT_NAMES if n != active and active is not None]
        for name in candidates:
            if not self.slots.is_complete(name):
                continue
            try:
                loaded = self._load_slot(name)
            except UpdateError as exc:
                log.error("slot %s does not verify: %s", name, exc)
                self.emit("failed", reason=exc.reason, detail=f"slot {name}: {exc}")
                continue
            if name != active:
                self.slots.activate(name)
                log.warning("fell back to slot %s: %s v%d", name, *self._label(loaded))
            return loaded
        return None

    def _load_slot(self, name: str) -> LoadedModel:
        path = self.slots.path(name)
        manifest = verify_slot(path)
        engine = self._open(path, manifest)
        return LoadedModel(name, manifest, engine)

    def _open(self, slot: Path, manifest: BundleManifest) -> Engine:
        """The slot's model, loaded as this device is configured and health-checked."""
        return open_checked_engine(
            slot, manifest, **self.engine_options.for_model(manifest.model_file)
        )

    @staticmethod
    def _label(model: LoadedModel) -> tuple[str, int]:
        return model.manifest.name, model.manifest.version

    # ------------------------------------------------------------------- install

    def install(
        self, ref: BundleRef, current: LoadedModel | None, cancel: Cancel | None = None
    ) -> LoadedModel | None:
        """Make ``ref`` the active model; return it, or None (and emit failed) on failure.

        ``cancel`` ends the install early (at once during the download, otherwise at the
        next step) with a ``cancelled`` event instead of ``failed``; the switch itself is
        never interrupted: after the health check the install completes.
        """
        if current is not None and current.manifest.ref == ref:
            # Nothing to install, but the fleet is waiting to hear that this generation is
            # served: a new generation naming the active bundle, or the one whose install
            # a crash cut off after the switch (this start loaded and checked it again).
            self.emit("healthy", bundle=to_data(ref), slot=current.slot, already_active=True)
            return current
        cancel = cancel or Cancel()
        detail: dict[str, Any] = {"bundle": to_data(ref)}
        engine = None
        self.last_error = None
        try:
            staged, manifest = self._stage_from_inactive(ref) or self._stage_from_fleet(
                ref, detail, cancel
            )
            cancel.check()
            engine = self._open(self.slots.path(staged), manifest)
            if self.fault is not None:
                self.fault("health_check", manifest)
            crash_point("after_health_check")
            self.slots.activate(staged)
            if self.fault is not None:
                self.fault("switched", manifest)
        except Exception as exc:
            if engine is not None:
                engine.close()
            error = _as_update_error(exc)
            self.last_error = error
            if isinstance(error, CancelledError):
                log.info("install of %s v%d cancelled: %s", ref.name, ref.version, error)
                self.emit("cancelled", **detail, reason=str(error))
                return None
            log.error("install of %s v%d failed: %s", ref.name, ref.version, error,
                      exc_info=error is not exc and not isinstance(exc, OSError))
            # ``final``: the same bytes would fail again (no retry); else the agent retries,
            # and a rollout waits for it instead of counting a failed install.
            self.emit("failed", **detail, reason=error.reason, detail=str(error),
                      final=bool(getattr(error, "final", False)))
            return None
        self.emit("healthy", **detail, slot=staged)
        log.info("now serving %s v%d from slot %s", ref.name, ref.version, staged)
        return LoadedModel(staged, manifest, engine)

    def slot_ref(self, name: str) -> BundleRef | None:
        """What a complete slot holds, by its manifest (not re-hashed); None if nothing."""
        if not self.slots.is_complete(name):
            return None
        try:
            return read_manifest(self.slots.path(name)).ref
        except UpdateError:
            return None

    def switch_to(self, name: str) -> LoadedModel:
        """Make slot ``name`` active after verifying and health-checking it (a rollback)."""
        loaded = self._load_slot(name)
        try:
            self.slots.activate(name)
        except BaseException:
            loaded.engine.close()
            raise
        return loaded

    def _manifest(self, slot: str, ref: BundleRef) -> BundleManifest:
        manifest = verify_slot(self.slots.path(slot))
        if manifest.ref != ref:
            raise ManifestError(
                f"slot {slot} holds {manifest.name} v{manifest.version}, "
                f"expected {ref.name} v{ref.version}"
            )
        return manifest

    def _stage_from_inactive(self, ref: BundleRef) -> tuple[str, BundleManifest] | None:
        name = self.slots.inactive()
        if not self.slots.is_complete(name):
            return None
        try:
            manifest = self._manifest(name, ref)
        except UpdateError:
            return None
        log.info("%s v%d is already in slot %s: no download", ref.name, ref.version, name)
        return name, manifest

    def _stage_from_fleet(
        self, ref: BundleRef, detail: dict[str, Any], cancel: Cancel
    ) -> tuple[str, BundleManifest]:
        client = self._client()
        if client is None:
            raise ManifestError("this agent is not enrolled with a fleet: cannot download")
        self.emit("downloading", **detail)
        client.refresh()
        info = client.target_info(ref.target_name)
        cancel.check()
        progress = _ProgressLog(ref.target_name, lambda have, total: self.emit(
            "downloading", **detail, received=have, total=total), self.progress_every_s)
        path = client.download(info, progress, cancel)
        detail.update(sha256=info.hashes["sha256"], size=info.length)
        self.emit("verified", **detail)
        crash_point("after_download")
        cancel.check()  # the last moment before the inactive slot (the rollback) is cleared
        slot = self.slots.inactive()
        target = self.slots.clear(slot)
        manifest = extract_bundle(path, target, self.max_bundle_bytes)
        if manifest.ref != ref:
            raise ManifestError(
                f"{ref.target_name} contains {manifest.name} v{manifest.version}"
            )
        path.unlink(missing_ok=True)  # the slot holds it now
        self.emit("installed", **detail, slot=slot)
        return slot, manifest


def _as_update_error(exc: Exception) -> UpdateError:
    """The boundary of an install: every failure leaves it as one of ours, with a reason.

    A disk error is ``io_error``; anything else unexpected (a bug, a library raising what it
    does not document) is ``install_failed``, not final: it is logged with its traceback
    and retried with backoff, never lost and never a crashed worker."""
    if isinstance(exc, UpdateError):
        return exc
    if isinstance(exc, OSError):
        error: UpdateError = InstallIOError(str(exc))
    else:
        error = InstallError(f"unexpected {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class _ProgressLog:
    """Log every 10 % of a download, and report how far it got at most every ``every_s``
    (none for a download shorter than that): visible progress on slow links, not a flood."""

    def __init__(self, name: str, report: Callable[[int, int], None] | None = None,
                 every_s: float = 5.0) -> None:
        self.name = name
        self._next = 0
        self._report = report
        self._every_s = every_s
        self._reported = time.monotonic()

    def __call__(self, have: int, total: int) -> None:
        now = time.monotonic()
        if self._report is not None and have < total and now - self._reported >= self._every_s:
            self._reported = now
            self._report(have, total)
        percent = 100 * have // total if total else 100
        if percent >= self._next:
            log.info("downloading %s: %d%% (%s of %s)", self.name, percent,
                     format_size(have), format_size(total))
            self._next = percent + 10


def format_size(count: int) -> str:
    """Bytes as read by a person: ``900 B``, ``3.2 KiB``, ``41.0 MiB``, ``1.20 GiB``."""
    if count < 1024:
        return f"{count} B"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    if count < 1024**3:
        return f"{count / 1024**2:.1f} MiB"
    return f"{count / 1024**3:.2f} GiB"
