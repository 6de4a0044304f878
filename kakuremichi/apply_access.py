"""A tunnel's access policy in ``kakuremichi apply``'s file: read, compared, sent, exported.

Theory of operation
-------------------
``access:`` under a tunnel entry is the tunnel's whole policy (``PUT
/api/tunnels/{id}/access`` in snake_case): ``ip_allow``, ``ip_deny``, ``basic_auth``
(``{user, password}`` each), ``password`` (the sign-in page's password or PIN),
``oidc`` (``issuer``, ``client_id``, ``client_secret``, ``scopes``, ``allowed_emails``,
``allowed_domains``, ``allowed_groups``, ``groups_claim``), ``paths`` (``{prefix,
action, bearer_token}`` each, action auth, bypass, deny or bearer), ``session_domain``,
``session_ttl`` (default 86400) and ``identity_headers`` (default true).  What the entry
leaves out is not in the policy (no ``password:``: the policy has none).  ``access:
{}`` is a policy that lets only share-link holders in.  A tcp/udp tunnel's policy takes
IP rules only.  The entry is checked with ``control.access.AccessIn``, the model
Control checks the PUT with, before anything is sent.  Share links are runtime state
and are never in the file.

Secrets.  A secret (``password``, a basic-auth user's ``password``, ``client_secret``,
``bearer_token``) is written as one of:

* ``keep``: the one Control holds stays (an error if Control holds none, so a policy
  is never made without the secret the file expects);
* ``{env: NAME}``: the environment variable's value (an error if it is unset);
* ``{file: PATH}``: the file's text without its trailing newline (relative paths
  start at the YAML file's directory; at most 64 KiB of UTF-8);
* the text itself.  This works but puts the secret in the file: prefer env or file.
  (A secret that is the word ``keep`` must come from env or file.)

Once read, a secret lives only in a :class:`Secret` beside the validated policy (whose
secret fields are emptied, so no model's repr shows one); it is never printed, in
plans, errors or logs.

Idempotence.  Control shows no secret, only whether each is set (``GET
/api/tunnels/{id}/access``), so the file's policy is compared as that view: without
its secrets, normalised as Control stores it (IP networks as networks, e-mail addresses
and domains in lower case, defaults filled), plus whether each secret is set.  A
secret the file gives where Control already holds one is left out of the PUT, so
Control keeps it: an unchanged file changes nothing, although the file cannot say
whether the secret it gives is the one Control holds.  ``apply --replace-secrets``
sends every secret the file gives, and the plan says "password replaced", never the
value.  A held OIDC client secret is Control's only while the client id stays.

Prune.  A tunnel entry without ``access:`` leaves the tunnel's policy as it is; with
``--prune`` a policy on such a tunnel is removed (``kakuremichi.apply`` plans that
DELETE, as it plans the PUT this module builds).

Export writes a policy as ``access:`` with defaults left out and every secret Control
holds as ``keep``, so applying an export changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from control.access import AccessIn, OidcIn
from kakuremichi.apply_yaml import (
    FileError,
    Place,
    dotted,
    mapping,
    plain,
    scalar,
    sequence,
    show,
    unknown,
    validation_error,
    where,
)

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
#: the OIDC fields that are lists: (file name, API name)
OIDC_LISTS = (
    ("scopes", "scopes"),
    ("allowed_emails", "allowedEmails"),
    ("allowed_domains", "allowedDomains"),
    ("allowed_groups", "allowedGroups"),
)
BASIC_FIELDS = ("user", "password")
PATH_FIELDS = ("prefix", "action", "bearer_token")
#: what a tcp/udp tunnel's policy cannot have (Control takes IP rules only for them)
HTTP_ONLY = ("basic_auth", "password", "oidc", "paths", "session_domain")
DEFAULT_SCOPES = ["openid", "email", "profile"]
DEFAULT_SESSION_TTL = 86400
KEEP = "keep"
MAX_SECRET_FILE = 64 * 1024
_HOW_TO_GIVE = "keep, {env: NAME}, {file: PATH} or the text"


@dataclass(frozen=True)
class Secret:
    """A secret as the file gives it: its value, or None for ``keep``.  ``where`` is the
    "file:line: field" its errors start with; the value is never shown."""

    value: str | None = field(repr=False)
    where: str = field(compare=False)


def _oidc_api(oidc: OidcIn) -> dict[str, Any]:
    """An OIDC client's fields as the API names them (no secret)."""
    out: dict[str, Any] = {"issuer": oidc.issuer, "clientId": oidc.client_id}
    out |= {api_name: list(getattr(oidc, name)) for name, api_name in OIDC_LISTS}
    out["groupsClaim"] = oidc.groups_claim
    return out


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
            else _oidc_api(p.oidc)
            | {
                "allowedEmails": [e.lower() for e in p.oidc.allowed_emails],
                "allowedDomains": [d.lower() for d in p.oidc.allowed_domains],
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


# -- reading access: ------------------------------------------------------------------------


class SecretReader:
    """Reads secrets (``keep``, ``{env: NAME}``, ``{file: PATH}`` or text) for the file
    at ``path``: from ``environ`` and from files relative to ``base``."""

    def __init__(self, path: str, environ: Mapping[str, str], base: Path) -> None:
        self.path = path
        self.environ = environ
        self.base = base

    def read(self, node: yaml.Node, what: str) -> Secret:
        at = f"{where(self.path, node)}: {what}"
        usage = "a secret is keep, {env: NAME}, {file: PATH} or text"
        if isinstance(node, yaml.ScalarNode):
            value = scalar(node)
            if value == KEEP:
                return Secret(None, at)
            if not isinstance(value, str):
                kind = "nothing" if value is None else f"a {type(value).__name__}"
                raise FileError(f"{at}: {usage} (this is {kind}; quote text that looks like one)")
            if not value:
                raise FileError(f"{at}: the secret is empty")
            return Secret(value, at)
        pairs = mapping(self.path, node, what)
        if len(pairs) != 1 or pairs[0][0] not in ("env", "file"):
            raise FileError(f"{at}: {usage}")
        source, _key_node, value_node = pairs[0]
        name = scalar(value_node) if isinstance(value_node, yaml.ScalarNode) else None
        if not isinstance(name, str) or not name:
            raise FileError(f"{where(self.path, value_node)}: {what}.{source}: expected a name")
        text = self._env(name, at) if source == "env" else self._file(name, at)
        if not text:
            raise FileError(f"{at}: the secret from {source} {name} is empty")
        return Secret(text, at)

    def _env(self, name: str, at: str) -> str:
        text = self.environ.get(name)
        if text is None:
            raise FileError(f"{at}: environment variable {name} is not set")
        return text

    def _file(self, name: str, at: str) -> str:
        file = Path(name).expanduser()
        file = file if file.is_absolute() else self.base / file
        try:
            with file.open("rb") as handle:
                raw = handle.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise FileError(f"{at}: cannot read {name}: {exc.strerror}") from None
        if len(raw) > MAX_SECRET_FILE:
            raise FileError(f"{at}: {name} is larger than {MAX_SECRET_FILE} bytes")
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise FileError(f"{at}: {name} is not UTF-8 text") from None


def _with_secret(
    path: str,
    node: yaml.Node,
    what: str,
    loc: Place,
    allowed: tuple[str, ...],
    secret_field: str,
    secrets: SecretReader,
    nodes: dict[Place, yaml.Node],
) -> tuple[dict[str, Any], Secret | None]:
    """A mapping at ``loc`` under ``what`` (a basic-auth user, a path rule, the OIDC
    client) with its one secret field read apart; the value of a secret given (not
    keep) stays in the mapping for the model to check."""
    at = dotted(what, loc)
    nodes[loc] = node
    entry: dict[str, Any] = {}
    secret: Secret | None = None
    for name, name_node, field_node in mapping(path, node, at):
        unknown(path, name_node, at, name, allowed)
        if name == secret_field:
            nodes[(*loc, name)] = field_node
            secret = secrets.read(field_node, f"{at}.{name}")
            if secret.value is not None:
                entry[name] = secret.value
        else:
            entry[name] = plain(path, field_node, what, (*loc, name), nodes)
    return entry, secret


def read_access(
    path: str,
    node: yaml.Node,
    what: str,
    secrets: SecretReader,
    protocol: str,
    domain: str | None,
) -> DesiredAccess:
    """A tunnel entry's ``access:``, its secrets read and the rest checked by
    ``control.access.AccessIn`` (as Control will check it)."""
    data: dict[str, Any] = {}
    nodes: dict[Place, yaml.Node] = {}
    password: Secret | None = None
    oidc_secret: Secret | None = None
    user_secrets: list[tuple[Secret, yaml.Node]] = []
    bearer: dict[int, Secret] = {}
    for key, key_node, value_node in mapping(path, node, what):
        unknown(path, key_node, what, key, ACCESS_FIELDS)
        if protocol != "http" and key in HTTP_ONLY:
            raise FileError(
                f"{where(path, key_node)}: {what}.{key}: a {protocol} tunnel's policy takes "
                "IP rules only (ip_allow, ip_deny)"
            )
        nodes[(key,)] = value_node
        if key == "password":
            password = secrets.read(value_node, f"{what}.password")
            if password.value is not None:
                data["password"] = password.value
        elif key == "basic_auth":
            users = []
            for i, item in enumerate(sequence(path, value_node, f"{what}.{key}")):
                given_user, secret = _with_secret(
                    path, item, what, (key, i), BASIC_FIELDS, "password", secrets, nodes
                )
                if secret is None:
                    raise FileError(
                        f"{where(path, item)}: {what}.{key}[{i}].password: required "
                        f"({_HOW_TO_GIVE})"
                    )
                user_secrets.append((secret, item))
                users.append(given_user)
            data[key] = users
        elif key == "paths":
            rules = []
            for i, item in enumerate(sequence(path, value_node, f"{what}.{key}")):
                given_rule, secret = _with_secret(
                    path, item, what, (key, i), PATH_FIELDS, "bearer_token", secrets, nodes
                )
                if secret is not None:
                    bearer[i] = secret
                rules.append(given_rule)
            data[key] = rules
        elif key == "oidc":
            data[key], oidc_secret = _with_secret(
                path, value_node, what, (key,), OIDC_FIELDS, "client_secret", secrets, nodes
            )
        else:
            data[key] = plain(path, value_node, what, (key,), nodes)
    try:
        policy = AccessIn.model_validate(data)
    except ValidationError as exc:
        raise validation_error(path, node, nodes, what, exc) from None
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
                f"{where(path, item)}: {what}.basic_auth: user {user.user!r} appears twice"
            )
        basic[user.user] = secret
    for i, rule in enumerate(policy.paths):
        at = f"{where(path, nodes[('paths', i)])}: {what}.paths[{i}].bearer_token"
        if rule.action == "bearer" and i not in bearer:
            raise FileError(f"{at}: a bearer rule needs a token ({_HOW_TO_GIVE})")
        if rule.action != "bearer" and i in bearer:
            raise FileError(f"{at}: only a bearer rule takes a token")
    session = policy.session_domain
    if session is not None:
        mine = domain or ""
        if mine != session and not mine.endswith("." + session):
            raise FileError(
                f"{where(path, nodes[('session_domain',)])}: {what}.session_domain: "
                f"{session!r} is not the tunnel's domain or a parent of it"
            )
    return DesiredAccess(policy, password, basic, oidc_secret, bearer, where(path, node))


# -- comparing with Control's view and building the PUT -------------------------------------


def normal_view(view: Mapping[str, Any]) -> dict[str, Any]:
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


EMPTY_VIEW = normal_view({})


def _items(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values) or "none"


def _set(flag: bool) -> str:
    return "set" if flag else "none"


def _flat(view: dict[str, Any]) -> dict[str, str]:
    """A normal view as one short text per file field; secrets only as set or none."""
    out = {
        "ip_allow": _items(view["ipAllow"]),
        "ip_deny": _items(view["ipDeny"]),
        "basic_auth": _items(u["user"] for u in view["basicAuth"]),
        "password": _set(view["password"]),
    }
    oidc = view["oidc"]
    out["oidc"] = "none" if oidc is None else f"{oidc['issuer']} client {oidc['clientId']}"
    if oidc is not None:
        out["oidc.client_secret"] = _set(oidc["clientSecretSet"])
        for name, api_name in OIDC_LISTS:
            out[f"oidc.{name}"] = _items(oidc[api_name])
        out["oidc.groups_claim"] = str(oidc["groupsClaim"])
    out["paths"] = _items(f"{r['prefix']} {r['action']}" for r in view["paths"])
    out["paths.bearer_token"] = _items(r["prefix"] for r in view["paths"] if r["bearerTokenSet"])
    out["session_domain"] = show(view["sessionDomain"])
    out["session_ttl"] = show(view["sessionTtl"])
    out["identity_headers"] = show(view["identityHeaders"])
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


def access_body(
    key: str, access: DesiredAccess, shown: dict[str, Any] | None, http: bool, replace: bool
) -> tuple[dict[str, Any], list[str]]:
    """The PUT body giving the tunnel ``access`` where Control shows ``shown`` (None: no
    policy) and the secrets it sends although Control holds them (``replace``).  A
    secret Control holds is left out (Control keeps it) unless ``replace``."""
    p = access.policy
    cur = normal_view(shown or {})
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

    def send(entry: dict[str, Any], api_name: str, secret: Secret, held: bool, name: str) -> None:
        """Put the secret in ``entry`` unless it is keep or held (and not replaced)."""
        if secret.value is None:  # keep
            if not held:
                raise FileError(
                    f"{secret.where}: keep, but Control holds no {name} for tunnel {key} "
                    "(give it with {env: NAME} or {file: PATH})"
                )
            return
        if held and not replace:
            return
        if held:
            replaced.append(name)
        entry[api_name] = secret.value

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
        send(
            entry,
            "password",
            access.basic[user.user],
            user.user in held_users,
            f"basic_auth {user.user} password",
        )
        users.append(entry)
    body["basicAuth"] = users
    if access.password is None:
        body["password"] = None  # absent would keep Control's
    else:
        send(body, "password", access.password, cur["password"], "password")
    if p.oidc is None:
        body["oidc"] = None
    else:
        oidc = _oidc_api(p.oidc)
        if access.oidc_secret is not None:
            send(oidc, "clientSecret", access.oidc_secret, held_oidc, "oidc client_secret")
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
            send(entry, "bearerToken", access.bearer[i], held, f"paths {rule.prefix} bearer_token")
        paths.append(entry)
    body["paths"] = paths
    body["sessionDomain"] = p.session_domain
    return body, replaced


def access_change(
    key: str, access: DesiredAccess, shown: dict[str, Any] | None, http: bool, replace: bool
) -> tuple[str, dict[str, Any]] | None:
    """The plan's line and the PUT body giving tunnel ``key`` the file's policy, Control
    showing ``shown`` (None: no policy); None if Control's policy is already the file's
    (and no held secret is to be replaced)."""
    body, replaced = access_body(key, access, shown, http, replace)
    new = normal_view(access.view())
    if shown is None:
        words = _access_words(EMPTY_VIEW, new, summary=True)
        text = f"+ access of tunnel {key}" + (
            f": {', '.join(words)}" if words else " (empty: share links only)"
        )
        return text, body
    old = normal_view(shown)
    words = (_access_words(old, new) if old != new else []) + [f"{n} replaced" for n in replaced]
    if not words:
        return None
    return f"~ tunnel {key}: access {', '.join(words)}", body


# -- export -------------------------------------------------------------------------------


def access_entry(shown: Mapping[str, Any]) -> dict[str, Any]:
    """A policy as ``access:`` (defaults left out, every secret Control holds as keep)."""
    view = normal_view(shown)
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
        for name, api_name in OIDC_LISTS[1:]:  # scopes: above, against their default
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
