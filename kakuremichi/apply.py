"""Tunnels as code: ``kakuremichi apply -f kakuremichi.yaml`` and ``kakuremichi export``.

Theory of operation
-------------------
The file declares what Control should hold::

    version: 1
    agents:
      - name: laptop
      - name: old-server
        enabled: false                   # refused by Control, peers with no gateway
    gateways:
      - name: edge-1
    tunnels:
      - domain: app.example.com          # protocol http (the default): keyed by domain
        agent: laptop
        target: 127.0.0.1:8080
      - protocol: tcp                    # tcp/udp: keyed by protocol and public port
        public_port: 2222
        agent: laptop
        target: 127.0.0.1:22
        enabled: false

Agents and gateways are named (``- laptop`` for short) and enabled unless the entry
says ``enabled: false`` (as ``kakuremichi admin agent disable``: Control refuses its
connection and no other client peers with it; its key stays valid, so ``enabled:
true`` brings it back).  Tunnels are known by what routes to them (an http tunnel by
its domain, a tcp/udp one by protocol and public port), so a changed target, agent or
``enabled`` is an update of the same tunnel.  Every entry is checked with the
REST API's own models (``control.api.models``) before anything is sent, and an error
names the file, the line and the field.

``apply`` reads Control's state through the REST API, computes a :class:`Plan` (what to
create, update and, with ``--prune``, delete: tunnels first, then agents and gateways
no longer named), prints it and, unless ``--dry-run``, carries it out in that order,
printing each change as it is made; a second ``apply`` of the same file changes
nothing.  A created agent's or gateway's API key and enrollment token are printed once;
they are never written to the file or to ``export``.

``export`` writes Control's current agents, gateways and tunnels in the same format
(sorted, defaults left out: ``enabled: false`` only where disabled), so ``apply -f``
of an export is a no-op.  Access policies are not handled yet: a ``policies`` key is
refused rather than ignored.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from common.config import COMMON, ConfigError, Setting, add_settings, resolve
from common.controlclient import CONTROL_CA, plaintext_warning
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
TUNNEL_FIELDS = ("protocol", "domain", "public_port", "publicPort", "agent", "target", "enabled")


class FileError(Exception):
    """The file cannot be applied; the message names the file, line and field."""


@dataclass(frozen=True)
class DesiredTunnel:
    """One tunnel as the file declares it (normalised by the API's model)."""

    protocol: str
    domain: str | None
    public_port: int | None
    agent: str
    target: str
    enabled: bool
    line: int = 0

    @property
    def key(self) -> str:
        return tunnel_key(self.protocol, self.domain, self.public_port)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"protocol": self.protocol, "agent": self.agent}
        if self.domain is not None:
            body["domain"] = self.domain
        if self.public_port is not None:
            body["publicPort"] = self.public_port
        body["target"] = self.target
        body["enabled"] = self.enabled
        return body


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


def _scalar(node: yaml.Node) -> Any:
    """A scalar node's value as YAML 1.1 (PyYAML's safe loader) reads it."""
    return yaml.safe_load(yaml.serialize(node))


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


def _fields(
    path: str, node: yaml.Node, what: str, allowed: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, yaml.Node]]:
    values: dict[str, Any] = {}
    nodes: dict[str, yaml.Node] = {}
    for key, key_node, value_node in _mapping(path, node, what):
        if key not in allowed:
            raise FileError(
                f"{_where(path, key_node)}: {what}.{key}: unknown field (allowed: "
                f"{', '.join(a for a in allowed if a != 'publicPort')})"
            )
        if not isinstance(value_node, yaml.ScalarNode):
            raise FileError(f"{_where(path, value_node)}: {what}.{key}: expected a single value")
        values[key], nodes[key] = _scalar(value_node), value_node
    return values, nodes


def _validation(
    path: str, node: yaml.Node, nodes: dict[str, yaml.Node], what: str, exc: ValidationError
) -> FileError:
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ())]
    name = loc[0] if loc else ""
    snake = {"publicPort": "public_port"}.get(name, name)
    at = nodes.get(name) or nodes.get(snake) or node
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "required"
    return FileError(f"{_where(path, at)}: {what}{'.' + snake if snake else ''}: {message}")


def parse(text: str, path: str = "kakuremichi.yaml") -> Desired:
    """Read a file's text into a :class:`Desired` (:class:`FileError` if it is not one)."""
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
    desired = Desired()
    sections: dict[str, yaml.Node] = {}
    for key, key_node, value_node in _mapping(path, root, "the file"):
        if key == "policies":
            raise FileError(
                f"{_where(path, key_node)}: policies: access policies are not handled by "
                "apply yet; set them with the REST API or the dashboard"
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
                raise _validation(path, item, nodes, what, exc) from None
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
        what = f"tunnels[{index}]"
        values, nodes = _fields(path, item, what, TUNNEL_FIELDS)
        try:
            model = TunnelCreate.model_validate(values)
        except ValidationError as exc:
            raise _validation(path, item, nodes, what, exc) from None
        if model.agent is None:  # replicas (several agents) are not declared in files yet
            raise FileError(f"{_where(path, item)}: {what}.agent: required")
        tunnel = DesiredTunnel(
            model.protocol,
            model.domain,
            model.public_port,
            model.agent,
            model.target,
            model.enabled,
            item.start_mark.line + 1,
        )
        if tunnel.key in desired.tunnels:
            raise FileError(
                f"{_where(path, item)}: {what}: tunnel {tunnel.key} is already declared on "
                f"line {desired.tunnels[tunnel.key].line}"
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

    @classmethod
    def read(cls, client: Client) -> Current:
        tunnels = {
            tunnel_key(t["protocol"], t["domain"], t["publicPort"]): t
            for t in client.list_all("/api/tunnels")
        }
        return cls(
            {a["name"]: a for a in client.list_all("/api/agents")},
            {g["name"]: g for g in client.list_all("/api/gateways")},
            tunnels,
        )


@dataclass(frozen=True)
class Change:
    """One step of a plan: a line to print and the REST call that makes it."""

    text: str
    method: str
    path: str
    body: dict[str, Any] | None = None


def _describe(t: DesiredTunnel | dict[str, Any]) -> str:
    if isinstance(t, DesiredTunnel):
        agent, target, enabled = t.agent, t.target, t.enabled
    else:
        agent, target, enabled = t["agentName"], t["target"], t["enabled"]
    return f"-> {agent} {target}" + ("" if enabled else " (disabled)")


def plan(desired: Desired, current: Current, prune: bool = False) -> list[Change]:
    """The changes that make ``current`` match ``desired``, in the order to make them."""
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
        if tunnel.agent not in referenced:
            raise FileError(
                f"line {tunnel.line}: tunnel {key}: agent {tunnel.agent!r} is neither in the "
                "file's agents nor on Control"
            )
        existing = current.tunnels.get(key)
        if existing is None:
            changes.append(
                Change(f"+ tunnel {key} {_describe(tunnel)}", "POST", "/api/tunnels", tunnel.body())
            )
            continue
        diff: dict[str, Any] = {}
        words: list[str] = []
        for field_name, api_name, old in (
            ("agent", "agent", existing["agentName"]),
            ("target", "target", existing["target"]),
            ("enabled", "enabled", existing["enabled"]),
        ):
            new = getattr(tunnel, field_name)
            if new != old:
                diff[api_name] = new
                words.append(f"{field_name} {_show(old)} -> {_show(new)}")
        if diff:
            changes.append(
                Change(
                    f"~ tunnel {key}: {', '.join(words)}",
                    "PATCH",
                    f"/api/tunnels/{existing['id']}",
                    diff,
                )
            )
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
        for kind, names, have in (
            ("agent", desired.agents, current.agents),
            ("gateway", desired.gateways, current.gateways),
        ):
            for name, row in sorted(have.items()):
                if name not in names:
                    used = any(t.agent == name for t in desired.tunnels.values() if kind == "agent")
                    if used:
                        raise FileError(
                            f"agent {name!r} is not in the file's agents but its tunnels are; "
                            "add it to agents or move the tunnels"
                        )
                    changes.append(
                        Change(f"- {kind} {name}", "DELETE", f"/api/{kind}s/{row['id']}")
                    )
    return changes


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def execute(client: Client, changes: list[Change], out: Any = None) -> None:
    """Make each change in order, printing it once done (keys and tokens once)."""
    out = sys.stdout if out is None else out
    for change in changes:
        data = client.call(change.method, change.path, change.body)
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


def export_text(current: Current) -> str:
    """Control's state in the file format (no keys, no ids, defaults left out)."""
    tunnels = []
    for _key, t in sorted(
        current.tunnels.items(),
        key=lambda kv: (kv[1]["protocol"], kv[1]["domain"] or "", kv[1]["publicPort"] or 0),
    ):
        entry: dict[str, Any] = {}
        if t["protocol"] != "http":
            entry["protocol"] = t["protocol"]
            entry["public_port"] = t["publicPort"]
        else:
            entry["domain"] = t["domain"]
        entry["agent"] = t["agentName"]
        entry["target"] = t["target"]
        if not t["enabled"]:
            entry["enabled"] = False
        tunnels.append(entry)
    document = {
        "version": VERSION,
        "agents": [_client_entry(current.agents[n]) for n in sorted(current.agents)],
        "gateways": [_client_entry(current.gateways[n]) for n in sorted(current.gateways)],
        "tunnels": tunnels,
    }
    header = "# kakuremichi export: apply with 'kakuremichi apply -f FILE' (no keys in it)\n"
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
        changes = plan(desired, Current.read(client), prune=args.prune)
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
        help="make Control match a kakuremichi.yaml (agents, gateways, tunnels)",
        description=(
            "Read a file declaring agents, gateways and tunnels and make Control match it "
            "through the REST API: create what is missing, update what differs, and with "
            "--prune delete what the file no longer names. Running it again changes "
            "nothing. New agents' and gateways' API keys and enrollment tokens are "
            "printed once. Exit codes: 0 done, 1 the API refused, 2 a bad file or setting."
        ),
    )
    apply_parser.add_argument("-f", "--file", required=True, metavar="FILE", help="YAML file")
    apply_parser.add_argument(
        "--dry-run", action="store_true", help="print the changes without making them"
    )
    apply_parser.add_argument(
        "--prune",
        action="store_true",
        help="also delete tunnels, agents and gateways the file does not name",
    )
    add_settings(apply_parser, SETTINGS)
    apply_parser.set_defaults(run=run_apply)
    export_parser = subparsers.add_parser(
        "export",
        help="write Control's agents, gateways and tunnels as a kakuremichi.yaml",
        description=(
            "Write Control's current agents, gateways and tunnels in the format "
            "'kakuremichi apply -f' reads (no keys or tokens in it)."
        ),
    )
    export_parser.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    add_settings(export_parser, SETTINGS)
    export_parser.set_defaults(run=run_export)
