"""The dashboard's sign-in pages: the first-run setup link, sign-in and sign-out, admin
users and passwords."""

from __future__ import annotations

import logging
import time

from starlette.responses import Response

from common.logs import kv
from control.db.admins import SESSION_MAX_AGE, AuditEntry
from control.db.store import Row, StoreError
from control.web import auth
from control.web import session as web
from control.web.core import Ctx, DashboardCore
from control.ws.admission import address_key

log = logging.getLogger("control.dashboard")


class SignInPages:
    """Setup, sign-in, sign-out, users and passwords."""

    def __init__(self, core: DashboardCore) -> None:
        self.core = core

    async def start(self) -> None:
        """Print the one-time setup link if there is no admin user yet."""
        if self.core.settings.insecure_http:
            log.warning(
                "the dashboard signs users in over plain HTTP from any address "
                "(--dashboard-insecure-http): sessions and passwords cross the network "
                "unencrypted unless a TLS proxy is in front"
            )
        if await self.core.admins.count_users():
            return
        self.core.setup, token = auth.SetupLink.create(time.monotonic())
        self.core.setup_url = f"{self.core.public_url}/setup?token={token}"
        minutes = int(auth.SETUP_TTL // 60)
        self.core.announce(
            "No dashboard user exists yet. Open this one-time link within "
            f"{minutes} minutes to create the first one (a restart makes a new link):\n"
            f"  {self.core.setup_url}"
        )
        log.info("dashboard setup link printed on stdout", extra=kv(valid_min=minutes))

    async def setup_page(self, ctx: Ctx) -> Response:
        token = ctx.request.query_params.get("token") or ctx.form.get("token")
        state = (
            "invalid" if self.core.setup is None else self.core.setup.state(token, time.monotonic())
        )
        if await self.core.admins.count_users():
            state = "done"
        if state != "ok":
            messages = {
                "done": "An admin user exists already: sign in instead.",
                "spent": "This setup link has been used. Sign in with the user it created.",
                "expired": "This setup link has expired. Restart Control for a new one "
                "(it prints it at start while no admin user exists).",
                "invalid": "This is not a valid setup link. Use the link Control printed at start.",
            }
            response = self.core._html(
                ctx,
                "message.html",
                403 if state != "done" else 200,
                title="Setup",
                message=messages[state],
                sign_in=True,
            )
            return response
        errors: dict[str, str] = {}
        username = ctx.form.get("username", "")
        if ctx.request.method == "POST":
            password = ctx.form.get("password", "")
            try:
                username = auth.check_username(username)
            except ValueError as exc:
                errors["username"] = str(exc)
            try:
                auth.check_password(password)
                if password != ctx.form.get("confirm", ""):
                    errors["confirm"] = "the two passwords differ"
            except ValueError as exc:
                errors["password"] = str(exc)
            if not errors:
                assert self.core.setup is not None
                self.core.setup.spend()
                user = await self.core.admins.create_user(
                    username, await auth.hash_password(password), only_if_none=True
                )
                self.core.setup_url = None
                await self.core.admins.record(
                    AuditEntry(
                        "user",
                        username,
                        "user.create",
                        "user",
                        user["id"],
                        username,
                        "first admin user, through the setup link",
                        ctx.address,
                    )
                )
                return await self._sign_in(ctx, user)
        response = self.core._form_page(
            ctx, "setup.html", 422 if errors else 200, token=token, username=username, errors=errors
        )
        return response

    async def login_page(self, ctx: Ctx) -> Response:
        if ctx.user is not None and ctx.request.method == "GET":
            return self.core._back("/")
        if ctx.request.method == "GET":
            first_run = self.core.setup is not None and not self.core.setup.spent
            return self.core._form_page(ctx, "login.html", first_run=first_run)
        username = ctx.form.get("username", "").strip().lower()[:63]
        password = ctx.form.get("password", "")
        address = address_key(ctx.address)
        now = time.monotonic()
        wait = self.core.limiter.retry_after(address, username, now)
        if wait:
            self.core.logins["limited"] += 1
            response = self.core._form_page(
                ctx,
                "login.html",
                429,
                username=username,
                error=f"Too many failed sign-ins. Try again in {wait} s.",
            )
            response.headers["Retry-After"] = str(wait)
            return response
        row = await self.core.admins.user_by_name(username) if username else None
        if not await auth.verify_password(row["password_hash"] if row else None, password):
            self.core.limiter.failed(address, username, now)
            self.core.logins["failed"] += 1
            log.warning("dashboard sign-in failed", extra=kv(address=address))
            await self.core.admins.record(
                AuditEntry(
                    "user",
                    username or "-",
                    "session.login_failed",
                    "user",
                    row["id"] if row else None,
                    username or None,
                    None,
                    ctx.address,
                )
            )
            return self.core._form_page(
                ctx, "login.html", 401, username=username, error="Wrong user name or password."
            )
        assert row is not None
        return await self._sign_in(ctx, row)

    async def _sign_in(self, ctx: Ctx, user: Row) -> Response:
        token = auth.new_session_token()
        now = time.time()
        await self.core.admins.create_session(
            user["id"], token, ctx.address, ctx.request.headers.get("user-agent"), now
        )
        self.core.logins["ok"] += 1
        await self.core.admins.record(
            AuditEntry(
                "user",
                user["username"],
                "session.login",
                "user",
                user["id"],
                user["username"],
                None,
                ctx.address,
            )
        )
        log.info(
            "dashboard sign-in", extra=kv(user=user["username"], address=address_key(ctx.address))
        )
        response = self.core._back("/")
        # the browser keeps it as long as a session can live; the server ends it sooner
        # when it is idle (control.db.admins: SESSION_IDLE) or signed out
        web.set_cookie(ctx.request, response, auth.SESSION_COOKIE, token, int(SESSION_MAX_AGE))
        web.clear_cookie(ctx.request, response, auth.FORM_COOKIE)
        return response

    async def logout(self, ctx: Ctx) -> Response:
        assert ctx.user is not None
        await self.core.admins.end_session(ctx.user.session_id)
        await self.core.admins.record(
            AuditEntry(
                "user",
                ctx.user.username,
                "session.logout",
                "user",
                ctx.user.user_id,
                ctx.user.username,
                None,
                ctx.address,
            )
        )
        response = self.core._back("/login")
        web.clear_cookie(ctx.request, response, auth.SESSION_COOKIE)
        return response

    async def users(self, ctx: Ctx) -> Response:
        assert ctx.user is not None
        errors: dict[str, str] = {}
        username = ""
        if ctx.request.method == "POST":
            username = ctx.form.get("username", "")
            password = ctx.form.get("password", "")
            try:
                username = auth.check_username(username)
            except ValueError as exc:
                errors["username"] = str(exc)
            try:
                auth.check_password(password)
            except ValueError as exc:
                errors["password"] = str(exc)
            if not errors:
                try:
                    row = await self.core.admins.create_user(
                        username, await auth.hash_password(password)
                    )
                except StoreError as exc:
                    errors["username"] = str(exc)
                else:
                    await self.core._actions(ctx).audit("user.create", "user", row)
                    return self.core._back("/users", "created")
        rows = await self.core.admins.list_users()
        return self.core._html(
            ctx,
            "users.html",
            422 if errors else 200,
            rows=rows,
            errors=errors,
            username=username,
            notice=ctx.request.query_params.get("notice"),
        )

    async def user_delete(self, ctx: Ctx) -> Response:
        row = await self.core.admins.delete_user(ctx.param("id"))
        await self.core._actions(ctx).audit("user.delete", "user", row)
        if ctx.user is not None and row["id"] == ctx.user.user_id:
            return self.core._back("/login")
        return self.core._back("/users", "deleted")

    async def password(self, ctx: Ctx) -> Response:
        assert ctx.user is not None
        errors: dict[str, str] = {}
        user = await self.core.admins.get_user(ctx.user.user_id)
        if not await auth.verify_password(user["password_hash"], ctx.form.get("current", "")):
            errors["current"] = "that is not your current password"
        try:
            new = auth.check_password(ctx.form.get("password", ""))
            if new != ctx.form.get("confirm", ""):
                errors["confirm"] = "the two passwords differ"
        except ValueError as exc:
            errors["password"] = str(exc)
        if errors:
            rows = await self.core.admins.list_users()
            return self.core._html(
                ctx, "users.html", 422, rows=rows, errors={}, username="", password_errors=errors
            )
        await self.core.admins.set_password(
            user["id"], await auth.hash_password(new), keep_session=ctx.user.session_id
        )
        await self.core._actions(ctx).audit(
            "user.password", "user", user, detail="password changed; other sessions ended"
        )
        return self.core._back("/users", "password-changed")
