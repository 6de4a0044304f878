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
``access:`` is the tunnel's whole policy (``PUT /api/tunnels/{id}/access`` in
snake_case): ``ip_allow``, ``ip_deny``, ``basic_auth`` (``{user, password}`` each),
``password`` (the sign-in page's password or PIN), ``oidc`` (``issuer``,
``client_id``, ``client_secret``, ``scopes``, ``allowed_emails``, ``allowed_domains``,
``allowed_groups``, ``groups_claim``), ``paths`` (``{prefix, action, bearer_token}``
each, action auth, bypass, deny or bearer), ``session_domain``, ``session_ttl``
(default 86400) and ``identity_headers`` (default true).  What the entry leaves out
is not in the policy (no ``password:``: the policy has none).  ``access: {}`` is a
policy that lets only share-link holders in.  A tunnel entry without ``access:``
leaves the tunnel's policy as it is; with ``--prune`` a policy on such a tunnel is
removed.  Share links are runtime state and are never in the file.

A secret (``password``, a basic-auth user's ``password``, ``client_secret``,
``bearer_token``) is written as one of:

* ``keep``: the one Control holds stays (an error if Control holds none, so a policy
  is never made without the secret the file expects);
* ``{env: NAME}``: the environment variable's value (an error if it is unset);
* ``{file: PATH}``: the file's text without its trailing newline (relative paths
  start at the YAML file's directory);
* the text itself.  This works but puts the secret in the file: prefer env or file.
  (A secret that is the word ``keep`` must come from env or file.)

Control shows no secret, only whether each is set, so ``apply`` compares the policy
without its secrets (normalised as Control stores it: IP networks as networks, e-mail
addresses and domains in lower case, defaults filled) plus whether each secret is set.
A secret the file gives where Control already holds one is not sent again (so an
unchanged file changes nothing); ``apply --replace-secrets`` sends every secret the
file gives (the plan says "password replaced", never the value).  Secrets are never
printed, in plans, errors or logs.

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
from control.access import AccessIn
from control.admin import ApiFailure, Client
from control.api.models import ClientCreate, TunnelCreate

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
ACCESS_FIELDS = (
    "ip_allow",
    "ip_deny",
    "basic_auth",
    "password",
    "oidc",
    "paths",
    "session_domain",
    "session_ttl",
    "identity_headers",
)
OIDC_FIELDS = (
    "issuer",
    "client_id",
    "client_secret",
    "scopes",
    "allowed_emails",
    "allowed_domains",
    "allowed_groups",
    "groups_claim",
)
BASIC_FIELDS = ("user", "password")
PATH_FIELDS = ("prefix", "action", "bearer_token")
#: what a tcp/udp tunnel's policy cannot have (Control takes IP rules only for them)
HTTP_ONLY = ("basic_auth", "password", "oidc", "paths", "session_domain")
DEFAULT_SCOPES = ["openid", "email", "profile"]
DEFAULT_SESSION_TTL = 86400
KEEP = "keep"
MAX_SECRET_FILE = 64 * 1024
#: bounds on a policy's values as the file gives them (before the API's own bounds)
MAX_DEPTH = 8
MAX_VALUES = 20_000


class FileError(Exception):
    """The file cannot be applied; the message names the file, line and field."""


#: (agent name, weight, role)
Replica = tuple[str, int, str]


@dataclass(frozen=True)
class Secret:
    """A secret as the file gives it: its value, or None for ``keep``.  ``where`` is the
    "file:line: field" its errors start with; the value is never shown."""

    value: str | None = field(repr=False)
    where: str = field(compare=False)


@dataclass(frozen=True)
class DesiredAccess:
    """A tunnel's access policy as the file declares it: the policy validated by
    ``AccessIn`` (then with its secrets taken out), and the secrets beside it."""

    policy: AccessIn
    password: Secret | None
    #: user → that user's password
    basic: dict[str, Secret]
    oidc_secret: Secret | None
    #: index in ``policy.paths`` → that bearer rule's token
    bearer: dict[int, Secret]
    where: str = field(compare=False)

    def view(self) -> dict[str, Any]:
        """The policy as ``GET /api/tunnels/{id}/access`` would show it."""
        p = self.policy
        return {
            "ipAllow": list(p.ip_allow),
            "ipDeny": list(p.ip_deny),
            "basicAuth": [{"user": u.user} for u in p.basic_auth],
            "password": self.password is not None,
            "oidc": None
            if p.oidc is None
            else {
                "issuer": p.oidc.issuer,
                "clientId": p.oidc.client_id,
                "scopes": list(p.oidc.scopes),
                "allowedEmails": [e.lower() for e in p.oidc.allowed_emails],
                "allowedDomains": [d.lower() for d in p.oidc.allowed_domains],
                "allowedGroups": list(p.oidc.allowed_groups),
                "groupsClaim": p.oidc.groups_claim,
                "clientSecretSet": self.oidc_secret is not None,
            },
            "paths": [
                {"prefix": r.prefix, "action": r.action, "bearerTokenSet": i in self.bearer}
                for i, r in enumerate(p.paths)
            ],
            "sessionDomain": p.session_domain,
            "sessionTtl": p.session_ttl,
            "identityHeaders": p.identity_headers,
        }


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


def _where(path: str, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}"


class _Unreadable(Exception):
    """A node the safe loader has no value for (``parse`` names its line)."""

    def __init__(self, node: yaml.Node, problem: str) -> None:
        super().__init__(problem)
        self.node = node
        self.problem = problem


def _scalar(node: yaml.Node) -> Any:
    """A scalar node's value as YAML 1.1 (PyYAML's safe loader) reads it."""
    try:
        return yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "no value for this"
        raise _Unreadable(node, str(problem)) from None


def _mapping(path: str, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise FileError(f"{_where(path, node)}: {what}: expected a mapping (key: value)")
    pairs: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise FileError(f"{_where(path, key_node)}: {what}: keys must be text")
        if key in seen:
            raise FileError(f"{_where(path, key_node)}: {what}.{key}: given twice")
        seen.add(key)
        pairs.append((key, key_node, value_node))
    return pairs


def _sequence(path: str, node: yaml.Node, what: str) -> list[yaml.Node]:
    if isinstance(node, yaml.ScalarNode) and _scalar(node) is None:
        return []  # "agents:" with nothing under it
    if not isinstance(node, yaml.SequenceNode):
        raise FileError(f"{_where(path, node)}: {what}: expected a list (- …)")
    return list(node.value)


def _unknown(path: str, key_node: yaml.Node, what: str, key: str, allowed: tuple[str, ...]) -> None:
    if key not in allowed:
        raise FileError(
            f"{_where(path, key_node)}: {what}.{key}: unknown field (allowed: "
            f"{', '.join(a for a in allowed if a != 'publicPort')})"
        )


def _fields(
    path: str,
    node: yaml.Node,
    what: str,
    allowed: tuple[str, ...],
    nested: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, yaml.Node]]:
    """A mapping of single values; the ``nested`` fields' nodes are returned as they are
    (their values are left for the caller)."""
    values: dict[str, Any] = {}
    nodes: dict[str, yaml.Node] = {}
    for key, key_node, value_node in _mapping(path, node, what):
        _unknown(path, key_node, what, key, allowed)
        nodes[key] = value_node
        if key in nested:
            continue
        if not isinstance(value_node, yaml.ScalarNode):
            raise FileError(f"{_where(path, value_node)}: {what}.{key}: expected a single value")
        values[key] = _scalar(value_node)
    return values, nodes


def _plain(
    path: str, node: yaml.Node, what: str, loc: tuple[Any, ...], nodes: dict[Any, Any]
) -> Any:
    """A node's value (lists and mappings too), each node recorded under its place."""
    nodes[loc] = node
    if len(loc) > MAX_DEPTH or len(nodes) > MAX_VALUES:  # aliases can nest and multiply
        raise FileError(f"{_where(path, node)}: {_dotted(what, loc)}: too deep or too many values")
    if isinstance(node, yaml.SequenceNode):
        return [_plain(path, item, what, (*loc, i), nodes) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        return {
            key: _plain(path, value, what, (*loc, key), nodes)
            for key, _key_node, value in _mapping(path, node, _dotted(what, loc))
        }
    return _scalar(node)


def _dotted(what: str, loc: tuple[Any, ...]) -> str:
    """``tunnels[0].access`` and ``("paths", 1, "prefix")``: ``…access.paths[1].prefix``."""
    out = what
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _validation(
    path: str,
    node: yaml.Node,
    nodes: Mapping[tuple[Any, ...], yaml.Node],
    what: str,
    exc: ValidationError,
) -> FileError:
    """The first problem pydantic found, at the line of the deepest node it names
    (``nodes`` maps places, tuples of field names and list indices, to nodes)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = tuple("public_port" if p == "publicPort" else p for p in error.get("loc", ()))
    ends = range(len(loc), 0, -1)
    at = next((nodes[loc[:end]] for end in ends if loc[:end] in nodes), node)
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "required"
    return FileError(f"{_where(path, at)}: {_dotted(what, loc)}: {message}")


class _Secrets:
    """Reads secrets (``keep``, ``{env: NAME}``, ``{file: PATH}`` or text)."""

    def __init__(self, path: str, environ: Mapping[str, str], base: Path) -> None:
        self.path = path
        self.environ = environ
        self.base = base

    def read(self, node: yaml.Node, what: str) -> Secret:
        where = f"{_where(self.path, node)}: {what}"
        usage = "a secret is keep, {env: NAME}, {file: PATH} or text"
        if isinstance(node, yaml.ScalarNode):
            value = _scalar(node)
            if value == KEEP:
                return Secret(None, where)
            if not isinstance(value, str):
                kind = "nothing" if value is None else f"a {type(value).__name__}"
                raise FileError(
                    f"{where}: {usage} (this is {kind}; quote text that looks like one)"
                )
            if not value:
                raise FileError(f"{where}: the secret is empty")
            return Secret(value, where)
        pairs = _mapping(self.path, node, what)
        if len(pairs) != 1 or pairs[0][0] not in ("env", "file"):
            raise FileError(f"{where}: {usage}")
        source, _key_node, value_node = pairs[0]
        name = _scalar(value_node) if isinstance(value_node, yaml.ScalarNode) else None
        if not isinstance(name, str) or not name:
            raise FileError(f"{_where(self.path, value_node)}: {what}.{source}: expected a name")
        if source == "env":
            text = self.environ.get(name)
            if text is None:
                raise FileError(f"{where}: environment variable {name} is not set")
        else:
            file = Path(name).expanduser()
            file = file if file.is_absolute() else self.base / file
            try:
                with file.open("rb") as handle:
                    raw = handle.read(MAX_SECRET_FILE + 1)
            except OSError as exc:
                raise FileError(f"{where}: cannot read {name}: {exc.strerror}") from None
            if len(raw) > MAX_SECRET_FILE:
                raise FileError(f"{where}: {name} is larger than {MAX_SECRET_FILE} bytes")
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise FileError(f"{where}: {name} is not UTF-8 text") from None
        if not text:
            raise FileError(f"{where}: the secret from {source} {name} is empty")
        return Secret(text, where)


_HOW_TO_GIVE = "keep, {env: NAME}, {file: PATH} or the text"


def _access(
    path: str,
    node: yaml.Node,
    what: str,
    secrets: _Secrets,
    protocol: str,
    domain: str | None,
) -> DesiredAccess:
    """A tunnel entry's ``access:``, its secrets read and the rest checked by
    ``control.access.AccessIn`` (as Control will check it)."""
    data: dict[str, Any] = {}
    nodes: dict[tuple[Any, ...], yaml.Node] = {}
    password: Secret | None = None
    oidc_secret: Secret | None = None
    user_secrets: list[tuple[Secret, yaml.Node]] = []
    bearer: dict[int, Secret] = {}
    for key, key_node, value_node in _mapping(path, node, what):
        _unknown(path, key_node, what, key, ACCESS_FIELDS)
        if protocol != "http" and key in HTTP_ONLY:
            raise FileError(
                f"{_where(path, key_node)}: {what}.{key}: a {protocol} tunnel's policy takes "
                "IP rules only (ip_allow, ip_deny)"
            )
        nodes[(key,)] = value_node
        if key == "password":
            password = secrets.read(value_node, f"{what}.password")
            if password.value is not None:
                data["password"] = password.value
        elif key in ("basic_auth", "paths"):
            allowed, secret_field = (
                (BASIC_FIELDS, "password") if key == "basic_auth" else (PATH_FIELDS, "bearer_token")
            )
            entries: list[dict[str, Any]] = []
            for i, item in enumerate(_sequence(path, value_node, f"{what}.{key}")):
                at = f"{what}.{key}[{i}]"
                nodes[(key, i)] = item
                entry: dict[str, Any] = {}
                secret: Secret | None = None
                for name, name_node, field_node in _mapping(path, item, at):
                    _unknown(path, name_node, at, name, allowed)
                    if name == secret_field:
                        nodes[(key, i, name)] = field_node
                        secret = secrets.read(field_node, f"{at}.{name}")
                        if secret.value is not None:
                            entry[name] = secret.value
                    else:
                        entry[name] = _plain(path, field_node, what, (key, i, name), nodes)
                if key == "basic_auth":
                    if secret is None:
                        raise FileError(
                            f"{_where(path, item)}: {at}.password: required ({_HOW_TO_GIVE})"
                        )
                    user_secrets.append((secret, item))
                elif secret is not None:
                    bearer[i] = secret
                entries.append(entry)
            data[key] = entries
        elif key == "oidc":
            entry = {}
            for name, name_node, field_node in _mapping(path, value_node, f"{what}.oidc"):
                _unknown(path, name_node, f"{what}.oidc", name, OIDC_FIELDS)
                if name == "client_secret":
                    nodes[("oidc", name)] = field_node
                    oidc_secret = secrets.read(field_node, f"{what}.oidc.client_secret")
                    if oidc_secret.value is not None:
                        entry[name] = oidc_secret.value
                else:
                    entry[name] = _plain(path, field_node, what, ("oidc", name), nodes)
            data["oidc"] = entry
        else:
            data[key] = _plain(path, value_node, what, (key,), nodes)
    try:
        policy = AccessIn.model_validate(data)
    except ValidationError as exc:
        raise _validation(path, node, nodes, what, exc) from None
    # the secrets live in the Secret objects only (a model's repr would show them)
    policy = policy.model_copy(
        update={
            "password": None,
            "basic_auth": [u.model_copy(update={"password": None}) for u in policy.basic_auth],
            "oidc": None
            if policy.oidc is None
            else policy.oidc.model_copy(update={"client_secret": None}),
            "paths": [r.model_copy(update={"bearer_token": None}) for r in policy.paths],
        }
    )
    basic: dict[str, Secret] = {}
    for user, (secret, item) in zip(policy.basic_auth, user_secrets, strict=True):
        if user.user in basic:
            raise FileError(
                f"{_where(path, item)}: {what}.basic_auth: user {user.user!r} appears twice"
            )
        basic[user.user] = secret
    for i, rule in enumerate(policy.paths):
        at = f"{_where(path, nodes[('paths', i)])}: {what}.paths[{i}].bearer_token"
        if rule.action == "bearer" and i not in bearer:
            raise FileError(f"{at}: a bearer rule needs a token ({_HOW_TO_GIVE})")
        if rule.action != "bearer" and i in bearer:
            raise FileError(f"{at}: only a bearer rule takes a token")
    session = policy.session_domain
    if session is not None:
        mine = domain or ""
        if mine != session and not mine.endswith("." + session):
            raise FileError(
                f"{_where(path, nodes[('session_domain',)])}: {what}.session_domain: "
                f"{session!r} is not the tunnel's domain or a parent of it"
            )
    return DesiredAccess(policy, password, basic, oidc_secret, bearer, _where(path, node))


def _tunnel(path: str, item: yaml.Node, what: str, secrets: _Secrets) -> DesiredTunnel:
    values, nodes = _fields(path, item, what, TUNNEL_FIELDS, NESTED_TUNNEL_FIELDS)
    places: dict[tuple[Any, ...], yaml.Node] = {
        ("public_port" if k == "publicPort" else k,): n for k, n in nodes.items()
    }
    if "agent" in nodes and "replicas" in nodes:
        raise FileError(
            f"{_where(path, nodes['replicas'])}: {what}.replicas: give agent (one agent) or "
            "replicas, not both"
        )
    if "replicas" in nodes:
        replicas: list[dict[str, Any]] = []
        for i, node in enumerate(_sequence(path, nodes["replicas"], f"{what}.replicas")):
            if isinstance(node, yaml.ScalarNode):  # "- nas" for short
                fields, field_nodes = {"agent": _scalar(node)}, {"agent": node}
            else:
                fields, field_nodes = _fields(path, node, f"{what}.replicas[{i}]", REPLICA_FIELDS)
            places[("replicas", i)] = node
            places.update({("replicas", i, k): n for k, n in field_nodes.items()})
            replicas.append(fields)
        values["replicas"] = replicas
    try:
        model = TunnelCreate.model_validate(values)
    except ValidationError as exc:
        raise _validation(path, item, places, what, exc) from None
    agents: tuple[Replica, ...] = ()
    if model.replicas:
        agents = tuple((r.agent, r.weight, r.role) for r in model.replicas)
        if len(agents) == 1:
            if agents[0][1:] != (1, "active"):
                raise FileError(
                    f"{_where(path, nodes['replicas'])}: {what}.replicas: one agent takes all "
                    "the traffic (weight and role are for two or more; write agent: NAME)"
                )
            agents = ()
        primary = model.replicas[0].agent
    else:
        assert model.agent is not None  # TunnelCreate: agent or replicas
        primary = model.agent
    access = None
    if "access" in nodes:
        access = _access(
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
    secrets = _Secrets(
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
    except _Unreadable as exc:
        raise FileError(f"{_where(path, exc.node)}: not valid here: {exc.problem}") from None


def _document(path: str, root: yaml.Node, secrets: _Secrets) -> Desired:
    desired = Desired()
    sections: dict[str, yaml.Node] = {}
    for key, key_node, value_node in _mapping(path, root, "the file"):
        if key == "policies":
            raise FileError(
                f"{_where(path, key_node)}: policies: an access policy goes in its tunnel's "
                "entry (access: under the tunnel)"
            )
        if key not in TOP_LEVEL:
            raise FileError(
                f"{_where(path, key_node)}: {key}: unknown section (allowed: {', '.join(TOP_LEVEL)})"
            )
        sections[key] = value_node
    version_node = sections.get("version")
    if version_node is None:
        raise FileError(f"{path}:1: version: required (version: {VERSION})")
    if not isinstance(version_node, yaml.ScalarNode) or _scalar(version_node) != VERSION:
        raise FileError(f"{_where(path, version_node)}: version: only version {VERSION} is known")
    for kind in ("agents", "gateways"):
        names: dict[str, int] = {}
        enabled: dict[str, bool] = {}
        node = sections.get(kind)
        for index, item in enumerate(_sequence(path, node, kind) if node is not None else []):
            what = f"{kind}[{index}]"
            if isinstance(item, yaml.ScalarNode):  # "- laptop" for short
                values, nodes = {"name": _scalar(item)}, {"name": item}
            else:
                values, nodes = _fields(path, item, what, CLIENT_FIELDS)
            try:
                client = ClientCreate.model_validate(values)
            except ValidationError as exc:
                places = {(k,): n for k, n in nodes.items()}
                raise _validation(path, item, places, what, exc) from None
            name = client.name
            if name in names:
                raise FileError(
                    f"{_where(path, item)}: {what}.name: {name!r} is already declared on "
                    f"line {names[name]}"
                )
            names[name] = item.start_mark.line + 1
            enabled[name] = client.enabled
        getattr(desired, kind).update(enabled)
    node = sections.get("tunnels")
    for index, item in enumerate(_sequence(path, node, "tunnels") if node is not None else []):
        tunnel = _tunnel(path, item, f"tunnels[{index}]", secrets)
        if tunnel.key in desired.tunnels:
            raise FileError(
                f"{_where(path, item)}: tunnels[{index}]: tunnel {tunnel.key} is already "
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
            words.append(f"{name} {_show(old)} -> {_show(new)}")
    return diff, words


def plan(
    desired: Desired, current: Current, prune: bool = False, replace_secrets: bool = False
) -> list[Change]:
    """The changes that make ``current`` match ``desired``, in the order to make them.
    ``replace_secrets``: send every secret the file gives, also those Control holds."""
    changes: list[Change] = []
    for kind, names, have in (
        ("agent", desired.agents, current.agents),
        ("gateway", desired.gateways, current.gateways),
    ):
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
                        f"~ {kind} {name}: enabled {_show(not enabled)} -> {_show(enabled)}",
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
            if tunnel.access is not None:
                changes += _access_changes(
                    key, tunnel, None, "/api/tunnels/{id}/access", replace_secrets, needs=key
                )
            continue
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
        if tunnel.access is not None:
            changes += _access_changes(
                key, tunnel, current.access.get(key), access_path, replace_secrets
            )
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
        for kind, names, have in (
            ("agent", desired.agents, current.agents),
            ("gateway", desired.gateways, current.gateways),
        ):
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


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


# -- access policies in the plan ------------------------------------------------------------


def _normal_view(view: dict[str, Any]) -> dict[str, Any]:
    """A policy view with only the fields the file has (a row stored by an older Control
    may lack some)."""
    oidc = view.get("oidc")
    return {
        "ipAllow": list(view.get("ipAllow") or []),
        "ipDeny": list(view.get("ipDeny") or []),
        "basicAuth": [{"user": u["user"]} for u in view.get("basicAuth") or []],
        "password": bool(view.get("password")),
        "oidc": None
        if oidc is None
        else {
            "issuer": oidc.get("issuer"),
            "clientId": oidc.get("clientId"),
            "scopes": list(oidc.get("scopes") or DEFAULT_SCOPES),
            "allowedEmails": list(oidc.get("allowedEmails") or []),
            "allowedDomains": list(oidc.get("allowedDomains") or []),
            "allowedGroups": list(oidc.get("allowedGroups") or []),
            "groupsClaim": oidc.get("groupsClaim") or "groups",
            "clientSecretSet": bool(oidc.get("clientSecretSet")),
        },
        "paths": [
            {
                "prefix": r["prefix"],
                "action": r["action"],
                "bearerTokenSet": bool(r.get("bearerTokenSet")),
            }
            for r in view.get("paths") or []
        ],
        "sessionDomain": view.get("sessionDomain"),
        "sessionTtl": view.get("sessionTtl", DEFAULT_SESSION_TTL),
        "identityHeaders": view.get("identityHeaders", True),
    }


EMPTY_VIEW = _normal_view({})


def _items(values: Any) -> str:
    return ", ".join(str(v) for v in values) or "none"


def _flat(view: dict[str, Any]) -> dict[str, str]:
    """A normal view as one short text per file field; secrets only as set or none."""
    out = {
        "ip_allow": _items(view["ipAllow"]),
        "ip_deny": _items(view["ipDeny"]),
        "basic_auth": _items(u["user"] for u in view["basicAuth"]),
        "password": "set" if view["password"] else "none",
    }
    oidc = view["oidc"]
    out["oidc"] = "none" if oidc is None else f"{oidc['issuer']} client {oidc['clientId']}"
    if oidc is not None:
        out["oidc.client_secret"] = "set" if oidc["clientSecretSet"] else "none"
        for name, api_name in (
            ("scopes", "scopes"),
            ("allowed_emails", "allowedEmails"),
            ("allowed_domains", "allowedDomains"),
            ("allowed_groups", "allowedGroups"),
        ):
            out[f"oidc.{name}"] = _items(oidc[api_name])
        out["oidc.groups_claim"] = str(oidc["groupsClaim"])
    out["paths"] = _items(f"{r['prefix']} {r['action']}" for r in view["paths"])
    out["paths.bearer_token"] = _items(r["prefix"] for r in view["paths"] if r["bearerTokenSet"])
    out["session_domain"] = _show(view["sessionDomain"])
    out["session_ttl"] = _show(view["sessionTtl"])
    out["identity_headers"] = _show(view["identityHeaders"])
    return out


def _access_words(old: dict[str, Any], new: dict[str, Any], summary: bool = False) -> list[str]:
    """What differs between two normal views (``summary``: only the new values)."""
    before, after = _flat(old), _flat(new)
    words = []
    for name in dict.fromkeys([*before, *after]):
        was, now = before.get(name, "none"), after.get(name, "none")
        if was == now or (
            name.startswith("oidc.") and (old["oidc"] is None or new["oidc"] is None)
        ):
            continue
        if name in ("password", "oidc.client_secret"):
            words.append(name if summary else f"{name} {'set' if now == 'set' else 'removed'}")
        else:
            words.append(f"{name} {now}" if summary else f"{name} {was} -> {now}")
    if not words and old != new:
        words.append("policy")  # a difference the short texts do not show
    return words


def _access_body(
    key: str, access: DesiredAccess, shown: dict[str, Any] | None, http: bool, replace: bool
) -> tuple[dict[str, Any], list[str]]:
    """The PUT body giving the tunnel ``access`` where Control shows ``shown`` (None: no
    policy) and the secrets it sends although Control holds them (``replace``).  A
    secret Control holds is left out (Control keeps it) unless ``replace``."""
    p = access.policy
    cur = _normal_view(shown or {})
    cur_oidc = cur["oidc"] or {}
    held_oidc = (
        shown is not None
        and p.oidc is not None
        and cur_oidc.get("clientId") == p.oidc.client_id
        and bool(cur_oidc.get("clientSecretSet"))
    )
    held_users = {u["user"] for u in cur["basicAuth"]} if shown is not None else set()
    held_bearers = {r["prefix"] for r in cur["paths"] if r["bearerTokenSet"]}
    replaced: list[str] = []

    def send(secret: Secret, held: bool, name: str) -> str | None:
        if secret.value is None:  # keep
            if not held:
                raise FileError(
                    f"{secret.where}: keep, but Control holds no {name} for tunnel {key} "
                    "(give it with {env: NAME} or {file: PATH})"
                )
            return None
        if held and not replace:
            return None
        if held:
            replaced.append(name)
        return secret.value

    body: dict[str, Any] = {
        "ipAllow": list(p.ip_allow),
        "ipDeny": list(p.ip_deny),
        "sessionTtl": p.session_ttl,
        "identityHeaders": p.identity_headers,
    }
    if not http:  # a raw tunnel's policy has IP rules only
        return body, replaced
    users = []
    for user in p.basic_auth:
        entry: dict[str, Any] = {"user": user.user}
        value = send(
            access.basic[user.user], user.user in held_users, f"basic_auth {user.user} password"
        )
        if value is not None:
            entry["password"] = value
        users.append(entry)
    body["basicAuth"] = users
    if access.password is None:
        body["password"] = None  # absent would keep Control's
    else:
        value = send(access.password, cur["password"], "password")
        if value is not None:
            body["password"] = value
    if p.oidc is None:
        body["oidc"] = None
    else:
        oidc: dict[str, Any] = {
            "issuer": p.oidc.issuer,
            "clientId": p.oidc.client_id,
            "scopes": list(p.oidc.scopes),
            "allowedEmails": list(p.oidc.allowed_emails),
            "allowedDomains": list(p.oidc.allowed_domains),
            "allowedGroups": list(p.oidc.allowed_groups),
            "groupsClaim": p.oidc.groups_claim,
        }
        if access.oidc_secret is not None:
            value = send(access.oidc_secret, held_oidc, "oidc client_secret")
            if value is not None:
                oidc["clientSecret"] = value
        elif held_oidc:
            raise FileError(
                f"{access.where}.oidc.client_secret: Control holds a client secret for client "
                f"{p.oidc.client_id!r} of tunnel {key} and cannot drop it: write "
                "client_secret: keep (or give one)"
            )
        body["oidc"] = oidc
    paths = []
    for i, rule in enumerate(p.paths):
        entry = {"prefix": rule.prefix, "action": rule.action}
        if i in access.bearer:
            held = rule.prefix in held_bearers
            value = send(access.bearer[i], held, f"paths {rule.prefix} bearer_token")
            if value is not None:
                entry["bearerToken"] = value
        paths.append(entry)
    body["paths"] = paths
    body["sessionDomain"] = p.session_domain
    return body, replaced


def _access_changes(
    key: str,
    tunnel: DesiredTunnel,
    shown: dict[str, Any] | None,
    path: str,
    replace: bool,
    needs: str | None = None,
) -> list[Change]:
    """The PUT (if any) giving ``tunnel`` its file's policy, Control showing ``shown``."""
    access = tunnel.access
    assert access is not None
    body, replaced = _access_body(key, access, shown, tunnel.protocol == "http", replace)
    new = _normal_view(access.view())
    if shown is None:
        words = _access_words(EMPTY_VIEW, new, summary=True)
        text = f"+ access of tunnel {key}" + (
            f": {', '.join(words)}" if words else " (empty: share links only)"
        )
        return [Change(text, "PUT", path, body, needs=needs)]
    old = _normal_view(shown)
    words = (_access_words(old, new) if old != new else []) + [f"{n} replaced" for n in replaced]
    if not words:
        return []
    return [Change(f"~ tunnel {key}: access {', '.join(words)}", "PUT", path, body)]


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


def _access_entry(shown: dict[str, Any]) -> dict[str, Any]:
    """A policy as ``access:`` (defaults left out, every secret Control holds as keep)."""
    view = _normal_view(shown)
    entry: dict[str, Any] = {}
    if view["ipAllow"]:
        entry["ip_allow"] = view["ipAllow"]
    if view["ipDeny"]:
        entry["ip_deny"] = view["ipDeny"]
    if view["basicAuth"]:
        entry["basic_auth"] = [{"user": u["user"], "password": KEEP} for u in view["basicAuth"]]
    if view["password"]:
        entry["password"] = KEEP
    oidc = view["oidc"]
    if oidc is not None:
        sso: dict[str, Any] = {"issuer": oidc["issuer"], "client_id": oidc["clientId"]}
        if oidc["clientSecretSet"]:
            sso["client_secret"] = KEEP
        if oidc["scopes"] != DEFAULT_SCOPES:
            sso["scopes"] = oidc["scopes"]
        for name, api_name in (
            ("allowed_emails", "allowedEmails"),
            ("allowed_domains", "allowedDomains"),
            ("allowed_groups", "allowedGroups"),
        ):
            if oidc[api_name]:
                sso[name] = oidc[api_name]
        if oidc["groupsClaim"] != "groups":
            sso["groups_claim"] = oidc["groupsClaim"]
        entry["oidc"] = sso
    if view["paths"]:
        entry["paths"] = [
            {"prefix": r["prefix"], "action": r["action"]}
            | ({"bearer_token": KEEP} if r["bearerTokenSet"] else {})
            for r in view["paths"]
        ]
    if view["sessionDomain"] is not None:
        entry["session_domain"] = view["sessionDomain"]
    if view["sessionTtl"] != DEFAULT_SESSION_TTL:
        entry["session_ttl"] = view["sessionTtl"]
    if not view["identityHeaders"]:
        entry["identity_headers"] = False
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
        entry["access"] = _access_entry(shown)
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
