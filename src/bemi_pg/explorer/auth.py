"""Who may read the trail: a bearer token for the API, a signed session cookie for the pages
(set by the login form), or a trusted reverse proxy's user header when the operator asks for it.

Sessions are ``<expiry>.<user>.<signature>`` signed with a key made at start-up, so a restart
ends every session; the CSRF token of a form is a signature of the session it belongs to."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

__all__ = ["Auth", "SESSION_COOKIE"]

SESSION_COOKIE = "bemi_session"


@dataclass
class Auth:
    token: str
    trusted_user_header: str | None = None
    session_seconds: int = 8 * 3600
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def token_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def bearer(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self.key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def new_session(self, user: str, *, now: float | None = None) -> str:
        """A session cookie value for ``user``, good for ``session_seconds``."""
        expires = int((time.time() if now is None else now) + self.session_seconds)
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        payload = f"{expires}.{name}"
        return f"{payload}.{self._sign(payload)}"

    def session_user(self, cookie: str | None) -> str | None:
        """The user of a valid, unexpired session cookie; None otherwise."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires, name, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{expires}.{name}")):
            return None
        if not expires.isdigit() or int(expires) < time.time():
            return None
        return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()

    def csrf_token(self, cookie: str) -> str:
        return self._sign("csrf:" + cookie)

    def csrf_ok(self, cookie: str | None, presented: str | None) -> bool:
        return bool(cookie and presented) and hmac.compare_digest(self.csrf_token(cookie or ""), presented or "")
