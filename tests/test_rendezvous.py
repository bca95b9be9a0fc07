"""Multi-host flags: wrong launches end in bounded time with one clear error (real sockets, real processes)."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attllm_jax.evaluation.hosts import CoordinationError, HostSpec
from attllm_jax.evaluation.rendezvous import rendezvous

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")},
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meet(specs: list[HostSpec]) -> list[BaseException | None]:
    """Runs every spec's rendezvous in its own thread (process 0 first); returns each one's error or None."""
    errors: list[BaseException | None] = [None] * len(specs)

    def run(k: int) -> None:
        try:
            rendezvous(specs[k])
        except BaseException as error:  # noqa: BLE001 - collected for the assertions
            errors[k] = error

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(specs))]
    for k, thread in enumerate(threads):
        thread.start()
        if k == 0:
            time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a rendezvous did not end within its timeout"
    return errors


def _spec(port: int, n: int, pid: int, timeout: float = 10.0) -> HostSpec:
    return HostSpec("env", f"127.0.0.1:{port}", n, pid, timeout).validated()


def test_every_process_joins_and_the_port_is_free_again():
    port = _free_port()
    assert _meet([_spec(port, 3, 0), _spec(port, 3, 2), _spec(port, 3, 1)]) == [None, None, None]
    with socket.socket() as s:  # jax's coordinator binds it next
        s.bind(("127.0.0.1", port))


def test_a_process_id_given_twice_is_refused_for_everyone():
    port = _free_port()
    errors = _meet([_spec(port, 3, 0), _spec(port, 3, 1), _spec(port, 3, 1)])
    assert all(isinstance(e, CoordinationError) for e in errors), errors
    assert all("--process_id 1 given twice" in str(e) for e in errors), errors


def test_a_late_duplicate_is_told_the_run_started_without_it():
    port = _free_port()
    assert _meet([_spec(port, 2, 0), _spec(port, 2, 1)]) == [None, None]
    with socket.socket() as server:  # what the duplicate meets: jax's coordinator (here, a server that says nothing)
        server.bind(("127.0.0.1", port))
        server.listen()
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        with pytest.raises(CoordinationError, match=r"process 1: the run at .* has already started without"):
            rendezvous(_spec(port, 2, 1, timeout=5.0))


def test_num_processes_that_differ_are_refused_naming_both_counts():
    port = _free_port()
    errors = _meet([_spec(port, 2, 0), _spec(port, 3, 1)])
    assert all("--num_processes differ: process 1" in str(e) and "has 3, process 0 has 2" in str(e) for e in errors)


def test_a_lone_process_waits_only_its_join_timeout():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(CoordinationError, match=r"process 0: process 1, 2 of 3 did not join .* within 1.5 s"):
        rendezvous(_spec(port, 3, 0, timeout=1.5))
    with pytest.raises(CoordinationError, match=r"process 1: cannot reach process 0's coordinator .* within 1.5 s"):
        rendezvous(_spec(port, 3, 1, timeout=1.5))
    assert time.monotonic() - t0 < 10


def test_a_port_in_use_is_one_error_on_process_0():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(CoordinationError, match=rf"127.0.0.1:{port}: port {port} is already in use on this host"):
            rendezvous(_spec(port, 2, 0))


@pytest.mark.parametrize(
    ("address", "message"),
    [("127.0.0.1:99999", "port must be 1-65535"), ("127.0.0.1:0", "port must be 1-65535"), ("x", "host:port")],
)
def test_an_impossible_coordinator_address_is_refused_up_front(address, message):
    with pytest.raises(ValueError, match=message):
        HostSpec("env", address, 2, 0).validated()


def _run_extract(tmp_path: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    (tmp_path / "db").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "experiments.extract", "--database_folder", str(tmp_path / "db"), "--store_dir",
            str(tmp_path / "store"), *flags]  # fmt: skip
    return subprocess.run(args, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_lone_extract_process_ends_in_one_line_within_its_join_timeout(tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    proc = _run_extract(
        tmp_path, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "0",
        "--join_timeout_s", "3",
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("extract: error: process 0: process 1 of 2 did not join") and "3 s" in lines[0]
    assert elapsed < 60  # was: 300 s, then SIGABRT with a C++ stack


def test_port_99999_is_a_usage_error(tmp_path):
    proc = _run_extract(tmp_path, "--coordinator_address", "127.0.0.1:99999", "--num_processes", "2",
                        "--process_id", "0")  # fmt: skip
    assert proc.returncode != 0 and "port must be 1-65535" in proc.stderr and "Traceback" not in proc.stderr


JOIN_AND_HOLD = """
import sys, time
from attllm_jax.evaluation import hosts
hosts.initialize(hosts.HostSpec("env", sys.argv[1], 2, int(sys.argv[2]), 60.0))
print("joined", flush=True)
hosts.barrier("hold")
time.sleep(float(sys.argv[3]))
hosts.barrier("release")
"""


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc/net/tcp")
def test_the_coordinator_listens_on_the_address_given_only(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOIN_AND_HOLD, address, str(p), "5"],
            env=ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for p in (0, 1)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "joined"
        listening = _listening_addresses(port)
        loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, as IPv4 or IPv4-mapped IPv6
        assert listening and listening <= loopback, listening  # not 0.0.0.0 nor [::] (every interface)
        for proc in procs:
            proc.wait(timeout=120)
            assert proc.returncode == 0, proc.stdout.read()[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


LATE_AT_BARRIER = """
import sys, time
from attllm_jax.evaluation import hosts
hosts.initialize(hosts.HostSpec("env", sys.argv[1], 2, int(sys.argv[2]), 60.0))
if hosts.process_index() == 1:
    time.sleep(float(sys.argv[3]))
try:
    hosts.barrier("model_loaded", timeout_s=3)
except hosts.CoordinationError as error:
    print("ERROR", error, flush=True)
    sys.exit(1)
"""


# two jax.distributed processes (14 s); the join timeout keeps its one-line test in the default suite
@pytest.mark.slow
def test_a_barrier_timeout_names_the_late_process_on_both_sides():
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LATE_AT_BARRIER, address, str(p), "8"],
            env=ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for p in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    errors = [next((line for line in out.splitlines() if line.startswith("ERROR")), out[-2000:]) for out in outputs]
    assert "barrier 'model_loaded' within 3 s: process 1 had not arrived when process 0 gave up" in errors[0]
    assert "process 1 arrived after another process had given up waiting for it" in errors[1]
    assert "--barrier_timeout_s" in errors[0] and "corrupt" not in errors[0] + errors[1]
