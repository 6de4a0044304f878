"""``kakuremichi admin …``: manage Control through its REST API.

    kakuremichi admin agent create laptop
    kakuremichi admin gateway list
    kakuremichi admin tunnel create --domain app.example.com --agent laptop --target 127.0.0.1:8080
    kakuremichi admin tunnel delete <id>
    kakuremichi admin tunnel create --domain app.example.com --replica a --replica b:2 --target 127.0.0.1:8080
    kakuremichi admin tunnel drain <id> --agent b

API keys are printed once, when an agent/gateway is created or its key is rotated.
Output is a table, or JSON with ``--json``.  Exit codes: 0 ok, 1 the API refused
(message printed), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from typing import Any

import httpx

from common.config import COMMON, ConfigError, Setting, add_settings, resolve
from common.controlclient import (
    CONTROL_CA,
    client_ssl_context,
    describe_tls_error,
    is_loopback_url,
    plaintext_warning,
)
from common.token import TokenError
from common.token import decode as decode_token

SETTINGS: tuple[Setting, ...] = (
    Setting("control-url", "Control's base URL", "http://127.0.0.1:7700", metavar="URL"),
    Setting("admin-token", "admin bearer token", None, secret=True, metavar="TOKEN"),
    CONTROL_CA,
    *COMMON,
)

_COLUMNS = {
    "agents": ("name", "id", "virtualIp", "enabled", "online", "lastSeen"),
    "gateways": ("name", "id", "slot", "publicIp", "wireguardPort", "enabled", "online"),
    "tunnels": (
        "id",
        "protocol",
        "domain",
        "publicPort",
        "target",
        "agents",
        "enabled",
        "health",
    ),
    "certificates": ("domain", "id", "notAfter", "source"),
    "share-links": ("id", "expiresAt", "maxUses", "uses"),
    "replicas": ("agentName", "weight", "role", "state", "healthDetail"),
}


_PROXY_PROTOCOL_HELP = (
    "tcp/udp tunnels: send the target a PROXY protocol header with the client's address "
    "before its bytes (v1: text, tcp only; v2: binary, also one per udp datagram), for "
    "targets that read one (nginx 'listen ... proxy_protocol', HAProxy 'accept-proxy')"
)


_REPLICA_HELP = (
    "an agent serving the tunnel, as AGENT[:WEIGHT[:ROLE]] (weight 1..1000, default 1; "
    "role active or standby, default active); repeat it for each agent: gateways spread "
    "the traffic over the healthy ones, a standby one only while no active one is healthy"
)
_BALANCE_HELP = "how gateways spread a replicated tunnel's traffic (default round_robin)"
_STICKY_HELP = (
    "keep a client on one replica while it is healthy: cookie (http) or client_ip; off for none"
)


def _replica(text: str) -> dict[str, Any]:
    """``--replica AGENT[:WEIGHT[:ROLE]]`` as the REST API's replica object."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not AGENT[:WEIGHT[:ROLE]]")
    replica: dict[str, Any] = {"agent": parts[0]}
    if len(parts) > 1 and parts[1]:
        if not parts[1].isdigit() or not 1 <= int(parts[1]) <= 1000:
            raise argparse.ArgumentTypeError(f"{text!r}: the weight must be 1..1000")
        replica["weight"] = int(parts[1])
    if len(parts) > 2:
        if parts[2] not in ("active", "standby"):
            raise argparse.ArgumentTypeError(f"{text!r}: the role must be active or standby")
        replica["role"] = parts[2]
    return replica


def _replica_options(args: argparse.Namespace, body: dict[str, Any]) -> None:
    if args.replica:
        body["replicas"] = args.replica
    if args.balance is not None:
        body["balance"] = args.balance
    if args.sticky is not None:
        body["sticky"] = None if args.sticky == "off" else args.sticky


def _with_agents(tunnels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tunnels with an ``agents`` column: each agent's name, and its state when it takes
    no traffic (draining, offline, unhealthy) or only as a standby."""

    def name(replica: dict[str, Any]) -> str:
        state = replica.get("state")
        quiet = state in ("draining", "offline", "unhealthy", "standby")
        return f"{replica['agentName']} ({state})" if quiet else str(replica["agentName"])

    out = []
    for tunnel in tunnels:
        replicas = tunnel.get("replicas") or []
        agents: str | None
        if len(replicas) > 1:
            agents = ", ".join(name(r) for r in replicas)
        else:
            agents = tunnel.get("agentName")
        out.append({**tunnel, "agents": agents})
    return out


class ApiFailure(Exception):
    """The API answered with an error (or could not be reached)."""


class Client:
    """A thin synchronous REST client."""

    def __init__(self, base_url: str, token: str, ca_file: str | None = None) -> None:
        verify: ssl.SSLContext | bool = True
        if base_url.startswith("https://"):
            try:
                verify = client_ssl_context(ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--control-ca: cannot load {ca_file}: {exc}") from exc
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
            verify=verify,
        )

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        try:
            response = self.http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            reason = describe_tls_error(exc)
            raise ApiFailure(f"cannot reach Control at {self.http.base_url}: {reason}") from exc
        if response.status_code == 204:
            return None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                error = data["error"]
                raise ApiFailure(
                    f"{response.status_code} {error.get('code')}: {error.get('message')}"
                )
            raise ApiFailure(f"HTTP {response.status_code}")
        return data

    def list_all(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self.call("GET", path, params={**(params or {}), "limit": 500, "offset": offset})
            items += page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return items


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    grid = [list(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in grid
    )


def _print(args: argparse.Namespace, collection: str, data: Any) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    elif isinstance(data, list):
        print(_table(data, _COLUMNS[collection]) if data else f"(no {collection})")
    else:
        for key, value in data.items():
            if key not in ("apiKey", "token", "certificate"):
                print(f"{key}: {value}")


def _show_key(kind: str, data: dict[str, Any]) -> None:
    print(f"\nAPI key for {kind} {data['name']!r} (shown once, store it now):\n  {data['apiKey']}")
    token = data.get("token")
    if not token:
        return
    print(
        f"\nEnrollment token (Control's URL, this key and Control's certificate pin in one;"
        f" shown once):\n  {token}\n\nStart the {kind} with it:\n"
        f"  KAKUREMICHI_TOKEN='{token}' kakuremichi {kind}"
        + (" --public-ip <this host's public address>" if kind == "gateway" else "")
    )
    try:
        url = decode_token(token).control_url
    except TokenError:
        return
    if is_loopback_url(url):
        print(
            f"\nNote: the token names Control at {url}, reachable only from this machine; "
            "start Control with --public-url set to the address agents and gateways reach."
        )


def _client_verbs(client: Client, args: argparse.Namespace, kind: str) -> int:
    plural = kind + "s"
    if args.action == "list":
        _print(args, plural, client.list_all(f"/api/{plural}"))
    elif args.action == "create":
        data = client.call("POST", f"/api/{plural}", {"name": args.name})
        _print(args, plural, data)
        if not args.json:
            _show_key(kind, data)
    elif args.action == "get":
        _print(args, plural, client.call("GET", f"/api/{plural}/{args.ref}"))
    elif args.action == "rotate-key":
        data = client.call("POST", f"/api/{plural}/{args.ref}/rotate-key")
        _print(args, plural, data)
        if not args.json:
            _show_key(kind, data)
    elif args.action == "delete":
        client.call("DELETE", f"/api/{plural}/{args.ref}")
        print(f"deleted {kind} {args.ref}")
    elif args.action in ("enable", "disable"):
        enabled = args.action == "enable"
        data = client.call("PATCH", f"/api/{plural}/{args.ref}", {"enabled": enabled})
        if args.json:
            _print(args, plural, data)
        else:
            print(f"{args.action}d {kind} {data['name']}")
    return 0


def _tunnel_verbs(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        params = {"agent": args.agent} if args.agent else None
        listed = client.list_all("/api/tunnels", params)
        _print(args, "tunnels", listed if args.json else _with_agents(listed))
    elif args.action == "create":
        body: dict[str, Any] = {
            "protocol": args.protocol,
            "target": args.target,
        }
        if args.agent:
            body["agent"] = args.agent
        _replica_options(args, body)
        if args.domain:
            body["domain"] = args.domain
        if args.public_port is not None:
            body["publicPort"] = args.public_port
        if args.disabled:
            body["enabled"] = False
        if args.proxy_protocol not in (None, "off"):
            body["proxyProtocol"] = args.proxy_protocol
        _print(args, "tunnels", client.call("POST", "/api/tunnels", body))
    elif args.action == "get":
        shown = client.call("GET", f"/api/tunnels/{args.id}")
        if args.json:
            _print(args, "tunnels", shown)
        else:
            _print(args, "tunnels", {k: v for k, v in shown.items() if k != "replicas"})
            print("replicas:")
            print(_table(shown["replicas"], _COLUMNS["replicas"]))
    elif args.action == "update":
        body = {}
        for key, attr in (
            ("domain", "domain"),
            ("publicPort", "public_port"),
            ("target", "target"),
            ("agent", "agent"),
            ("protocol", "protocol"),
        ):
            if getattr(args, attr) is not None:
                body[key] = getattr(args, attr)
        if args.enable:
            body["enabled"] = True
        if args.disable:
            body["enabled"] = False
        if args.proxy_protocol is not None:
            body["proxyProtocol"] = None if args.proxy_protocol == "off" else args.proxy_protocol
        _replica_options(args, body)
        _print(args, "tunnels", client.call("PATCH", f"/api/tunnels/{args.id}", body))
    elif args.action in ("drain", "undrain"):
        path = f"/api/tunnels/{args.id}/replicas/{args.agent}/{args.action}"
        tunnel = client.call("POST", path)
        if args.json:
            _print(args, "tunnels", tunnel)
        else:
            print(f"tunnel {args.id}: {args.action}ed {args.agent}")
            print(_table(tunnel["replicas"], _COLUMNS["replicas"]))
    elif args.action == "delete":
        client.call("DELETE", f"/api/tunnels/{args.id}")
        print(f"deleted tunnel {args.id}")
    elif args.action == "access":
        return _access(client, args)
    elif args.action == "share":
        body = {"expiresIn": _duration(args.expires)}
        if args.uses is not None:
            body["maxUses"] = args.uses
        link = client.call("POST", f"/api/tunnels/{args.id}/share-links", body)
        if args.json:
            print(json.dumps(link, indent=2))
        else:
            print(f"share link {link['id']} (shown once; anyone holding it gets in):")
            print(link["url"])
    elif args.action == "shares":
        _print(
            args, "share-links", client.call("GET", f"/api/tunnels/{args.id}/share-links")["items"]
        )
    elif args.action == "unshare":
        client.call("DELETE", f"/api/tunnels/{args.id}/share-links/{args.link}")
        print(f"deleted share link {args.link}")
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """``90``, ``30m``, ``12h``, ``7d`` → seconds."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    if not number.isascii() or not number.isdigit() or len(number) > 9:
        raise ConfigError(f"--expires: {text!r} is not a duration (e.g. 3600, 30m, 12h, 7d)")
    return int(number) * (unit or 1)


def _access(client: Client, args: argparse.Namespace) -> int:
    path = f"/api/tunnels/{args.id}/access"
    if args.clear:
        client.call("DELETE", path)
        print(f"tunnel {args.id} is open to anyone again")
        return 0
    changes = any(
        getattr(args, name) not in (None, [], False)
        for name in (
            "allow_ip",
            "deny_ip",
            "basic_auth",
            "password",
            "password_stdin",
            "no_password",
            "oidc_issuer",
            "path",
            "session_domain",
            "session_ttl",
            "no_identity_headers",
        )
    )
    if not changes:
        print(json.dumps(client.call("GET", path), indent=2))
        return 0
    body: dict[str, Any] = {
        "ipAllow": args.allow_ip or [],
        "ipDeny": args.deny_ip or [],
        "basicAuth": [],
        "paths": [],
        "identityHeaders": not args.no_identity_headers,
    }
    for entry in args.basic_auth or []:
        user, sep, password = entry.partition(":")
        body["basicAuth"].append({"user": user, **({"password": password} if sep else {})})
    if args.password_stdin:
        body["password"] = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        body["password"] = args.password
    elif args.no_password:
        body["password"] = None
    if args.oidc_issuer:
        if not args.oidc_client_id:
            raise ConfigError("--oidc-issuer needs --oidc-client-id")
        oidc: dict[str, Any] = {
            "issuer": args.oidc_issuer,
            "clientId": args.oidc_client_id,
            "allowedEmails": args.oidc_allow_email or [],
            "allowedDomains": args.oidc_allow_domain or [],
            "allowedGroups": args.oidc_allow_group or [],
        }
        if args.oidc_client_secret:
            oidc["clientSecret"] = args.oidc_client_secret
        if args.oidc_groups_claim:
            oidc["groupsClaim"] = args.oidc_groups_claim
        body["oidc"] = oidc
    for rule in args.path or []:
        prefix, sep, action = rule.partition("=")
        if not sep:
            raise ConfigError(f"--path: {rule!r} is not PREFIX=ACTION[:TOKEN]")
        action, sep, token = action.partition(":")
        body["paths"].append(
            {"prefix": prefix, "action": action, **({"bearerToken": token} if sep else {})}
        )
    if args.session_domain:
        body["sessionDomain"] = args.session_domain
    if args.session_ttl is not None:
        body["sessionTtl"] = _duration(args.session_ttl)
    print(json.dumps(client.call("PUT", path, body), indent=2))
    return 0


def _certificate_verbs(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        _print(args, "certificates", client.list_all("/api/certificates"))
    elif args.action == "create":
        try:
            with open(args.cert) as cert_file, open(args.key) as key_file:
                body = {
                    "domain": args.domain,
                    "certificate": cert_file.read(),
                    "privateKey": key_file.read(),
                }
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        _print(args, "certificates", client.call("POST", "/api/certificates", body))
    elif args.action == "delete":
        client.call("DELETE", f"/api/certificates/{args.ref}")
        print(f"deleted certificate {args.ref}")
    return 0


def run(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    token = values["admin_token"]
    if not token:
        raise ConfigError("--admin-token (or KAKUREMICHI_ADMIN_TOKEN[_FILE]) is required")
    warning = plaintext_warning(values["control_url"])
    if warning:
        print(f"kakuremichi admin: warning: {warning}", file=sys.stderr)
    client = Client(values["control_url"], token, values["control_ca"])
    try:
        if args.noun in ("agent", "gateway"):
            return _client_verbs(client, args, args.noun)
        if args.noun == "tunnel":
            return _tunnel_verbs(client, args)
        return _certificate_verbs(client, args)
    except ApiFailure as exc:
        print(f"kakuremichi admin: {exc}", file=sys.stderr)
        return 1
    finally:
        client.http.close()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "admin",
        help="manage agents, gateways, tunnels and certificates through the REST API",
        description="Manage Control through its REST API (needs the admin token).",
    )
    nouns = parser.add_subparsers(dest="noun", metavar="NOUN", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_settings(p, SETTINGS)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(run=run)

    for kind in ("agent", "gateway"):
        noun = nouns.add_parser(kind, help=f"manage {kind}s")
        actions = noun.add_subparsers(dest="action", metavar="ACTION", required=True)
        common(actions.add_parser("list", help=f"list {kind}s"))
        create = actions.add_parser("create", help=f"create a {kind} and print its API key once")
        create.add_argument("name", help="unique name (lower-case letters, digits, . _ -)")
        common(create)
        for action, text in (
            ("get", "show one"),
            ("delete", f"delete a {kind}"),
            ("rotate-key", "issue a new API key (prints it once)"),
            (
                "disable",
                f"disable a {kind}: Control refuses its connection (close code 4008) and no "
                "other client peers with it"
                + (" (its tunnels answer as disabled)" if kind == "agent" else "")
                + "; its key stays valid",
            ),
            ("enable", f"enable a disabled {kind} again (it reconnects with the same key)"),
        ):
            sub = actions.add_parser(
                action, help=text, description=text[:1].upper() + text[1:] + "."
            )
            sub.add_argument("ref", help="id or name")
            common(sub)

    noun = nouns.add_parser("tunnel", help="manage tunnels")
    actions = noun.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list tunnels")
    listing.add_argument("--agent", help="only this agent's tunnels (id or name)")
    common(listing)
    create = actions.add_parser("create", help="create a tunnel")
    create.add_argument("--protocol", choices=("http", "tcp", "udp"), default="http")
    create.add_argument("--domain", help="public hostname (http)")
    create.add_argument("--public-port", type=int, help="public port (tcp/udp)")
    create.add_argument(
        "--target", required=True, help="host:port or http(s) URL on the agent's side"
    )
    create.add_argument(
        "--agent",
        help="agent id or name (required without --replica; with it, the one of them "
        "older gateways route to, default the first)",
    )
    create.add_argument(
        "--replica",
        action="append",
        type=_replica,
        metavar="AGENT[:WEIGHT[:ROLE]]",
        help=_REPLICA_HELP,
    )
    create.add_argument(
        "--balance", choices=("round_robin", "least_connections"), help=_BALANCE_HELP
    )
    create.add_argument("--sticky", choices=("cookie", "client_ip", "off"), help=_STICKY_HELP)
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    create.add_argument(
        "--proxy-protocol",
        choices=("v1", "v2", "off"),
        help=_PROXY_PROTOCOL_HELP + " (default off)",
    )
    common(create)
    update = actions.add_parser("update", help="change a tunnel")
    update.add_argument("id")
    update.add_argument("--protocol", choices=("http", "tcp", "udp"))
    update.add_argument("--domain")
    update.add_argument("--public-port", type=int)
    update.add_argument("--target")
    update.add_argument("--agent")
    toggle = update.add_mutually_exclusive_group()
    toggle.add_argument("--enable", action="store_true")
    toggle.add_argument("--disable", action="store_true")
    update.add_argument("--proxy-protocol", choices=("v1", "v2", "off"), help=_PROXY_PROTOCOL_HELP)
    update.add_argument(
        "--replica",
        action="append",
        type=_replica,
        metavar="AGENT[:WEIGHT[:ROLE]]",
        help=_REPLICA_HELP + " (replaces the whole set; a draining agent that stays keeps "
        "draining)",
    )
    update.add_argument(
        "--balance", choices=("round_robin", "least_connections"), help=_BALANCE_HELP
    )
    update.add_argument("--sticky", choices=("cookie", "client_ip", "off"), help=_STICKY_HELP)
    common(update)
    for action, text in (
        (
            "drain",
            "take one agent of a replicated tunnel out gracefully: gateways send it no new "
            "requests or connections (open ones finish); the others take the traffic",
        ),
        ("undrain", "let a drained agent take traffic again"),
    ):
        sub = actions.add_parser(action, help=text, description=text[:1].upper() + text[1:] + ".")
        sub.add_argument("id")
        sub.add_argument("--agent", required=True, help="the replica's agent (id or name)")
        common(sub)
    for action, text in (("get", "show one"), ("delete", "delete a tunnel")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("id")
        common(sub)
    access = actions.add_parser(
        "access",
        help="show or set who may reach a tunnel",
        description="Without options: show the tunnel's access policy. With options: set "
        "the whole policy (what is not given is removed, except secrets, which keep their "
        "stored value: a --basic-auth USER without :PASSWORD, a bearer --path without "
        ":TOKEN, the OIDC client secret, the password unless --no-password).",
    )
    access.add_argument("id")
    access.add_argument("--clear", action="store_true", help="remove the policy (open to anyone)")
    access.add_argument(
        "--allow-ip", action="append", metavar="CIDR", help="only these may connect"
    )
    access.add_argument("--deny-ip", action="append", metavar="CIDR", help="these may not connect")
    access.add_argument(
        "--basic-auth", action="append", metavar="USER[:PASSWORD]", help="an HTTP basic-auth user"
    )
    secret = access.add_mutually_exclusive_group()
    secret.add_argument("--password", metavar="PIN", help="a sign-in page with this password/PIN")
    secret.add_argument(
        "--password-stdin", action="store_true", help="read the password/PIN from standard input"
    )
    secret.add_argument("--no-password", action="store_true", help="remove the password")
    access.add_argument("--oidc-issuer", metavar="URL", help="OIDC single sign-on provider")
    access.add_argument("--oidc-client-id", metavar="ID")
    access.add_argument("--oidc-client-secret", metavar="SECRET")
    access.add_argument("--oidc-allow-email", action="append", metavar="EMAIL")
    access.add_argument("--oidc-allow-domain", action="append", metavar="DOMAIN")
    access.add_argument("--oidc-allow-group", action="append", metavar="GROUP")
    access.add_argument("--oidc-groups-claim", metavar="CLAIM", help="default: groups")
    access.add_argument(
        "--path",
        action="append",
        metavar="PREFIX=ACTION[:TOKEN]",
        help="a path rule: ACTION is auth, bypass, deny or bearer (with :TOKEN)",
    )
    access.add_argument(
        "--session-domain", metavar="DOMAIN", help="share sign-in with the tunnels under DOMAIN"
    )
    access.add_argument("--session-ttl", metavar="DURATION", help="session lifetime (e.g. 12h)")
    access.add_argument(
        "--no-identity-headers",
        action="store_true",
        help="do not send X-Auth-User/-Email/-Groups to the app",
    )
    common(access)
    share = actions.add_parser("share", help="make a share link (printed once)")
    share.add_argument("id")
    share.add_argument("--expires", default="24h", help="e.g. 30m, 12h, 7d (default 24h)")
    share.add_argument("--uses", type=int, help="how many times it opens (default: any)")
    common(share)
    shares = actions.add_parser("shares", help="list a tunnel's share links")
    shares.add_argument("id")
    common(shares)
    unshare = actions.add_parser("unshare", help="delete a share link (its sessions end)")
    unshare.add_argument("id")
    unshare.add_argument("link", help="share link id")
    common(unshare)

    noun = nouns.add_parser("certificate", help="manage certificates")
    actions = noun.add_subparsers(dest="action", metavar="ACTION", required=True)
    common(actions.add_parser("list", help="list certificates"))
    create = actions.add_parser("create", help="upload a certificate chain and key")
    create.add_argument("--domain", required=True)
    create.add_argument("--cert", required=True, help="PEM chain file")
    create.add_argument("--key", required=True, help="PEM private key file")
    common(create)
    delete = actions.add_parser("delete", help="delete a certificate")
    delete.add_argument("ref", help="id or domain")
    common(delete)
