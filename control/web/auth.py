"""Who may use the dashboard: passwords, sessions, CSRF tokens, the setup link, and
the limit on failed sign-ins.

* **Passwords** are hashed with argon2id (``common.passwords``: argon2-cffi's defaults,
  RFC 9106's second recommended profile) in a worker thread, so a sign-in never stalls
  the event loop that serves the hub.  An unknown user name costs the same verification
  against a dummy hash: timing does not tell which names exist.
* **Sessions**: the cookie holds ``ses_`` + 32 random bytes; the database holds its
  SHA-256 (``control.db.admins``).  The cookie is HttpOnly, SameSite=Lax, and Secure
  whenever the request came over HTTPS (directly, or from a proxy uvicorn trusts:
  ``--forwarded-allow-ips``).  Plain HTTP is accepted only from loopback addresses
  (an SSH tunnel, the demo) unless the operator opts in (``--dashboard-insecure-http``).
* **CSRF**: every form carries a token.  Signed in, it is an HMAC of the session token
  (which scripts cannot read: HttpOnly), so it needs no storage and dies with the
  session.  Before sign-in (the sign-in and setup forms) it is a double-submit value:
  a random cookie the form must repeat.  A POST without the right token is refused
  (403) before anything else happens.
* **The setup link**: while no admin user exists, Control makes a one-time token
  (``stp_`` + 32 random bytes), prints the link once at start and keeps only its hash
  in memory; it expires after ``ttl`` seconds and is spent by the first successful
  use.  A restart makes a new one (the old one dies with the process).
* **Failed sign-ins** are limited per address (IPv6: its /64) and per user name, in
  sliding windows (:class:`control.api.authlimit.AuthFailures`); while either is over,
  the form answers 429 without checking the password.

Sans-IO where it can be: everything that depends on time takes ``now``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass

from common import passwords
from control.api.authlimit import AuthFailures

SESSION_COOKIE = "km_session"
FORM_COOKIE = "km_form"
#: prefixes of the secrets made here (``common.logs`` redacts ``stp_`` ones)
SESSION_PREFIX = "ses_"
SETUP_PREFIX = "stp_"
#: the setup link's life
SETUP_TTL = 3600.0
PASSWORD_MIN = 10
PASSWORD_MAX = 1024
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: failed sign-ins: per address (IPv6: /64) in a minute, per user name in 5 minutes
LOGIN_ADDRESS_LIMIT = (10, 60.0)
LOGIN_USER_LIMIT = (10, 300.0)


def _token(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def new_session_token() -> str:
    return _token(SESSION_PREFIX)


def check_username(name: str) -> str:
    """A user name as agents' names are: 1-63 of ``a-z 0-9 . _ -``, lower case."""
    name = name.strip().lower()
    if not USERNAME.match(name):
        raise ValueError(
            "a user name is 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise ValueError(f"a password needs at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise ValueError(f"a password may have at most {PASSWORD_MAX} characters")
    return password


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(passwords.hash_password, password)


async def verify_password(stored: str | None, password: str) -> bool:
    """True if ``password`` matches ``stored`` (None: an unknown user, still costed)."""
    if len(password) > PASSWORD_MAX:
        return False
    if stored is None:
        return await asyncio.to_thread(passwords.verify_nobody, password)
    return await asyncio.to_thread(passwords.verify_password, stored, password)


def csrf_token(session_token: str) -> str:
    """The CSRF token of a signed-in session (derived; nothing stored)."""
    mac = hmac.new(session_token.encode(), b"kakuremichi dashboard csrf", hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def new_form_token() -> str:
    """The double-submit value of the pre-sign-in forms."""
    return base64.urlsafe_b64encode(secrets.token_bytes(24)).rstrip(b"=").decode()


def tokens_match(expected: str | None, given: str | None) -> bool:
    if not expected or not given or len(given) > 256:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class SetupLink:
    """The one-time first-run token: its hash and expiry, spent by one use."""

    digest: str
    expires_at: float
    spent: bool = False

    @classmethod
    def create(cls, now: float, ttl: float = SETUP_TTL) -> tuple[SetupLink, str]:
        token = _token(SETUP_PREFIX)
        return cls(hashlib.sha256(token.encode()).hexdigest(), now + ttl), token

    def state(self, token: str | None, now: float) -> str:
        """ "ok", "expired", "spent" or "invalid" for a presented token."""
        if not token or len(token) > 128:
            return "invalid"
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.digest):
            return "invalid"
        if self.spent:
            return "spent"
        if now >= self.expires_at:
            return "expired"
        return "ok"

    def spend(self) -> None:
        self.spent = True


class LoginLimiter:
    """Failed sign-ins per address and per user name (see the module docstring)."""

    def __init__(
        self,
        per_address: tuple[int, float] = LOGIN_ADDRESS_LIMIT,
        per_user: tuple[int, float] = LOGIN_USER_LIMIT,
    ) -> None:
        self.addresses = AuthFailures(*per_address)
        self.users = AuthFailures(*per_user)

    def retry_after(self, address: str, username: str, now: float) -> int:
        """0 when a sign-in may be tried now, else the seconds to wait."""
        return max(self.addresses.retry_after(address, now), self.users.retry_after(username, now))

    def failed(self, address: str, username: str, now: float) -> None:
        self.addresses.failed(address, now)
        self.users.failed(username, now)
