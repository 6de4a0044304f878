"""What one Control replica tells the others after a change it committed.

Every replica serves its own WebSocket clients.  When a replica commits a change its
clients must hear of (a tunnel created, a gateway's key changed, a certificate
stored), it pushes to its own clients as a single Control does, and publishes a
:class:`Change` so that every other replica builds the same push for its clients
from the database (the change names what to re-read; it never carries a client's
view, so every replica's clients get views built from the committed rows).

Changes travel in batches (:class:`Batch`) as PostgreSQL ``NOTIFY`` payloads (at most
8,000 bytes): the publishing replica's id, its batch number (a gap means batches were
lost: the receiver re-syncs every client) and the changes in commit order.  Parsing
is strict and bounded: anything else is :class:`BadChange`, never a crash.

The same feed carries the shared-ACME coordination between replicas (``acme``
changes holding an :class:`AcmeNote`; ``control/acme_cluster.py`` says what they mean):
they are not database changes, so the hub never sees them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from common import protocol as p

WHATS = ("config", "tunnel", "disconnect", "presence", "resync", "acme")
What = Literal["config", "tunnel", "disconnect", "presence", "resync", "acme"]
KINDS = ("agent", "gateway")
TUNNEL_EVENTS = ("tunnel_create", "tunnel_update", "tunnel_delete")
#: a config push to more clients than this is sent as "every client of the kind"
MAX_IDS = 32
#: PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more
MAX_PAYLOAD = 7900
MAX_ID = 64
MAX_REASON = 120
ACME_OPS = ("set", "end", "reset", "sync", "ack", "ready", "failing")
AcmeOp = Literal["set", "end", "reset", "sync", "ack", "ready", "failing"]
#: a failed order's error as the notes carry it (as ``GET /api/acme`` shows it)
MAX_NOTE_ERROR = 300
#: HTTP-01 responses in one ``set`` note: a token and its key authorisation take at
#: most 386 bytes, so eight keep a note far below :data:`MAX_PAYLOAD`
MAX_NOTE_TOKENS = 8
#: DNS zones in one ``ready`` note (at most 253 bytes each: sixteen keep it far below
#: :data:`MAX_PAYLOAD`); a gateway with more is announced with its first sixteen
MAX_NOTE_ZONES = 16


class BadChange(ValueError):
    """A payload that is not a batch of changes."""


@dataclass(frozen=True)
class AcmeNote:
    """One replica's word to the others about shared ACME (``control/acme_cluster.py``).

    * ``set``: the origin's lease ``lease`` now stands so (announcement number ``n``):
      ``domain`` ordered by its gateway ``gateway`` until ``expires`` (both None for
      Control's own order), ``tokens`` the HTTP-01 responses it needs served;
    * ``end``: that lease ended (its tokens are withdrawn);
    * ``reset``: forget every lease of the origin (the ``set`` notes that follow are
      all of them);
    * ``sync``: every replica, please ``reset`` and ``set`` all your leases again;
    * ``ack``: this replica's gateways serve every response replica ``to`` announced
      up to its number ``n``;
    * ``ready``: the origin's gateway ``gateway`` (its id) orders certificates with
      ``challenges`` (``dns-01`` under ``zones``); no challenges: it no longer does
      (it left);
    * ``failing``: the origin's order of ``domain`` failed with ``error`` and backs off
      until ``expires``; no error: it no longer does (ordered since, or not wanted).
    A ``reset`` forgets the origin's gateways and failures too.
    """

    op: AcmeOp
    n: int = 0
    lease: str | None = None
    domain: str | None = None
    gateway: str | None = None
    expires: float | None = None
    to: str | None = None
    tokens: tuple[tuple[str, str], ...] = ()
    challenges: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        for key, value in (
            ("n", self.n or None),
            ("l", self.lease),
            ("d", self.domain),
            ("g", self.gateway),
            ("e", self.expires),
            ("to", self.to),
            ("er", self.error),
        ):
            if value is not None:
                out[key] = value
        if self.tokens:
            out["tk"] = [list(pair) for pair in self.tokens]
        if self.challenges:
            out["c"] = list(self.challenges)
        if self.zones:
            out["z"] = list(self.zones)
        return out


def parse_acme_note(data: object) -> AcmeNote:
    if not isinstance(data, dict):
        raise BadChange("an acme note is an object")
    op = _text(data, "op", 8, ACME_OPS)
    if op is None:
        raise BadChange("an acme note needs 'op'")
    n = data.get("n", 0)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 2**62:
        raise BadChange("'n' must be a non-negative integer")
    expires = data.get("e")
    if expires is not None and (
        not isinstance(expires, int | float) or isinstance(expires, bool) or expires < 0
    ):
        raise BadChange("'e' must be a time")
    pairs = data.get("tk", [])
    if not isinstance(pairs, list) or len(pairs) > MAX_NOTE_TOKENS:
        raise BadChange(f"'tk' must be a list of at most {MAX_NOTE_TOKENS} responses")
    tokens = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise BadChange("'tk' holds [token, key authorisation] pairs")
        try:
            challenge = p.parse_acme_challenge(
                {"lease": "", "token": pair[0], "keyAuthorization": pair[1]}
            )
        except p.ProtocolError as exc:
            raise BadChange(f"bad HTTP-01 response: {exc}") from None
        tokens.append((challenge.token, challenge.key_authorization))
    zones = data.get("z", [])
    if not isinstance(zones, list) or len(zones) > MAX_NOTE_ZONES:
        raise BadChange(f"'z' must be a list of at most {MAX_NOTE_ZONES} DNS zones")
    try:
        ready = p.parse_acme_ready({"challenges": data.get("c", []), "dnsZones": zones})
    except p.ProtocolError as exc:
        raise BadChange(f"bad ACME capability: {exc}") from None
    note = AcmeNote(
        op,  # type: ignore[arg-type]
        n=n,
        lease=_text(data, "l", MAX_ID),
        domain=_text(data, "d", p.MAX_DOMAIN),
        gateway=_text(data, "g", p.MAX_NAME),
        expires=None if expires is None else float(expires),
        to=_text(data, "to", MAX_ID),
        tokens=tuple(tokens),
        challenges=ready.challenges,
        zones=ready.dns_zones,
        error=_text(data, "er", MAX_NOTE_ERROR),
    )
    need = {
        "set": ("lease", "n"),
        "end": ("lease", "n"),
        "reset": ("n",),
        "ack": ("to", "n"),
        "ready": ("gateway",),
        "failing": ("domain",),
    }
    for name in need.get(note.op, ()):
        if not getattr(note, name):
            raise BadChange(f"an acme {note.op!r} note needs {name}")
    return note


class AcmeListener(Protocol):
    """What the change feed tells the ACME coordinator (``control/acme_cluster.py``)."""

    def acme_note(self, origin: str, note: AcmeNote) -> None:
        """Replica ``origin`` sent ``note``."""

    def acme_resync(self) -> None:
        """Notes may have been lost (a gap, a feed re-opened): ask for them again."""

    def replicas_alive(self, replica_ids: set[str]) -> None:
        """These replicas (this one included) are alive now; the others are dead."""


@dataclass(frozen=True)
class Change:
    """One committed change, as another replica must pass it on.

    * ``config``: push a fresh full config to ``kind``'s clients (``ids``: only those;
      None: all of them);
    * ``tunnel``: ``event`` happened to ``tunnel_id`` (``agent_id``: its owner; for a
      delete, the owner it had): gateways get the tunnel as it is now, and the agents
      ``ids`` (those that served it before or after; None: every agent) a full config;
    * ``disconnect``: close ``kind`` client ``ids[0]`` with ``code`` and ``reason``;
    * ``presence``: clients connected or left somewhere (re-read who is online);
    * ``resync``: something may have been missed; push full configs to everybody;
    * ``acme``: shared-ACME coordination (``acme``), not a database change.
    """

    what: What
    kind: str | None = None
    ids: tuple[str, ...] | None = None
    event: str | None = None
    tunnel_id: str | None = None
    agent_id: str | None = None
    code: int | None = None
    reason: str | None = None
    acme: AcmeNote | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"w": self.what}
        if self.acme is not None:
            out["x"] = self.acme.to_wire()
        for key, value in (
            ("k", self.kind),
            ("i", None if self.ids is None else list(self.ids)),
            ("e", self.event),
            ("t", self.tunnel_id),
            ("a", self.agent_id),
            ("c", self.code),
            ("r", self.reason),
        ):
            if value is not None:
                out[key] = value
        return out


def config_change(kind: str, ids: list[str] | None) -> Change:
    """A config push, its ids dropped (everybody of the kind) past :data:`MAX_IDS`."""
    if ids is not None and len(ids) > MAX_IDS:
        ids = None
    return Change("config", kind=kind, ids=None if ids is None else tuple(ids))


def tunnel_change(event: str, tunnel_id: str, agent_id: str, agent_ids: list[str]) -> Change:
    """A tunnel event; the agents concerned dropped (every agent) past :data:`MAX_IDS`."""
    unique = list(dict.fromkeys(agent_ids))
    ids = None if len(unique) > MAX_IDS else tuple(unique)
    return Change("tunnel", event=event, tunnel_id=tunnel_id, agent_id=agent_id, ids=ids)


def _text(data: dict[str, Any], key: str, limit: int, allowed: tuple[str, ...] = ()) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise BadChange(f"{key!r} must be a string of 1..{limit} characters")
    if allowed and value not in allowed:
        raise BadChange(f"{key!r} must be one of {', '.join(allowed)}")
    return value


def parse_change(data: object) -> Change:
    if not isinstance(data, dict):
        raise BadChange("a change is an object")
    what = _text(data, "w", 16, WHATS)
    if what is None:
        raise BadChange("a change needs 'w'")
    ids_value = data.get("i")
    ids = None
    if ids_value is not None:
        if not isinstance(ids_value, list) or len(ids_value) > MAX_IDS:
            raise BadChange(f"'i' must be a list of at most {MAX_IDS} ids")
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID for i in ids_value):
            raise BadChange("'i' holds ids of 1..64 characters")
        ids = tuple(ids_value)
    code = data.get("c")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
        raise BadChange("'c' must be an integer")
    if code is not None and not 1000 <= code <= 4999:
        raise BadChange("'c' must be a WebSocket close code")
    change = Change(
        what,  # type: ignore[arg-type]
        kind=_text(data, "k", 8, KINDS),
        ids=ids,
        event=_text(data, "e", 16, TUNNEL_EVENTS),
        tunnel_id=_text(data, "t", MAX_ID),
        agent_id=_text(data, "a", MAX_ID),
        code=code,
        reason=_text(data, "r", MAX_REASON),
        acme=None if data.get("x") is None else parse_acme_note(data["x"]),
    )
    _check_complete(change)
    return change


def _check_complete(change: Change) -> None:
    need: dict[str, tuple[str, ...]] = {
        "config": ("kind",),
        "tunnel": ("event", "tunnel_id", "agent_id"),
        "disconnect": ("kind", "ids", "code"),
        "acme": ("acme",),
    }
    for name in need.get(change.what, ()):
        if getattr(change, name) is None:
            raise BadChange(f"a {change.what!r} change needs {name}")


@dataclass(frozen=True)
class Batch:
    """Changes from one replica, in the order it committed them."""

    origin: str
    seq: int
    changes: tuple[Change, ...]

    def encode(self) -> str:
        return json.dumps(
            {"o": self.origin, "s": self.seq, "c": [c.to_wire() for c in self.changes]},
            separators=(",", ":"),
        )


def parse_batch(payload: str) -> Batch:
    if len(payload) > MAX_PAYLOAD * 2:
        raise BadChange("payload too large")
    try:
        data = json.loads(payload)
    except ValueError:
        raise BadChange("payload is not JSON") from None
    if not isinstance(data, dict):
        raise BadChange("a batch is an object")
    origin, seq, changes = data.get("o"), data.get("s"), data.get("c")
    if not isinstance(origin, str) or not 0 < len(origin) <= MAX_ID:
        raise BadChange("'o' must be a replica id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise BadChange("'s' must be a positive integer")
    if not isinstance(changes, list) or not changes or len(changes) > 1000:
        raise BadChange("'c' must be a non-empty list of changes")
    return Batch(origin, seq, tuple(parse_change(c) for c in changes))


def pack(origin: str, first_seq: int, changes: list[Change]) -> list[Batch]:
    """Split ``changes`` into batches whose payloads fit one ``NOTIFY``."""
    batches: list[Batch] = []
    current: list[Change] = []
    size = 0
    for change in changes:
        length = len(json.dumps(change.to_wire(), separators=(",", ":"))) + 1
        if current and size + length > MAX_PAYLOAD - 100:
            batches.append(Batch(origin, first_seq + len(batches), tuple(current)))
            current, size = [], 0
        current.append(change)
        size += length
    if current:
        batches.append(Batch(origin, first_seq + len(batches), tuple(current)))
    return batches
