"""Logins for a shared web UI: scrypt hashes in the auth file (plain text refused), the refusal to
serve beyond loopback without a login, `threedgen webui hash-password`, and the per-address login
rate limit on a real server (429 before the password is checked)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from threedgen.errors import UserError
from threedgen.webui import auth as webauth
from threedgen.webui.auth import (
    LoginLimiter,
    LoginRateLimit,
    check_exposure,
    hash_password,
    read_auth,
    verify_password,
)

FAST = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
        "export.formats=[glb]", "export.evaluate=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threedgen", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


# ---- hashes and the auth file ----------------------------------------------------------------

def test_hash_round_trip_wrong_password_and_salt():
    first = hash_password("correct horse")
    scheme, n, r, p, salt, key = first.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert verify_password(first, "correct horse")
    assert not verify_password(first, "correct horsE") and not verify_password(first, "")
    second = hash_password("correct horse")
    assert second != first and second.split("$")[4] != salt  # a fresh salt every time
    assert verify_password(second, "correct horse")
    for broken in ("", "correct horse", "scrypt$16384$8$1$!!$??", first.replace("16384", "16385"),
                   "scrypt$1048576$64$16$" + "$".join(first.split("$")[4:])):  # not a power of two; too much memory
        assert not verify_password(broken, "correct horse")
    with pytest.raises(UserError, match="empty"):
        hash_password("")


def test_auth_file_takes_hashes_and_refuses_plain_text(tmp_path):
    good = tmp_path / "users"
    good.write_text(f"# the team\n\nalice:{hash_password('a-secret')}\n  bob : {hash_password('b-secret')}\n")
    logins = read_auth(str(good))
    assert logins.users == ["alice", "bob"]
    assert logins("alice", "a-secret") and logins("bob", "b-secret")
    assert not logins("alice", "b-secret") and not logins("carol", "a-secret") and not logins("", "")
    assert "scrypt" not in repr(logins)
    assert read_auth(None) is None

    plain = tmp_path / "plain"
    plain.write_text(f"# the team\nalice:{hash_password('a-secret')}\nbob:hunter2\n")
    with pytest.raises(UserError) as info:
        read_auth(str(plain))
    message = str(info.value)
    assert "\n" not in message and str(plain) in message and "line 3" in message and "plain-text" in message
    assert "threedgen webui hash-password" in message and "hunter2" not in message  # never echoes the password

    cases = {"missing": (None, "no such file"), "empty": ("# nobody\n\n", "no user:HASH lines"),
             "no-colon": ("alice\n", "line 1: not a user:HASH line"),
             "no-user": (f":{hash_password('x')}\n", "line 1: not a user:HASH line"),
             "bad-hash": ("alice:scrypt$16384$8$1$@@$@@\n", "line 1: the hash of user 'alice' is malformed"),
             "twice": (f"alice:{hash_password('x')}\nalice:{hash_password('y')}\n", "line 2: user 'alice' appears twice")}
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(UserError, match=expected) as info:
            read_auth(str(path))
        assert "\n" not in str(info.value)


# ---- binding beyond this machine -------------------------------------------------------------

def test_check_exposure():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert check_exposure(host, has_auth=False, no_auth=False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "my-host.example.org", ""):
        with pytest.raises(UserError, match="refuses to serve .* without a login; give --auth-file") as info:
            check_exposure(host, has_auth=False, no_auth=False)
        assert "--no-auth" in str(info.value) and "hash-password" in str(info.value)
        assert check_exposure(host, has_auth=True, no_auth=False) is None
        warning = check_exposure(host, has_auth=False, no_auth=True)
        assert warning and "warning" in warning and "no login" in warning and "\n" not in warning
    with pytest.raises(UserError, match="contradict"):
        check_exposure("0.0.0.0", has_auth=True, no_auth=True)


def test_cli_refuses_an_open_bind_before_starting_anything(tmp_path):
    port = free_port()
    outputs, state = tmp_path / "outputs", tmp_path / "state"
    start = time.time()
    proc = cli("webui", "--host", "0.0.0.0", "--port", str(port), "--outputs", str(outputs), "--state", str(state))
    assert proc.returncode == 2 and time.time() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threedgen: error: threedgen webui refuses to serve 0.0.0.0")
    assert "--auth-file" in lines[0] and "--no-auth" in lines[0]
    assert not outputs.exists() and not state.exists()  # no server, no job database
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing is listening on the port

    plain = tmp_path / "users"
    plain.write_text("alice:hunter2\n")
    proc = cli("webui", "--port", str(port), "--auth-file", str(plain), "--outputs", str(outputs), "--state", str(state))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "line 1" in lines[0] and "plain-text" in lines[0]
    assert not state.exists()


def test_hash_password_command_through_a_pipe(tmp_path):
    proc = cli("webui", "hash-password", stdin="pipe d secret\n")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert len(proc.stdout.strip().splitlines()) == 1 and verify_password(token, "pipe d secret")
    assert not verify_password(token, "pipe d secret\n")

    proc = cli("webui", "hash-password", "--user", "alice", stdin="a-secret\r\n")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("alice:scrypt$")
    users = tmp_path / "users"
    users.write_text(line + "\n")
    assert read_auth(str(users))("alice", "a-secret")

    for args, stdin, expected in ((("webui", "hash-password"), "", "empty password"),
                                  (("webui", "hash-password", "--user", "a:b"), "x\n", "user name"),
                                  (("webui", "--user", "alice"), "", "hash-password")):
        proc = cli(*args, stdin=stdin)
        assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---- the login rate limit ----------------------------------------------------------------------

def test_limiter_window_and_concurrent_attempts():
    now = [1000.0]
    limiter = LoginLimiter(max_failures=3, window_s=60, clock=lambda: now[0])
    attempts = [limiter.begin("10.0.0.1") for _ in range(3)]  # three in flight at once
    assert all(a is not None for a in attempts)
    assert limiter.begin("10.0.0.1") is None  # a fourth concurrent guess is refused
    assert limiter.begin("10.0.0.2") is not None  # per address
    limiter.succeeded("10.0.0.1", attempts[0])  # a success is taken back
    assert limiter.begin("10.0.0.1") is not None and limiter.blocked("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 60  # the oldest of the last three failures, at t=1000, leaves at 1060
    now[0] += 61  # the window slides past
    assert not limiter.blocked("10.0.0.1") and limiter.retry_after("10.0.0.1") == 0


def test_middleware_answers_429_without_calling_the_app():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b'{"detail":"Incorrect credentials."}'})

    limited = LoginRateLimit(app, max_failures=2, window_s=60)

    def request(path, method="POST", client=("10.0.0.1", 5000)):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "client": client, "headers": []}
        asyncio.run(limited(scope, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"])

    assert [request("/login")[0], request("/login/")[0]] == [400, 400]
    status, headers = request("/login")
    assert status == 429 and int(headers[b"retry-after"]) >= 1 and len(calls) == 2
    assert request("/login", client=("10.0.0.9", 5000))[0] == 400  # another address
    assert request("/config", method="GET")[0] == 400 and request("/login", method="GET")[0] == 400  # not logins
    assert len(calls) == 5


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    from threedgen.webui.app import Settings, WebUI

    checked = []
    real_verify = webauth.verify_password

    def spy(stored, password):
        checked.append(password)
        return real_verify(stored, password)

    monkeypatch.setattr(webauth, "verify_password", spy)
    users = tmp_path / "users"
    users.write_text(f"# the team\nalice:{hash_password('right horse')}\n")
    ui = WebUI(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state", overrides=FAST, max_queued=2))
    port = free_port()
    demo = ui.launch(port=port, auth=read_auth(str(users)), block=False)  # the default limit: 19 a minute
    try:
        yield port, checked
    finally:
        ui.close(demo)


def login(port: int, username: str, password: str, source: str = "127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        body = urllib.parse.urlencode({"username": username, "password": password})
        conn.request("POST", "/login", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null"), response.getheader("set-cookie")
    finally:
        conn.close()


def test_failed_logins_from_one_address_are_rate_limited(auth_server):
    port, checked = auth_server
    status, body, cookie = login(port, "alice", "right horse")  # before any failure: logged in
    assert status == 200 and body == {"success": True} and "access-token" in (cookie or "")
    assert checked == ["right horse"]

    for i in range(19):  # Gradio's answer to a wrong password
        assert login(port, "alice", f"guess {i}")[:2] == (400, {"detail": "Incorrect credentials."})
    assert len(checked) == 20

    status, body, _ = login(port, "alice", "guess 19")  # the 20th within a minute
    assert status == 429 and "Too many failed logins" in body["detail"]
    status, _, cookie = login(port, "alice", "right horse")  # even the right password, while blocked
    assert status == 429 and cookie is None
    assert len(checked) == 20  # neither password was checked

    # Another address is not blocked (127.0.0.2 is loopback too on Linux).
    status, body, _ = login(port, "alice", "right horse", source="127.0.0.2")
    assert status == 200 and body == {"success": True} and len(checked) == 21


def get(port: int, path: str, user: str | None = None, password: str | None = None, source: str = "127.0.0.1"):
    import base64

    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_the_polling_api_asks_for_the_same_users_and_the_same_limit(auth_server):
    port, checked = auth_server
    assert get(port, "/api/v1/jobs")[0] == 401  # no credentials
    assert get(port, "/api/v1/jobs", "alice", "right horse") == (200, {"jobs": []})
    assert get(port, "/api/v1/jobs", "alice", "right horse") == (200, {"jobs": []})
    assert checked == ["right horse"]  # the verified header is remembered: one hash for many polls
    status, body = get(port, "/api/v1/status/0123456789ab", "alice", "right horse")
    assert status == 404 and body == {"error": "no job 0123456789ab"}
    for i in range(19):
        assert get(port, "/api/v1/jobs", "alice", f"guess {i}", source="127.0.0.3")[0] == 401
    status, body = get(port, "/api/v1/jobs", "alice", "guess 19", source="127.0.0.3")
    assert status == 429 and "too many failed logins" in body["error"]
    assert get(port, "/api/v1/jobs", "alice", "right horse", source="127.0.0.3")[0] == 200  # remembered header
    assert len(checked) == 20  # the 429 checked no password


# ---- edges of the limiter, the hashes and the polling API's HTTP Basic ----------------------

def test_the_limit_blocks_at_exactly_max_failures_and_a_failure_leaves_at_exactly_the_window():
    now = [0.0]
    limiter = LoginLimiter(max_failures=2, window_s=10, clock=lambda: now[0])
    assert limiter.begin("a") == 0.0 and not limiter.blocked("a")  # one failure of two
    now[0] = 4.0
    assert limiter.begin("a") == 4.0 and limiter.blocked("a")  # the second: blocked now
    assert limiter.begin("a") is None and limiter.retry_after("a") == 6
    now[0] = 9.999
    assert limiter.blocked("a") and limiter.retry_after("a") == 1  # never 0 while blocked
    now[0] = 10.0  # the first failure is exactly one window old: gone
    assert not limiter.blocked("a") and limiter.retry_after("a") == 0
    limiter.succeeded("a", 0.0)  # an attempt already out of the window: nothing to take back, no error
    assert limiter.begin("a") == 10.0 and limiter.blocked("a")
    with pytest.raises(ValueError):
        LoginLimiter(max_failures=0)
    with pytest.raises(ValueError):
        LoginLimiter(window_s=0)
    assert LoginLimiter(max_failures=1, window_s=0.5).window_s == 0.5  # any positive window
    limited = LoginRateLimit(lambda *a: None)  # the documented policy: 19 failures within a minute
    assert (limited.limiter.max_failures, limited.limiter.window_s) == (19, 60.0)


def test_the_limiter_forgets_the_least_recent_addresses_beyond_its_memory():
    now = [0.0]
    limiter = LoginLimiter(max_failures=1, window_s=100, clock=lambda: now[0], max_clients=3)
    for client in ("a", "b", "c"):
        limiter.begin(client)
        now[0] += 1
    assert all(limiter.blocked(c) for c in ("a", "b", "c"))
    limiter.begin("d")  # a fourth address: the least recent one ("a") is forgotten
    assert not limiter.blocked("a") and limiter.blocked("b") and limiter.blocked("d")
    now[0] = 150.0  # every failure but d's (at t=3) is out of the window
    limiter.begin("e")
    assert limiter.blocked("e") and not limiter.blocked("b")


def test_login_requests_are_posts_to_the_login_route_only():
    def scope(path, method="POST", kind="http"):
        return {"type": kind, "method": method, "path": path}

    for path in ("/login", "/login/", "/gradio/login", "/app/login/"):
        assert webauth.is_login_request(scope(path))
    for s in (scope("/login", "GET"), scope("/logins"), scope("/xlogin"), scope("/login/x"), scope("/login", kind="websocket")):
        assert not webauth.is_login_request(s)


def test_hashes_outside_the_accepted_parameters_never_verify():
    good = hash_password("pw")
    _, n, r, p, salt, key = good.split("$")
    assert verify_password(f"scrypt$2$1$1${salt}${key}", "pw") is False  # smallest N: parsed, wrong key
    for bad in (f"scrypt$1${r}${p}${salt}${key}", f"scrypt$3${r}${p}${salt}${key}",  # N below 2, not a power of 2
                f"scrypt$2097152${r}${p}${salt}${key}",  # N above 2^20
                f"scrypt${n}$0${p}${salt}${key}", f"scrypt${n}$65${p}${salt}${key}",
                f"scrypt${n}${r}$0${salt}${key}", f"scrypt${n}${r}$17${salt}${key}",
                f"scrypt${n}${r}${p}$YWJj${key}",  # a 3-byte salt
                f"scrypt${n}${r}${p}${salt}$" + "QUFB" * 2,  # a 6-byte key
                f"bcrypt${n}${r}${p}${salt}${key}", good + "$x", f"scrypt$x${r}${p}${salt}${key}"):
        assert not verify_password(bad, "pw"), bad
        with pytest.raises(ValueError):
            webauth._parse(bad)
    assert webauth._parse(f"scrypt$1048576$1$1${salt}${key}")[0] == 2 ** 20  # the largest N, 128 MiB at r=1
    with pytest.raises(ValueError, match="more than 256 MiB"):
        webauth._parse(f"scrypt$1048576$8$1${salt}${key}")
    assert not verify_password(good, None)


def test_user_names():
    for name in ("alice", "bob smith", "ünïcode"):
        assert webauth.check_username(name) == name
    for name in ("", " alice", "alice ", "a:b", "a\nb", "a\rb"):
        with pytest.raises(UserError, match="user name"):
            webauth.check_username(name)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _basic(user, password) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _rest(monkeypatch, max_failures=3):
    from threedgen.webui import rest

    clock = _Clock()
    monkeypatch.setattr(rest.time, "monotonic", clock)
    calls = []

    def logins(user, password):
        calls.append(user)
        return (user, password) in {("alice", "right"), ("bob", "also right")}

    limiter = LoginLimiter(max_failures=max_failures, window_s=60, clock=clock)
    return rest.BasicAuth(logins, limiter), clock, calls


def test_successful_basic_logins_never_count_against_the_limit(monkeypatch):
    from threedgen.webui.rest import REMEMBER_S

    auth, clock, calls = _rest(monkeypatch, max_failures=2)
    for _ in range(5):  # each after the remembered header expired: the password is checked every time
        assert auth.check(_basic("alice", "right"), "10.0.0.1") is None
        clock.now += REMEMBER_S + 1
    assert calls == ["alice"] * 5
    assert auth.check(_basic("alice", "wrong"), "10.0.0.1") == (401, "wrong user name or password")
    assert auth.check(_basic("bob", "also right"), "10.0.0.1") is None  # one failure of two: not blocked
    assert auth.check(_basic("alice", "wrong again"), "10.0.0.1") == (401, "wrong user name or password")
    status, message = auth.check(_basic("alice", "right"), "10.0.0.1")  # no longer remembered; blocked address
    assert status == 429 and message == "too many failed logins from this address; try again in 60 s"


def test_a_verified_header_is_remembered_for_five_minutes_then_checked_again(monkeypatch):
    auth, clock, calls = _rest(monkeypatch)
    header = _basic("alice", "right")
    assert auth.check(header, "10.0.0.1") is None and calls == ["alice"]
    clock.now += 299
    assert auth.check(header, "10.0.0.2") is None and calls == ["alice"]  # remembered, from any address
    clock.now += 1  # exactly five minutes after: checked again
    assert auth.check(header, "10.0.0.1") is None and calls == ["alice", "alice"]
    assert auth.check(_basic("alice", "Right"), "10.0.0.1")[0] == 401  # another header is never taken for it


def test_malformed_or_missing_credentials(monkeypatch):
    auth, clock, calls = _rest(monkeypatch, max_failures=2)
    for header in (None, "", "Bearer abc", "basic " + _basic("alice", "right")[6:]):
        assert auth.check(header, "10.0.0.1") == (401, "this server needs a login: HTTP Basic credentials of a "
                                                        "web UI user")
    assert auth.check("Basic !!!", "10.0.0.1") == (401, "malformed HTTP Basic credentials")
    assert auth.check("Basic " + "gA==", "10.0.0.1") == (401, "malformed HTTP Basic credentials")  # not UTF-8
    assert auth.check(_basic("alice", "right"), "10.0.0.1")[0] == 429  # the two malformed ones counted
    assert calls == []  # and no password was checked


def test_the_polling_routes_answer_json_with_the_right_status(monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from threedgen.webui.rest import rest_routes

    class UI:
        def status(self, job_id):
            if job_id == "0123456789ab":
                return {"id": job_id, "status": "queued"}
            if job_id == "bad":
                raise UserError("job ids are 12 hexadecimal characters")
            raise UserError(f"no job {job_id}")

        def jobs(self):
            return [{"id": "0123456789ab"}]

    open_client = TestClient(Starlette(routes=rest_routes(UI())))
    assert open_client.get("/api/v1/jobs").json() == {"jobs": [{"id": "0123456789ab"}]}
    response = open_client.get("/api/v1/status/0123456789ab")
    assert response.status_code == 200 and response.json()["status"] == "queued"
    response = open_client.get("/api/v1/status/ffffffffffff")
    assert response.status_code == 404 and response.json() == {"error": "no job ffffffffffff"}
    response = open_client.get("/api/v1/status/bad")
    assert response.status_code == 400 and response.json() == {"error": "job ids are 12 hexadecimal characters"}
    assert open_client.post("/api/v1/jobs").status_code == 405

    auth, clock, calls = _rest(monkeypatch, max_failures=1)
    client = TestClient(Starlette(routes=rest_routes(UI(), auth.logins, auth.limiter)))
    response = client.get("/api/v1/jobs")
    assert response.status_code == 401 and response.headers["www-authenticate"] == 'Basic realm="threedgen"'
    response = client.get("/api/v1/jobs", headers={"Authorization": _basic("alice", "right")})
    assert response.status_code == 200 and response.json() == {"jobs": [{"id": "0123456789ab"}]}
    assert client.get("/api/v1/jobs", headers={"Authorization": _basic("alice", "no")}).status_code == 401
    response = client.get("/api/v1/jobs", headers={"Authorization": _basic("bob", "also right")})
    assert response.status_code == 429 and "www-authenticate" not in response.headers
    assert "try again in" in response.json()["error"]
    # the limit is per client address: another address logs in as usual
    other = TestClient(Starlette(routes=rest_routes(UI(), auth.logins, auth.limiter)), client=("10.9.9.9", 5000))
    assert other.get("/api/v1/jobs", headers={"Authorization": _basic("bob", "also right")}).status_code == 200


def test_hash_parameters_at_their_edges():
    """N from 2 to 2^20 (a power of two), r from 1 to 64, p from 1 to 16, at most 256 MiB of
    scrypt memory (128·r·(N+p+2) bytes), a salt of 8 bytes or more and a key of 16 to 64 bytes,
    all in strict base64."""
    import base64

    def token(n=16384, r=8, p=1, salt=b"s" * 16, key=b"k" * 32, salt_text=None):
        return f"scrypt${n}${r}${p}${salt_text or base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"

    for ok in (token(n=2), token(r=1), token(r=64, n=1024), token(p=16), token(salt=b"s" * 8), token(key=b"k" * 16),
               token(key=b"k" * 64), token(n=2 ** 19, r=3, p=16)):
        webauth._parse(ok)
    for bad, reason in ((token(r=65), "r from 1 to 64"), (token(p=0), "p from 1 to 16"), (token(p=17), "p from 1"),
                        (token(salt=b"s" * 7), "salt must be 8 bytes"), (token(key=b"k" * 15), "key 16 to 64"),
                        (token(key=b"k" * 65), "key 16 to 64"), (token(n=2 ** 20, r=2, p=2), "more than 256 MiB"),
                        (token(salt_text=base64.b64encode(b"s" * 16).decode() + "!"), "must be base64")):
        with pytest.raises(ValueError, match=reason):
            webauth._parse(bad)
    salt = base64.b64encode(b"s" * 16).decode()
    with pytest.raises(ValueError, match="N, r and p must be integers"):
        webauth._parse(f"scrypt$x$8$1${salt}${salt}")


def test_a_new_password_typed_at_a_terminal_is_asked_twice(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    answers = []
    monkeypatch.setattr(webauth.getpass, "getpass", lambda prompt: answers.pop(0))
    answers[:] = ["hunter22", "hunter22"]
    assert webauth.read_new_password(Terminal()) == "hunter22"
    answers[:] = ["hunter22", "hunter23"]
    with pytest.raises(UserError, match="the two passwords differ; nothing printed"):
        webauth.read_new_password(Terminal())
    answers[:] = [""]  # an empty first answer is not asked again
    with pytest.raises(UserError, match="empty password"):
        webauth.read_new_password(Terminal())
    assert answers == []


def test_the_limiter_forgets_idle_addresses_before_blocked_ones():
    """Over its memory, addresses with no failure left in the window go first, even when they were
    looked at more recently than a blocked one."""
    now = [0.0]
    limiter = LoginLimiter(max_failures=1, window_s=10, clock=lambda: now[0], max_clients=3)
    for t, client in ((0.0, "idle"), (8.0, "b"), (9.0, "c")):
        now[0] = t
        limiter.begin(client)
    now[0] = 12.0
    assert not limiter.blocked("idle")  # its failure left the window; looking at it makes it the most recent
    limiter.begin("d")
    assert limiter.blocked("b") and limiter.blocked("c") and limiter.blocked("d")
