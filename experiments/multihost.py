"""The multi-process flags of ``experiments.eval`` and ``experiments.extract`` (see attllm_jax.evaluation.hosts).

Two processes on one machine (each a "host"), sharing one store::

    python -m experiments.extract --database_folder D --store_dir S \\
        --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 0 &
    python -m experiments.extract --database_folder D --store_dir S \\
        --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 1
"""

from __future__ import annotations

from absl import flags

from attllm_jax.evaluation.hosts import (
    BARRIER_TIMEOUT_ENV,
    DEFAULT_BARRIER_TIMEOUT_S,
    DEFAULT_JOIN_TIMEOUT_S,
    DISTRIBUTED_MODES,
    HostSpec,
    initialize,
    set_barrier_timeout,
)

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "distributed",
    "env",
    list(DISTRIBUTED_MODES),
    "Multi-process runs: env = join one when the coordinator flags are given or the environment names a launch "
    "(JAX_COORDINATOR_ADDRESS, srun with SLURM_NTASKS > 1, Open MPI, TPU_WORKER_HOSTNAMES); auto = always call "
    "jax.distributed.initialize() and let JAX detect the cluster (TPU pods, SLURM); off = one process.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (with the two flags below).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address and --process_id).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.DEFINE_float(
    "join_timeout_s",
    DEFAULT_JOIN_TIMEOUT_S,
    "How long the processes wait for each other to join (with --coordinator_address): a process missing after it "
    "ends the run with one error line naming it.",
)
flags.DEFINE_float(
    "barrier_timeout_s",
    None,
    "How long a process waits at a barrier for the others (a host's database share can take hours); default "
    f"${BARRIER_TIMEOUT_ENV} or {DEFAULT_BARRIER_TIMEOUT_S:g} s. The error names the processes that had not arrived.",
)
flags.register_validator("join_timeout_s", lambda v: v > 0, "--join_timeout_s must be > 0")
flags.register_validator("barrier_timeout_s", lambda v: v is None or v > 0, "--barrier_timeout_s must be > 0")


def join_from_flags() -> bool:
    """Joins the multi-process run the flags ask for, before any other JAX call.

    Returns:
        Whether jax.distributed is initialized.

    Raises:
        ValueError: naming the inconsistent flag.
        CoordinationError: the processes did not meet (one missing, a --process_id twice, a port in use, ...).
    """
    spec = HostSpec(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.join_timeout_s
    )
    if FLAGS.barrier_timeout_s is not None:
        set_barrier_timeout(FLAGS.barrier_timeout_s)
    return initialize(spec)
