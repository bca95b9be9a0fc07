"""The processes of an explicit multi-process run meet here before ``jax.distributed`` starts.

``jax.distributed.initialize`` turns a wrong launch into a hang and then a SIGABRT with a C++ stack: a process
alone waits ``initialization_timeout`` (300 s) and aborts; a ``--process_id`` given twice or ``--num_processes``
that differ hang. This rendezvous checks the launch first, in plain Python on the coordinator's own address, with
a bounded wait (``--join_timeout_s``) and one clear error:

1. Process 0 binds exactly ``--coordinator_address`` (its host, not every interface), so a port already in use is
   reported at once, and waits for the other processes.
2. Every other process connects (retrying until process 0 listens) and sends one JSON line
   ``{"process_id", "num_processes", "host", "pid"}``.
3. Process 0 refuses a ``--process_id`` given twice and a ``--num_processes`` unlike its own (telling every process
   that joined why), or, once all have joined, answers ``{"go": true}`` and closes the port, which jax's
   coordinator then binds.

A process that arrives after the run started finds jax's coordinator on the port, not this rendezvous, and is told
that the run started without it (its ``--process_id`` was already taken, or it is another run's port).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

from attllm_jax.errors import CoordinationError

# ``spec`` below is an :class:`attllm_jax.evaluation.hosts.HostSpec`; hosts imports this module, so it is not
# imported here (the import-cycle test counts typing-only imports too).
HostSpec = Any


_LINE_LIMIT = 4096


def rendezvous(spec: HostSpec) -> None:
    """Meets the other processes of ``spec`` (explicit flags) or raises :class:`CoordinationError` saying why not.

    Args:
        spec: Validated flags with ``coordinator_address``, ``num_processes``, ``process_id``, ``join_timeout_s``.
    """
    if int(spec.num_processes) == 1:
        return
    deadline = time.monotonic() + float(spec.join_timeout_s)
    if int(spec.process_id) == 0:
        _serve(spec, deadline)
    else:
        _join(spec, deadline)


def _address(spec: HostSpec) -> tuple[str, int]:
    host, _, port = str(spec.coordinator_address).rpartition(":")
    return host.strip("[]"), int(port)


def _hello(spec: HostSpec) -> dict[str, Any]:
    return {
        "process_id": int(spec.process_id),
        "num_processes": int(spec.num_processes),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _who(hello: dict[str, Any]) -> str:
    return f"pid {hello.get('pid')} on host {hello.get('host')}"


def _listen(spec: HostSpec) -> socket.socket:
    host, port = _address(spec)
    where = f"--coordinator_address {spec.coordinator_address}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise CoordinationError(f"{where}: cannot resolve host {host!r} ({error})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's closed connections (TIME_WAIT)
    try:
        sock.bind(sockaddr)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise CoordinationError(
                f"{where}: port {port} is already in use on this host (another run's coordinator, or a second "
                "--process_id 0?); give a free port to every process"
            ) from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise CoordinationError(
                f"{where}: {host} is not an address of this host; process 0 runs the coordinator, so give one of "
                "its addresses"
            ) from None
        raise CoordinationError(f"{where}: cannot listen there ({error.strerror or error})") from None
    sock.listen(int(spec.num_processes))
    return sock


def _serve(spec: HostSpec, deadline: float) -> None:
    """Process 0: waits for every other process, checks their flags, then lets them all go."""
    n = int(spec.num_processes)
    joined: dict[int, tuple[socket.socket, dict[str, Any]]] = {}
    with _listen(spec) as server:
        try:
            while len(joined) < n - 1:
                conn, hello = _accept(server, spec, deadline, joined)
                problem = _problem(hello, n, joined)
                if problem is not None:
                    for other in [conn, *(c for c, _ in joined.values())]:
                        _send(other, {"error": problem})
                    conn.close()
                    raise CoordinationError(problem)
                joined[int(hello["process_id"])] = (conn, hello)
            for conn, _ in joined.values():
                _send(conn, {"go": True})
            for conn, _ in joined.values():  # let the other side close first: the port stays free to bind
                conn.settimeout(5.0)
                try:
                    conn.recv(1)
                except OSError:
                    pass
        finally:
            for conn, _ in joined.values():
                conn.close()


def _accept(server: socket.socket, spec: HostSpec, deadline: float, joined: dict) -> tuple[socket.socket, dict]:
    """The next process's connection and hello line (a connection that sends no hello in time is dropped)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = [p for p in range(1, int(spec.num_processes)) if p not in joined]
            raise CoordinationError(
                f"process 0: process {', '.join(map(str, missing))} of {spec.num_processes} did not join at "
                f"{spec.coordinator_address} within {spec.join_timeout_s:g} s (--join_timeout_s): start every "
                f"process with --coordinator_address {spec.coordinator_address} --num_processes "
                f"{spec.num_processes} and its own --process_id"
            )
        server.settimeout(remaining)
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(max(0.1, min(10.0, deadline - time.monotonic())))
        try:
            hello = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        if isinstance(hello, dict) and {"process_id", "num_processes"} <= set(hello):
            return conn, hello
        conn.close()


def _problem(hello: dict[str, Any], n: int, joined: dict) -> str | None:
    """Why a joining process cannot be part of the run, or None."""
    try:
        pid, count = int(hello["process_id"]), int(hello["num_processes"])
    except (TypeError, ValueError):
        return f"a process sent a malformed rendezvous line ({_who(hello)})"
    if count != n:
        return (
            f"--num_processes differ: process {pid} ({_who(hello)}) has {count}, process 0 has {n}; "
            "give every process the same --num_processes"
        )
    if pid == 0 or pid in joined:
        first = "process 0, the coordinator" if pid == 0 else _who(joined[pid][1])
        return (
            f"--process_id {pid} given twice: {first} and {_who(hello)}; give every process its own "
            f"--process_id in [0, {n})"
        )
    return None


def _join(spec: HostSpec, deadline: float) -> None:
    """A process other than 0: says who it is and waits for process 0's answer."""
    host, port = _address(spec)
    where = f"process {spec.process_id}"
    conn = None
    while conn is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CoordinationError(
                f"{where}: cannot reach process 0's coordinator at {spec.coordinator_address} within "
                f"{spec.join_timeout_s:g} s (--join_timeout_s): is process 0 running, with this address?"
            )
        try:
            conn = socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining)))
        except OSError:
            time.sleep(min(0.2, max(0.0, remaining)))
    with conn:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            _send(conn, _hello(spec))
            answer = _receive(conn)
        except TimeoutError:
            raise CoordinationError(
                f"{where}: process 0 at {spec.coordinator_address} did not start the run within "
                f"{spec.join_timeout_s:g} s (--join_timeout_s): another process has not joined (see process 0's "
                "error)"
            ) from None
        except (OSError, ValueError):
            raise CoordinationError(
                f"{where}: the run at {spec.coordinator_address} has already started without this process "
                f"(is --process_id {spec.process_id} given twice, or is that another run's port?)"
            ) from None
    if isinstance(answer, dict) and answer.get("error"):
        raise CoordinationError(f"{where}: {answer['error']}")
    if not (isinstance(answer, dict) and answer.get("go") is True):
        raise CoordinationError(f"{where}: {spec.coordinator_address} did not answer as an attllm_jax process 0")


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode("utf-8"))
    except OSError:
        pass  # the other side is gone; it fails on its own


def _receive(conn: socket.socket) -> Any:
    """One JSON line (at most 4 KiB). Raises ValueError for anything else, TimeoutError / OSError as the socket."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(_LINE_LIMIT)
        if not chunk:
            raise ValueError("connection closed before a full line")
        data += chunk
        if len(data) > _LINE_LIMIT:
            raise ValueError("line too long")
    return json.loads(data.split(b"\n", 1)[0].decode("utf-8"))
