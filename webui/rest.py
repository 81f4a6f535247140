"""The polling API: ``GET /api/v1/status/<job id>`` and ``GET /api/v1/jobs`` as plain JSON routes.

Scripts and dashboards that poll many times a second should use these: a Gradio API call (``/status``
through ``gradio_client``) goes through Gradio's event queue and costs the server about 20 ms of
CPU, these about 1 ms (BENCHMARKS.md, "Web UI under load"). They answer the same dicts as the
Gradio API's ``status`` and ``jobs``. With ``--auth-file`` they ask for HTTP Basic credentials of
the same users; failed ones count against the same per-address limit as failed logins, and a
verified ``Authorization`` header is remembered for five minutes, so a poll does not pay for a
password hash each time.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from typing import Optional

from threedgen.errors import UserError

REMEMBER_S = 300.0


class BasicAuth:
    """HTTP Basic against the web UI's users (``Logins``), with the login rate limit."""

    def __init__(self, logins, limiter):
        self.logins, self.limiter = logins, limiter
        self._verified: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, header: Optional[str], client: str) -> Optional[tuple[int, str]]:
        """None when allowed; else ``(HTTP status, message)``."""
        if not header or not header.startswith("Basic "):
            return 401, "this server needs a login: HTTP Basic credentials of a web UI user"
        key = hashlib.sha256(header.encode("utf-8", "replace")).hexdigest()
        now = time.monotonic()
        with self._lock:
            if self._verified.get(key, 0.0) > now:
                return None
        attempt = self.limiter.begin(client)
        if attempt is None:
            return 429, f"too many failed logins from this address; try again in {self.limiter.retry_after(client)} s"
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return 401, "malformed HTTP Basic credentials"
        if not self.logins(user, password):
            return 401, "wrong user name or password"
        self.limiter.succeeded(client, attempt)
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified = {k: t for k, t in self._verified.items() if t > now}
            self._verified[key] = now + REMEMBER_S
        return None


def rest_routes(ui, logins=None, limiter=None) -> list:
    """Starlette routes over ``ui`` (a ``WebUI``)."""
    from starlette.responses import JSONResponse  # ships with Gradio
    from starlette.routing import Route  # ships with Gradio; only when serving

    auth = BasicAuth(logins, limiter) if logins is not None else None

    def guarded(handler):
        def endpoint(request):
            if auth is not None:
                refused = auth.check(request.headers.get("authorization"),
                                     request.client.host if request.client else "unknown")
                if refused is not None:
                    status, message = refused
                    headers = {"WWW-Authenticate": 'Basic realm="threedgen"'} if status == 401 else {}
                    return JSONResponse({"error": message}, status_code=status, headers=headers)
            try:
                return JSONResponse(handler(request))
            except UserError as exc:
                return JSONResponse({"error": str(exc)}, status_code=404 if str(exc).startswith("no job") else 400)
        return endpoint

    return [
        Route("/api/v1/status/{job_id}", guarded(lambda request: ui.status(request.path_params["job_id"])),
              methods=["GET"]),
        Route("/api/v1/jobs", guarded(lambda request: {"jobs": ui.jobs()}), methods=["GET"]),
    ]
