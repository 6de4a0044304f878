"""Tunnels as code: ``kakuremichi apply -f kakuremichi.yaml`` and ``kakuremichi export``.

Theory of operation
-------------------
The file declares what Control should hold::

    version: 1
    agents:
      - name: laptop
      - nas
      - name: old-server
        enabled: false                   # refused by Control, peers with no gateway
    gateways:
      - name: edge-1
    tunnels:
      - domain: app.example.com          # protocol http (the default): keyed by domain
        agent: laptop
        target: 127.0.0.1:8080
        access:                          # the tunnel's access policy (see below)
          password: {env: APP_PIN}
          basic_auth:
            - {user: alice, password: {file: secrets/alice.txt}}
          oidc:
            issuer: https://idp.example.com
            client_id: kakuremichi
            client_secret: keep          # the one Control holds stays
            allowed_domains: [example.com]
          paths:
            - {prefix: /api/, action: bearer, bearer_token: {env: APP_API_TOKEN}}
            - {prefix: /health, action: bypass}
          ip_deny: [203.0.113.0/24]
      - domain: web.example.com
        replicas:                        # served by several agents
          - agent: laptop                # the first is the primary
          - {agent: nas, weight: 2}
          - {agent: old-server, role: standby}
        balance: least_connections       # default round_robin
        sticky: cookie                   # cookie (http) or client_ip; default none
        target: 127.0.0.1:8080
      - protocol: tcp                    # tcp/udp: keyed by protocol and public port
        public_port: 2222
        agent: laptop
        target: 127.0.0.1:22
        proxy_protocol: v2               # v1 (tcp) or v2; default none
        enabled: false
        access: {ip_allow: [192.0.2.0/24]}   # raw tunnels take IP rules only

Agents and gateways are named (``- laptop`` for short) and enabled unless the entry
says ``enabled: false`` (as ``kakuremichi admin agent disable``: Control refuses its
connection and no other client peers with it; its key stays valid, so ``enabled:
true`` brings it back).  Tunnels are known by what routes to them (an http tunnel by
its domain, a tcp/udp one by protocol and public port), so a changed target, agent,
replica set, ``enabled``, ``proxy_protocol``, ``balance``, ``sticky`` or access policy
is an update of the same tunnel.  Every entry is checked with the REST API's own
models (``control.api.models``, ``control.access``) before anything is sent, and an
error names the file, the line and the field.

Replicas
~~~~~~~~
A tunnel names either ``agent:`` (one agent) or ``replicas:`` (a list of ``{agent,
weight, role}``, weight 1-1000 default 1, role ``active`` or ``standby`` default
active; ``- nas`` for short), never both.  The first replica is the primary (the one
older gateways route to); the others are compared as a set.  One replica is the same
as ``agent:`` (Control keeps no weight or role for a tunnel with one agent, so such a
replica takes neither).  Draining is runtime state (``kakuremichi admin tunnel drain``)
and is not in the file: a replica that stays keeps draining.  ``export`` writes
``agent:`` for a tunnel with one agent and ``replicas:`` (Control's order: the primary,
then by name) for one with more.

Access policies
~~~~~~~~~~~~~~~
``access:`` is the tunnel's whole policy; its secrets are written as ``keep``,
``{env: NAME}``, ``{file: PATH}`` or the text and are never printed.  A tunnel entry
without ``access:`` leaves the tunnel's policy as it is (``--prune`` removes it), and a
secret Control already holds is not sent again unless ``--replace-secrets``.
``kakuremichi.apply_access`` reads, compares, sends and exports policies and has the
rules; ``kakuremichi.apply_yaml`` reads YAML nodes into errors that name their line.

Applying and exporting
~~~~~~~~~~~~~~~~~~~~~~
``apply`` reads Control's state through the REST API, computes a plan (what to create,
update and, with ``--prune``, delete: tunnels with their access policies first, then
agents and gateways no longer named), prints it and, unless ``--dry-run``, carries it
out in that order, printing each change as it is made; a second ``apply`` of the same
file changes nothing.  A new tunnel's access policy is set right after the tunnel is
created (its id comes from that response).  A created agent's or gateway's API key
and enrollment token are printed once; they are never written to the file or to
``export``.

``export`` writes Control's current agents, gateways and tunnels with their access
policies in the same format (sorted, defaults left out: ``enabled: false`` only where
disabled, ``balance``, ``sticky`` and ``proxy_protocol`` only where not the default),
every secret Control holds written as ``keep``, so ``apply -f`` of an export is a
no-op.  On an empty Control an export recreates everything but the secrets: replace
each ``keep`` with ``{env: …}`` or ``{file: …}`` first (``keep`` is an error where
Control holds nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from common.config import COMMON, ConfigError, Setting, add_settings, resolve
from common.controlclient import CONTROL_CA, plaintext_warning
from control.admin import ApiFailure, Client
from control.api.models import ClientCreate, TunnelCreate
from kakuremichi.apply_access import (
    DesiredAccess,
    SecretReader,
    access_change,
    access_entry,
    read_access,
)
from kakuremichi.apply_yaml import (
    FileError,
    Unreadable,
    fields,
    fields_or_name,
    mapping,
    scalar,
    sequence,
    show,
    validation_error,
    where,
)

VERSION = 1
SETTINGS: tuple[Setting, ...] = (
    Setting("control-url", "Control's base URL", "http://127.0.0.1:7700", metavar="URL"),
    Setting("admin-token", "admin bearer token", None, secret=True, metavar="TOKEN"),
    CONTROL_CA,
    *COMMON,
)
TOP_LEVEL = ("version", "agents", "gateways", "tunnels")
CLIENT_FIELDS = ("name", "enabled")
TUNNEL_FIELDS = (
    "protocol",
    "domain",
    "public_port",
    "publicPort",
    "agent",
    "replicas",
    "target",
    "enabled",
    "proxy_protocol",
    "balance",
    "sticky",
    "access",
)
NESTED_TUNNEL_FIELDS = ("replicas", "access")
REPLICA_FIELDS = ("agent", "weight", "role")

#: (agent name, weight, role)
Replica = tuple[str, int, str]


@dataclass(frozen=True)
class DesiredTunnel:
    """One tunnel as the file declares it (normalised by the API's model)."""

    protocol: str
    domain: str | None
    public_port: int | None
    #: the primary agent (the first replica)
    agent: str
    target: str
    enabled: bool
    line: int = 0
    #: its agents when more than one, the primary first (empty: ``agent`` alone)
    replicas: tuple[Replica, ...] = ()
    proxy_protocol: str | None = None
    balance: str = "round_robin"
    sticky: str | None = None
    access: DesiredAccess | None = None

    @property
    def key(self) -> str:
        return tunnel_key(self.protocol, self.domain, self.public_port)

    @property
    def agents(self) -> tuple[Replica, ...]:
        return self.replicas or ((self.agent, 1, "active"),)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"protocol": self.protocol, "agent": self.agent}
        if len(self.agents) > 1:
            body["replicas"] = _replicas_body(self.agents)
        if self.domain is not None:
            body["domain"] = self.domain
        if self.public_port is not None:
            body["publicPort"] = self.public_port
        body["target"] = self.target
        body["enabled"] = self.enabled
        if self.proxy_protocol is not None:
            body["proxyProtocol"] = self.proxy_protocol
        if self.balance != "round_robin":
            body["balance"] = self.balance
        if self.sticky is not None:
            body["sticky"] = self.sticky
        return body


def _replicas_body(replicas: tuple[Replica, ...]) -> list[dict[str, Any]]:
    return [{"agent": name, "weight": weight, "role": role} for name, weight, role in replicas]


def tunnel_key(protocol: str, domain: str | None, public_port: int | None) -> str:
    return f"http {domain}" if protocol == "http" else f"{protocol} {public_port}"


@dataclass
class Desired:
    """Everything a file declares."""

    #: name → enabled
    agents: dict[str, bool] = field(default_factory=dict)
    gateways: dict[str, bool] = field(default_factory=dict)
    tunnels: dict[str, DesiredTunnel] = field(default_factory=dict)


# -- reading the file ---------------------------------------------------------------------


def _tunnel(path: str, item: yaml.Node, what: str, secrets: SecretReader) -> DesiredTunnel:
    values, nodes = fields(path, item, what, TUNNEL_FIELDS, NESTED_TUNNEL_FIELDS)
    places: dict[tuple[Any, ...], yaml.Node] = {
        ("public_port" if k == "publicPort" else k,): n for k, n in nodes.items()
    }
    if "agent" in nodes and "replicas" in nodes:
        raise FileError(
            f"{where(path, nodes['replicas'])}: {what}.replicas: give agent (one agent) or "
            "replicas, not both"
        )
    if "replicas" in nodes:
        replicas: list[dict[str, Any]] = []
        for i, node in enumerate(sequence(path, nodes["replicas"], f"{what}.replicas")):
            at = f"{what}.replicas[{i}]"
            replica, field_nodes = fields_or_name(path, node, at, REPLICA_FIELDS, "agent")
            places[("replicas", i)] = node
            places.update({("replicas", i, k): n for k, n in field_nodes.items()})
            replicas.append(replica)
        values["replicas"] = replicas
    try:
        model = TunnelCreate.model_validate(values)
    except ValidationError as exc:
        raise validation_error(path, item, places, what, exc) from None
    agents: tuple[Replica, ...] = ()
    if model.replicas:
        agents = tuple((r.agent, r.weight, r.role) for r in model.replicas)
        if len(agents) == 1:
            if agents[0][1:] != (1, "active"):
                raise FileError(
                    f"{where(path, nodes['replicas'])}: {what}.replicas: one agent takes all "
                    "the traffic (weight and role are for two or more; write agent: NAME)"
                )
            agents = ()
        primary = model.replicas[0].agent
    else:
        assert model.agent is not None  # TunnelCreate: agent or replicas
        primary = model.agent
    access = None
    if "access" in nodes:
        access = read_access(
            path, nodes["access"], f"{what}.access", secrets, model.protocol, model.domain
        )
    return DesiredTunnel(
        model.protocol,
        model.domain,
        model.public_port,
        primary,
        model.target,
        model.enabled,
        item.start_mark.line + 1,
        agents,
        model.proxy_protocol,
        model.balance,
        model.sticky,
        access,
    )


def parse(
    text: str,
    path: str = "kakuremichi.yaml",
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> Desired:
    """Read a file's text into a :class:`Desired` (:class:`FileError` if it is not one).
    Secrets come from ``environ`` (default ``os.environ``) and from files relative to
    ``base`` (default: the directory of ``path``)."""
    secrets = SecretReader(
        path,
        os.environ if environ is None else environ,
        Path(path).parent if base is None else base,
    )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise FileError(f"{path}{line}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise FileError(f"{path}: not valid YAML: {exc}") from None
    if root is None:
        raise FileError(f"{path}: the file is empty (want version: 1 and agents/gateways/tunnels)")
    try:
        return _document(path, root, secrets)
    except Unreadable as exc:
        raise FileError(f"{where(path, exc.node)}: not valid here: {exc.problem}") from None


def _document(path: str, root: yaml.Node, secrets: SecretReader) -> Desired:
    desired = Desired()
    sections: dict[str, yaml.Node] = {}
    for key, key_node, value_node in mapping(path, root, "the file"):
        if key == "policies":
            raise FileError(
                f"{where(path, key_node)}: policies: an access policy goes in its tunnel's "
                "entry (access: under the tunnel)"
            )
        if key not in TOP_LEVEL:
            raise FileError(
                f"{where(path, key_node)}: {key}: unknown section (allowed: {', '.join(TOP_LEVEL)})"
            )
        sections[key] = value_node
    version_node = sections.get("version")
    if version_node is None:
        raise FileError(f"{path}:1: version: required (version: {VERSION})")
    if not isinstance(version_node, yaml.ScalarNode) or scalar(version_node) != VERSION:
        raise FileError(f"{where(path, version_node)}: version: only version {VERSION} is known")
    for kind in ("agents", "gateways"):
        names: dict[str, int] = {}
        enabled: dict[str, bool] = {}
        node = sections.get(kind)
        for index, item in enumerate(sequence(path, node, kind) if node is not None else []):
            what = f"{kind}[{index}]"
            values, nodes = fields_or_name(path, item, what, CLIENT_FIELDS, "name")
            try:
                client = ClientCreate.model_validate(values)
            except ValidationError as exc:
                places = {(k,): n for k, n in nodes.items()}
                raise validation_error(path, item, places, what, exc) from None
            name = client.name
            if name in names:
                raise FileError(
                    f"{where(path, item)}: {what}.name: {name!r} is already declared on "
                    f"line {names[name]}"
                )
            names[name] = item.start_mark.line + 1
            enabled[name] = client.enabled
        getattr(desired, kind).update(enabled)
    node = sections.get("tunnels")
    for index, item in enumerate(sequence(path, node, "tunnels") if node is not None else []):
        tunnel = _tunnel(path, item, f"tunnels[{index}]", secrets)
        if tunnel.key in desired.tunnels:
            raise FileError(
                f"{where(path, item)}: tunnels[{index}]: tunnel {tunnel.key} is already "
                f"declared on line {desired.tunnels[tunnel.key].line}"
            )
        desired.tunnels[tunnel.key] = tunnel
    return desired


def load(path: str) -> Desired:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FileError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


# -- Control's state and the plan -----------------------------------------------------------


@dataclass
class Current:
    """What Control holds now (REST API rows)."""

    agents: dict[str, dict[str, Any]]
    gateways: dict[str, dict[str, Any]]
    tunnels: dict[str, dict[str, Any]]
    #: tunnel key → ``GET /api/tunnels/{id}/access`` (tunnels with a policy only)
    access: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, client: Client) -> Current:
        tunnels = {
            tunnel_key(t["protocol"], t["domain"], t["publicPort"]): t
            for t in client.list_all("/api/tunnels")
        }
        access: dict[str, dict[str, Any]] = {}
        for key, tunnel in tunnels.items():
            shown = client.call("GET", f"/api/tunnels/{tunnel['id']}/access")
            if isinstance(shown, dict) and shown.get("enabled"):
                access[key] = shown
        return cls(
            {a["name"]: a for a in client.list_all("/api/agents")},
            {g["name"]: g for g in client.list_all("/api/gateways")},
            tunnels,
            access,
        )


@dataclass(frozen=True)
class Change:
    """One step of a plan: a line to print and the REST call that makes it."""

    text: str
    method: str
    path: str
    #: may hold secrets: never shown
    body: dict[str, Any] | None = field(default=None, repr=False)
    #: a tunnel's POST: the key under which :func:`execute` keeps the new tunnel's id
    creates: str | None = None
    #: ``path`` holds ``{id}``: the id of the tunnel created earlier under this key
    needs: str | None = None


def _agents_text(agents: tuple[Replica, ...]) -> str:
    """``laptop`` or ``laptop, nas:2, old:1:standby`` (``--replica``'s syntax)."""
    words = []
    for name, weight, role in agents:
        if role != "active":
            words.append(f"{name}:{weight}:{role}")
        elif weight != 1:
            words.append(f"{name}:{weight}")
        else:
            words.append(name)
    return ", ".join(words)


def current_agents(row: dict[str, Any]) -> tuple[Replica, ...]:
    """A tunnel row's agents, the primary first; one agent as weight 1, active (Control
    keeps no weight or role for it)."""
    agents = tuple(
        (str(r["agentName"]), int(r["weight"]), str(r["role"])) for r in row.get("replicas") or []
    )
    if len(agents) <= 1:
        return ((row["agentName"], 1, "active"),)
    return agents


def _same_agents(a: tuple[Replica, ...], b: tuple[Replica, ...]) -> bool:
    """The same primary and the same other replicas (Control orders those by name)."""
    return a[0] == b[0] and sorted(a[1:]) == sorted(b[1:])


def _describe(t: DesiredTunnel | dict[str, Any]) -> str:
    if isinstance(t, DesiredTunnel):
        agents, target, enabled = t.agents, t.target, t.enabled
        extras = (t.proxy_protocol, t.balance, t.sticky)
    else:
        agents, target, enabled = current_agents(t), t["target"], t["enabled"]
        extras = (t.get("proxyProtocol"), t.get("balance") or "round_robin", t.get("sticky"))
    words = [f"-> {_agents_text(agents)} {target}"]
    for name, value, default in zip(
        ("proxy_protocol", "balance", "sticky"), extras, (None, "round_robin", None), strict=True
    ):
        if value != default:
            words.append(f"{name} {value}")
    return " ".join(words) + ("" if enabled else " (disabled)")


def _tunnel_diff(
    tunnel: DesiredTunnel, existing: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The PATCH body making ``existing`` ``tunnel`` and the words saying so."""
    diff: dict[str, Any] = {}
    words: list[str] = []
    old_agents = current_agents(existing)
    if len(old_agents) == 1 and len(tunnel.agents) == 1:
        if tunnel.agent != old_agents[0][0]:
            diff["agent"] = tunnel.agent
            words.append(f"agent {old_agents[0][0]} -> {tunnel.agent}")
    elif not _same_agents(tunnel.agents, old_agents):
        diff["agent"] = tunnel.agent  # the primary: Control keeps its own otherwise
        diff["replicas"] = _replicas_body(tunnel.agents)
        words.append(f"replicas {_agents_text(old_agents)} -> {_agents_text(tunnel.agents)}")
    for name, api_name, new, old in (
        ("target", "target", tunnel.target, existing["target"]),
        ("enabled", "enabled", tunnel.enabled, existing["enabled"]),
        ("proxy_protocol", "proxyProtocol", tunnel.proxy_protocol, existing.get("proxyProtocol")),
        ("balance", "balance", tunnel.balance, existing.get("balance") or "round_robin"),
        ("sticky", "sticky", tunnel.sticky, existing.get("sticky")),
    ):
        if new != old:
            diff[api_name] = new
            words.append(f"{name} {show(old)} -> {show(new)}")
    return diff, words


def plan(
    desired: Desired, current: Current, prune: bool = False, replace_secrets: bool = False
) -> list[Change]:
    """The changes that make ``current`` match ``desired``, in the order to make them.
    ``replace_secrets``: send every secret the file gives, also those Control holds."""
    changes: list[Change] = []
    clients = (
        ("agent", desired.agents, current.agents),
        ("gateway", desired.gateways, current.gateways),
    )
    for kind, names, have in clients:
        for name, enabled in names.items():
            row = have.get(name)
            if row is None:
                body: dict[str, Any] = {"name": name}
                if not enabled:
                    body["enabled"] = False
                text = f"+ {kind} {name}" + ("" if enabled else " (disabled)")
                changes.append(Change(text, "POST", f"/api/{kind}s", body))
            elif row.get("enabled", True) != enabled:
                changes.append(
                    Change(
                        f"~ {kind} {name}: enabled {show(not enabled)} -> {show(enabled)}",
                        "PATCH",
                        f"/api/{kind}s/{row['id']}",
                        {"enabled": enabled},
                    )
                )
    referenced = set(desired.agents) | set(current.agents)
    for key, tunnel in desired.tunnels.items():
        for agent, _weight, _role in tunnel.agents:
            if agent not in referenced:
                raise FileError(
                    f"line {tunnel.line}: tunnel {key}: agent {agent!r} is neither in the "
                    "file's agents nor on Control"
                )
        existing = current.tunnels.get(key)
        if existing is None:
            changes.append(
                Change(
                    f"+ tunnel {key} {_describe(tunnel)}",
                    "POST",
                    "/api/tunnels",
                    tunnel.body(),
                    creates=key,
                )
            )
            # the policy goes right after the POST, to the id its response gives
            access_path, shown, needs = "/api/tunnels/{id}/access", None, key
        else:
            diff, words = _tunnel_diff(tunnel, existing)
            if diff:
                changes.append(
                    Change(
                        f"~ tunnel {key}: {', '.join(words)}",
                        "PATCH",
                        f"/api/tunnels/{existing['id']}",
                        diff,
                    )
                )
            access_path = f"/api/tunnels/{existing['id']}/access"
            shown, needs = current.access.get(key), None
        if tunnel.access is not None:
            put = access_change(
                key, tunnel.access, shown, tunnel.protocol == "http", replace_secrets
            )
            if put is not None:
                text, body = put
                changes.append(Change(text, "PUT", access_path, body, needs=needs))
        elif prune and key in current.access:
            changes.append(Change(f"- access of tunnel {key}", "DELETE", access_path))
    if prune:
        for key, existing in sorted(current.tunnels.items()):
            if key not in desired.tunnels:
                changes.append(
                    Change(
                        f"- tunnel {key} {_describe(existing)}",
                        "DELETE",
                        f"/api/tunnels/{existing['id']}",
                    )
                )
        used = {a for t in desired.tunnels.values() for a, _weight, _role in t.agents}
        for kind, names, have in clients:
            for name, row in sorted(have.items()):
                if name not in names:
                    if kind == "agent" and name in used:
                        raise FileError(
                            f"agent {name!r} is not in the file's agents but its tunnels are; "
                            "add it to agents or move the tunnels"
                        )
                    changes.append(
                        Change(f"- {kind} {name}", "DELETE", f"/api/{kind}s/{row['id']}")
                    )
    return changes


def execute(client: Client, changes: list[Change], out: Any = None) -> None:
    """Make each change in order, printing it once done (keys and tokens once)."""
    out = sys.stdout if out is None else out
    created: dict[str, str] = {}
    for change in changes:
        path = change.path
        if change.needs is not None:
            path = path.replace("{id}", created[change.needs])
        data = client.call(change.method, path, change.body)
        if change.creates is not None and isinstance(data, dict):
            created[change.creates] = str(data["id"])
        print(change.text, file=out, flush=True)
        if isinstance(data, dict) and data.get("apiKey"):
            print(f"    API key (shown once): {data['apiKey']}", file=out)
            if data.get("token"):
                print(f"    enrollment token (shown once): {data['token']}", file=out)


# -- export -------------------------------------------------------------------------------


def _client_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": row["name"]}
    if not row.get("enabled", True):
        entry["enabled"] = False
    return entry


def _tunnel_entry(t: dict[str, Any], shown: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if t["protocol"] != "http":
        entry["protocol"] = t["protocol"]
        entry["public_port"] = t["publicPort"]
    else:
        entry["domain"] = t["domain"]
    agents = current_agents(t)
    if len(agents) == 1:
        entry["agent"] = agents[0][0]
    else:
        entry["replicas"] = [
            name
            if (weight, role) == (1, "active")
            else {"agent": name}
            | ({"weight": weight} if weight != 1 else {})
            | ({"role": role} if role != "active" else {})
            for name, weight, role in agents
        ]
    entry["target"] = t["target"]
    if not t["enabled"]:
        entry["enabled"] = False
    if t.get("proxyProtocol") is not None:
        entry["proxy_protocol"] = t["proxyProtocol"]
    if (t.get("balance") or "round_robin") != "round_robin":
        entry["balance"] = t["balance"]
    if t.get("sticky") is not None:
        entry["sticky"] = t["sticky"]
    if shown is not None:
        entry["access"] = access_entry(shown)
    return entry


def export_text(current: Current) -> str:
    """Control's state in the file format (no keys, no ids, no secrets: those Control
    holds are written as keep; defaults left out)."""
    tunnels = [
        _tunnel_entry(t, current.access.get(key))
        for key, t in sorted(
            current.tunnels.items(),
            key=lambda kv: (kv[1]["protocol"], kv[1]["domain"] or "", kv[1]["publicPort"] or 0),
        )
    ]
    document = {
        "version": VERSION,
        "agents": [_client_entry(current.agents[n]) for n in sorted(current.agents)],
        "gateways": [_client_entry(current.gateways[n]) for n in sorted(current.gateways)],
        "tunnels": tunnels,
    }
    header = (
        "# kakuremichi export: apply with 'kakuremichi apply -f FILE' (no keys in it).\n"
        "# Secrets are written as 'keep' (Control's stay); on another Control give each\n"
        "# as {env: NAME} or {file: PATH}.\n"
    )
    body: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    return header + body


# -- the commands -------------------------------------------------------------------------


def _client(values: dict[str, Any]) -> Client:
    if not values["admin_token"]:
        raise ConfigError("--admin-token (or KAKUREMICHI_ADMIN_TOKEN[_FILE]) is required")
    warning = plaintext_warning(values["control_url"])
    if warning:
        print(f"kakuremichi: warning: {warning}", file=sys.stderr)
    return Client(values["control_url"], values["admin_token"], values["control_ca"])


def run_apply(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    try:
        desired = load(args.file)
    except FileError as exc:
        print(f"kakuremichi apply: {exc}", file=sys.stderr)
        return 2
    client = _client(values)
    try:
        changes = plan(
            desired, Current.read(client), prune=args.prune, replace_secrets=args.replace_secrets
        )
        if not changes:
            print("no changes: Control matches the file")
            return 0
        if args.dry_run:
            print(f"{len(changes)} change(s) would be made (dry run; nothing was changed):")
            for change in changes:
                print(change.text)
            return 0
        execute(client, changes)
        print(f"{len(changes)} change(s) made")
    except FileError as exc:
        print(f"kakuremichi apply: {exc}", file=sys.stderr)
        return 2
    except ApiFailure as exc:
        print(f"kakuremichi apply: {exc}", file=sys.stderr)
        return 1
    finally:
        client.http.close()
    return 0


def run_export(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    client = _client(values)
    try:
        text = export_text(Current.read(client))
    except ApiFailure as exc:
        print(f"kakuremichi export: {exc}", file=sys.stderr)
        return 1
    finally:
        client.http.close()
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {args.output}: {exc.strerror}") from exc
    return 0


def register(subparsers: Any) -> None:
    apply_parser = subparsers.add_parser(
        "apply",
        help="make Control match a kakuremichi.yaml (agents, gateways, tunnels, access policies)",
        description=(
            "Read a file declaring agents, gateways and tunnels (with their replicas, "
            "balance, sticky, proxy_protocol and access policies) and make Control match "
            "it through the REST API: create what is missing, update what differs, and "
            "with --prune delete what the file no longer names (and access policies of "
            "tunnels whose entry has no access:). Running it again changes nothing. "
            "Secrets are written as keep, {env: NAME}, {file: PATH} or text, and are "
            "never printed; one Control already holds is sent again only with "
            "--replace-secrets. New agents' and gateways' API keys and enrollment tokens "
            "are printed once. Exit codes: 0 done, 1 the API refused, 2 a bad file or "
            "setting."
        ),
    )
    apply_parser.add_argument("-f", "--file", required=True, metavar="FILE", help="YAML file")
    apply_parser.add_argument(
        "--dry-run", action="store_true", help="print the changes without making them"
    )
    apply_parser.add_argument(
        "--prune",
        action="store_true",
        help="also delete tunnels, agents and gateways the file does not name, and the "
        "access policies of tunnels whose entry has no access:",
    )
    apply_parser.add_argument(
        "--replace-secrets",
        action="store_true",
        help="send every secret the file gives, also those Control already holds (by "
        "default a held secret is left as it is)",
    )
    add_settings(apply_parser, SETTINGS)
    apply_parser.set_defaults(run=run_apply)
    export_parser = subparsers.add_parser(
        "export",
        help="write Control's agents, gateways, tunnels and access policies as a kakuremichi.yaml",
        description=(
            "Write Control's current agents, gateways and tunnels (with their replicas, "
            "balance, sticky, proxy_protocol and access policies) in the format "
            "'kakuremichi apply -f' reads. No keys or tokens are in it, and every secret "
            "Control holds is written as keep."
        ),
    )
    export_parser.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    add_settings(export_parser, SETTINGS)
    export_parser.set_defaults(run=run_export)
