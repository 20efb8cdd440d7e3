"""The audit log: every operator action and automatic decision, append-only and
hash-chained.

Invariant: entry ``n`` (``seq`` 1, 2, 3, ... without gaps) stores ``prev_hash`` = the hash
of entry ``n - 1`` (``GENESIS`` for the first) and ``hash`` = SHA-256 of the canonical
encoding of its own fields (seq, time, actor, action, subject, reason, details) and that
``prev_hash``; the one-row ``audit_head`` names the newest entry's seq and hash. Editing
an entry breaks its hash, removing one leaves a gap and a broken link, moving one breaks
the links around it, removing the newest ones disagrees with the head. :func:`verify`
finds and names each; it reads only the entries, never trusts the database's triggers
(whoever can edit rows can drop those too).

Why the head row: appenders take its row lock (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite has one writer at a time and the head upsert is a write), so two fleet workers
never give out the same seq or chain onto the same parent. :func:`record` adds the entry
to the caller's transaction and does not commit: the change and its record commit
together, or neither does. Lock order: the chain's head first, then any other rows
(:func:`lock_chain` for callers that record only after locking rows).

What it does not do: a writer with database access who rewrites every entry from some
point on and the head with them produces a valid chain. Keep the head hash that
``edge-fleet audit verify`` prints somewhere else, and compare (``--expect``).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from agent.contract import utcnow
from fleet.db import dialect_insert
from fleet.models import ApiToken, AuditEntry, AuditHead

__all__ = [
    "GENESIS",
    "AuditProblem",
    "AuditReport",
    "cli_actor",
    "entry_hash",
    "list_entries",
    "lock_chain",
    "record",
    "token_actor",
    "verify",
]

GENESIS = "0" * 64  # the prev_hash of entry 1

MAX_DETAILS_BYTES = 16 * 1024
MAX_DETAILS_DEPTH = 6
_HEAD_ID = 1
_FIELD_LIMITS = {"actor": 200, "action": 64, "subject": 256, "reason": 1000}


def token_actor(token: ApiToken) -> str:
    """``token:<id>:<name>``: the API caller, by the token it authenticated with."""
    return f"token:{token.id}:{token.name}"[:_FIELD_LIMITS["actor"]]


def cli_actor() -> str:
    """``cli:<os user>``: a local command working on the database directly."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}"[:_FIELD_LIMITS["actor"]]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _bounded_details(details: dict[str, Any]) -> dict[str, Any]:
    """The details as they will read back from the database (JSON round trip: tuples
    become lists), refused if not JSON, non-finite, too deep or too large. Callers are
    the fleet's own code: a refusal is a defect, raised as ValueError."""
    try:
        encoded = _canonical(details)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit details are not finite JSON: {exc}") from exc
    if len(encoded) > MAX_DETAILS_BYTES:
        raise ValueError(f"audit details take {len(encoded)} bytes (at most "
                         f"{MAX_DETAILS_BYTES})")
    plain = json.loads(encoded)
    if _depth(plain) > MAX_DETAILS_DEPTH:
        raise ValueError(f"audit details nest deeper than {MAX_DETAILS_DEPTH}")
    return plain


def _time_text(at: datetime) -> str:
    if at.tzinfo is None:  # SQLite gives stored times back naive (they are UTC)
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def entry_hash(*, seq: int, at: datetime, actor: str, action: str, subject: str, reason: str,
               details: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over the canonical JSON of the entry's fields and the previous hash."""
    return hashlib.sha256(_canonical({
        "seq": seq, "at": _time_text(at), "actor": actor, "action": action,
        "subject": subject, "reason": reason, "details": details, "prev_hash": prev_hash,
    })).hexdigest()


def _locked_head(session: Session) -> AuditHead:
    """The head row, created if missing, locked for this transaction. The upsert is a
    write, so on SQLite it takes the database's write lock before the head is read."""
    session.execute(
        dialect_insert(session)(AuditHead)
        .values(id=_HEAD_ID, seq=0, hash=GENESIS)
        .on_conflict_do_nothing()
    )
    head = session.exec(
        select(AuditHead).where(AuditHead.id == _HEAD_ID)
        .with_for_update().execution_options(populate_existing=True)
    ).one()
    return head


def lock_chain(session: Session) -> None:
    """Take the chain's lock now, before other row locks, when the entry is recorded after
    them: everyone takes the chain first, then rows (a removal records, then deletes), so
    two transactions never wait on each other in opposite orders."""
    _locked_head(session)


def record(
    session: Session,
    actor: str,
    action: str,
    subject: str,
    reason: str,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry to the session's transaction (flushed, not committed): commit it
    with the change it records. Appends are serialised by the head row's lock, held until
    the caller's transaction ends, so keep that transaction short."""
    fields = {"actor": actor, "action": action, "subject": subject, "reason": reason}
    for name, value in fields.items():
        if len(value) > _FIELD_LIMITS[name]:
            fields[name] = value[:_FIELD_LIMITS[name] - 1] + "…"
    plain = _bounded_details(details or {})
    head = _locked_head(session)
    at = utcnow()
    seq = head.seq + 1
    digest = entry_hash(seq=seq, at=at, details=plain, prev_hash=head.hash, **fields)
    entry = AuditEntry(seq=seq, at=at, details=plain, prev_hash=head.hash, hash=digest,
                       **fields)
    session.add(entry)
    session.execute(
        update(AuditHead).where(col(AuditHead.id) == _HEAD_ID).values(seq=seq, hash=digest)
    )
    session.flush()
    return entry


def _under(column: Any, value: str, separator: str) -> Any:
    """The value itself or anything below it: ``token:3`` matches ``token:3:alice``."""
    return or_(column == value, column.startswith(value + separator, autoescape=True))


def _utc(value: datetime | None) -> datetime | None:
    """In UTC (SQLite compares stored times as text); naive means UTC. A bound beyond
    what UTC can express is no bound (year 1) or the end of time (year 9999)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return None if value.year < 2 else datetime.max.replace(tzinfo=UTC)


def list_entries(
    session: Session,
    *,
    action: str | None = None,
    actor: str | None = None,
    subject: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """The newest ``limit`` entries that match every filter given, oldest first."""
    query = select(AuditEntry)
    if action:
        query = query.where(_under(col(AuditEntry.action), action, "."))
    if actor:
        query = query.where(_under(col(AuditEntry.actor), actor, ":"))
    if subject:
        query = query.where(_under(col(AuditEntry.subject), subject, ":"))
    since = _utc(since)
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    newest = session.exec(query.order_by(col(AuditEntry.seq).desc()).limit(limit))
    return list(reversed(list(newest)))


@dataclass(frozen=True)
class AuditProblem:
    """One thing wrong with the chain. ``problem`` is a stable code: ``edited`` (content
    does not match its hash), ``missing`` (seq numbers absent), ``broken_link`` (prev_hash
    is not the previous entry's hash), ``reordered`` (it links to another entry than the
    one before it), ``head`` (the head row disagrees with the newest entry), ``anchor``
    (the entry differs from the hash the operator kept)."""

    seq: int | None
    problem: str
    detail: str

    def __str__(self) -> str:
        where = "head" if self.seq is None else f"entry {self.seq}"
        return f"{where}: {self.problem}: {self.detail}"


@dataclass(frozen=True)
class AuditReport:
    entries: int
    head_seq: int
    head_hash: str
    problems: list[AuditProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


def _walk(session: Session, batch: int = 1000) -> Iterator[AuditEntry]:
    """Every entry in seq order, a batch at a time (bounded memory)."""
    after = 0
    while True:
        rows = list(session.exec(
            select(AuditEntry).where(col(AuditEntry.seq) > after)
            .order_by(col(AuditEntry.seq)).limit(batch)
        ))
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1].seq
        session.expunge_all()


def _owner_of(session: Session, digest: str) -> int | None:
    return session.exec(
        select(AuditEntry.seq).where(AuditEntry.hash == digest).limit(1)
    ).first()


def verify(session: Session, expect: tuple[int, str] | None = None) -> AuditReport:
    """Walk the chain from entry 1 and name every problem (see :class:`AuditProblem`).
    ``expect`` is an anchor kept outside the database: (seq, hash) an earlier
    verification printed; a chain rewritten from that entry on differs there."""
    problems: list[AuditProblem] = []
    anchor_seen = False
    count = 0
    last_seq, last_hash = 0, GENESIS
    for entry in _walk(session):
        count += 1
        if entry.seq != last_seq + 1:
            first, end = last_seq + 1, entry.seq - 1
            gap = f"entry {first}" if first == end else f"entries {first} to {end}"
            problems.append(AuditProblem(first, "missing", f"{gap} removed (the log goes from "
                                         f"{last_seq or 'its start'} to {entry.seq})"))
        if entry.prev_hash != last_hash:
            owner = _owner_of(session, entry.prev_hash)
            if owner is not None and owner != last_seq:
                problems.append(AuditProblem(
                    entry.seq, "reordered",
                    f"it links to entry {owner}, not to entry {last_seq} before it"))
            elif entry.seq == last_seq + 1:
                problems.append(AuditProblem(
                    entry.seq, "broken_link",
                    f"prev_hash {entry.prev_hash[:12]}… is not the hash of entry "
                    f"{last_seq or '(genesis)'} ({last_hash[:12]}…)"))
        expected = entry_hash(
            seq=entry.seq, at=entry.at, actor=entry.actor, action=entry.action,
            subject=entry.subject, reason=entry.reason, details=entry.details,
            prev_hash=entry.prev_hash,
        )
        if expected != entry.hash:
            problems.append(AuditProblem(
                entry.seq, "edited",
                "its content does not match its hash (a field was changed, or the entry "
                "was moved here from another position)"))
        if expect is not None and entry.seq == expect[0]:
            anchor_seen = True
            if not entry.hash.startswith(expect[1].lower()) or len(expect[1]) < 12:
                problems.append(AuditProblem(
                    entry.seq, "anchor", f"its hash {entry.hash[:12]}… is not the expected "
                    f"{expect[1][:12]}…: the chain was rewritten from here or before"))
        last_seq, last_hash = entry.seq, entry.hash
    if expect is not None and not anchor_seen:
        problems.append(AuditProblem(expect[0], "anchor", "the expected entry is not in the log"))
    head = session.get(AuditHead, _HEAD_ID)
    if head is None:
        if count:
            problems.append(AuditProblem(None, "head", "the chain's head row is missing"))
    elif head.seq > last_seq:
        first = last_seq + 1
        gap = f"entry {first}" if first == head.seq else f"entries {first} to {head.seq}"
        problems.append(AuditProblem(first, "missing", f"{gap} removed from the end (the "
                                     f"head names entry {head.seq})"))
    elif head.seq != last_seq or head.hash != last_hash:
        problems.append(AuditProblem(
            None, "head", f"the head names entry {head.seq} with hash {head.hash[:12]}…, "
            f"the newest entry is {last_seq} with hash {last_hash[:12]}…"))
    return AuditReport(entries=count, head_seq=last_seq, head_hash=last_hash,
                       problems=problems)
