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
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

DISTRIBUTED_MODES = ("env", "auto", "off")
BARRIER_TIMEOUT_S = 24 * 3600.0

log = logging.getLogger("attllm_jax.evaluation")


@dataclass(frozen=True)
class HostSpec:
    """How this process joins a multi-process run (see the module notes).

    Attributes:
        mode: "env", "auto" or "off".
        coordinator_address: ``host:port`` of process 0's coordinator, or None.
        num_processes: Processes in the run, or None.
        process_id: This process's index in ``[0, num_processes)``, or None.
    """

    mode: str = "env"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

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
            if int(self.num_processes) < 1:
                raise ValueError(f"--num_processes must be >= 1, got {self.num_processes}")
            if not 0 <= int(self.process_id) < int(self.num_processes):
                raise ValueError(f"--process_id must lie in [0, {self.num_processes}), got {self.process_id}")
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
        jax.distributed.initialize(
            spec.coordinator_address, num_processes=int(spec.num_processes), process_id=int(spec.process_id)
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


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op in a one-process run).

    Every process must pass the same barriers in the same order; a repeated name gets a running number.
    """
    if process_count() == 1:
        return
    count = _barrier_counts.get(name, 0)
    _barrier_counts[name] = count + 1
    client = _client()
    barrier_id = f"attllm_jax/{name}/{count}"
    if client is None:  # not through jax.distributed (should not happen): fall back to device collectives
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(barrier_id)
        return
    client.wait_at_barrier(barrier_id, int(timeout_s * 1000))


def gather_json(name: str, value: Any, timeout_s: float = BARRIER_TIMEOUT_S) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (process 0 gets all; the others get only their own).

    Goes through the coordination service's key-value store; a barrier follows, so every process has published.
    """
    if process_count() == 1:
        return [value]
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
