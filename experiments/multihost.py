"""The multi-process flags of ``experiments.eval`` and ``experiments.extract`` (see attllm_jax.evaluation.hosts).

Two processes on one machine (each a "host"), sharing one store::

    python -m experiments.extract --database_folder D --store_dir S \\
        --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 0 &
    python -m experiments.extract --database_folder D --store_dir S \\
        --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 1
"""

from __future__ import annotations

from absl import flags

from attllm_jax.evaluation.hosts import DISTRIBUTED_MODES, HostSpec, initialize

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


def join_from_flags() -> bool:
    """Joins the multi-process run the flags ask for, before any other JAX call.

    Returns:
        Whether jax.distributed is initialized.

    Raises:
        ValueError: naming the inconsistent flag.
    """
    spec = HostSpec(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    return initialize(spec)
