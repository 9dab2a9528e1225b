"""Settings are read once, validated at startup, and name the variable that is wrong; the processes start one way."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from arabic_words.processes import command, flower_argv, web_argv, worker_argv
from shared.config import AsrBackend, ConfigError, Settings
from worker.backends import Backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ASR_BACKEND", "fastest"),
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_ATTEMPTS", "0"),
        ("MAX_REDIS_MEMORY_FRACTION", "1.5"),
        ("LOG_LEVEL", "chatty"),
        ("REDIS_MAXMEMORY", "2 gigabytes"),
        ("QUEUE", "two words"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        Settings()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("invalid configuration: ")
    assert f"{name}=" in message


def test_a_secret_is_not_echoed(monkeypatch):
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "no-colon-secret")
    with pytest.raises(ConfigError) as caught:
        Settings()
    assert "FLOWER_BASIC_AUTH" in str(caught.value) and "no-colon-secret" not in str(caught.value)


def test_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("MAX_AUDIO_S", "12.5")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = Settings(QUEUE="elsewhere")
    assert settings.MAX_AUDIO_S == 12.5 and settings.LOG_LEVEL == "DEBUG" and settings.QUEUE == "elsewhere"
    assert Settings(**{k: v for k, v in settings.as_env().items()}) == settings  # what child processes are given
    with pytest.raises(ConfigError, match="NO_SUCH_SETTING"):
        Settings(NO_SUCH_SETTING=1)
    with pytest.raises(ConfigError, match="PORT"):
        settings.replace(PORT=0)


def test_state_dir_is_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert Settings().state_dir == tmp_path / "arabic-words"
    assert Settings(STATE_DIR="/srv/aw").state_dir == Path("/srv/aw")


def test_backend_names_match_the_worker():
    assert set(typing.get_args(AsrBackend)) == {b.value for b in Backend}


def test_service_commands():
    settings = Settings(REDIS_URL="redis://h:1/0", HOST="0.0.0.0", PORT=9000, WEB_PROCESSES=3, MAX_WAIT_S=20)
    assert command("worker", "-n", "a@%h") == [sys.executable, "-m", "arabic_words", "worker", "-n", "a@%h"]
    web = web_argv(settings)
    assert web[web.index("--bind") + 1] == "0.0.0.0:9000" and web[web.index("--workers") + 1] == "3"
    assert web[web.index("--graceful-timeout") + 1] == "25"  # outlasts the longest long-poll
    assert "--address=127.0.0.1" in flower_argv(settings)  # no password: never off this machine
    with_auth = flower_argv(settings.replace(FLOWER_BASIC_AUTH="ops:s3cret"))
    assert "--address=0.0.0.0" in with_auth and "s3cret" not in " ".join(with_auth)  # by environment
    assert "redis://h:1/0" not in " ".join(with_auth)  # the broker URL (and its password) goes by environment
    assert worker_argv(settings, ["-n", "x@%h"])[-2:] == ["-n", "x@%h"]
    with pytest.raises(ValueError):
        command("redis")


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "arabic_words", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


@pytest.mark.parametrize("service", ["web", "worker", "flower", "run"])
def test_services_refuse_a_bad_setting_at_startup(service):
    done = _cli(service, REDIS_URL="redis://127.0.0.1:1/0", WORKER_CONCURRENCY="many")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "arabic-words: invalid configuration: WORKER_CONCURRENCY='many': "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_web_worker_and_flower_need_redis_url():
    for service in ("web", "worker", "flower"):
        done = _cli(service)
        assert done.returncode == 2 and "REDIS_URL is not set" in done.stderr, done.stderr


def test_only_the_worker_takes_extra_options():
    done = _cli("transcribe", "x.wav", "--concurrency", "2")
    assert done.returncode == 2 and "unrecognized arguments: --concurrency 2" in done.stderr


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("ASR_MODEL", "/nonexistent/checkpoint", "could not be loaded"),
        ("ASR_LEXICON", "/nonexistent.txt", "could not be read"),
    ],
)
def test_a_model_or_word_list_that_cannot_load_is_one_line_naming_it(tmp_path, name, value, says):
    env = {name: value, "HOME": str(tmp_path), "ASR_BACKEND": "torch-fp32"}
    done = _cli("transcribe", str(ROOT / "tests" / "data" / "kitab.webm"), **env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"arabic-words: {name}={value!r} {says}: ")


def test_worker_processes_and_threads_share_the_cores(monkeypatch):
    """What bench.saturation measured (2 processes x 1 thread ~2x the throughput of 1 x 2 and of 2 x 2 on 2 cores):
    WORKER_CONCURRENCY=0 is a process per CPU (at most 4), and TORCH_THREADS=0 with several prefork processes gives
    each its share of the CPUs; anything set explicitly is kept."""
    from arabic_words import processes

    monkeypatch.setattr(processes, "cpu_count", lambda: 8)
    resolved = lambda **kw: processes.worker_settings(Settings(**kw))  # noqa: E731
    pair = lambda **kw: (resolved(**kw).WORKER_CONCURRENCY, resolved(**kw).TORCH_THREADS)  # noqa: E731
    assert pair() == (4, 2)  # the default: one per CPU, at most 4, the CPUs shared
    assert pair(WORKER_CONCURRENCY=1) == (1, 0)  # one process: the runtime's own default
    assert pair(WORKER_CONCURRENCY=2) == (2, 4) and pair(WORKER_CONCURRENCY=3) == (3, 2)
    assert pair(WORKER_CONCURRENCY=16) == (16, 1)  # at least one each
    assert pair(WORKER_CONCURRENCY=2, TORCH_THREADS=3) == (2, 3)
    assert pair(BATCH_MAX_SIZE=4) == (0, 0)  # threads pool: one process, BATCH_MAX_SIZE threads
    monkeypatch.setattr(processes, "cpu_count", lambda: 2)
    assert pair() == (2, 1)
    monkeypatch.setattr(processes, "cpu_count", lambda: 1)
    assert pair() == (1, 0)
