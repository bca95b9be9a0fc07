"""A real ``attllm-serve`` subprocess on 127.0.0.1 (the service tests and bench_serve): start, wait for health, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running service: its URL, process and log files."""

    url: str
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def log(self) -> str:
        """Everything it wrote so far (stdout and stderr)."""
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


def wait_ready(server: Server, timeout_s: float) -> None:
    """Polls /v1/health until "ready"; fails with the server's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"attllm-serve exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v1/health", timeout=2).json().get("status") == "ready":
                return
        time.sleep(0.5)
    raise AssertionError(f"attllm-serve not ready after {timeout_s} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def running_server(
    args: list[str], workdir: Path, env: dict | None = None, ready_timeout_s: float = 400.0
) -> Iterator[Server]:
    """``python -m experiments.serve ARGS --port P`` in a subprocess, ready; SIGTERM then kill when done."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = workdir / "server.stdout", workdir / "server.stderr"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **(env or {})}
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.serve", *args, "--port", str(port)],
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=err,
        )
    server = Server(f"http://127.0.0.1:{port}", process, stdout, stderr)
    try:
        wait_ready(server, ready_timeout_s)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
