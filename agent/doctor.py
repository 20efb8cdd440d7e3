"""``edge-agent doctor``: is this device's install able to work? One line per check.

Each check names what it looked at and, when it fails, what to do. The run order follows
what a device needs, and a check whose premise failed is skipped rather than failed
again (no broker check without credentials):

* **config**: the config file in force is readable and every key is one of ``run``'s;
* **state dir**: exists, writable, not readable by group or others (it holds the
  device's private key and broker password);
* **enrolled**: ``identity.json`` (device id, fleet, broker account) is readable, and it
  and ``device-key.pem`` are 0600;
* **root pin**: ``tuf/root.json`` is a TUF root signed by its own keys to its threshold;
* **trust**: that root still leads to the fleet's current metadata: a TUF refresh
  (:class:`agent.trust.client.BundleClient`) succeeds. It runs on a copy of the pinned
  metadata in a temporary directory, so the doctor never writes the agent's state (run as
  root, it would leave root-owned files the agent could not replace);
* **broker**: reachable and accepting the device's credentials. The broker binds each
  device account to the client id ``edgefleet-agent-<device id>``, so connecting while the
  agent runs would throw the agent off: when the agent answers on its control socket, its
  own connection state is reported instead; otherwise one connection is made and the
  CONNACK's reason reported ("Not authorized", ...);
* **slots**: the active slot (and a complete inactive one, the rollback target) still
  match their manifests' hashes (:func:`agent.bundle.verify_slot`);
* **onnxruntime** imports (and has the configured providers); **tflite**: a TFLite runtime
  is optional (a warning), unless the active model needs it;
* **endpoint**: the inference endpoint's address is free, or held by the running agent.

Nothing here changes the device: no file is written in the state directory, the slots'
lock is not taken (a doctor must never keep the agent from starting).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "DoctorInput", "Report", "diagnose", "render"]

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
SERVICE_USER = "edgefleet"
SERVICE_STATE_DIR = Path("/var/lib/edgefleet")
_CLIENT_PREFIX = "edgefleet-agent-"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, FAIL, skip
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    def get(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "checks": [asdict(c) for c in self.checks]}, indent=2)


@dataclass(frozen=True)
class DoctorInput:
    """What the checks look at: ``run``'s settings as the daemon would get them (command
    line defaults, environment, config file), and the doctor's own options."""

    state_dir: Path
    config_file: Path | None = None
    config_error: str | None = None
    config_settings: int = 0
    broker: str | None = None  # given (environment, config); else the enrolled one
    broker_source: str = ""
    device_id: str | None = None  # given; the enrolled identity's wins
    fleet_url: str | None = None  # given; else the enrolled one
    listen: str = "127.0.0.1:8470"
    socket_path: Path | None = None
    providers: tuple[str, ...] = ()
    max_bundle_bytes: int = 512 * 1024 * 1024
    timeout: float = 10.0

    @classmethod
    def from_args(cls, args: Any, environ: Mapping[str, str]) -> DoctorInput:
        """From ``edge-agent doctor``'s arguments; ``args.run_options`` is ``run``'s
        namespace parsed with no arguments (the config file's values as defaults)."""
        run = args.run_options
        broker, source = run.broker, f"config {args.config_file}"
        if environ.get("EDGE_AGENT_BROKER"):
            broker, source = environ["EDGE_AGENT_BROKER"], "EDGE_AGENT_BROKER"
        providers = run.providers or [
            name.strip() for name in environ.get("EDGE_AGENT_PROVIDERS", "").split(",")]
        return cls(
            state_dir=args.state_dir,
            config_file=args.config_file,
            config_error=args.config_error,
            config_settings=len(args.config_values),
            broker=broker,
            broker_source=source if broker else "",
            device_id=run.device_id,
            fleet_url=run.fleet,
            listen=run.listen,
            socket_path=run.socket,
            providers=tuple(name for name in providers if name),
            max_bundle_bytes=int(run.max_bundle_mb * 1024 * 1024),
            timeout=args.timeout,
        )


@dataclass
class _Facts:
    """What earlier checks learnt, for the later ones."""

    state_dir_ok: bool = False
    never_enrolled: bool = False  # no identity, no pinned root: say it once
    identity: Any = None  # agent.identity.Identity
    root_ok: bool = False
    fleet_url: str | None = None
    daemon: dict[str, Any] | None = None  # the running agent's status reply
    daemon_error: str | None = None
    runtime: str | None = None  # the active model's ("onnx", "tflite")


def diagnose(given: DoctorInput) -> Report:
    facts = _Facts()
    facts.daemon, facts.daemon_error = _ask_daemon(given)
    report = Report()
    checks: list[Callable[[DoctorInput, _Facts], Check]] = [
        _check_config, _check_state_dir, _check_enrolled, _check_root, _check_trust,
        _check_broker, _check_slots, _check_onnxruntime, _check_tflite, _check_endpoint,
    ]
    for check in checks:
        try:
            report.checks.append(check(given, facts))
        except Exception as exc:  # a doctor reports, it does not crash
            name = check.__name__.removeprefix("_check_").replace("_", " ")
            report.checks.append(Check(name, FAIL, f"the check itself failed: "
                                       f"{type(exc).__name__}: {exc}"))
    return report


def render(report: Report) -> str:
    width = max(len(check.name) for check in report.checks) + 1
    lines = []
    for check in report.checks:
        line = f"{check.status:<4}  {check.name + ':':<{width}} {check.detail}"
        if check.fix and check.status in (FAIL, WARN):
            line += f" -> {check.fix}"
        lines.append(line)
    failed = sum(check.status == FAIL for check in report.checks)
    warned = sum(check.status == WARN for check in report.checks)
    lines.append(f"{len(report.checks)} checks: " + (
        f"{failed} failed" if failed else "all passed") + (f", {warned} warning(s)"
                                                          if warned else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------ the checks


def _check_config(given: DoctorInput, facts: _Facts) -> Check:
    if given.config_error:
        return Check("config", FAIL, given.config_error,
                     "fix that key: the keys are `edge-agent run`'s options with underscores "
                     "(see `edge-agent run --help`), in an [agent] table")
    if given.config_file is None:
        return Check("config", OK, "no config file (command line, environment and defaults)")
    return Check("config", OK, f"{given.config_file}: {given.config_settings} setting(s), "
                 "all valid")


def _check_state_dir(given: DoctorInput, facts: _Facts) -> Check:
    path = given.state_dir
    try:
        info = path.stat()
    except FileNotFoundError:
        return Check("state dir", FAIL, f"{path}: no such directory",
                     "install-agent.sh creates it; or give --state-dir (config: state_dir)")
    except OSError as exc:
        return Check("state dir", FAIL, f"{path}: {exc.strerror}",
                     "run the doctor as root or as the agent's user")
    if not stat.S_ISDIR(info.st_mode):
        return Check("state dir", FAIL, f"{path}: not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return Check("state dir", FAIL, f"{path}: mode {mode:04o}, readable by others (it "
                     "holds the device key and broker password)", f"chmod 700 {path}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".doctor-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Check("state dir", FAIL, f"{path}: not writable as uid {os.geteuid()}: "
                     f"{exc.strerror}", "run the doctor as the agent's user, or fix the owner")
    owner = _owner(info.st_uid)
    service_user = _service_user()
    if (path == SERVICE_STATE_DIR and service_user is not None
            and info.st_uid != service_user.pw_uid):
        return Check("state dir", FAIL, f"{path}: owned by {owner}; the service runs as "
                     f"{SERVICE_USER}", f"chown -R {SERVICE_USER}:{SERVICE_USER} {path}")
    facts.state_dir_ok = True
    return Check("state dir", OK, f"{path}: mode {mode:04o}, owner {owner}, writable")


def _check_enrolled(given: DoctorInput, facts: _Facts) -> Check:
    from agent.identity import IDENTITY_FILE, KEY_FILE, Identity
    from agent.state import is_enrolled, peek

    if not facts.state_dir_ok:
        return Check("enrolled", SKIP, "no usable state dir")
    enroll = (f"edge-agent enroll --fleet URL --code CODE --state-dir {given.state_dir} "
              "(the code from `edge-fleet devices add NAME`)")
    try:
        identity = Identity.load(given.state_dir)
    except (OSError, ValueError) as exc:
        return Check("enrolled", FAIL, str(exc), f"enroll again: {enroll}")
    for name in (IDENTITY_FILE, KEY_FILE):
        file = given.state_dir / name
        if file.exists() and (mode := stat.S_IMODE(file.stat().st_mode)) & 0o077:
            return Check("enrolled", FAIL, f"{file}: mode {mode:04o}, readable by others",
                         f"chmod 600 {file}")
    stored = peek(given.state_dir)
    facts.fleet_url = given.fleet_url or (identity.fleet_url if identity else None) or \
        stored.get("fleet_url")
    if identity is not None:
        facts.identity = identity
        account = f"broker account {identity.username}" if identity.username else \
            "no broker account (the broker is given another way)"
        return Check("enrolled", OK, f"device {identity.device_id} of {identity.fleet_url}, "
                     f"{account}")
    if is_enrolled(given.state_dir):
        return Check("enrolled", WARN, f"root pinned for {facts.fleet_url or 'an unknown fleet'}"
                     ", but no identity.json: enrolled without a code (broker credentials "
                     "come from --broker or the config)", f"to enroll with a code: {enroll}")
    facts.never_enrolled = True
    return Check("enrolled", FAIL, f"{given.state_dir}: not enrolled (no identity.json, no "
                 "pinned root): the agent trusts no fleet", enroll)


def _check_root(given: DoctorInput, facts: _Facts) -> Check:
    from agent.state import root_path

    if not facts.state_dir_ok:
        return Check("root pin", SKIP, "no usable state dir")
    if facts.never_enrolled:
        return Check("root pin", SKIP, "not enrolled")
    path = root_path(given.state_dir)
    if not path.is_file():
        return Check("root pin", FAIL, f"{path}: missing: no fleet's root is trusted",
                     "enroll: edge-agent enroll --fleet URL --code CODE")
    from tuf.api.metadata import Metadata, Root

    try:
        root_md = Metadata[Root].from_bytes(path.read_bytes())
        root_md.verify_delegate(Root.type, root_md)
    except Exception as exc:
        return Check("root pin", FAIL, f"{path} is not a valid self-signed TUF root: "
                     f"{type(exc).__name__}: {exc}", "enroll again with a new code")
    facts.root_ok = True
    role = root_md.signed.roles["root"]
    keys = ", ".join(keyid[:12] for keyid in role.keyids)
    return Check("root pin", OK, f"root v{root_md.signed.version} (keys {keys}, threshold "
                 f"{role.threshold}), signed by its own keys")


def _check_trust(given: DoctorInput, facts: _Facts) -> Check:
    if not facts.root_ok:
        return Check("trust", SKIP, "no valid pinned root")
    fleet = facts.fleet_url
    if not fleet:
        return Check("trust", FAIL, "no fleet URL known (not in identity.json, the state "
                     "or the config)", "give fleet = \"http://FLEET:8000\" in the config")
    from agent.errors import TrustError
    from agent.trust.client import BundleClient
    from agent.trust.download import DownloadLimits

    with tempfile.TemporaryDirectory(prefix="edge-agent-doctor-") as scratch:
        copy = Path(scratch)
        (copy / "tuf").mkdir()
        for name in ("root.json", "timestamp.json", "snapshot.json", "targets.json"):
            source = given.state_dir / "tuf" / name
            if source.is_file():  # the newer metadata too: rollback checks start from it
                shutil.copyfile(source, copy / "tuf" / name)
        client = BundleClient(fleet, copy, max_bundle_bytes=given.max_bundle_bytes,
                              limits=DownloadLimits(deadline_s=given.timeout))
        try:
            client.refresh()
        except TrustError as exc:
            return Check("trust", FAIL, f"root pin wrong / fleet unreachable: {fleet}: {exc}",
                         f"check that {fleet} is this device's fleet and answers "
                         f"({fleet}/repo/metadata/timestamp.json); if the fleet's root was "
                         "replaced rather than rotated, enroll again with a new code")
        versions = {name: _version(copy / "tuf" / f"{name}.json")
                    for name in ("root", "targets")}
    return Check("trust", OK, f"the pinned root leads to {fleet}'s current metadata (root "
                 f"v{versions['root']}, targets v{versions['targets']})")


def _check_broker(given: DoctorInput, facts: _Facts) -> Check:
    from agent.mqtt import BrokerAddress, LinkError, try_connect
    from agent.state import peek

    daemon = facts.daemon
    if daemon is not None and daemon.get("ok"):
        pid, broker = daemon.get("pid"), daemon.get("broker")
        if daemon.get("connected"):
            return Check("broker", OK, f"the running agent (pid {pid}) is connected to {broker}")
        return Check("broker", FAIL, f"the running agent (pid {pid}) is NOT connected to "
                     f"{broker}", "its log says why (journalctl -u edge-agent -n 50): "
                     "nothing listening, or the broker refusing its credentials")
    if facts.daemon_error:
        return Check("broker", FAIL, facts.daemon_error,
                     "run the doctor as root or as the agent's user")
    identity = facts.identity
    url, source = given.broker, given.broker_source
    if not url and identity is not None and identity.broker_url():
        url, source = identity.broker_url(), "identity.json"
    if not url and facts.state_dir_ok and (stored := peek(given.state_dir).get("broker_url")):
        url, source = stored, "named by the fleet at enrollment"
    if not url and facts.never_enrolled:
        return Check("broker", SKIP, "not enrolled (enrollment gives the broker account)")
    if not url:
        return Check("broker", FAIL, "no broker known (none in identity.json, the config or "
                     "EDGE_AGENT_BROKER)", "enroll with a code, or set broker in the config")
    try:
        address = BrokerAddress.parse(url)
    except ValueError as exc:
        return Check("broker", FAIL, f"{exc} (from {source})")
    device_id = (identity.device_id if identity is not None else given.device_id) or (
        peek(given.state_dir).get("device_id") if facts.state_dir_ok else None)
    if not device_id:
        return Check("broker", FAIL, "no device id known (not enrolled with a code, none "
                     "given, and the agent has not run yet)",
                     "enroll with a code, or set device_id in the config")
    client_id = f"{_CLIENT_PREFIX}{device_id}"
    try:
        reason = try_connect(address, client_id, given.timeout)
    except LinkError as exc:
        return Check("broker", FAIL, f"{exc} (broker from {source})",
                     "check the broker's address and that it runs; a firewall?")
    if reason == "Success":
        who = address.username or "an anonymous client"
        return Check("broker", OK, f"{address} accepted {who} as {client_id} (broker from "
                     f"{source})")
    who = f"user {address.username}" if address.username else "no user name"
    return Check("broker", FAIL, f"{address} refused the device's credentials ({who}, client "
                 f"id {client_id}): {reason} (broker from {source})",
                 "wrong or revoked password, or an account bound to another client id: "
                 "enroll again with a new code (or reset the account: add-account.sh "
                 f"{device_id})")


def _check_slots(given: DoctorInput, facts: _Facts) -> Check:
    from agent.bundle import COMPLETE_MARKER, verify_slot
    from agent.errors import BundleError

    if not facts.state_dir_ok:
        return Check("slots", SKIP, "no usable state dir")
    link = given.state_dir / "current"
    if not link.is_symlink():
        return Check("slots", OK, "no model installed yet")
    active = Path(os.readlink(link)).name
    slots = given.state_dir / "slots"
    try:
        manifest = verify_slot(slots / active)
    except (BundleError, OSError) as exc:
        return Check("slots", FAIL, f"active slot {active}: {exc}",
                     "roll back (edge-agent rollback) or deploy the model again")
    facts.runtime = manifest.runtime
    detail = (f"active slot {active}: {manifest.name} v{manifest.version}, "
              f"{len(manifest.files)} file(s) intact")
    other = "b" if active == "a" else "a"
    if (slots / other / COMPLETE_MARKER).is_file():
        try:
            previous = verify_slot(slots / other)
        except (BundleError, OSError) as exc:
            return Check("slots", WARN, f"{detail}; inactive slot {other}: {exc}",
                         "a rollback to it would fail; the next install replaces it")
        detail += f"; slot {other}: {previous.name} v{previous.version}, intact"
    return Check("slots", OK, detail)


def _check_onnxruntime(given: DoctorInput, facts: _Facts) -> Check:
    install = "pip install 'edgefleet[agent]' into the agent's venv"
    try:
        import onnxruntime
    except ImportError as exc:
        return Check("onnxruntime", FAIL, f"cannot import onnxruntime: {exc}", install)
    available = onnxruntime.get_available_providers()
    missing = [name for name in given.providers if name not in available]
    if missing:
        return Check("onnxruntime", FAIL, f"onnxruntime {onnxruntime.__version__} lacks the "
                     f"configured provider(s) {missing}; it has {available}",
                     "install the onnxruntime build for this hardware, or change providers")
    return Check("onnxruntime", OK, f"onnxruntime {onnxruntime.__version__} "
                 f"({', '.join(available)})")


def _check_tflite(given: DoctorInput, facts: _Facts) -> Check:
    failures = []
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            __import__(module)
        except ImportError as exc:
            failures.append(f"{module.split('.')[0]}: {exc}")
        else:
            return Check("tflite", OK, f"{module.split('.')[0]} imports")
    status = FAIL if facts.runtime == "tflite" else WARN
    why = "the active model is a TFLite model" if status == FAIL else \
        "TFLite bundles would fail to install"
    return Check("tflite", status, f"no TFLite runtime ({'; '.join(failures)}): {why}",
                 "pip install 'edgefleet[agent,tflite]' (or tflite-runtime where numpy < 2)")


def _check_endpoint(given: DoctorInput, facts: _Facts) -> Check:
    daemon = facts.daemon if facts.daemon and facts.daemon.get("ok") else None
    if given.socket_path is not None:
        if daemon is not None and given.socket_path.is_socket():
            return Check("endpoint", OK, f"unix:{given.socket_path}, served by the running "
                         f"agent (pid {daemon.get('pid')})")
        parent = given.socket_path.parent
        if not parent.is_dir():
            return Check("endpoint", FAIL, f"unix:{given.socket_path}: no directory {parent}")
        return Check("endpoint", OK, f"unix:{given.socket_path} can be bound")
    if given.listen == "off":
        return Check("endpoint", OK, "off (listen = \"off\")")
    host, _, port_text = given.listen.rpartition(":")
    if not host or not port_text.isdigit():
        return Check("endpoint", FAIL, f"listen {given.listen!r} is not HOST:PORT")
    port = int(port_text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host.strip("[]"), port), family=family).close()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return Check("endpoint", FAIL, f"{given.listen}: cannot listen there: {exc.strerror}",
                         "set listen to an address of this device")
    else:
        return Check("endpoint", OK, f"{given.listen} is free")
    holders = _listeners(port)
    if daemon is not None and (daemon.get("pid") in holders or holders is None):
        return Check("endpoint", OK, f"{given.listen} held by the running agent (pid "
                     f"{daemon.get('pid')})")
    who = ", ".join(f"pid {pid} ({name})" for pid, name in (holders or {}).items())
    return Check("endpoint", FAIL, f"{given.listen} is taken by {who or 'another process'}",
                 "stop it, or set listen = \"127.0.0.1:OTHER_PORT\" in the config")


# ------------------------------------------------------------------------ helpers


def _ask_daemon(given: DoctorInput) -> tuple[dict[str, Any] | None, str | None]:
    """The running agent's status reply, or (None, why it could not be asked)."""
    from agent.control import NoDaemonError, request, socket_path

    path = socket_path(given.state_dir)
    try:
        return request(path, "status", timeout=given.timeout), None
    except NoDaemonError:
        return None, None
    except PermissionError:
        return None, f"cannot ask the agent on {path}: permission denied"
    except (OSError, ValueError) as exc:
        return None, f"the agent owns {path} but does not answer: {exc}"


def _version(path: Path) -> Any:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_bytes())["signed"]["version"]
    return "?"


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _service_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None


def _listeners(port: int) -> dict[int, str] | None:
    """Processes with a listening TCP socket on ``port`` (pid -> name), read from /proc;
    None when that cannot be told (no /proc, or others' descriptors unreadable)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) \
                    == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    found: dict[int, str] = {}
    unreadable = False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except PermissionError:  # another user's process
            unreadable = True
            continue
        except OSError:  # one that just ended
            continue
        links = set()
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own, too)
                links.add(os.readlink(fd))
        if links & inodes:
            with contextlib.suppress(OSError):
                found[int(proc.name)] = (proc / "comm").read_text().strip()
    return found if found or not unreadable else None
