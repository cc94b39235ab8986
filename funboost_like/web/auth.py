"""Who may use the dashboard: credentials, signed session cookies, CSRF tokens, the binding rule.

Guarantees:

* There is no default password. Credentials are either a **token** (random, printed at start, or
  given by the operator in ``FUNBOOST_LIKE_WEB_TOKEN``, at least 16 characters) or a **user** with a
  password hash made by :func:`hash_password` (scrypt, random salt) in ``FUNBOOST_LIKE_WEB_USER`` and
  ``FUNBOOST_LIKE_WEB_PASSWORD_HASH`` (or ``--user`` / ``--password-hash``).
* :func:`check_binding` refuses any address other than a loopback one unless the operator gave
  credentials (a configured token or user): a printed random token is only for 127.0.0.1.
* A session is a cookie ``<payload>.<HMAC-SHA256>`` signed with a key made at server start (a restart
  ends every session); it expires after ``SESSION_SECONDS``; its CSRF token is an HMAC of the session
  id, checked on every POST. Every comparison of secrets is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass, field

from funboost_like.core.errors import FunboostLikeError

SESSION_SECONDS = 12 * 3600
COOKIE = "fl_session"
MIN_TOKEN_LENGTH = 16
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class CredentialsError(FunboostLikeError, ValueError):
    """Credentials missing or malformed for the way the dashboard is started."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$<salt hex>$<hash hex>`` of ``password`` (a random salt unless given)."""
    if not password:
        raise CredentialsError("an empty password is not allowed")
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=len(bytes.fromhex(digest)),
                                  n=int(n), r=int(r), p=int(p), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed.hex(), digest)


def _check_hash(stored: str) -> None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise CredentialsError("the password hash must come from `funboost_like web --hash-password` "
                               "(scrypt$n$r$p$salt$hash)")


@dataclass
class Credentials:
    """The dashboard's credentials: a token, or a user and its password hash (both may be set)."""

    token: str | None = None
    user: str | None = None
    password_hash: str | None = None
    configured: bool = False  # given by the operator (not a token made at start)
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @classmethod
    def make(cls, user: str | None = None, password_hash: str | None = None,
             token: str | None = None) -> Credentials:
        """From the arguments, else the environment; a random token when nothing is configured."""
        user = user or os.environ.get("FUNBOOST_LIKE_WEB_USER") or None
        password_hash = password_hash or os.environ.get("FUNBOOST_LIKE_WEB_PASSWORD_HASH") or None
        token = token or os.environ.get("FUNBOOST_LIKE_WEB_TOKEN") or None
        if bool(user) != bool(password_hash):
            raise CredentialsError("a dashboard user needs both a name and a password hash "
                                   "(FUNBOOST_LIKE_WEB_USER and FUNBOOST_LIKE_WEB_PASSWORD_HASH)")
        if password_hash:
            _check_hash(password_hash)
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise CredentialsError(f"FUNBOOST_LIKE_WEB_TOKEN must have at least {MIN_TOKEN_LENGTH} characters")
        configured = bool(token or user)
        if not configured:
            token = secrets.token_urlsafe(24)
        return cls(token=token, user=user, password_hash=password_hash, configured=configured)

    # -- logging in ---------------------------------------------------------------------------
    def check_login(self, user: str, secret: str) -> str | None:
        """The session user when ``secret`` is the token, or ``user``'s password; else None."""
        if self.token and secret and hmac.compare_digest(secret.encode(), self.token.encode()):
            return "token"
        if self.user and self.password_hash and hmac.compare_digest(user.encode(), self.user.encode()) \
                and verify_password(secret, self.password_hash):
            return self.user
        return None

    def check_bearer(self, header: str | None) -> bool:
        """Whether an ``Authorization: Bearer <token>`` header carries the token (for scripts using the API)."""
        if not header or not self.token or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    # -- sessions -----------------------------------------------------------------------------
    def _sign(self, payload: bytes) -> str:
        return hmac.new(self.key, payload, hashlib.sha256).hexdigest()

    def new_session(self, user: str, now: float | None = None) -> str:
        """A signed session cookie value for ``user``."""
        payload = json.dumps({"u": user, "exp": (now or time.time()) + SESSION_SECONDS,
                              "sid": secrets.token_hex(16)}, separators=(",", ":")).encode()
        encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{encoded}.{self._sign(encoded.encode())}"

    def session(self, cookie: str | None, now: float | None = None) -> dict[str, str] | None:
        """The session (``user``, ``sid``) of a cookie value, if its signature holds and it has not expired."""
        if not cookie or "." not in cookie:
            return None
        encoded, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature.encode(), self._sign(encoded.encode()).encode()):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
            if float(payload["exp"]) < (now or time.time()):
                return None
            return {"user": str(payload["u"]), "sid": str(payload["sid"])}
        except (ValueError, KeyError, TypeError):
            return None

    def csrf_token(self, sid: str) -> str:
        return hmac.new(self.key, f"csrf:{sid}".encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token).encode(), self.csrf_token(sid).encode())


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, credentials: Credentials) -> None:
    """Refuse to serve on a non-loopback address without credentials the operator configured."""
    if not is_loopback(host) and not credentials.configured:
        raise CredentialsError(
            f"refusing to listen on {host!r} without credentials: the dashboard binds 127.0.0.1 unless a token "
            "(FUNBOOST_LIKE_WEB_TOKEN, 16+ characters) or a user (--user and --password-hash from "
            "`funboost_like web --hash-password`) is configured; put it behind TLS (a reverse proxy) as well")
