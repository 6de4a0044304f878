"""Control as one process or as several replicas on one PostgreSQL database.

The hub talks to a :class:`Cluster`: it publishes every change its clients were told
of, reports its clients connecting and leaving, and asks whether a client is online
at another replica.  :class:`SingleControl` (SQLite, the default) does nothing: one
process sees everything itself.  ``control.cluster.postgres.PostgresCluster`` passes
changes between replicas with LISTEN/NOTIFY, keeps presence in the database and runs
the once-only jobs under a lease (see its module docstring).
"""

from __future__ import annotations

from typing import Protocol

from control.cluster.changes import Change

#: default seconds without a heartbeat before a replica counts as dead
#: (``--replica-timeout``)
DEFAULT_TIMEOUT = 10.0


class ChangeSink(Protocol):
    """What a cluster drives in the hub (``control.ws.hub.Hub`` implements it)."""

    async def apply_change(self, change: Change) -> None:
        """Another replica committed ``change``: tell this replica's clients."""

    async def resync(self) -> None:
        """Changes may have been missed: send every client a full config."""

    def remote_presence(self, kind: str, client_id: str, online: bool) -> None:
        """A client came online or went offline at another replica."""


class SingleControl:
    """One Control process: nothing to share."""

    #: this process's id among replicas ("" when alone)
    replica_id = ""
    #: True while this replica holds the lease for once-only jobs (always, alone)
    holds_jobs = True

    async def start(self, sink: ChangeSink) -> None:
        return None

    def publish(self, change: Change) -> None:
        return None

    def connected(self, kind: str, client_id: str) -> None:
        return None

    def disconnected(self, kind: str, client_id: str) -> None:
        return None

    def remote_online(self, kind: str, client_id: str) -> bool:
        return False

    async def close(self) -> None:
        return None


class Cluster(Protocol):
    """The hub's view of the other replicas (see the module docstring)."""

    replica_id: str
    holds_jobs: bool

    async def start(self, sink: ChangeSink) -> None: ...

    def publish(self, change: Change) -> None: ...

    def connected(self, kind: str, client_id: str) -> None: ...

    def disconnected(self, kind: str, client_id: str) -> None: ...

    def remote_online(self, kind: str, client_id: str) -> bool: ...

    async def close(self) -> None: ...
