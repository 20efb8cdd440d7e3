"""``edge-agent status``: what this device is, whom it trusts and what it runs.

Read from the state directory alone, so it answers whether or not the daemon runs and
never changes anything: the state file and the outbox are opened read-only (beside a
running daemon that is safe: both are SQLite in WAL mode), the pinned root, the slots'
``current`` link and the active manifest are plain files, and nothing here takes the
slots' lock (a status call must never keep an agent from starting). When a daemon runs,
its control socket adds what only it knows: its pid, whether it is connected to the
broker and which model it serves.

Kept light on purpose (no numpy, no runtime, no TUF): ``status`` starts in a few tens
of milliseconds on a device.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent.state import peek, root_path

__all__ = ["collect", "render"]

_MANIFEST = "manifest.json"  # agent.contract.MANIFEST_NAME, read without msgspec


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _root(state_dir: Path) -> dict[str, Any] | None:
    document = _json_file(root_path(state_dir))
    if not isinstance(document, dict) or not isinstance(document.get("signed"), dict):
        return None
    signed = document["signed"]
    role = signed.get("roles", {}).get("root", {})
    return {"version": signed.get("version"), "expires": signed.get("expires"),
            "keyids": [k[:12] for k in role.get("keyids", [])],
            "threshold": role.get("threshold")}


def _active(state_dir: Path) -> dict[str, Any] | None:
    link = state_dir / "current"
    if not link.is_symlink():
        return None
    slot = Path(os.readlink(link)).name
    manifest = _json_file(link / _MANIFEST)
    model = None
    if isinstance(manifest, dict):
        model = {"name": manifest.get("name"), "version": manifest.get("version")}
    return {"slot": slot, "model": model}


def _outbox(state_dir: Path) -> dict[str, int] | None:
    path = state_dir / "outbox.db"
    if not path.is_file():
        return {"depth": 0, "bytes": 0}
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox")
            depth, size = row.fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return {"depth": int(depth), "bytes": int(size)}


def _daemon(state_dir: Path, timeout: float) -> dict[str, Any] | None:
    from agent.control import NoDaemonError, request, socket_path

    try:
        reply = request(socket_path(state_dir), "status", timeout=timeout)
    except NoDaemonError:
        return None
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"no answer on its control socket: {exc}"}
    return reply


def collect(state_dir: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``--json`` prints it as is)."""
    stored = peek(state_dir)
    desired = None
    if "desired" in stored:
        try:
            raw = json.loads(stored["desired"])
            desired = {"generation": raw.get("generation"), "bundle": raw.get("bundle")}
        except (ValueError, AttributeError):
            desired = None
    return {
        "state_dir": str(state_dir),
        "device_id": stored.get("device_id"),
        "fleet": stored.get("fleet_url"),
        "broker": stored.get("broker_url"),
        "enrolled": root_path(state_dir).is_file(),
        "root": _root(state_dir),
        "active": _active(state_dir),
        "desired": desired,
        "applied_generation": int(stored.get("applied_generation") or 0) or None,
        "outbox": _outbox(state_dir),
        "daemon": _daemon(state_dir, timeout),
    }


def _model(ref: dict[str, Any] | None) -> str:
    return f"{ref.get('name')} v{ref.get('version')}" if ref else "none"


def render(status: dict[str, Any]) -> str:
    """The human form: one ``label: value`` line per fact."""
    daemon = status["daemon"]
    if daemon is None:
        agent = "not running"
    elif not daemon.get("ok"):
        agent = f"owns the state directory but {daemon.get('error')}"
    else:
        link = "connected to" if daemon.get("connected") else "NOT connected to"
        agent = f"running (pid {daemon.get('pid')}), {link} {daemon.get('broker')}"
    state_dir = status["state_dir"]
    root = status["root"]
    if not status["enrolled"]:
        trust = (f"NOT ENROLLED: every deployment is refused; run `edge-agent enroll "
                 f"--fleet URL --state-dir {state_dir}`")
    elif root is None:
        trust = "root.json unreadable"
    else:
        trust = (f"root v{root['version']} (keys {', '.join(root['keyids'])}, threshold "
                 f"{root['threshold']}, expires {root['expires']})")
    active = status["active"]
    serving = (f"{_model(active['model'])} (slot {active['slot']})" if active
               else "none installed")
    if daemon and daemon.get("ok") and daemon.get("serving") != (active or {}).get("model"):
        serving += f"; the daemon serves {_model(daemon.get('serving'))}"
    desired = status["desired"]
    told = "none yet" if desired is None else (
        f"generation {desired['generation']}: {_model(desired['bundle'])}")
    outbox = status["outbox"]
    waiting = "unreadable" if outbox is None else (
        f"{outbox['depth']} message(s) waiting ({_size(outbox['bytes'])})")
    rows = [
        ("state dir", state_dir),
        ("agent", agent),
        ("device id", status["device_id"] or "unknown (the daemon has not run yet)"),
        ("fleet", status["fleet"] or "none"),
        ("broker", status["broker"] or "none learnt at enrollment (give run --broker)"),
        ("trust", trust),
        ("active model", serving),
        ("desired", told),
        ("outbox", waiting),
    ]
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{label + ':':<{width}} {value}" for label, value in rows)


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.1f} MiB"
