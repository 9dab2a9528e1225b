"""The HTTP API: accepts uploads, queues jobs, answers status. No model here."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app

from shared.access import KeyStore, Limiter
from shared.cache import ResultCache
from shared.config import Settings
from shared.jobs import JobStore
from shared.queue import make_celery
from shared.redis_client import connect
from shared.vocabularies import VocabularyStore
from web.waiting import JobWaiter

# multipart framing around a file of MAX_UPLOAD_BYTES; the file itself is checked exactly in the view
_MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Services:
    """What the views use, built once per app."""

    settings: Settings
    store: JobStore
    waiter: JobWaiter  # ?wait= long-polls: one pub/sub listener per process, started on first use
    celery: Celery  # sends tasks only
    keys: KeyStore  # API keys (web/auth.py)
    limiter: Limiter  # per-client limits
    cache: ResultCache  # results by content
    vocabularies: VocabularyStore  # word lists requests may name


def services(app: Flask | None = None) -> Services:
    """The services of ``app`` (default: the app handling the current request)."""
    return (app or current_app).extensions["arabic_words"]


def create_app(config: Settings | dict | None = None) -> Flask:
    """App factory. ``config``: a Settings, a dict of Settings overrides, or None (the environment)."""
    settings = config if isinstance(config, Settings) else Settings(**(config or {}))
    if not settings.REDIS_URL:
        raise RuntimeError("REDIS_URL is not set (`arabic-words run` starts an embedded Redis and sets it)")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES + _MULTIPART_OVERHEAD
    app.json.ensure_ascii = False  # Arabic text stays readable in responses
    client = connect(settings.REDIS_URL, health_check_interval=30)
    store = JobStore(client, settings)
    app.extensions["arabic_words"] = Services(
        settings=settings,
        store=store,
        waiter=JobWaiter(store),
        celery=make_celery(settings, main="arabic_words_web"),
        keys=KeyStore(client),
        limiter=Limiter(client),
        cache=ResultCache(client, settings),
        vocabularies=VocabularyStore(client),
    )
    logging.getLogger(__name__).setLevel(settings.LOG_LEVEL)

    from web import auth, metrics
    from web.api import bp as api_bp
    from web.errors import register_error_handlers
    from web.openai import bp as openai_bp
    from web.openapi import bp as openapi_bp
    from web.pages import bp as pages_bp

    auth.install(app)
    app.register_blueprint(api_bp)
    app.register_blueprint(openai_bp)  # POST /v1/audio/transcriptions (OpenAI-compatible)
    app.register_blueprint(openapi_bp)  # /openapi.json and /docs
    app.register_blueprint(pages_bp)
    register_error_handlers(app)
    metrics.install(app, settings, client)  # counts every request; GET /metrics (web/metrics.py)
    return app
