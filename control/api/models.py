"""Request and response bodies of the REST API (pydantic), with our validation rules.

The same models feed the OpenAPI document, so what is documented is what is checked.
Bodies use camelCase, reject unknown fields, and return 422 with the offending field
named when a value is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

import idna
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from common.protocol import proxy_protocol_problem, sticky_problem

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_URL = re.compile(
    r"^(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:\[\]?#\s]+)(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[^\s#]*)?$"
)

#: the shape of the ids Control makes (uuid4): a name of that shape is refused, so a
#: reference in a path (an id or a name) always means one object
_ID_SHAPE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _not_an_id(value: str) -> str:
    if _ID_SHAPE.match(value):
        raise ValueError("a name may not have the shape of an id (8-4-4-4-12 hex digits)")
    return value


Name = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$"),
    AfterValidator(_not_an_id),
    Field(
        description="lower-case letters, digits, '.', '_', '-'; 1-63 characters; "
        "not shaped like an id"
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]


def check_domain(value: str, *, wildcard: bool = False) -> str:
    """A fully qualified DNS name (RFC 1123 labels), lower-cased, at least two labels;
    an internationalised name is stored as its A-labels (IDNA 2008 with UTS #46
    mapping: ``Café.Example`` → ``xn--caf-dma.example``), which is what clients send in
    Host and SNI and what the gateways' routers and ACME match.  With ``wildcard``,
    also ``*.`` before such a name (one label, as a certificate's wildcard covers)."""
    domain = value.strip().rstrip(".")
    if wildcard and domain.startswith("*."):
        return "*." + check_domain(domain[2:])
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise ValueError("domain is not a valid internationalised domain name") from None
    else:
        domain = domain.lower()
        if "xn--" in domain:  # A-labels given as such must decode (RFC 5891 §5.4)
            try:
                idna.decode(domain)
            except (idna.IDNAError, UnicodeError, ValueError):
                raise ValueError("domain has an A-label that is not valid punycode") from None
    if len(domain) > 253:
        raise ValueError("domain is longer than 253 characters")
    labels = domain.split(".")
    if len(labels) < 2:
        raise ValueError("domain needs at least two labels (e.g. app.example.com)")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"invalid domain label {label!r}")
    if labels[-1].isdigit():
        raise ValueError("domain must not be an IP address")
    return domain


def _check_host(host: str) -> None:
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
        return
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(p) for p in host.split(".")):
        raise ValueError(f"invalid host {host!r}")
    if host.replace(".", "").isdigit():
        raise ValueError(f"invalid IPv4 address {host!r}")


def check_target(value: str, *, allow_url: bool) -> str:
    """``host:port`` (``[v6]:port`` for IPv6) or, for HTTP tunnels, an http(s) URL."""
    target = value.strip()
    match = _URL.match(target)
    if match:
        if not allow_url:
            raise ValueError("tcp/udp tunnel targets must be host:port, not a URL")
        _check_host(match["host"])
        if match["port"] is not None and not 1 <= int(match["port"]) <= 65535:
            raise ValueError("target port must be 1-65535")
        return target
    if "://" in target:
        raise ValueError("target URL must start with http:// or https://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError("target must be host:port (e.g. 127.0.0.1:8080) or an http(s) URL")
    if not 1 <= int(port) <= 65535:
        raise ValueError("target port must be 1-65535")
    if ":" in host and not host.startswith("["):
        raise ValueError("IPv6 targets are written [addr]:port")
    _check_host(host)
    return target


class _Body(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        str_max_length=4096,
        strict=True,
    )


_CLIENT_ENABLED = (
    "false: Control refuses its connection (close code 4008) and no other client peers "
    "with it (a disabled agent's tunnels are answered as disabled); its key stays valid"
)


class ClientCreate(_Body):
    """Create an agent or a gateway; the response carries its API key, once."""

    name: Name
    enabled: bool = Field(default=True, description=_CLIENT_ENABLED)


class ClientUpdate(_Body):
    """Rename, enable or disable an agent or a gateway (give at least one field)."""

    name: Name | None = None
    enabled: bool | None = Field(default=None, description=_CLIENT_ENABLED)

    @model_validator(mode="after")
    def _something(self) -> ClientUpdate:
        for field in ("name", "enabled"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise ValueError(f"{field} cannot be null")
        if not self.model_fields_set:
            raise ValueError("give name or enabled")
        return self


Protocol = Literal["http", "tcp", "udp"]
ProxyProtocol = Literal["v1", "v2"]
_PROXY_PROTOCOL = (
    "tcp/udp tunnels: the PROXY protocol header the agent sends the target before the "
    "client's bytes, so the app sees the client's address: v1 (text, tcp only) or v2 "
    "(binary; for udp one in front of every datagram); null for none"
)


Balance = Literal["round_robin", "least_connections"]
Sticky = Literal["cookie", "client_ip"]
_REPLICAS = (
    "the agents serving the tunnel (the same target on each), at most 64: gateways spread "
    "requests (raw tunnels: connections, flows) over the healthy ones; a standby replica "
    "takes traffic only while no active one is healthy.  With agent too, agent must be "
    "one of them (the one older gateways route to; default: the first)"
)
_BALANCE = "how gateways spread a replicated tunnel's traffic (default round_robin)"
_STICKY = (
    "keep a client on one replica while it is healthy: cookie (http; the gateway sets "
    "kkm_replica) or client_ip; null for none"
)


class ReplicaIn(_Body):
    """One agent of a tunnel with replicas."""

    agent: str = Field(min_length=1, max_length=63, description="agent id or name")
    weight: int = Field(default=1, ge=1, le=1000, description="share of new traffic")
    role: Literal["active", "standby"] = "active"


class TunnelCreate(_Body):
    """A public hostname (http) or public port (tcp/udp) forwarded to a target on an agent."""

    protocol: Protocol = "http"
    domain: str | None = Field(
        default=None,
        description="public hostname (http tunnels); *.parent for every name one label "
        "under parent that no other tunnel names (needs a certificate for it, uploaded or "
        "from a gateway with DNS-01 for its zone)",
    )
    public_port: Port | None = Field(default=None, description="public port (tcp/udp tunnels)")
    target: str = Field(max_length=2048, description="host:port or http(s) URL, agent side")
    # before agent: agent's validator sees whether replicas were given
    replicas: list[ReplicaIn] | None = Field(default=None, max_length=64, description=_REPLICAS)
    agent: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        validate_default=True,
        description="agent id or name (required without replicas)",
    )
    enabled: bool = True
    proxy_protocol: ProxyProtocol | None = Field(default=None, description=_PROXY_PROTOCOL)
    balance: Balance = Field(default="round_robin", description=_BALANCE)
    sticky: Sticky | None = Field(default=None, description=_STICKY)

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        return None if value is None else check_domain(value, wildcard=True)

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and "replicas" in info.data and info.data["replicas"] is None:
            raise ValueError("required (or replicas)")
        return value

    @model_validator(mode="after")
    def _shape(self) -> TunnelCreate:
        problem = proxy_protocol_problem(self.protocol, self.proxy_protocol)
        if problem:
            raise ValueError(problem)
        problem = _replicas_problem(self.agent, self.replicas, required=True)
        problem = problem or sticky_problem(self.protocol, self.sticky)
        if problem:
            raise ValueError(problem)
        if self.protocol == "http":
            if self.domain is None:
                raise ValueError("an http tunnel needs a domain")
            if self.public_port is not None:
                raise ValueError("an http tunnel is routed by domain; omit publicPort")
        else:
            if self.public_port is None:
                raise ValueError(f"a {self.protocol} tunnel needs a publicPort")
            if self.domain is not None:
                raise ValueError(f"a {self.protocol} tunnel is routed by port; omit domain")
        self.target = check_target(self.target, allow_url=self.protocol == "http")
        return self


class TunnelUpdate(_Body):
    """Partial update of a tunnel; omitted fields stay as they are."""

    protocol: Protocol | None = None
    domain: str | None = None
    public_port: Port | None = None
    target: str | None = Field(default=None, max_length=2048)
    agent: str | None = Field(default=None, min_length=1, max_length=63)
    enabled: bool | None = None
    proxy_protocol: ProxyProtocol | None = Field(
        default=None, description=_PROXY_PROTOCOL + " (null turns it off)"
    )
    replicas: list[ReplicaIn] | None = Field(
        default=None,
        max_length=64,
        description=_REPLICAS + "; replaces the whole set (a draining agent that stays keeps "
        "draining).  agent alone cannot change a tunnel that has replicas",
    )
    balance: Balance | None = Field(default=None, description=_BALANCE)
    sticky: Sticky | None = Field(default=None, description=_STICKY + " (null turns it off)")

    @model_validator(mode="after")
    def _replica_set(self) -> TunnelUpdate:
        problem = _replicas_problem(self.agent, self.replicas, required=False)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        return None if value is None else check_domain(value, wildcard=True)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        return None if value is None else check_target(value, allow_url=True)


def _replicas_problem(agent: str | None, replicas: list[ReplicaIn] | None, required: bool) -> str:
    """Why an agent/replicas pair cannot be a tunnel's ("" when it can)."""
    if replicas is None:
        return "a tunnel needs an agent (or replicas)" if required and agent is None else ""
    if not replicas:
        return "replicas must name at least one agent"
    names = [r.agent for r in replicas]
    if len(set(names)) != len(names):
        return "replicas name the same agent twice"
    if agent is not None and agent not in names:
        return "agent must be one of the replicas"
    return ""


class CertificateCreate(_Body):
    """Upload a certificate chain and its private key (PEM) for a domain."""

    domain: str
    certificate: str = Field(max_length=65536, description="PEM certificate chain, leaf first")
    private_key: str = Field(max_length=16384, description="PEM private key (write-only)")

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return check_domain(value, wildcard=True)


class CertificateUpdate(_Body):
    """Replace a certificate chain and key."""

    certificate: str = Field(max_length=65536)
    private_key: str = Field(max_length=16384)


# -- responses (documentation of what the handlers return) ------------------------------


class ErrorDetail(BaseModel):
    """One validation problem."""

    field: str
    message: str


class ErrorBody(BaseModel):
    """The error object."""

    code: str
    message: str
    details: list[ErrorDetail] = []


class Error(BaseModel):
    """Every error response has this shape."""

    error: ErrorBody


class AgentOut(BaseModel):
    """An agent as the API shows it (never its key or key hash)."""

    id: str
    name: str
    subnet: str
    virtualIp: str
    publicKey: str | None
    enabled: bool
    online: bool
    lastSeen: str | None
    version: str | None
    createdAt: str
    updatedAt: str
    apiKey: str | None = Field(default=None, description="only in create/rotate responses")
    token: str | None = Field(
        default=None,
        description="only in create/rotate responses: the enrollment token (kmt_…) holding "
        "Control's URL, this API key and the pin of Control's certificate key, for "
        "'kakuremichi agent|gateway --token'",
    )


class GatewayOut(BaseModel):
    """A gateway as the API shows it."""

    id: str
    name: str
    slot: int
    publicKey: str | None
    publicIp: str | None
    wireguardPort: int | None
    enabled: bool
    online: bool
    lastSeen: str | None
    version: str | None
    createdAt: str
    updatedAt: str
    apiKey: str | None = Field(default=None, description="only in create/rotate responses")
    token: str | None = Field(
        default=None,
        description="only in create/rotate responses: the enrollment token (kmt_…) holding "
        "Control's URL, this API key and the pin of Control's certificate key, for "
        "'kakuremichi agent|gateway --token'",
    )


class ReplicaOut(BaseModel):
    """One agent of a tunnel, with its state as Control sees it."""

    agentId: str
    agentName: str
    agentIp: str
    weight: int
    role: str
    draining: bool
    health: str | None = Field(description="the agent's target check, or offline")
    healthDetail: str | None
    healthAt: str | None
    state: str = Field(
        description="healthy, unknown, unhealthy, offline, standby or draining (a gateway "
        "may also have ejected it for a back-off: its kakuremichi_replica_state metric)"
    )


class TunnelOut(BaseModel):
    """A tunnel as the API shows it."""

    id: str
    protocol: str
    domain: str | None
    publicPort: int | None
    target: str
    agentId: str
    agentName: str
    agentIp: str
    enabled: bool
    proxyProtocol: str | None = Field(description=_PROXY_PROTOCOL)
    health: str | None
    healthDetail: str | None
    healthAt: str | None
    replicas: list[ReplicaOut] = Field(description="the tunnel's agents (one without replicas)")
    balance: str = Field(description=_BALANCE)
    sticky: str | None = Field(description=_STICKY)
    createdAt: str
    updatedAt: str


class CertificateOut(BaseModel):
    """A certificate as the API shows it (the private key is never returned)."""

    id: str
    domain: str
    #: null only for a stored time no clock can show (never stored since certs.py)
    notAfter: str | None
    source: str
    certificate: str
    createdAt: str
    updatedAt: str


class AcmeOrderOut(BaseModel):
    """A tunnel domain that needs a certificate and what is being done about it."""

    domain: str
    #: ordering (a gateway holds the lease), waiting (for the next pass), failing
    #: (the last order failed; retried at nextTryAt), no_gateway (no connected gateway
    #: can prove the name: none with ACME, or a wildcard without DNS-01 for its zone)
    state: Literal["ordering", "waiting", "failing", "no_gateway"]
    gateway: str | None
    leaseExpiresAt: str | None
    lastError: str | None
    nextTryAt: str | None
    ordersGranted: int


class AcmeEndedOut(BaseModel):
    """An order that ended: who held it and how it ended."""

    domain: str
    gateway: str
    outcome: Literal["obtained", "failed", "gateway left", "expired"]
    grantedAt: str | None
    endedAt: str | None


class AcmeGatewayOut(BaseModel):
    """A connected gateway that orders certificates."""

    name: str
    challenges: list[str]
    dnsZones: list[str]


class AcmeOut(BaseModel):
    """Shared ACME: orders in flight or failing, the last ones that ended, and the
    gateways that can order."""

    orders: list[AcmeOrderOut]
    recent: list[AcmeEndedOut]
    gateways: list[AcmeGatewayOut]
