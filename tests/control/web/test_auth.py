"""The dashboard's sign-in rules without a server: setup link, limiter, CSRF tokens,
passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.db import admins as admins_module
from control.db.engine import create_engine, migrate
from control.web import auth


def test_setup_link_is_single_use_and_expires() -> None:
    link, token = auth.SetupLink.create(now=100.0, ttl=60.0)
    assert token.startswith("stp_") and len(token) > 40
    assert token not in repr(link)  # only the hash is kept
    assert link.state(token, 100.0) == "ok"
    assert link.state(token, 159.9) == "ok"
    assert link.state(token, 160.0) == "expired"
    assert link.state(token + "x", 100.0) == "invalid"
    assert link.state("", 100.0) == "invalid"
    assert link.state(None, 100.0) == "invalid"
    assert link.state("x" * 10_000, 100.0) == "invalid"
    link.spend()
    assert link.state(token, 100.0) == "spent"


def test_login_limiter_per_address_and_per_user() -> None:
    limiter = auth.LoginLimiter(per_address=(3, 60.0), per_user=(5, 300.0))
    for i in range(3):
        assert limiter.retry_after("1.2.3.4", f"user{i}", 10.0) == 0
        limiter.failed("1.2.3.4", f"user{i}", 10.0)
    assert limiter.retry_after("1.2.3.4", "someone", 11.0) == 59  # the address is out
    assert limiter.retry_after("5.6.7.8", "someone", 11.0) == 0
    for i in range(5):  # one user from many addresses
        limiter.failed(f"10.0.0.{i}", "alice", 20.0)
    assert limiter.retry_after("10.9.9.9", "alice", 21.0) == 299
    assert limiter.retry_after("10.9.9.9", "bob", 21.0) == 0
    assert limiter.retry_after("1.2.3.4", "x", 70.0) == 0  # the window moved on


def test_csrf_token_is_bound_to_the_session() -> None:
    a, b = auth.new_session_token(), auth.new_session_token()
    assert a != b and a.startswith("ses_")
    assert auth.csrf_token(a) == auth.csrf_token(a)
    assert auth.csrf_token(a) != auth.csrf_token(b)
    assert auth.tokens_match(auth.csrf_token(a), auth.csrf_token(a))
    assert not auth.tokens_match(auth.csrf_token(a), auth.csrf_token(b))
    assert not auth.tokens_match(auth.csrf_token(a), None)
    assert not auth.tokens_match(None, "")
    assert not auth.tokens_match("x", "x" * 300)


async def test_passwords_are_argon2id_and_verified() -> None:
    stored = await auth.hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert await auth.verify_password(stored, "correct horse battery")
    assert not await auth.verify_password(stored, "correct horse batterY")
    assert not await auth.verify_password(None, "correct horse battery")  # unknown user
    assert not await auth.verify_password("not a hash", "x")
    assert not await auth.verify_password(stored, "x" * 5000)


@pytest.mark.parametrize("name", ["", "-a", "A" * 64, "a b", "<script>", "é"])
def test_bad_usernames(name: str) -> None:
    with pytest.raises(ValueError):
        auth.check_username(name)


def test_usernames_and_passwords() -> None:
    assert auth.check_username(" Alice ") == "alice"
    with pytest.raises(ValueError):
        auth.check_password("short")
    with pytest.raises(ValueError):
        auth.check_password("x" * 1025)
    assert auth.check_password("long enough!") == "long enough!"


def test_loopback() -> None:
    assert (
        auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("127.8.9.1")
    )
    assert not auth.is_loopback("192.0.2.1") and not auth.is_loopback(None)
    assert not auth.is_loopback("example.com")


async def test_sessions_end_when_idle_and_at_their_maximum_age(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    try:
        await migrate(engine)
        admins = admins_module.AdminStore(engine)
        user = await admins.create_user("alice", "hash")
        token = auth.new_session_token()
        t0 = 1_000_000.0
        await admins.create_session(user["id"], token, "127.0.0.1", "test", t0)
        idle, max_age = admins_module.SESSION_IDLE, admins_module.SESSION_MAX_AGE
        assert await admins.session(token, t0 + 10) is not None
        assert await admins.session(token + "x", t0 + 10) is None
        assert await admins.session(token, t0 + idle + 1) is None  # idle too long
        # used now and then, it lives until its maximum age, not past it
        other = auth.new_session_token()
        await admins.create_session(user["id"], other, None, None, t0)
        now = t0
        while now + idle / 2 < t0 + max_age:
            now += idle / 2
            assert await admins.session(other, now) is not None, now - t0
        assert await admins.session(other, t0 + max_age + 1) is None
        # the database holds no usable token
        async with engine.connect() as conn:
            dump = "\n".join(
                str(r) for r in (await conn.exec_driver_sql("select * from admin_sessions")).all()
            )
        assert token not in dump and other not in dump
    finally:
        await engine.dispose()


async def test_the_audit_log_keeps_the_newest_entries(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    try:
        await migrate(engine)
        admins = admins_module.AdminStore(engine, max_audit=150)
        for i in range(450):
            await admins.record(
                admins_module.AuditEntry("user", "x" * 100, f"act.{i}", detail="d" * 5000)
            )
        rows, total = await admins.audit(500, 0)
        assert 150 <= total <= 150 + admins_module.PRUNE_EVERY
        assert rows[0]["action"] == "act.449"  # newest first, the newest kept
        assert rows[-1]["action"] == f"act.{450 - total}"
        assert len(rows[0]["actor"]) == 63 and len(rows[0]["detail"]) == 1024  # cut to fit
    finally:
        await engine.dispose()
