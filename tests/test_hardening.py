"""Hardened defaults, on real processes: the embedded Redis wants its data directory's password, listens on
127.0.0.1 only and refuses the dangerous commands; no password is on a command line; Flower takes its basic-auth
credentials from its environment (or a file) and refuses requests without them."""

from __future__ import annotations

import base64
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from arabic_words.processes import command, flower_argv, stop_process
from shared.config import ConfigError, Settings
from shared.redis_server import (
    DISABLED_COMMANDS,
    SERVICE_DISABLED_COMMANDS,
    ensure_password,
    free_port,
    start_redis,
)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def _raw(port: int, *lines: str) -> bytes:
    """Send inline commands over a plain socket (no client library between the test and the server's answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall("".join(f"{line}\r\n" for line in lines).encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture()
def service_redis(tmp_path):
    """The embedded Redis the way `arabic-words run` starts it."""
    data_dir = tmp_path / "state" / "redis"
    password = ensure_password(data_dir)
    port = free_port()
    proc = start_redis(port, data_dir, persistent=True, password=password, disabled_commands=SERVICE_DISABLED_COMMANDS)
    yield port, password, proc, data_dir
    stop_process(proc, 10)


def test_the_embedded_redis_wants_its_password(service_redis):
    port, password, proc, _ = service_redis
    assert _raw(port, "PING").startswith(b"-NOAUTH")
    assert _raw(port, "SET k v", "GET k").count(b"-NOAUTH") == 2
    assert _raw(port, "AUTH wrong-password").startswith(b"-WRONGPASS")
    client = redis.Redis(port=port, password=password)
    assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
    assert "used_memory" in client.info("memory")  # admission control reads this; it must stay
    assert password.encode() not in _cmdline(proc.pid)


def test_the_dangerous_commands_are_renamed_off(service_redis):
    port, password, _, _ = service_redis
    client = redis.Redis(port=port, password=password)
    for name, *args in [("CONFIG", "GET", "dir"), ("CONFIG", "SET", "dir", "/tmp"), ("DEBUG", "SLEEP", "0"),
                        ("MODULE", "LIST"), ("SLAVEOF", "127.0.0.1", "1"), ("REPLICAOF", "127.0.0.1", "1"),
                        ("FLUSHALL",), ("FLUSHDB",), ("SHUTDOWN", "NOSAVE")]:  # fmt: skip
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(name, *args)
    assert client.ping()  # SHUTDOWN did nothing


def test_it_listens_on_loopback_only(service_redis):
    port = service_redis[0]
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and no IPv6 socket


def test_the_password_file_is_private_and_kept(service_redis):
    port, password, proc, data_dir = service_redis
    path = data_dir / "redis.password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert path.read_text().strip() == password and len(password) >= 40
    before = path.stat()
    redis.Redis(port=port, password=password).set("survives", "1")
    stop_process(proc, 10)
    # a second start of the same data directory: the same password, the file untouched, the data still there
    again = ensure_password(data_dir)
    assert again == password
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    proc2 = start_redis(port, data_dir, persistent=True, password=again, disabled_commands=SERVICE_DISABLED_COMMANDS)
    try:
        assert redis.Redis(port=port, password=again).get("survives") == b"1"
    finally:
        stop_process(proc2, 10)
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(".redis.password")] == []  # no temp files left


def test_another_data_directory_gets_another_password(tmp_path):
    assert ensure_password(tmp_path / "a") != ensure_password(tmp_path / "b")


def test_concurrent_first_starts_agree_on_one_password(tmp_path):
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_password(tmp_path / "d"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and len(set(results)) == 1


def test_a_password_file_others_can_read_is_refused(tmp_path):
    data_dir = tmp_path / "redis"
    ensure_password(data_dir)
    (data_dir / "redis.password").chmod(0o644)
    with pytest.raises(RuntimeError, match="readable by others"):
        ensure_password(data_dir)


def test_the_tests_servers_keep_flushdb_but_not_config(tmp_path):
    port = free_port()
    proc = start_redis(port, tmp_path, persistent=False)
    try:
        client = redis.Redis(port=port)
        assert client.ping() and client.flushdb()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.config_get("dir")
        assert "FLUSHDB" not in DISABLED_COMMANDS
        assert _listening_addresses(port) == {"0100007F"}
    finally:
        stop_process(proc, 10)


# ------------------------------------------------------------------------------------------------------- Flower
def _get(url: str, credentials: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _start_flower(tmp_path: Path, redis_url: str, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    environment = {**inherited, "REDIS_URL": redis_url, "FLOWER_PORT": str(port), **env}
    log = (tmp_path / f"flower-{port}.log").open("w")
    proc = subprocess.Popen(command("flower"), env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while _get_or_none(base + "/healthcheck") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, 10)
            output = (tmp_path / f"flower-{port}.log").read_text()
            pytest.skip(f"Flower did not start here: {output[-500:]}")
        time.sleep(0.2)
    return proc, base


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)
    except OSError:
        return None


@pytest.mark.parametrize("source", ["env", "file"])
def test_flower_takes_its_credentials_from_the_environment_or_a_file(tmp_path, service_redis, source):
    port, password, _, _ = service_redis
    redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
    credentials = "ops:flower-secret-7f3a"
    if source == "env":
        env = {"FLOWER_BASIC_AUTH": credentials}
    else:
        secret = tmp_path / "flower_basic_auth"
        secret.write_text(credentials + "\n")
        secret.chmod(0o600)
        env = {"FLOWER_BASIC_AUTH_FILE": str(secret)}
    proc, base = _start_flower(tmp_path, redis_url, **env)
    try:
        assert _get(base + "/workers") == 401
        assert _get(base + "/workers", "ops:wrong") == 401
        assert _get(base + "/workers", credentials) == 200
        argv = _cmdline(proc.pid)  # exec'd: this pid is Flower itself
        assert b"flower" in argv and b"--address=0.0.0.0" in argv
        assert b"flower-secret-7f3a" not in argv and password.encode() not in argv
    finally:
        stop_process(proc, 10)


def test_flower_without_credentials_is_local_and_open(tmp_path, service_redis):
    """No FLOWER_BASIC_AUTH: Flower listens on 127.0.0.1 and answers (an empty FLOWER_BASIC_AUTH in its
    environment would have made Flower require the credential '' and refuse everything)."""
    port, password, _, _ = service_redis
    proc, base = _start_flower(tmp_path, f"redis://:{password}@127.0.0.1:{port}/0", FLOWER_BASIC_AUTH="")
    try:
        assert _get(base + "/workers") == 200
        assert b"--address=127.0.0.1" in _cmdline(proc.pid)
    finally:
        stop_process(proc, 10)


def test_flower_credentials_are_checked_at_startup(tmp_path):
    settings = Settings(REDIS_URL="redis://h:1/0")
    with pytest.raises(ConfigError, match="FLOWER_BASIC_AUTH_FILE='/no/such/file': cannot be read"):
        flower_argv(settings.replace(FLOWER_BASIC_AUTH_FILE="/no/such/file"))
    bad = tmp_path / "bad"
    bad.write_text("ops:a,b")  # Flower splits at commas: "b" alone would be a credential
    with pytest.raises(ConfigError, match="user:password") as caught:
        flower_argv(settings.replace(FLOWER_BASIC_AUTH_FILE=str(bad)))
    assert "ops:a" not in str(caught.value)
    with pytest.raises(ConfigError, match="not both"):
        flower_argv(settings.replace(FLOWER_BASIC_AUTH="ops:x", FLOWER_BASIC_AUTH_FILE=str(bad)))
    assert "--basic-auth" not in " ".join(flower_argv(settings.replace(FLOWER_BASIC_AUTH="ops:x")))
