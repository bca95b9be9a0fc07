"""The processes of a run: ``jax.distributed`` set-up, barriers, small gathers, per-process shares and log files.

One process per host (or per accelerator group) runs the same command. How a process joins the others:

- ``--coordinator_address host:port --num_processes N --process_id I`` (all three): ``jax.distributed.initialize``
  with exactly these; process 0 hosts the coordinator at ``host:port``.
- ``--distributed auto``: ``jax.distributed.initialize()`` with no arguments: JAX detects the cluster itself
  (Cloud TPU pods through their metadata server, SLURM, Open MPI, Kubernetes, or ``JAX_COORDINATOR_ADDRESS``).
- ``--distributed env`` (the default): the same no-argument call, but only when the environment names a
  multi-process launch (``JAX_COORDINATOR_ADDRESS``, ``SLURM_NTASKS`` > 1 under ``srun``, ``OMPI_COMM_WORLD_SIZE``
  > 1, or ``TPU_WORKER_HOSTNAMES`` with more than one host); otherwise the run is one process. The TPU metadata
  query is not made by default: on a TPU VM without those variables pass ``--distributed auto``.
- ``--distributed off``: never (one process).

On the CPU the collectives go through gloo (``jax_cpu_collectives_implementation``), set before the
initialization. Barriers and gathers use the coordination service's barrier and key-value store, not device
collectives, so they need no accelerator program and have their own timeout. When a process dies, the others fail
at their next barrier once the coordination service misses its heartbeats (``heartbeat_timeout_seconds``, 100 s by
default); rerun every process's command and the store resumes.

No step of a run needs a device collective across processes: each process restores its model by itself
(:func:`attllm_jax.checkpoint.load_model` synchronizes with no one), so hosts may reach their model load any
time apart. Processes meet only at named barriers (:func:`barrier`), whose wait is bounded by
``--barrier_timeout_s`` (or ``ATTLLM_JAX_BARRIER_TIMEOUT_S``; default 24 h, as a host's database share can take
hours); a barrier that times out raises :class:`CoordinationError` naming the processes that had not arrived.

With the explicit flags, the processes first meet in a rendezvous of our own on the coordinator's address
(:func:`rendezvous`), bounded by ``--join_timeout_s`` (default 120 s): process 0 binds exactly the address given
(not every interface; a port already in use is one clear error), every other process says who it is, and process 0
refuses a ``--process_id`` given twice or a ``--num_processes`` that differs, before ``jax.distributed`` starts
(whose own failures to join end the process with SIGABRT after its timeout).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from attllm_jax.evaluation.rendezvous import CoordinationError, rendezvous

DISTRIBUTED_MODES = ("env", "auto", "off")
BARRIER_TIMEOUT_ENV = "ATTLLM_JAX_BARRIER_TIMEOUT_S"
DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600.0
DEFAULT_JOIN_TIMEOUT_S = 120.0


def _barrier_timeout_from_env() -> float:
    text = os.environ.get(BARRIER_TIMEOUT_ENV)
    if text is None:
        return DEFAULT_BARRIER_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


BARRIER_TIMEOUT_S = _barrier_timeout_from_env()


def set_barrier_timeout(seconds: float) -> None:
    """Sets how long :func:`barrier` and :func:`gather_json` wait for every process (``--barrier_timeout_s``)."""
    global BARRIER_TIMEOUT_S
    if not seconds > 0:
        raise ValueError(f"--barrier_timeout_s must be > 0, got {seconds}")
    BARRIER_TIMEOUT_S = float(seconds)


log = logging.getLogger("attllm_jax.evaluation")


@dataclass(frozen=True)
class HostSpec:
    """How this process joins a multi-process run (see the module notes).

    Attributes:
        mode: "env", "auto" or "off".
        coordinator_address: ``host:port`` of process 0's coordinator, or None.
        num_processes: Processes in the run, or None.
        process_id: This process's index in ``[0, num_processes)``, or None.
        join_timeout_s: How long the processes wait for each other to join (the rendezvous, then jax's own).
    """

    mode: str = "env"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None

    def validated(self) -> HostSpec:
        """Checks the flags together.

        Raises:
            ValueError: naming the flag that is missing or wrong.
        """
        if self.mode not in DISTRIBUTED_MODES:
            raise ValueError(f"--distributed must be one of {DISTRIBUTED_MODES}, got {self.mode!r}")
        given = {
            "--coordinator_address": self.coordinator_address,
            "--num_processes": self.num_processes,
            "--process_id": self.process_id,
        }
        missing = [name for name, value in given.items() if value is None]
        if len(missing) not in (0, 3):
            raise ValueError(
                f"give --coordinator_address, --num_processes and --process_id together (missing {missing})"
            )
        if self.explicit:
            if self.mode == "off":
                raise ValueError("--distributed off contradicts --coordinator_address; drop one of them")
            host, _, port = str(self.coordinator_address).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--coordinator_address must be host:port, got {self.coordinator_address!r}")
            if not 1 <= int(port) <= 65535:
                raise ValueError(f"--coordinator_address {self.coordinator_address}: port must be 1-65535")
            if int(self.num_processes) < 1:
                raise ValueError(f"--num_processes must be >= 1, got {self.num_processes}")
            if not 0 <= int(self.process_id) < int(self.num_processes):
                raise ValueError(f"--process_id must lie in [0, {self.num_processes}), got {self.process_id}")
        if not self.join_timeout_s > 0:
            raise ValueError(f"--join_timeout_s must be > 0, got {self.join_timeout_s}")
        return self

    def launcher(self, environ: Mapping[str, str] | None = None) -> str | None:
        """What starts the processes: "flags", "auto", the environment variable naming a launch, or None."""
        if self.mode == "off":
            return None
        if self.explicit:
            return "flags"
        if self.mode == "auto":
            return "auto"
        return multi_process_environment(os.environ if environ is None else environ)


def multi_process_environment(environ: Mapping[str, str]) -> str | None:
    """The environment variable that shows a multi-process launch, or None (see the module notes)."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if _int(environ.get("SLURM_NTASKS")) > 1 and "SLURM_STEP_ID" in environ:
        return "SLURM_NTASKS"
    if _int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "OMPI_COMM_WORLD_SIZE"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "TPU_WORKER_HOSTNAMES"
    return None


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def initialize(spec: HostSpec) -> bool:
    """Joins the multi-process run ``spec`` asks for (once per process; before any other JAX call).

    Returns:
        Whether ``jax.distributed`` is initialized (False: a one-process run).

    Raises:
        CoordinationError: the explicit flags' processes did not meet (see :mod:`.rendezvous`).
    """
    spec = spec.validated()
    if jax.distributed.is_initialized():
        return True
    how = spec.launcher()
    if how is None:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if spec.explicit:
        rendezvous(spec)
        jax.distributed.initialize(
            spec.coordinator_address,
            num_processes=int(spec.num_processes),
            process_id=int(spec.process_id),
            initialization_timeout=max(1, int(math.ceil(spec.join_timeout_s))),
            coordinator_bind_address=spec.coordinator_address if int(spec.process_id) == 0 else None,
        )
    else:
        jax.distributed.initialize()
    log.info(
        "joined a %d-process run as process %d (%s); %d local of %d devices",
        jax.process_count(),
        jax.process_index(),
        how,
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def _client():
    from jax._src import distributed

    return distributed.global_state.client


_barrier_counts: dict[str, int] = {}


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op in a one-process run).

    Every process must pass the same barriers in the same order; a repeated name gets a running number.

    Args:
        name: The barrier's name.
        timeout_s: Longest wait (default ``--barrier_timeout_s``, see the module notes).

    Raises:
        CoordinationError: naming the processes that had not arrived when the wait ended.
    """
    if process_count() == 1:
        return
    timeout_s = BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
    count = _barrier_counts.get(name, 0)
    _barrier_counts[name] = count + 1
    client = _client()
    barrier_id = f"attllm_jax/{name}/{count}"
    if client is None:  # not through jax.distributed (should not happen): fall back to device collectives
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(barrier_id)
        return
    client.key_value_set(f"attllm_jax/arrived/{name}/{count}/{process_index()}", "1")
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as error:  # jax raises its runtime error type for a timeout or a dead peer
        late = _not_arrived(client, f"attllm_jax/arrived/{name}/{count}/")
        if late:
            who = f"process {', '.join(map(str, late))} had not arrived when process {process_index()} gave up"
        else:  # everyone has arrived by now: the wait had already ended elsewhere, so this process was the late one
            who = f"process {process_index()} arrived after another process had given up waiting for it"
        raise CoordinationError(
            f"processes did not meet at barrier {name!r} within {timeout_s:g} s: {who}; a late host needs a longer "
            f"--barrier_timeout_s, a dead one a rerun of every process ({_first_line(error)})"
        ) from error


def _not_arrived(client, prefix: str) -> list[int]:
    """Processes that did not publish their arrival under ``prefix`` (empty when that cannot be read)."""
    try:
        arrived = {int(key.rsplit("/", 1)[-1]) for key, _ in client.key_value_dir_get(prefix)}
    except Exception:  # noqa: BLE001 - the service itself may be gone; the caller still raises
        return []
    return [p for p in range(process_count()) if p not in arrived]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def gather_json(name: str, value: Any, timeout_s: float | None = None) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (process 0 gets all; the others get only their own).

    Goes through the coordination service's key-value store; a barrier follows, so every process has published.
    """
    if process_count() == 1:
        return [value]
    timeout_s = BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
    client = _client()
    count = _barrier_counts.get("gather/" + name, 0)
    key = f"attllm_jax/gather/{name}/{count}"
    client.key_value_set(f"{key}/{process_index()}", json.dumps(value))
    barrier("gather/" + name, timeout_s)
    if process_index() != 0:
        return [value]
    timeout_ms = int(timeout_s * 1000)
    return [json.loads(client.blocking_key_value_get(f"{key}/{i}", timeout_ms)) for i in range(process_count())]


def share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's round-robin share of ``items``: every ``count``-th item from the ``index``-th."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    return list(items[index::count])


def log_file(directory: str | Path, stem: str) -> Path:
    """``directory/stem.log`` for process 0 (and one-process runs), ``directory/stem.process_<i>.log`` otherwise."""
    index = process_index()
    return Path(directory) / (f"{stem}.log" if index == 0 else f"{stem}.process_{index}.log")


def hosts_entry() -> dict[str, Any]:
    """The results.json ``hosts`` entry: processes and devices the run used."""
    devices = jax.devices()
    return {
        "process_count": jax.process_count(),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "devices_per_process": [sum(1 for d in devices if d.process_index == p) for p in range(jax.process_count())],
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
    }
