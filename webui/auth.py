"""Logins for ``threedgen webui`` on a shared machine: hashed passwords, a login rate limit, and the
check that refuses to serve beyond this machine without a login.

- ``hash_password`` / ``verify_password``: salted scrypt, one token ``scrypt$N$r$p$<salt>$<key>``;
- ``read_auth``: the ``--auth-file`` of ``user:HASH`` lines, as Gradio's ``auth=`` callable; a
  plain-text password is refused;
- ``LoginRateLimit``: ASGI middleware that answers 429 to an address with too many failed logins
  inside a window, before Gradio checks the password;
- ``check_exposure``: binding beyond loopback needs ``--auth-file`` (or an explicit ``--no-auth``).

Standard library only: ``threedgen webui hash-password`` answers without importing Gradio.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from threedgen.errors import UserError

SCHEME = "scrypt"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
MAX_SCRYPT_MEMORY = 256 * 2 ** 20  # a hash asking for more (a hand-edited N or r) is refused
HASH_HELP = "make hashes with `threedgen webui hash-password`"


def _hash_help(user: str = "NAME") -> str:
    return f"make each line with `threedgen webui hash-password --user {user}`"


# ---- password hashes ------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    memory = 128 * r * (n + p + 2)
    return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=memory + 2 ** 20)


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, key) of a ``scrypt$N$r$p$salt$key`` token; ValueError saying what is wrong."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError(f"expected {SCHEME}$N$r$p$salt$key")
    try:
        n, r, p = (int(x, 10) for x in parts[1:4])
    except ValueError:
        raise ValueError("N, r and p must be integers") from None
    if not (2 <= n <= 2 ** 20 and n & (n - 1) == 0) or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise ValueError("N must be a power of two up to 2^20, r from 1 to 64, p from 1 to 16")
    if 128 * r * (n + p + 2) > MAX_SCRYPT_MEMORY:
        raise ValueError("N and r ask for more than 256 MiB")
    try:
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the salt and key must be base64") from None
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise ValueError("the salt must be 8 bytes at least and the key 16 to 64 bytes")
    return n, r, p, salt, key


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password``: ``scrypt$16384$8$1$<salt b64>$<key b64>``."""
    if not isinstance(password, str) or not password:
        raise UserError("the password is empty")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches the hash ``stored`` (False for a malformed hash)."""
    try:
        n, r, p, salt, key = _parse(stored)
    except ValueError:
        return False
    if not isinstance(password, str):
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(key)), key)


def check_username(user: str) -> str:
    if not user or user != user.strip() or ":" in user or any(c in user for c in "\r\n"):
        raise UserError(f"user name {user!r}: give a non-empty name without ':' or surrounding spaces")
    return user


def read_new_password(stream=None) -> str:
    """A new password: asked twice without echo on a terminal, else the first line of ``stream``."""
    stream = sys.stdin if stream is None else stream
    if stream.isatty():
        password = getpass.getpass("password: ")
        if password and getpass.getpass("password again: ") != password:
            raise UserError("the two passwords differ; nothing printed")
    else:
        password = stream.readline()
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise UserError("empty password: type one, or pipe it in on one line (e.g. from a password manager)")
    return password


# ---- the auth file --------------------------------------------------------------------------

class Logins:
    """Gradio's ``auth=`` callable over ``user:HASH`` lines: ``logins(username, password) -> bool``.

    An unknown user is checked against a dummy hash, so it takes as long as a wrong password.
    """

    def __init__(self, users: dict[str, str]):
        for user, stored in users.items():
            check_username(user)
            _parse(stored)
        self._users = dict(users)
        self._dummy = hash_password(secrets.token_urlsafe(16))

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def __call__(self, username: str, password: str) -> bool:
        stored = self._users.get(username)
        ok = verify_password(self._dummy if stored is None else stored, password)
        return ok and stored is not None

    def __repr__(self) -> str:  # never the hashes
        return f"Logins(users={self.users!r})"


def read_auth(path: Optional[str]) -> Optional[Logins]:
    """The ``--auth-file``: ``user:HASH`` lines (blank lines and ``#`` comments skipped), or None
    for no file. A plain-text password, a malformed line, a missing file or no users: UserError."""
    if path is None:
        return None
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--auth-file {path}: no such file; write user:HASH lines ({_hash_help()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"--auth-file {path}: cannot read it ({reason})") from None
    users: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--auth-file {path}, line {number}"
        user, sep, stored = line.partition(":")
        user, stored = user.strip(), stored.strip()
        if not sep or not user or not stored:
            raise UserError(f"{where}: not a user:HASH line; {_hash_help()}")
        if not stored.startswith(SCHEME + "$"):  # never echo the line: it may be a password
            raise UserError(f"{where}: user {user!r} has a plain-text password; the file takes hashed passwords "
                            f"only: {_hash_help(user)}")
        try:
            check_username(user)
            _parse(stored)
        except ValueError as exc:
            raise UserError(f"{where}: the hash of user {user!r} is malformed ({exc}); {_hash_help(user)}") from None
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if user in users:
            raise UserError(f"{where}: user {user!r} appears twice (first on line {first_line[user]})")
        users[user], first_line[user] = stored, number
    if not users:
        raise UserError(f"--auth-file {path}: no user:HASH lines; {_hash_help()}")
    return Logins(users)


# ---- the login rate limit -------------------------------------------------------------------

class LoginLimiter:
    """Failed logins per client address inside a sliding window.

    An attempt counts as a failure from the moment it starts and is taken back when it succeeds, so
    concurrent guesses cannot slip past the limit. Successes do not clear earlier failures.
    """

    def __init__(self, max_failures: int = 19, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000):
        if max_failures < 1 or window_s <= 0:
            raise ValueError("max_failures must be 1 or more and window_s positive")
        self.max_failures, self.window_s, self.clock, self.max_clients = max_failures, window_s, clock, max_clients
        self._failures: dict[str, deque] = {}

    def _recent(self, client: str, now: float) -> deque:
        stamps = self._failures.pop(client, None) or deque()
        while stamps and stamps[0] <= now - self.window_s:
            stamps.popleft()
        self._failures[client] = stamps  # re-inserted: the dict stays in order of last activity
        return stamps

    def _trim(self, now: float) -> None:
        if len(self._failures) <= self.max_clients:
            return
        for client in [c for c, s in self._failures.items() if not s or s[-1] <= now - self.window_s]:
            del self._failures[client]
        while len(self._failures) > self.max_clients:  # still too many: forget the least recent
            del self._failures[next(iter(self._failures))]

    def blocked(self, client: str) -> bool:
        return len(self._recent(client, self.clock())) >= self.max_failures

    def begin(self, client: str) -> Optional[float]:
        """None if ``client`` is blocked; else the attempt, counted as a failure until ``succeeded``."""
        now = self.clock()
        stamps = self._recent(client, now)
        if len(stamps) >= self.max_failures:
            return None
        stamps.append(now)
        self._trim(now)
        return now

    def succeeded(self, client: str, attempt: float) -> None:
        stamps = self._failures.get(client)
        if stamps is not None:
            try:
                stamps.remove(attempt)
            except ValueError:  # already out of the window
                pass

    def retry_after(self, client: str) -> int:
        now = self.clock()
        stamps = self._recent(client, now)
        if len(stamps) < self.max_failures:
            return 0
        return max(1, int(stamps[-self.max_failures] + self.window_s - now + 0.999))


def is_login_request(scope) -> bool:
    """A POST to Gradio's login route (``/login`` or ``/login/``, under any root path)."""
    return (scope.get("type") == "http" and scope.get("method") == "POST"
            and scope.get("path", "").rstrip("/").endswith("/login"))


class LoginRateLimit:
    """Pure ASGI middleware: once an address has ``max_failures`` failed logins inside ``window_s``
    seconds, its further login attempts get 429 without reaching the app (no password is checked).

    A failure is any answer to a login POST outside 2xx/3xx (Gradio answers a wrong password with
    400 ``{"detail": "Incorrect credentials."}``). Addresses are the peer addresses the server sees:
    behind a reverse proxy all clients share the proxy's address.
    """

    def __init__(self, app, max_failures: int = 19, window_s: float = 60.0, limiter: Optional[LoginLimiter] = None):
        self.app = app
        self.limiter = limiter if limiter is not None else LoginLimiter(max_failures, window_s)

    async def __call__(self, scope, receive, send):
        if not is_login_request(scope):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        attempt = self.limiter.begin(client)
        if attempt is None:
            await self._too_many(send, self.limiter.retry_after(client))
            return
        status = None

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if status is not None and 200 <= status < 400:
                self.limiter.succeeded(client, attempt)

    async def _too_many(self, send, retry_after: int) -> None:
        body = json.dumps({"detail": f"Too many failed logins from this address; try again in {retry_after} s."})
        body = body.encode("utf-8")
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---- binding beyond this machine ------------------------------------------------------------

def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, has_auth: bool, no_auth: bool) -> Optional[str]:
    """None when serving ``host`` is fine as asked; a warning line to print on every start when it is
    served open on purpose (``--no-auth``); UserError for a bind beyond loopback without a login."""
    if has_auth and no_auth:
        raise UserError("--auth-file and --no-auth contradict each other; give one of them")
    if has_auth or is_loopback(host):
        return None
    if not no_auth:
        raise UserError(f"threedgen webui refuses to serve {host} without a login; give --auth-file "
                        f"({HASH_HELP}) or --no-auth to serve it open")
    return (f"threedgen: warning: serving {host} with no login (--no-auth): anyone who can reach it can submit "
            "jobs and download every result")


__all__ = ["hash_password", "verify_password", "read_auth", "read_new_password", "check_username", "Logins",
           "LoginLimiter", "LoginRateLimit", "check_exposure", "is_loopback"]


class NoUploads:
    """Pure ASGI middleware: 404 for Gradio's upload route (``/gradio_api/upload``, ``/upload``).
    The page has no file input, so the route only let a logged-in user put files on the server."""

    PATHS = ("/gradio_api/upload", "/upload")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").rstrip("/") in self.PATHS:
            body = b'{"detail": "Not Found"}'
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
