"""Who is calling, and may they: API keys, per-client limits and CORS for the ``/v1`` API (``shared.access``).

With auth required (``AUTH_MODE``; by default whenever the server binds a non-loopback address), every API request
carries ``Authorization: Bearer <key>``; a job belongs to the key that created it, and another key is told it does
not exist (404, so ids cannot be probed). With auth off, each client address is limited the same way, except the
local machine. Health checks and the page are open: the page asks for a key when the API answers 401.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from dataclasses import dataclass

import redis
from flask import Flask, Response, g, request
from flask_cors import CORS

from shared.access import ApiKey, Decision, Limits
from shared.jobs import Job, new_id
from shared.schema import ErrorCode
from web import services
from web.errors import ApiError

log = logging.getLogger(__name__)

# CSP without inline script or style: the page loads only its own files and talks only to this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_EXPOSED = ["Location", "Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]


@dataclass(frozen=True)
class Client:
    subject: str  # whose limits a request counts against: "key:<id>" or "addr:<address>"
    key: ApiKey | None
    limits: Limits

    @property
    def counted(self) -> str:
        """The subject a job records for its limits to be released and its audio counted ("" for none)."""
        return self.subject if self.limits != Limits() else ""


def client() -> Client:
    """The caller of the current API request (set by ``check_access``)."""
    return g.client


def owns(job: Job) -> bool:
    """Whether the caller may see ``job``: always with auth off, else only the key that created it."""
    caller = client()
    return caller.key is None or job.key_id == caller.key.id


def _identify() -> Client:
    app = services()
    if not app.settings.auth_required:
        address = request.remote_addr or "unknown"
        limits = Limits() if _is_loopback(address) else _default_limits()
        return Client(f"addr:{address}", None, limits)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send an API key: 'Authorization: Bearer <key>'")
    key = app.keys.lookup(token.strip())
    if key is None:
        raise _unauthorized("unknown API key")
    if key.revoked:
        raise ApiError(403, ErrorCode.KEY_REVOKED, "this API key was revoked")
    return Client(key.subject, key, key.limits)


def _default_limits() -> Limits:
    s = services().settings
    return Limits(s.RATE_LIMIT_PER_MIN, s.MAX_INFLIGHT, s.AUDIO_S_PER_DAY)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, headers={"WWW-Authenticate": 'Bearer realm="arabic-words"'})


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_access() -> None:
    """Before every API request (register it on each ``/v1`` blueprint): who it is, and one request of their rate;
    a POST (an upload) also reserves a place among their jobs in flight, under the job id it will get
    (``reserved_job_id``), and checks their daily audio."""
    if request.method == "OPTIONS" or not request.path.startswith("/v1/"):  # a CORS preflight; health checks
        return
    g.client = caller = _identify()
    job_id = new_id() if request.method == "POST" else ""  # every POST under /v1 submits a job
    if caller.limits != Limits():  # an unlimited client (the local machine with auth off) costs no Redis call
        settings = services().settings
        hold_s = settings.UPLOAD_TTL_S + settings.TASK_TIME_LIMIT_S * settings.MAX_ATTEMPTS
        decision = services().limiter.admit(caller.subject, caller.limits, job_id=job_id, hold_s=hold_s)
        g.decision = decision
        if not decision.allowed:
            assert decision.code is not None
            raise ApiError(429, decision.code, decision.message, retry_after_s=max(1, decision.retry_after_s))
    if job_id:
        g.reserved_job_id = job_id


def reserved_job_id() -> str:
    """The id reserved for the job this upload creates; ``created()`` keeps the reservation."""
    return g.reserved_job_id


def created() -> None:
    """The job was stored and queued: its final transition frees its place (shared.jobs), not this request."""
    g.pop("reserved_job_id", None)


def release_unused(_: BaseException | None) -> None:
    """After an upload that created no job: give its reserved place back."""
    job_id = g.pop("reserved_job_id", None)
    if job_id and g.client.counted:
        with contextlib.suppress(redis.RedisError):  # else the reservation lapses after hold_s
            services().limiter.release(g.client.subject, job_id)


def rate_headers(response: Response) -> Response:
    decision: Decision | None = g.get("decision")
    if decision is not None and decision.limits.rate_per_min:
        response.headers["RateLimit-Limit"] = str(decision.limits.rate_per_min)
        response.headers["RateLimit-Remaining"] = str(decision.remaining)
        response.headers["RateLimit-Reset"] = str(decision.reset_s)
    return response


def _page_headers(response: Response) -> Response:
    for name, value in _PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def install(app: Flask) -> None:
    """CORS for the API routes and security headers on every response (the API blueprint registers the access
    checks itself: ``check_access``, ``rate_headers``, ``release_unused``)."""
    app.after_request(_page_headers)
    origins = services(app).settings.cors_origins
    if origins:
        CORS(
            app,
            resources={r"/v1/*": {"origins": origins}},
            allow_headers=["Authorization", "Content-Type"],
            methods=["GET", "POST", "OPTIONS"],
            expose_headers=_EXPOSED,
            max_age=600,
            vary_header=True,
        )
