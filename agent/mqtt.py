"""MQTT v5 plumbing shared by the agent and the fleet: broker URLs and a resilient link.

paho-mqtt is wrapped here and nowhere else, so the rest of the code sees plain callbacks and
one error type. The link reconnects by itself (paho's loop thread), and asks for a fresh
Last Will before every connection attempt: each connection of a device announces its own
offline message, which is how the fleet tells a stale will from a current one (see
``agent.contract``).

Two field conditions decide how it does so (:class:`_Client`, :class:`Backoff`):

* **A dead link is noticed within one keepalive** (plus the loop's 1 s tick), so within
  the 1.5 keepalives after which the broker gives up on us and publishes our Last Will. A
  NAT that forgot the connection sends no RST: only silence tells. paho pings after a
  keepalive of silence and then waits a whole keepalive more for the PINGRESP, 2
  keepalives in all (measured: 9.9 s at keepalive 5). Here a ping goes out after half a
  keepalive without a byte from the broker, and the connection is dropped once a whole
  keepalive passed without one: a live broker answers well within that.
* **Reconnects do not storm.** A broker restart drops every device in the same instant;
  if they all come back in the same second, the broker (and the fleet behind it) takes
  the whole fleet's connects, subscriptions and retained messages at once. The first
  attempt after a lost connection is therefore drawn uniformly over ``spread_s`` (one
  keepalive by default: a device back within it is never seen offline, since the broker
  waits 1.5 keepalives), and each further attempt after ``n`` failures over
  ``min(cap, base * 2**n)`` ("full jitter"). ``jitter=False`` gives the plain doubling
  (1, 2, 4 ... 30 s), for comparison (``bench/reconnect.py``).

A broker that cannot be reached is never silent: every failed attempt (nothing listening,
a name that does not resolve, a refusal) is logged with where it went, why it failed and
when the next attempt is due. The first failure of a run of them is a WARNING, the rest
DEBUG, with a WARNING summary at most once a minute (:class:`FailureLog` decides; a device
offline for a week writes ~10,000 lines, not ~20,000 warnings); success after failures
says how long it took.
"""

from __future__ import annotations

import enum
import logging
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["Backoff", "BrokerAddress", "FailureLog", "Inbound", "LinkError", "MqttLink",
           "Will", "try_connect"]

log = logging.getLogger(__name__)


class _PollSelect:
    """``select.select`` for paho's network loop, done with ``poll(2)``.

    ``select(2)`` cannot watch a descriptor numbered 1024 or above (FD_SETSIZE): Python
    raises ValueError, which paho takes for a lost connection and retries for ever, in
    silence. A process with many open files (the device simulator: ~10 per device, so from
    ~100 devices on) would then never connect. ``poll`` has no such ceiling; errors stay
    those of ``select`` (ValueError for a closed socket's -1, TypeError for None), which is
    what paho handles. Hang-ups and errors count as readable and writable, as with select.
    """

    error = OSError

    @staticmethod
    def select(rlist, wlist, xlist, timeout=None):
        poller = select.poll()
        by_fd: dict[int, object] = {}
        masks: dict[int, int] = {}
        for items, mask in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
            for item in items:
                fd = item if isinstance(item, int) else item.fileno()
                if fd < 0:
                    raise ValueError("file descriptor cannot be a negative integer")
                by_fd[fd] = item
                masks[fd] = masks.get(fd, 0) | mask
        for fd, mask in masks.items():
            poller.register(fd, mask)
        ready = poller.poll(None if timeout is None else max(timeout, 0) * 1000)
        failed = select.POLLERR | select.POLLHUP | select.POLLNVAL
        readable, writable = [], []
        for fd, events in ready:
            if masks[fd] & select.POLLIN and events & (select.POLLIN | failed):
                readable.append(by_fd[fd])
            if masks[fd] & select.POLLOUT and events & (select.POLLOUT | failed):
                writable.append(by_fd[fd])
        return readable, writable, []


if hasattr(select, "poll"):  # not on Windows, where select has no such ceiling
    paho.select = _PollSelect  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Backoff:
    """When to try the broker again (pure: the random source is given).

    ``delay(0)``: the first attempt after losing an established connection, drawn over
    ``spread_s``; ``delay(n)``: the attempt after ``n`` failed ones, drawn over
    ``min(cap_s, base_s * 2**n)``. Without jitter: ``base_s``, then the doubling itself.
    """

    base_s: float = 1.0
    cap_s: float = 30.0
    spread_s: float = 15.0
    jitter: bool = True

    def window(self, attempt: int) -> float:
        if attempt <= 0:
            return self.spread_s if self.jitter else self.base_s
        return min(self.cap_s, self.base_s * 2 ** min(attempt, 32))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        window = self.window(attempt)
        if not self.jitter:
            return window
        return (rng or random).uniform(0, window)


# The paho methods the link's subclass replaces or calls (paho 2.x). Missing in some other
# version: paho's own keepalive handling and reconnect timing apply, and we say so.
_PAHO_METHODS = ("_check_keepalive", "_reconnect_wait", "_send_pingreq", "_sock_close",
                 "_do_on_disconnect")


class _Client(paho.Client):
    """paho's client with the link's dead-link watchdog and reconnect timing.

    Both replace one paho method each (``_check_keepalive``, ``_reconnect_wait``), which
    paho's loop thread calls; everything else is paho's."""

    link: MqttLink
    _heard_attr = "_last_bytes_received"  # when a byte last came (paho 2.0: _last_msg_in)

    def _check_keepalive(self) -> None:
        keepalive = self._keepalive
        if (keepalive == 0 or self._sock is None
                or self._state != paho._ConnectionState.MQTT_CS_CONNECTED):
            super()._check_keepalive()  # connecting: paho's CONNACK deadline (a keepalive)
            return
        now = paho.time_func()
        with self._msgtime_mutex:
            last_out = self._last_msg_out
            heard = getattr(self, self._heard_attr)
        silent = now - heard
        if silent >= keepalive:
            log.debug("nothing from the broker for %.1f s (keepalive %d s): dropping the "
                      "connection", silent, keepalive)
            self._sock_close()
            self._do_on_disconnect(packet_from_broker=False,
                                   v1_rc=paho.MQTTErrorCode.MQTT_ERR_KEEPALIVE)
            return
        pinged = self._ping_t
        if (silent >= keepalive / 2 or now - last_out >= keepalive) and (
                pinged == 0 or now - pinged >= keepalive / 2):
            try:
                self._send_pingreq()
            except Exception:  # as paho: a failed write is a lost link
                self._sock_close()
                self._do_on_disconnect(packet_from_broker=False,
                                       v1_rc=paho.MQTTErrorCode.MQTT_ERR_CONN_LOST)
            else:
                with self._msgtime_mutex:
                    self._last_msg_out = now  # (paho also pretends it heard from the broker)

    def _reconnect_wait(self) -> None:
        delay = self.link._take_delay()
        deadline = paho.time_func() + delay
        while (remaining := deadline - paho.time_func()) > 0:
            if self._thread_terminate or self._state in (
                    paho._ConnectionState.MQTT_CS_DISCONNECTING,
                    paho._ConnectionState.MQTT_CS_DISCONNECTED):
                return
            time.sleep(min(remaining, 0.5))


def _paho_fits() -> bool:
    return (all(hasattr(paho.Client, name) for name in _PAHO_METHODS)
            and hasattr(paho, "_ConnectionState") and hasattr(paho, "time_func"))


_PAHO_FITS = _paho_fits()


class LinkError(RuntimeError):
    """The broker could not be reached or refused us; raised from paho's own error."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt://[user[:pass]@]host[:port]`` (or ``mqtts://``) with a clear error."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r}: no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r}: port is not a number 1-65535") from None
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def with_account(self, username: str, password: str | None) -> BrokerAddress:
        return replace(self, username=username, password=password)

    def url(self) -> str:
        """The URL :meth:`parse` reads back, credentials included (for a secret's file or
        an environment variable, never a log: ``str()`` is for those)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        account = ""
        if self.username is not None:
            account = quote(self.username, safe="")
            if self.password is not None:
                account += ":" + quote(self.password, safe="")
            account += "@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{account}{host}:{self.port}"

    def __str__(self) -> str:  # never shows the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class FailureLog:
    """Decides how loudly each failed connection attempt is logged (pure: no IO, no clock).

    :meth:`failed` returns the level and the text for one attempt: the first of a run of
    failures at WARNING, later ones at DEBUG except one WARNING summary per ``every_s``.
    :meth:`connected` ends the run and returns what to say about it (None if there was none).
    """

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.failures = 0
        self._first_at = 0.0
        self._warned_at = 0.0

    def failed(self, now: float, where: str, why: str, retry_in_s: float) -> tuple[int, str]:
        self.failures += 1
        # Tenths: a jittered wait is rarely a whole number of seconds.
        retry = f"retrying in {retry_in_s:.1f} s"
        if self.failures == 1:
            self._first_at = self._warned_at = now
            return logging.WARNING, f"cannot reach the broker {where}: {why}; {retry}"
        since = _duration(now - self._first_at)
        if now - self._warned_at >= self.every_s:
            self._warned_at = now
            return logging.WARNING, (
                f"still cannot reach the broker {where}: {self.failures} attempts failed "
                f"in {since} (last: {why}); {retry}"
            )
        return logging.DEBUG, (
            f"attempt {self.failures} to reach the broker {where} failed: {why}; {retry}"
        )

    def connected(self, now: float) -> str | None:
        failures, self.failures = self.failures, 0
        if not failures:
            return None
        return f"after {failures} failed attempt(s) in {_duration(now - self._first_at)}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _describe(exc: BaseException | None) -> str:
    """``ConnectionRefusedError: [Errno 111] Connection refused`` -> what a user reads."""
    if exc is None:
        return "unknown error"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({text})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port?)"
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    return text


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


@dataclass(frozen=True)
class Inbound:
    """A received message. With ``manual_ack`` the broker's copy is released only by
    :meth:`ack`, so a consumer that dies before storing a message gets it again."""

    topic: str
    payload: bytes
    retained: bool = False
    _ack: Callable[[], object] | None = None

    def ack(self) -> None:
        if self._ack is not None:
            self._ack()


MessageHandler = Callable[[Inbound], None]


class MqttLink:
    """One MQTT v5 session that keeps itself connected.

    ``on_connect`` runs in paho's thread after every successful (re)connection: subscribe and
    announce there. ``will_factory`` runs before every connection attempt.
    """

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        *,
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
        will_factory: Callable[[], Will] | None = None,
        keepalive: int = 15,
        max_backoff: int = 30,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        session_expiry_s: int | None = None,
        on_published: Callable[[int, bool], None] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """``receive_maximum`` caps unacknowledged QoS>0 messages the broker sends us (flow
        control: a consumer with a bounded queue never blocks paho's thread).
        ``session_expiry_s`` keeps our session, subscriptions and unacknowledged messages on
        the broker across a disconnect or restart of this process (needs a stable id).
        ``backoff``: when to try again (default: full jitter, the first attempt after a
        loss spread over one keepalive, the later ones doubling up to ``max_backoff``)."""
        self.broker = broker
        self.client_id = client_id
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._will_factory = will_factory
        self._keepalive = keepalive
        self._state = _State.UNOPENED
        self._dropped = False  # drop() until resume(): offline on purpose
        self._connected = threading.Event()
        self._manual_ack = manual_ack
        self._receive_maximum = receive_maximum
        self._session_expiry_s = session_expiry_s
        # Bumped on every connection: a PUBACK for a message from an earlier connection
        # would acknowledge whatever reuses its packet id now, so it is dropped instead.
        self._connection_generation = 0
        self._min_backoff, self._max_backoff = 1, max_backoff
        self.backoff = backoff or Backoff(cap_s=max_backoff, spread_s=max(1, keepalive))
        self._retries = 0  # failed attempts since the last connection
        self._planned: float | None = None  # the wait before the next attempt, once drawn
        self._failures = FailureLog()
        client_class = _Client if _PAHO_FITS else paho.Client
        if not _PAHO_FITS:
            log.warning("paho-mqtt %s: the link's keepalive watchdog and reconnect jitter are "
                        "off (paho's internals differ)", getattr(paho, "__version__", "?"))
        self._client = client_class(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        if isinstance(self._client, _Client):
            self._client.link = self
            if not hasattr(self._client, _Client._heard_attr):
                self._client._heard_attr = "_last_msg_in"
        self._client.reconnect_delay_set(min_delay=1, max_delay=max_backoff)
        # 0 = unbounded: paho holds QoS 1 publishes made while offline until reconnect.
        self._client.max_queued_messages_set(0)
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self._client.tls_set()
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_connect_fail = self._handle_connect_fail
        self._client.on_message = self._handle_message
        self._on_published = on_published
        if on_published is not None:
            self._client.on_publish = self._handle_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Begin connecting in the background; returns at once, even if the broker is down."""
        if self._state is not _State.UNOPENED:
            raise RuntimeError(f"cannot start a link that is {self._state.value}")
        self._state = _State.OPENED
        self._arm_will()
        self._connect_async()

    def _connect_async(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        if self._receive_maximum is not None:
            properties.ReceiveMaximum = self._receive_maximum
        if self._session_expiry_s is not None:
            properties.SessionExpiryInterval = self._session_expiry_s
        try:
            self._client.connect_async(
                self.broker.host,
                self.broker.port,
                keepalive=self._keepalive,
                clean_start=self._session_expiry_s is None,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            raise LinkError(f"cannot connect to {self.broker}: {exc}") from exc
        self._client.loop_start()

    def drop(self, timeout: float = 5.0) -> None:
        """Leave the broker as a lost network would look to everyone else: the broker
        publishes this connection's Last Will (MQTT v5 DISCONNECT reason 0x04), and nothing
        reconnects until :meth:`resume`. Publishes meanwhile are queued, as while offline.
        The device simulator's "go offline" and "crash"."""
        if self._state is not _State.OPENED or self._dropped:
            return
        self._dropped = True
        if self._connected.is_set():
            self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
            deadline = time.monotonic() + timeout
            while self._connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._client.loop_stop()
        self._connected.clear()

    def resume(self) -> None:
        """Connect again after :meth:`drop` (with a fresh Last Will, as after any loss)."""
        if self._state is not _State.OPENED or not self._dropped:
            return
        self._dropped = False
        self._retries, self._planned = 0, None
        self._connect_async()

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        if self._state is not _State.OPENED:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        if not self._dropped:
            self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> paho.MQTTMessageInfo:
        if self._state is not _State.OPENED:
            raise RuntimeError(f"cannot publish on a link that is {self._state.value}")
        properties = None
        if expiry_s is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = expiry_s
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._client.subscribe(topic, qos=qos)

    def unsubscribe(self, topic: str) -> None:
        self._client.unsubscribe(topic)

    def _arm_will(self) -> None:
        if self._will_factory is None:
            return
        will = self._will_factory()
        self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _next_retry_s(self) -> float:
        """The wait before the next attempt after a failed one, drawn now (so the log can
        say when), or already drawn for this failure."""
        if self._planned is None:
            self._retries += 1
            self._planned = self.backoff.delay(self._retries)
        return self._planned

    def _take_delay(self) -> float:
        """paho's thread, before an attempt: the wait drawn for it (and forget it)."""
        delay = self._planned if self._planned is not None else self._next_retry_s()
        self._planned = None
        return delay

    def _log_failure(self, why: str) -> None:
        retry_s = self._next_retry_s()
        level, text = self._failures.failed(time.monotonic(), str(self.broker), why, retry_s)
        at = time.strftime("%H:%M:%S", time.localtime(time.time() + retry_s))
        log.log(level, "%s (at %s)", text, at)

    def _handle_connect_fail(self, client, userdata) -> None:
        """paho's thread, inside its ``except OSError``: the exception is the current one."""
        self._log_failure(_describe(sys.exc_info()[1]))

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._log_failure(f"the broker refused the connection: {reason_code}")
            return
        after = self._failures.connected(time.monotonic())
        log.info("connected to %s%s", self.broker, f" {after}" if after else "")
        self._retries, self._planned = 0, None
        self._connection_generation += 1
        self._connected.set()
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect handler failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._state is _State.OPENED:
            if was_connected and not self._dropped:
                self._retries, self._planned = 0, self.backoff.delay(0)
                log.warning("lost the broker %s (%s); reconnecting in %.1f s", self.broker,
                            reason_code, self._planned)
            elif not was_connected and not self._dropped and self._planned is None:
                # An attempt that got no CONNACK (or a refusal, already logged above).
                self._log_failure(f"no answer to the connection ({reason_code})")
            # The next attempt announces a new connection with its own Last Will.
            self._arm_will()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """QoS 1: the broker's PUBACK. A failure code (e.g. not authorised) is final."""
        assert self._on_published is not None
        try:
            self._on_published(mid, not reason_code.is_failure)
        except Exception:
            log.exception("on_published handler failed")

    def _ack_for(self, mid: int, qos: int) -> Callable[[], None]:
        generation = self._connection_generation

        def ack() -> None:
            if generation == self._connection_generation and self._connected.is_set():
                self._client.ack(mid, qos)
            # else: the broker redelivers it on the new connection; we must not PUBACK a
            # packet id that now belongs to another message.

        return ack

    def _handle_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        ack = None
        if self._manual_ack and message.qos > 0:
            ack = self._ack_for(message.mid, message.qos)
        try:
            self._on_message_cb(Inbound(message.topic, message.payload, message.retain, ack))
        except Exception:
            log.exception("handler failed for a message on %s", message.topic)


def try_connect(broker: BrokerAddress, client_id: str, timeout: float) -> str:
    """Connect once, disconnect at once; the broker's CONNACK reason ("Success", "Bad user
    name or password", "Not authorized", ...). LinkError when no CONNACK comes (nothing
    listens, no answer within ``timeout``). For ``edge-agent doctor``: with a device's own
    client id this takes over the device's session, so never while its agent runs."""
    answer: list[ReasonCode] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.connect_timeout = timeout
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set()
    client.on_connect = lambda c, u, f, reason_code, p: answer.append(reason_code)
    deadline = time.monotonic() + timeout
    try:
        client.connect(broker.host, broker.port, keepalive=max(5, int(timeout)))
        while not answer and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS and not answer:
                raise LinkError(f"{broker} closed the connection before answering")
    except (OSError, ValueError) as exc:
        raise LinkError(f"cannot reach {broker}: {_describe(exc)}") from exc
    finally:
        if answer and not answer[0].is_failure:
            client.disconnect()
            client.loop(timeout=0.1)  # sends the DISCONNECT: no "connection lost" logged
        sock = client.socket()
        if sock is not None:
            sock.close()
    if not answer:
        raise LinkError(f"{broker} sent no CONNACK within {timeout:.0f} s")
    return str(answer[0])

