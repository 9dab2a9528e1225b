"""`arabic-words`: run | web | worker | flower | transcribe | evaluate | backfill."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from arabic_words.processes import (
    SERVICES,
    command,
    exec_service,
    flower_argv,
    run_worker,
    stop_process,
    web_argv,
)
from shared.config import ConfigError, Settings

log = logging.getLogger("arabic_words")


# ------------------------------------------------------------------------------------------- the services
def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Start Redis (unless REDIS_URL is set), the web server, one worker and Flower; Ctrl-C stops them all.

    The embedded Redis has a password of its data directory's own (made on the first start, kept in a 0600 file
    there); the children find it in REDIS_URL in their environment, which only this user can read."""
    from shared.redis_server import SERVICE_DISABLED_COMMANDS, ensure_password, free_port, start_redis

    env = {**os.environ, **settings.as_env()}
    procs: dict[str, subprocess.Popen] = {}
    if not settings.REDIS_URL:
        port = settings.REDIS_PORT or free_port()
        data_dir = settings.state_dir / "redis"
        try:
            password = ensure_password(data_dir)
            procs["redis"] = start_redis(
                port,
                data_dir,
                maxmemory=settings.REDIS_MAXMEMORY,
                password=password,
                disabled_commands=SERVICE_DISABLED_COMMANDS,
            )
        except (OSError, RuntimeError) as exc:
            print(f"arabic-words: embedded Redis: {exc}", file=sys.stderr, flush=True)
            return 1
        env["REDIS_URL"] = f"redis://:{urllib.parse.quote(password, safe='')}@127.0.0.1:{port}/0"
        print(f"embedded redis-server on redis://:***@127.0.0.1:{port}/0 (data in {data_dir})", flush=True)
    for name in SERVICES:
        procs[name] = subprocess.Popen(command(name), env=env)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    ready_url = f"http://127.0.0.1:{settings.PORT}/readyz"
    announced, exit_code = False, 0
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; stopping everything", file=sys.stderr, flush=True)
                stopping, exit_code = True, 1
        if not announced and not stopping:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    announced = response.status == 200
            except (urllib.error.URLError, OSError):
                pass
            if announced:
                print(
                    f"arabic-words is ready: http://127.0.0.1:{settings.PORT}/  "
                    f"(API /v1/transcriptions, Flower http://127.0.0.1:{settings.FLOWER_PORT}/)",
                    flush=True,
                )
        time.sleep(0.5)
    for name in ("flower", "web", "worker", "redis"):  # redis last: the others flush to it on the way out
        proc = procs.get(name)
        if proc:
            stop_process(proc, settings.MAX_WAIT_S + 10)  # gunicorn lets open long-polls answer first
    return exit_code


def _require_redis(settings: Settings) -> None:
    if not settings.REDIS_URL:
        raise ConfigError("REDIS_URL is not set (`arabic-words run` starts an embedded Redis and sets it)")


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    _require_redis(settings)
    exec_service(web_argv(settings), settings)
    return 0  # not reached


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    _require_redis(settings)
    return run_worker(settings, args.celery_options)


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    _require_redis(settings)
    exec_service(flower_argv(settings), settings)
    return 0  # not reached


# ---------------------------------------------------------------------------------------------------- keys
def _rate(value: str) -> int:
    """``N`` or ``N/min`` requests per minute."""
    number = value.removesuffix("/min").strip()
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected N or N/min, not {value!r}")
    return int(number)


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Create, list and revoke API keys (stored in Redis as a hash; a new key is printed once)."""
    from shared.access import KeyStore, Limits
    from shared.redis_client import connect

    _require_redis(settings)
    store = KeyStore(connect(settings.REDIS_URL))
    if args.action == "create":
        limits = Limits(
            settings.RATE_LIMIT_PER_MIN if args.rate is None else args.rate,
            settings.MAX_INFLIGHT if args.max_inflight is None else args.max_inflight,
            settings.AUDIO_S_PER_DAY if args.audio_s_per_day is None else args.audio_s_per_day,
        )
        try:
            record, secret = store.create(args.name, limits)
        except ValueError as exc:
            print(f"arabic-words: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(record.public(), ensure_ascii=False), file=sys.stderr)
        print(secret)  # alone on stdout, so `KEY=$(arabic-words keys create app)` works; it is not shown again
        return 0
    if args.action == "list":
        for record in store.list():
            print(json.dumps(record.public(), ensure_ascii=False))
        return 0
    revoked = store.revoke(args.name)
    for record in revoked:
        print(json.dumps(record.public() | {"revoked": True}, ensure_ascii=False))
    if not revoked:
        print(f"arabic-words: no live key with the id or name {args.name!r}", file=sys.stderr)
    return 0 if revoked else 1


def cmd_vocabulary(args: argparse.Namespace, settings: Settings) -> int:
    """Word lists registered on the server, for requests that name one (``vocabulary=NAME``)."""
    from shared.redis_client import connect
    from shared.vocabularies import InvalidVocabulary, VocabularyStore

    _require_redis(settings)
    store = VocabularyStore(connect(settings.REDIS_URL))
    if args.action == "add":
        try:
            words = store.add(args.name, Path(args.file).read_text(encoding="utf-8"))
        except (InvalidVocabulary, OSError) as exc:
            print(f"arabic-words: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"name": args.name, "words": len(words)}, ensure_ascii=False))
        return 0
    if args.action == "list":
        for name, count in store.names().items():
            print(json.dumps({"name": name, "words": count}, ensure_ascii=False))
        return 0
    if args.action == "show":
        words = store.get(args.name)
        print("\n".join(words or []))
        return 0 if words is not None else 1
    removed = store.remove(args.name)
    if not removed:
        print(f"arabic-words: no word list named {args.name!r}", file=sys.stderr)
    return 0 if removed else 1


# ---------------------------------------------------------------------------------------------- transcribe
def _load(settings: Settings):
    from worker.asr import select_device
    from worker.model import load_configured_model

    return load_configured_model(settings, select_device(0))


def _transcribe_file(model, path: Path, settings: Settings, expected: str | None = None) -> dict:
    from worker.audio import InvalidAudio
    from worker.pipeline import transcribe_bytes

    try:
        result = transcribe_bytes(model, path.read_bytes(), max_audio_s=settings.MAX_AUDIO_S, expected=expected)
    except InvalidAudio as exc:
        code = "audio_too_long" if exc.reason == "audio_too_long" else "invalid_audio"
        return {"file": str(path), "status": "failed",
                "error": {"code": code, "message": exc.message, "reason": exc.reason}}  # fmt: skip
    except OSError as exc:
        return {"file": str(path), "status": "failed", "error": {"code": "unreadable", "message": str(exc)}}
    return {"file": str(path), "status": "succeeded", "result": result.to_dict()}


def cmd_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    """One JSON line per file, the API's result schema, no queue."""
    model = _load(settings)
    failed = 0
    for name in args.files:
        out = _transcribe_file(model, Path(name), settings, expected=args.expected)
        failed += out["status"] != "succeeded"
        print(json.dumps(out, ensure_ascii=False), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ evaluate
def read_manifest(directory: Path) -> list[tuple[Path, str]]:
    """``transcripts.tsv`` in ``directory``: one ``file<TAB>expected text`` line per clip."""
    rows = []
    for line in (directory / "transcripts.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, text = line.split("\t", 1)
            rows.append((directory / name, text.strip()))
    return rows


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from arabic_words.metrics import auroc, corpus_scores, word_correctness

    model = _load(settings)
    rows = read_manifest(Path(args.directory))
    pairs, scores, labels, decode_ms, infer_ms, by_format = [], [], [], [], [], {}
    for path, expected in rows:
        out = _transcribe_file(model, path, settings)
        hypothesis = out["result"]["text"] if out["status"] == "succeeded" else ""
        pairs.append((expected, hypothesis))
        by_format.setdefault(path.suffix.lstrip("."), []).append((expected, hypothesis))
        if out["status"] == "succeeded":
            result = out["result"]
            decode_ms.append(result["timings_ms"]["decode"])
            infer_ms.append(result["timings_ms"]["inference"])
            for word, correct in zip(result["words"], word_correctness(expected, hypothesis), strict=True):
                scores.append(word["confidence"])
                labels.append(correct)
        if args.verbose:
            print(json.dumps({"file": path.name, "expected": expected, "got": hypothesis}, ensure_ascii=False))
    report = {
        "model": settings.ASR_MODEL,
        "clips": len(rows),
        **{k: round(v, 4) for k, v in corpus_scores(pairs).items()},
        "confidence_auroc": (lambda a: round(a, 4) if a is not None else None)(auroc(scores, labels)),
        "median_decode_ms": round(statistics.median(decode_ms), 2) if decode_ms else None,
        "median_inference_ms": round(statistics.median(infer_ms), 2) if infer_ms else None,
        "by_format": {
            fmt: {k: round(v, 4) for k, v in corpus_scores(p).items()} for fmt, p in sorted(by_format.items())
        },
    }
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ backfill
def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    """Send a folder's recordings (or a manifest's) to a running service; one record per file; resumable."""
    from arabic_words import backfill

    options = backfill.Options(
        url=args.url,
        out=Path(args.out),
        directory=Path(args.directory) if args.directory else None,
        manifest=Path(args.manifest) if args.manifest else None,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        retries=args.retries,
        api_key=args.api_key or None,
        fields={"priority": args.priority, **({"vocabulary": args.vocabulary} if args.vocabulary else {})},
    )
    try:
        summary = backfill.run(options)
    except backfill.BackfillError as exc:
        print(f"arabic-words: {exc}", file=sys.stderr)
        return 2
    print(summary.line(), file=sys.stderr)
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arabic-words", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start redis (embedded), web, worker and flower").set_defaults(func=cmd_run)
    sub.add_parser("web", help="the HTTP API (gunicorn, gevent) on HOST:PORT").set_defaults(func=cmd_web)
    sub.add_parser(
        "worker", help="a Celery worker that loads the model and runs jobs; more `celery worker` options may follow"
    ).set_defaults(func=cmd_worker)
    sub.add_parser("flower", help="Flower, the Celery monitor, on FLOWER_PORT").set_defaults(func=cmd_flower)

    keys = sub.add_parser("keys", help="API keys: create NAME | list | revoke NAME-OR-ID").add_subparsers(
        dest="action", required=True
    )
    p = keys.add_parser("create", help="print a new key (once); limits default to the settings'")
    p.add_argument("name")
    p.add_argument("--rate", type=_rate, help="requests per minute, N or N/min (0 = no limit)")
    p.add_argument("--max-inflight", type=int, help="jobs not yet finished at once (0 = no limit)")
    p.add_argument("--audio-s-per-day", type=float, help="seconds of audio per UTC day (0 = no limit)")
    p.set_defaults(func=cmd_keys)
    keys.add_parser("list", help="one JSON line per key (never the key itself)").set_defaults(func=cmd_keys)
    p = keys.add_parser("revoke", help="revoke a key by id, or every live key with this name")
    p.add_argument("name")
    p.set_defaults(func=cmd_keys)

    vocab = sub.add_parser(
        "vocabulary", help="word lists requests can name: add NAME FILE | list | show NAME | remove NAME"
    ).add_subparsers(dest="action", required=True)
    p = vocab.add_parser("add", help="register (or replace) a list: one word per line, or comma-separated")
    p.add_argument("name")
    p.add_argument("file")
    p.set_defaults(func=cmd_vocabulary)
    vocab.add_parser("list", help="one JSON line per list: name, number of words").set_defaults(func=cmd_vocabulary)
    for action in ("show", "remove"):
        p = vocab.add_parser(action, help=f"{action} one list")
        p.add_argument("name")
        p.set_defaults(func=cmd_vocabulary)

    p = sub.add_parser("transcribe", help="transcribe files without the queue; one JSON line per file")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", help="checkpoint dir or hub id (default: ASR_MODEL)")
    p.add_argument("--expected", help="the text the speaker was asked to say")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("evaluate", help="CER, word accuracy and confidence AUROC on a folder with transcripts.tsv")
    p.add_argument("directory")
    p.add_argument("--model", help="checkpoint dir or hub id (default: ASR_MODEL)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "backfill", help="send a folder of recordings (or a manifest's) to a running service, with a progress bar"
    )
    p.add_argument("directory", nargs="?", help="walked for audio files (or give --manifest)")
    p.add_argument(
        "--manifest",
        metavar="FILE.tsv",
        help="'path<TAB>expected text' lines (paths relative to its folder); instead of DIRECTORY",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--out",
        default="backfill.jsonl",
        help="records, appended: CSV if it ends in .csv, else JSON lines; files done are skipped",
    )
    p.add_argument("--concurrency", type=int, default=4, help="uploads in flight at once")
    p.add_argument(
        "--priority", choices=("batch", "interactive"), default="batch",
        help="the lane (default batch: learners' interactive jobs go first)",
    )  # fmt: skip
    p.add_argument("--vocabulary", help="words to prefer, or the name of a registered word list (sent with each)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for one job")
    p.add_argument(
        "--retries",
        type=int,
        default=8,
        help="retries per request on connection errors, timeouts, 5xx and 429 (backoff, Retry-After)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("ARABIC_WORDS_API_KEY", ""),
        help="sent as 'Authorization: Bearer KEY' (default: $ARABIC_WORDS_API_KEY, which keeps it "
        "off the command line)",
    )
    p.set_defaults(func=cmd_backfill)

    args, args.celery_options = parser.parse_known_args(argv)
    if args.celery_options and args.func is not cmd_worker:
        parser.error(f"unrecognized arguments: {' '.join(args.celery_options)}")
    try:
        settings = Settings(**({"ASR_MODEL": args.model} if getattr(args, "model", None) else {}))
        if args.func is not cmd_worker:  # the worker logs at LOG_LEVEL; a command says only what went wrong
            logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s %(message)s")
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"arabic-words: {exc}", file=sys.stderr)
        return 2
