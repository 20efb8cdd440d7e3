"""The production broker set-up, run the way the docs say: ``deploy/mosquitto/mosquitto.conf``
(only its paths and port changed) started as root, so that mosquitto drops to user
``mosquitto``; accounts made as root with ``deploy/mosquitto/add-account.sh``.

What it must hold against a device that owns valid credentials: no reading or publishing
another device's topics, no joining the fleet's shared subscriptions (the broker would
round-robin other devices' telemetry to it), no taking another client's id (the broker
would kick that client off and fire its Last Will), no anonymous access. What the fleet
needs must still work, for several workers with their own accounts at once.

Needs root and a ``mosquitto`` user: skips without them, fails under ``CI=true``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.contract import topic
from fleet.ingest import SUBSCRIPTIONS
from fleet.local_broker import BrokerNotFound, find_dynamic_security_plugin, free_port
from tests.fixtures.processes import stop_process
from tests.fixtures.waiting import wait_until

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
SCRIPT = DEPLOY_DIR / "add-account.sh"
SHIPPED_CONFIG = DEPLOY_DIR / "mosquitto.conf"
TREE = "edgefleet/v1/devices"


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the production broker set-up must be tested)")
    pytest.skip(reason)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def _plugin(configured: str) -> str | None:
    try:
        return find_dynamic_security_plugin(configured)
    except BrokerNotFound:
        return None


def adapt_shipped_config(base: Path, port: int) -> str:
    """The shipped config with its paths moved under ``base`` and its port changed; nothing
    else (user, listener without bind address, plugin, deny by default) is touched."""
    text = SHIPPED_CONFIG.read_text()
    assert re.search(r"^listener 1883$", text, re.M), "the shipped config listens on 1883"
    text = re.sub(r"^listener 1883$", f"listener {port}", text, flags=re.M)
    for prefix, directory in (("/var/lib/mosquitto/", "lib"), ("/run/mosquitto/", "run"),
                              ("/var/log/mosquitto/", "log")):
        assert prefix in text, f"the shipped config uses {prefix}"
        text = text.replace(prefix, f"{base / directory}/")
    plugin = re.search(r"^plugin (\S+)$", text, re.M)
    assert plugin, "the shipped config loads the dynamic-security plugin"
    found = _plugin(plugin.group(1))
    assert found is not None
    return text.replace(plugin.group(0), f"plugin {found}")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@dataclass
class ShippedBroker:
    base: Path
    config: Path
    port: int
    process: subprocess.Popen
    passwords: dict[str, str] = field(default_factory=dict)
    printed: dict[str, str] = field(default_factory=dict)  # account -> the URL printed

    def add(self, name: str) -> str:
        done = run_script(name, str(self.config))
        assert done.returncode == 0, f"add-account.sh {name}: {done.stderr}"
        url = done.stdout.strip()
        match = re.fullmatch(rf"mqtt://{re.escape(name)}:([A-Za-z0-9]+)@([^:]+):(\d+)", url)
        assert match, f"add-account.sh printed {url!r}"
        self.passwords[name] = match.group(1)
        self.printed[name] = url
        return match.group(1)

    def log(self) -> str:
        return (self.base / "log" / "mosquitto.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def shipped() -> Iterator[ShippedBroker]:
    _require(hasattr(os, "geteuid") and os.geteuid() == 0,
             "needs root: the documented set-up runs mosquitto and add-account.sh as root")
    _require(_user_exists("mosquitto"), "needs a `mosquitto` user for the broker to drop to")
    mosquitto = _mosquitto()
    _require(mosquitto is not None, "mosquitto is not installed")
    _require(all(shutil.which(tool) for tool in ("mosquitto_ctrl", "mosquitto_rr")),
             "mosquitto_ctrl / mosquitto_rr (mosquitto-clients) are not installed")
    plugin = re.search(r"^plugin (\S+)$", SHIPPED_CONFIG.read_text(), re.M)
    _require(plugin is not None and _plugin(plugin.group(1)) is not None,
             "Mosquitto's dynamic-security plugin is not installed")
    assert mosquitto is not None

    base = Path(tempfile.mkdtemp(prefix="edgefleet-broker-", dir="/tmp"))
    base.chmod(0o755)  # mosquitto, once it has dropped root, must reach lib/ run/ log/
    broker_user = pwd.getpwnam("mosquitto")
    for name in ("etc", "lib", "run", "log"):
        (base / name).mkdir()
        if name != "etc":  # /etc/mosquitto stays root's, as on Debian
            os.chown(base / name, broker_user.pw_uid, broker_user.pw_gid)
    port = free_port()
    config = base / "etc" / "mosquitto.conf"
    config.write_text(adapt_shipped_config(base, port))

    init = run_script("--init", str(config))
    assert init.returncode == 0, f"add-account.sh --init: {init.stderr}"
    process = subprocess.Popen([mosquitto, "-c", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = ShippedBroker(base, config, port, process)
    try:
        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"mosquitto exited with {process.returncode}:\n"
                                     f"{broker.log() if (base / 'log').exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return (base / "run" / "mosquitto.pid").exists()
            except OSError:
                return False

        wait_until(listening, timeout=30, what="the shipped broker listening")
        for name in ("dev-a", "dev-b", "edgefleet-fleet-w1", "edgefleet-fleet-w2"):
            broker.add(name)
        yield broker
    finally:
        stop_process(process)
        shutil.rmtree(base, ignore_errors=True)


class Session:
    """One MQTT v5 connection that records what the broker answered: CONNACK, SUBACKs,
    PUBACKs, messages, and whether the broker dropped it."""

    def __init__(self, broker: ShippedBroker, user: str | None, *, client_id: str | None = None,
                 password: str | None = None, will: tuple[str, bytes] | None = None) -> None:
        self.connack: ReasonCode | None = None
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self.messages: list[paho.MQTTMessage] = []
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  protocol=paho.MQTTv5, reconnect_on_failure=False)
        if user is not None:
            self.client.username_pw_set(user, password or broker.passwords[user])
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, flags, code, props: self.dropped.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, timeout=20, what="CONNACK")

    def _on_connect(self, client, userdata, flags, code, props) -> None:
        self.connack = code

    def _on_subscribe(self, client, userdata, mid, codes, props) -> None:
        self.subacks[mid] = codes

    def _on_publish(self, client, userdata, mid, code, props) -> None:
        self.pubacks[mid] = code

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(message)

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *topics: str) -> list[ReasonCode]:
        """The broker's answer for each topic filter, in order."""
        _, mid = self.client.subscribe([(name, 1) for name in topics])
        return wait_until(lambda: self.subacks.get(mid), timeout=20, what=f"SUBACK {topics}")

    def publish(self, topic_name: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        return wait_until(lambda: self.pubacks.get(info.mid), timeout=20,
                          what=f"PUBACK {topic_name}")

    def received(self, topic_name: str | None = None) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages if topic_name in (None, m.topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    opened: list[Session] = []
    yield opened
    for session in opened:
        session.close()


def _open(sessions: list[Session], broker: ShippedBroker, user: str | None, **kwargs) -> Session:
    session = Session(broker, user, **kwargs)
    sessions.append(session)
    return session


def _device(sessions, broker, device_id: str, **kwargs) -> Session:
    session = _open(sessions, broker, device_id, client_id=f"edgefleet-agent-{device_id}",
                    **kwargs)
    assert session.accepted, f"{device_id} refused with its own credentials: {session.connack}"
    return session


def _worker(sessions, broker, account: str) -> Session:
    session = _open(sessions, broker, account, client_id=account)
    assert session.accepted, f"{account} refused with its own credentials: {session.connack}"
    return session


def _refused(code: ReasonCode) -> bool:
    return code.is_failure


# -- the broker process and the files -------------------------------------------------------

def test_the_broker_drops_to_mosquitto_and_reads_the_store_the_script_made(shipped):
    status = Path(f"/proc/{shipped.process.pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    assert uid == pwd.getpwnam("mosquitto").pw_uid, "the broker kept running as root"
    store = shipped.base / "lib" / "edgefleet-dynsec.json"
    assert store.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid, "store not the broker's"
    assert store.stat().st_mode & 0o077 == 0, "the account store is readable by others"
    admin = shipped.base / "etc" / "edgefleet-admin"
    assert admin.stat().st_uid == 0 and admin.stat().st_mode & 0o077 == 0, \
        "the admin credentials are readable by others than root"
    assert "Error" not in shipped.log(), shipped.log()


# -- what a device may not do ---------------------------------------------------------------

def test_a_device_cannot_join_the_fleets_shared_subscriptions(shipped, sessions):
    fleet = _worker(sessions, shipped, "edgefleet-fleet-w1")
    assert not any(map(_refused, fleet.subscribe(f"$share/fleet/{TREE}/+/telemetry")))
    thief = _device(sessions, shipped, "dev-a")
    siphons = [f"$share/fleet/{TREE}/+/telemetry", f"$share/fleet/{TREE}/dev-b/telemetry",
               f"$share/fleet/{TREE}/#", f"$share/other/{TREE}/+/telemetry", "$share/fleet/#"]
    for siphon, code in zip(siphons, thief.subscribe(*siphons), strict=True):
        assert _refused(code), f"dev-a was granted {siphon} ({code})"

    victim = _device(sessions, shipped, "dev-b")
    sent = [f"b-{n}".encode() for n in range(30)]
    for payload in sent:
        assert not _refused(victim.publish(topic("dev-b", "telemetry"), payload))
    wait_until(lambda: len(fleet.received()) >= len(sent), timeout=30,
               what="all of dev-b's telemetry at the fleet")
    assert sorted(fleet.received()) == sorted(sent), "the fleet did not get all of dev-b's"
    assert thief.received() == [], "dev-a received dev-b's telemetry"


def test_a_device_cannot_read_another_devices_topics(shipped, sessions):
    reader = _device(sessions, shipped, "dev-a")
    others = [topic("dev-b", "desired"), topic("dev-b", "telemetry"), topic("dev-b", "status"),
              f"{TREE}/+/desired", f"{TREE}/+/telemetry", f"{TREE}/#", "#"]
    for other, code in zip(others, reader.subscribe(*others), strict=True):
        assert _refused(code), f"dev-a may subscribe to {other} ({code})"
    own = reader.subscribe(topic("dev-a", "desired"))
    assert not _refused(own[0]), f"dev-a may not read its own desired state ({own[0]})"

    fleet = _worker(sessions, shipped, "edgefleet-fleet-w1")
    assert not _refused(fleet.publish(topic("dev-b", "desired"), b"for dev-b", retain=True))
    assert not _refused(fleet.publish(topic("dev-a", "desired"), b"for dev-a", retain=True))
    wait_until(lambda: reader.received(), timeout=20, what="dev-a's own desired state")
    assert reader.received() == [b"for dev-a"], "dev-a got another device's desired state"


def test_a_device_cannot_publish_as_another_device_or_as_the_fleet(shipped, sessions):
    fleet = _worker(sessions, shipped, "edgefleet-fleet-w2")
    assert not any(map(_refused, fleet.subscribe(f"{TREE}/+/status", f"{TREE}/+/reported")))
    forger = _device(sessions, shipped, "dev-a")
    forged = {channel: forger.publish(topic("dev-b", channel), b"forged")
              for channel in ("status", "reported", "telemetry", "events", "drift", "desired")}
    for channel, code in forged.items():
        assert _refused(code), f"dev-a may publish on dev-b's {channel} ({code})"
    own_desired = forger.publish(topic("dev-a", "desired"), b"forged")
    assert _refused(own_desired), "a device may write its own desired state"
    own_status = forger.publish(topic("dev-a", "status"), b"sentinel", retain=True)
    assert not _refused(own_status), f"dev-a may not publish its own status ({own_status})"
    # Same publisher, same subscriber: delivered in order, so the sentinel closes the window.
    wait_until(lambda: fleet.received(topic("dev-a", "status")), timeout=20, what="sentinel")
    assert fleet.received(topic("dev-b", "status")) == [], "a forged status reached the fleet"


def test_a_device_cannot_take_another_devices_client_id(shipped, sessions):
    fleet = _worker(sessions, shipped, "edgefleet-fleet-w1")
    assert not any(map(_refused, fleet.subscribe(f"{TREE}/dev-b/status")))
    victim = _device(sessions, shipped, "dev-b", will=(topic("dev-b", "status"), b"offline"))
    assert not _refused(victim.publish(topic("dev-b", "status"), b"online", retain=True))

    taker = _open(sessions, shipped, "dev-a", client_id="edgefleet-agent-dev-b")
    assert taker.connack is not None and taker.connack.is_failure, \
        f"dev-a connected with dev-b's client id ({taker.connack})"
    assert not _refused(victim.publish(topic("dev-b", "status"), b"still-online", retain=True))
    wait_until(lambda: b"still-online" in fleet.received(), timeout=20, what="dev-b's status")
    assert not victim.dropped.is_set(), "dev-b was kicked off"
    assert b"offline" not in fleet.received(), "dev-b's Last Will (offline) was fired"


def test_a_device_cannot_take_a_fleet_workers_client_id(shipped, sessions):
    worker = _worker(sessions, shipped, "edgefleet-fleet-w2")
    for stolen in ("edgefleet-fleet-w2", "edgefleet-fleet-w9", "edgefleet-admin"):
        taker = _open(sessions, shipped, "dev-a", client_id=stolen)
        assert taker.connack is not None and taker.connack.is_failure, \
            f"dev-a connected with the client id {stolen} ({taker.connack})"
    assert not _refused(worker.publish(topic("dev-a", "desired"), b"x")), "the worker is gone"
    assert not worker.dropped.is_set(), "the fleet worker was kicked off"


def test_a_fleet_account_is_bound_to_its_own_client_id(shipped, sessions):
    session = _open(sessions, shipped, "edgefleet-fleet-w1", client_id="edgefleet-fleet-w2")
    assert session.connack is not None and session.connack.is_failure, \
        "worker w1's account connected as worker w2"


@pytest.mark.parametrize("who", ["anonymous", "wrong-password", "unknown-account",
                                 "device-without-client-id"])
def test_anonymous_unknown_and_unbound_clients_are_refused(shipped, sessions, who):
    user, password, client_id = {
        "anonymous": (None, None, "edgefleet-agent-dev-a"),
        "wrong-password": ("dev-a", "wrong", "edgefleet-agent-dev-a"),
        "unknown-account": ("dev-zz", "whatever", "edgefleet-agent-dev-zz"),
        "device-without-client-id": ("dev-a", None, None),  # the broker would assign one
    }[who]
    session = _open(sessions, shipped, user, client_id=client_id, password=password)
    assert session.connack is not None and session.connack.is_failure, \
        f"{who} was let in ({session.connack})"


# -- what the fleet needs -------------------------------------------------------------------

def test_two_fleet_workers_with_their_own_accounts_get_what_the_fleet_needs(shipped, sessions):
    workers = [_worker(sessions, shipped, f"edgefleet-fleet-w{n}") for n in (1, 2)]
    for worker in workers:
        codes = worker.subscribe(*SUBSCRIPTIONS)
        for name, code in zip(SUBSCRIPTIONS, codes, strict=True):
            assert not _refused(code), f"a fleet worker may not subscribe to {name} ({code})"

    device = _device(sessions, shipped, "dev-b")
    assert not any(map(_refused, device.subscribe(topic("dev-b", "desired"))))
    shared = {channel: [f"{channel}-{n}".encode() for n in range(20)]
              for channel in ("telemetry", "events", "drift")}
    for channel, payloads in shared.items():
        for payload in payloads:
            assert not _refused(device.publish(topic("dev-b", channel), payload))
    for channel in ("status", "reported"):
        assert not _refused(device.publish(topic("dev-b", channel), channel.encode(),
                                           retain=True))

    def all_arrived() -> bool:
        shares = all(sum(len(w.received(topic("dev-b", channel))) for w in workers) >= 20
                     for channel in shared)
        direct = all(w.received(topic("dev-b", channel))[-1:] == [channel.encode()]
                     for w in workers for channel in ("status", "reported"))
        return shares and direct

    wait_until(all_arrived, timeout=30, what="the shared and the direct channels at the fleet")
    for channel, payloads in shared.items():
        by_worker = [w.received(topic("dev-b", channel)) for w in workers]
        assert sorted(by_worker[0] + by_worker[1]) == sorted(payloads), \
            f"the two workers did not get every {channel} message exactly once between them"
    assert all(w.received(topic("dev-b", "telemetry")) for w in workers), \
        "one worker got no share of the telemetry: it is not in the shared group"

    desired = workers[1].publish(topic("dev-b", "desired"), b"v2", retain=True)
    assert not _refused(desired), f"a fleet worker may not publish desired ({desired})"
    wait_until(lambda: device.received(topic("dev-b", "desired")), timeout=20, what="desired")
    assert device.received(topic("dev-b", "desired"))[-1] == b"v2"
    # Ingest clears a refused retained status/reported with an empty retained message.
    cleared = workers[0].publish(topic("dev-b", "status"), b"", retain=True)
    assert not _refused(cleared), f"a fleet worker may not clear a retained status ({cleared})"


# -- the account script ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "", "bad name", "-leading-dash", ".hidden", "a/b", "+", "#", "x" * 65, "caf\u00e9",
    "edgefleet-admin", "edgefleet-fleet", "edgefleet-fleet-", "edgefleet-agent-cam",
    "edgefleet-x", "a\"b",
])
def test_the_script_refuses_invalid_or_reserved_names(shipped, name):
    done = run_script(name, str(shipped.config))
    assert done.returncode == 2, f"{name!r}: exit {done.returncode}, {done.stdout}{done.stderr}"
    assert done.stdout == "", "a refused name printed a URL"


def test_the_script_prints_the_brokers_real_address(shipped):
    host = subprocess.run(["hostname", "-f"], capture_output=True, text=True).stdout.strip()
    url = shipped.printed["dev-a"]
    assert url.endswith(f"@{host}:{shipped.port}"), f"printed {url}, broker on port {shipped.port}"
    done = run_script("dev-c", str(shipped.config), "broker.example.net")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"@broker.example.net:{shipped.port}"), done.stdout


def test_readding_an_account_changes_its_password_at_once(shipped, sessions):
    old = shipped.passwords["dev-b"]
    new = shipped.add("dev-b")
    assert new != old
    stale = _open(sessions, shipped, "dev-b", client_id="edgefleet-agent-dev-b", password=old)
    assert stale.connack is not None and stale.connack.is_failure, "the old password still works"
    _device(sessions, shipped, "dev-b")  # the new one works without a reload


def test_the_script_signals_no_other_broker(shipped, sessions, tmp_path):
    """The old script sent SIGHUP to every mosquitto on the host (``pkill -x mosquitto``)."""
    decoy_dir = Path(tempfile.mkdtemp(prefix="edgefleet-decoy-", dir="/tmp"))
    decoy_log = decoy_dir / "decoy.log"
    decoy_config = decoy_dir / "decoy.conf"
    decoy_port = free_port()
    decoy_config.write_text("\n".join([
        f"listener {decoy_port} 127.0.0.1", "allow_anonymous true", "user root",
        f"pid_file {decoy_dir / 'decoy.pid'}", f"log_dest file {decoy_log}", "log_type all",
    ]) + "\n")
    mosquitto = _mosquitto()
    assert mosquitto is not None
    decoy = subprocess.Popen([mosquitto, "-c", str(decoy_config)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: decoy_log.exists() and "running" in decoy_log.read_text(),
                   timeout=30, what="the decoy broker running")
        broker_pid = shipped.process.pid
        shipped.add("dev-d")
        _device(sessions, shipped, "dev-d")  # the account is live on our broker ...
        assert shipped.process.poll() is None and shipped.process.pid == broker_pid
        assert "Reloading config" not in shipped.log(), "the script reloaded the broker"
        assert decoy.poll() is None, "the decoy broker was stopped"  # ... and nowhere else
        assert "Reloading config" not in decoy_log.read_text(), "the decoy broker got SIGHUP"
        decoy.send_signal(signal.SIGHUP)  # the probe works: a SIGHUP does show in its log
        wait_until(lambda: "Reloading config" in decoy_log.read_text(), timeout=20,
                   what="the decoy logging a reload")
    finally:
        decoy.terminate()
        decoy.wait(10)
        shutil.rmtree(decoy_dir, ignore_errors=True)


def test_the_script_refuses_when_its_broker_is_not_running(shipped, tmp_path):
    stopped = shipped.base / "etc" / "stopped.conf"
    stopped.write_text(re.sub(r"^pid_file .*$", f"pid_file {tmp_path / 'none.pid'}",
                              shipped.config.read_text(), flags=re.M))
    done = run_script("dev-e", str(stopped))
    assert done.returncode == 1 and "not running" in done.stderr, done.stderr
    assert done.stdout == ""
