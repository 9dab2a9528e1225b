"""Every Redis client of the service comes from ``connect(settings.REDIS_URL)``: one Redis, or the master of a group
that Redis Sentinel watches, so the job store follows a failover (the broker follows it through
``shared.queue.make_celery``, which gives kombu the same URL in its own terms: ``broker``).

``REDIS_URL`` is one of:

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix://[[user]:password@]/path?db=N``:
  redis-py's ``Redis.from_url``, unchanged;
- ``sentinel://[[user]:password@]host:port;sentinel://host:port;...[/db]?master_name=NAME`` (Redis Sentinel): the
  sentinels (port 26379 when omitted), separated by ``;``, the name of the master they watch, and the password (and
  user) of the master and its replicas. The database and the query may be written once, on any part (usually the
  last), or identically on every part (kombu's form); the password likewise. ``sentinel_password=...`` in the query:
  the sentinels' own password (``requirepass`` of the sentinels), if they have one.

A Sentinel client (``redis.sentinel.Sentinel(...).master_for(...)``) asks the sentinels for the master's address
whenever it opens a connection, so after a failover the next connection reaches the new master; commands that hit
the dead master fail with ``ConnectionError`` (a demoted one's ``READONLY`` answer is turned into one too) and the
callers' own retries (``worker.tasks._with_redis``, the web's 503 + Retry-After) cover the seconds until the
sentinels have promoted a replica. Lua scripts registered with ``register_script`` reload themselves on the new
master (redis-py retries EVALSHA with SCRIPT LOAD on ``NoScriptError``).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
SENTINEL_DEFAULT_PORT = 26379
# Timeouts of the connections to the sentinels themselves (asked for the master's address): a sentinel that does not
# answer within this is skipped for the next one, so one dead sentinel host never stalls every reconnection.
SENTINEL_SOCKET_TIMEOUT_S = 1.0
_QUERY_OPTIONS = ("master_name", "sentinel_password")
_PLAIN_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class SentinelURL:
    """A ``sentinel://`` REDIS_URL, parsed. ``username``/``password``: the master's (and its replicas')."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def kombu_url(self) -> str:
        """The broker URL kombu's Sentinel transport reads: every sentinel as a ``;``-separated alternate, each with
        the master's credentials and the database (kombu takes them from the first URL, and from the next one
        when it switches to it after a connection error, so each part must carry them)."""
        auth = ""
        if self.password is not None or self.username is not None:
            user = urllib.parse.quote(self.username or "", safe="")
            auth = f"{user}:{urllib.parse.quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.sentinels)

    def kombu_transport_options(self) -> dict:
        """What kombu's Sentinel transport needs besides the URL: the master's name and how to reach the
        sentinels."""
        sentinel_kwargs: dict = {
            "socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S,
        }
        if self.sentinel_password is not None:
            sentinel_kwargs["password"] = self.sentinel_password
        return {"master_name": self.master_name, "sentinel_kwargs": sentinel_kwargs}

    def redacted(self) -> str:
        """The URL without its passwords, for logs."""
        hosts = ";".join(f"sentinel://{_netloc(host, port)}" for host, port in self.sentinels)
        return f"{hosts}/{self.db}?master_name={self.master_name}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def _one(what: str, values: list) -> object:
    """The value given for ``what`` (None if none); several parts may repeat it, but must agree."""
    given = [v for v in values if v is not None]
    if len(set(given)) > 1:
        raise ValueError(f"a sentinel:// URL gives its {what} more than once, differently")
    return given[0] if given else None


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``sentinel://`` REDIS_URL; a ValueError names what is wrong (never a password)."""
    parts = [part.strip() for part in url.strip().split(";") if part.strip()]
    if not parts:
        raise ValueError("a sentinel:// URL needs at least one sentinel")
    sentinels: list[tuple[str, int]] = []
    usernames, passwords, dbs = [], [], []
    queries: dict[str, list[str]] = {}
    for part in parts:
        parsed = urllib.parse.urlsplit(part)
        if parsed.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError("every ;-separated part of a sentinel:// URL must start with sentinel://")
        if parsed.fragment:
            raise ValueError("a sentinel:// URL has no #fragment")
        try:
            port = parsed.port or SENTINEL_DEFAULT_PORT
        except ValueError:
            raise ValueError("a sentinel's port must be a number from 1 to 65535") from None
        if not parsed.hostname:
            raise ValueError("each sentinel:// part needs a host")
        sentinels.append((parsed.hostname, port))
        usernames.append(urllib.parse.unquote(parsed.username) if parsed.username else None)
        passwords.append(urllib.parse.unquote(parsed.password) if parsed.password else None)
        path = parsed.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError("the database of a sentinel:// URL must be a number (/0, /1, ...)")
            dbs.append(int(path))
        for name, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True, strict_parsing=False).items():
            if name not in _QUERY_OPTIONS:
                raise ValueError(f"a sentinel:// URL takes only {', '.join(_QUERY_OPTIONS)} in its query, not {name!r}")
            queries.setdefault(name, []).extend(values)
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("a sentinel:// URL names one sentinel twice")
    master_name = _one("master_name", queries.get("master_name", []))
    if not master_name:
        raise ValueError("a sentinel:// URL needs ?master_name=NAME (the name the sentinels monitor the master by)")
    return SentinelURL(
        sentinels=tuple(sentinels),
        master_name=str(master_name),
        db=int(_one("database", dbs) or 0),  # type: ignore[arg-type]
        username=_one("user", usernames),  # type: ignore[arg-type]
        password=_one("password", passwords),  # type: ignore[arg-type]
        sentinel_password=_one("sentinel_password", queries.get("sentinel_password", [])),  # type: ignore[arg-type]
    )


def check_url(url: str) -> None:
    """Raise ValueError (a message without secrets) unless ``url`` is a REDIS_URL ``connect`` can use; "" is fine
    (``arabic-words run`` starts an embedded Redis)."""
    if not url:
        return
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        return
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _PLAIN_SCHEMES:
        raise ValueError("must start with redis://, rediss://, unix:// or sentinel:// (see the README)")


class SentinelMasterClient(redis.Redis):
    """The master of a Sentinel group (``Sentinel.master_for``); closing it also closes its connections to the
    sentinels."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            if manager is not None:
                manager.close()


def connect(url: str, **kwargs: object) -> redis.Redis:
    """A client of the Redis that ``url`` (a REDIS_URL) names: ``redis.Redis.from_url`` for a plain URL, the
    master of the Sentinel group for a ``sentinel://`` one. ``kwargs`` are given to the connections to Redis
    (``socket_timeout``, ``health_check_interval``, ...); the sentinels are asked with their own short timeouts."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    sentinel_kwargs: dict = {
        "socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S,
    }
    if parsed.sentinel_password is not None:
        sentinel_kwargs["password"] = parsed.sentinel_password
    master_kwargs: dict = {"db": parsed.db, **kwargs}
    if parsed.username is not None:
        master_kwargs["username"] = parsed.username
    if parsed.password is not None:
        master_kwargs["password"] = parsed.password
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(parsed.master_name, redis_class=SentinelMasterClient, **master_kwargs)
