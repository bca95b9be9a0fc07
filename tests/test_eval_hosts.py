"""Two processes on 127.0.0.1 with jax.distributed on the CPU (gloo): one shared store, resume after SIGKILL, eval.

Every process is a subprocess with a bounded timeout, killed in a ``finally`` whatever happens.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.data.dataset import load_image_set
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.evaluation.extract import build_database_store
from attllm_jax.evaluation.hosts import HostSpec, gather_json, log_file, multi_process_environment, share
from attllm_jax.retrieval.store import read_store
from tests.test_eval_resume import _dataset

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")},
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_flags(port: int, process: int) -> list[str]:
    return ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process)]


def _start(args_of, log: Path) -> list[subprocess.Popen]:
    """Starts process 0 and 1 of a two-process run (``args_of(port, process)`` gives each one's command line)."""
    port = _free_port()
    procs = []
    for process in (0, 1):
        out = open(log.with_name(f"{log.name}.{process}.txt"), "w")
        procs.append(subprocess.Popen(args_of(port, process), env=ENV, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
        out.close()
    return procs


def _finish(procs: list[subprocess.Popen], log: Path) -> list[str]:
    """Waits for both processes (bounded); returns their output. Kills what is left on any failure."""
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill(procs)
    outputs = [log.with_name(f"{log.name}.{p}.txt").read_text() for p in (0, 1)]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    database, queries = _dataset(root / "data")
    return root, database, queries


@pytest.fixture(scope="module")
def one_process_store(data):
    """The store of a one-process extraction (this pytest process), chunks of 3 images."""
    root, database, _ = data
    store, _ = build_database_store(
        random_cosplace_model(seed=0), load_image_set(database), root / "store1", chunk_size=3, batch_size=2,
        image_size=64, num_workers=1,
    )  # fmt: skip
    store.close()
    return read_store(root / "store1")


def _extract_args(database: Path, store: Path, logs: Path, chunk_size: int = 3):
    def args_of(port: int, process: int) -> list[str]:
        return [
            sys.executable, "-m", "experiments.extract", "--database_folder", str(database), "--store_dir",
            str(store), "--image_size", "64", "--chunk_size", str(chunk_size), "--batch_size", "2",
            "--num_workers", "1", "--logs_dir", str(logs), *_host_flags(port, process),
        ]  # fmt: skip

    return args_of


def _written_chunks(logs: Path) -> list[int]:
    """Every "wrote store chunk N" line of every process's log (appended over runs)."""
    chunks = []
    for path in sorted(logs.glob("extract*.log")):
        for line in path.read_text().splitlines():
            if "wrote store chunk" in line:
                chunks.append(int(line.split("wrote store chunk")[1].split()[0]))
    return chunks


def test_two_processes_extract_the_one_process_store(data, one_process_store, tmp_path):
    _, database, _ = data
    store, logs = tmp_path / "store2", tmp_path / "logs"
    procs = _start(_extract_args(database, store, logs), tmp_path / "extract")
    outputs = _finish(procs, tmp_path / "extract")
    descriptors, valid, paths = read_store(store)
    ref_descriptors, ref_valid, ref_paths = one_process_store
    assert paths == ref_paths and valid.all() and ref_valid.all()
    np.testing.assert_allclose(np.asarray(descriptors), np.asarray(ref_descriptors), rtol=0, atol=1e-6)
    # 13 images in 5 chunks of 3: round robin gives process 0 chunks 0, 2, 4 and process 1 chunks 1, 3
    assert "process 0: store" in outputs[0] and "3 of 5 chunks computed" in outputs[0], outputs[0]
    assert "process 1: store" in outputs[1] and "2 of 5 chunks computed" in outputs[1], outputs[1]
    assert "all 2 processes: 5 chunks, 13 images" in outputs[0]
    assert (logs / "extract.log").exists() and (logs / "extract.process_1.log").exists()
    assert sorted(_written_chunks(logs)) == [0, 1, 2, 3, 4]


KILL_DRIVER = textwrap.dedent(
    """
    import sys
    from attllm_jax.evaluation import hosts
    hosts.initialize(hosts.HostSpec("env", sys.argv[1], 2, int(sys.argv[2])))
    from attllm_jax.evaluation import EvalConfig, random_cosplace_model
    from attllm_jax.evaluation.pipeline import run_extraction
    from tests.slow_model import SlowModel

    database, store, logs = sys.argv[3:6]
    config = EvalConfig(database_folder=database, queries_folder=database, output_dir=".", image_size=64,
                        chunk_size=1, batch_size=1, num_workers=1, store_dir=store).validated()
    run_extraction(config, model=SlowModel(random_cosplace_model(seed=0), float(sys.argv[6])), log_dir=logs)
    print("DONE")
    """
)


@pytest.mark.slow
def test_a_killed_process_resumes_without_computing_a_chunk_twice(data, one_process_store, tmp_path):
    _, database, _ = data
    store, logs = tmp_path / "store", tmp_path / "logs"
    (tmp_path / "driver.py").write_text(KILL_DRIVER)

    def args_of(delay: float):
        def args(port: int, process: int) -> list[str]:
            address = f"127.0.0.1:{port}"
            return [sys.executable, str(tmp_path / "driver.py"), address, str(process), str(database), str(store),
                    str(logs), str(delay)]  # fmt: skip

        return args

    procs = _start(args_of(0.4), tmp_path / "first")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(list(store.glob("done/chunk_*.json"))) < 4:
            assert all(p.poll() is None for p in procs), (tmp_path / "first.0.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the extraction did not start"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        procs[0].send_signal(signal.SIGKILL)  # its peer is gone: end it too, then restart both
        procs[0].wait(timeout=30)
    finally:
        _kill(procs)
    before = len(list(store.glob("done/chunk_*.json")))
    assert 4 <= before < 13, before  # 13 images in chunks of 1
    assert sorted(_written_chunks(logs)) == sorted(int(p.stem.split("_")[1]) for p in store.glob("done/chunk_*.json"))
    outputs = _finish(_start(args_of(0.0), tmp_path / "second"), tmp_path / "second")
    assert all("DONE" in output for output in outputs)
    written = _written_chunks(logs)
    assert sorted(written) == list(range(13)), written  # every chunk written once over both runs
    descriptors, valid, paths = read_store(store)
    ref_descriptors, _, ref_paths = one_process_store
    assert paths == ref_paths and valid.all()
    np.testing.assert_allclose(np.asarray(descriptors), np.asarray(ref_descriptors), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_process_eval_gives_the_one_process_recalls(data, tmp_path):
    """Two processes (exact_jax on process 0) write the recalls of one process (faiss Flat): exact paths agree."""
    _, database, queries = data
    common = dict(alphas=(0.0, 1.0), recall_values=(1, 5), image_size=64, chunk_size=3, batch_size=2, num_workers=1)
    one = run_evaluation(
        EvalConfig(database_folder=str(database), queries_folder=str(queries), output_dir=str(tmp_path / "one"),
                   **common)
    )  # fmt: skip
    out = tmp_path / "two"

    def args_of(port: int, process: int) -> list[str]:
        return [
            sys.executable, "-m", "experiments.eval", "--database_folder", str(database), "--queries_folder",
            str(queries), "--output_dir", str(out), "--alphas", "0,1", "--recall_values", "1,5", "--image_size", "64",
            "--chunk_size", "3", "--batch_size", "2", "--num_workers", "1", "--search", "exact_jax",
            *_host_flags(port, process),
        ]  # fmt: skip

    outputs = _finish(_start(args_of, tmp_path / "eval"), tmp_path / "eval")
    results = json.loads((out / "results.json").read_text())
    assert results["recalls"] == one.results["recalls"]
    assert results["hosts"]["process_count"] == 2 and results["hosts"]["devices_per_process"] == [1, 1]
    assert results["store"]["chunks_computed"] == 5 and len(results["store"]["per_process"]) == 2
    # process 0 searches alone on its own devices (a global mesh would wait for process 1 forever)
    assert results["search"]["method"] == "exact_jax" and one.results["search"]["method"] == "faiss_flat"
    assert (out / "eval.log").exists() and (out / "eval.process_1.log").exists()
    assert "process 0 wrote" in outputs[1]


def test_host_flags_are_checked_together():
    with pytest.raises(ValueError, match="together"):
        HostSpec(coordinator_address="127.0.0.1:1234").validated()
    with pytest.raises(ValueError, match="host:port"):
        HostSpec(coordinator_address="localhost", num_processes=2, process_id=0).validated()
    with pytest.raises(ValueError, match=r"--process_id must lie in \[0, 2\)"):
        HostSpec(coordinator_address="h:1", num_processes=2, process_id=2).validated()
    with pytest.raises(ValueError, match="contradicts"):
        HostSpec("off", "h:1", 2, 0).validated()
    assert HostSpec("off").launcher({"JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    assert HostSpec("auto").launcher({}) == "auto"
    assert HostSpec("env", "h:1", 2, 0).launcher({}) == "flags"


def test_multi_process_launches_are_detected_from_the_environment():
    assert multi_process_environment({}) is None
    assert multi_process_environment({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}) is None  # one task
    assert multi_process_environment({"SLURM_NTASKS": "4"}) is None  # sbatch script, not yet srun
    assert multi_process_environment({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}) == "SLURM_NTASKS"
    assert multi_process_environment({"OMPI_COMM_WORLD_SIZE": "2"}) == "OMPI_COMM_WORLD_SIZE"
    assert multi_process_environment({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert multi_process_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU_WORKER_HOSTNAMES"
    assert multi_process_environment({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "JAX_COORDINATOR_ADDRESS"


def test_shares_and_log_names():
    pending = [0, 2, 3, 5, 6, 7, 9]
    shares = [share(pending, i, 3) for i in range(3)]
    assert shares == [[0, 5, 9], [2, 6], [3, 7]]  # round robin: sizes differ by at most one chunk
    assert sorted(sum(shares, [])) == pending
    assert log_file("out", "eval").name == "eval.log"  # one process: process 0's name
    assert gather_json("x", {"a": 1}) == [{"a": 1}]


DELAY_DRIVER = textwrap.dedent(
    """
    import sys, time
    from attllm_jax.evaluation import hosts
    hosts.initialize(hosts.HostSpec("env", sys.argv[1], 2, int(sys.argv[2])))
    from attllm_jax.evaluation import EvalConfig
    from attllm_jax.evaluation.pipeline import run_extraction

    database, store, logs, checkpoint, delay = sys.argv[3:8]
    if hosts.process_index() == 1:
        time.sleep(float(delay))  # a host that starts late: process 0 loads its model and waits at a barrier
    config = EvalConfig(database_folder=database, queries_folder=database, output_dir=".", image_size=64,
                        chunk_size=3, batch_size=2, num_workers=1, store_dir=store, checkpoint=checkpoint).validated()
    run_extraction(config, log_dir=logs)
    print("DONE", flush=True)
    """
)


@pytest.mark.slow
def test_a_process_delayed_40_s_before_its_model_load_still_extracts_the_one_process_store(
    data, one_process_store, tmp_path
):
    """orbax's default multi-process restore met the other process in a 30 s gloo rendezvous and died."""
    from attllm_jax.checkpoint import save_model

    _, database, _ = data
    model = random_cosplace_model(seed=0)
    checkpoint = save_model(tmp_path / "model", model.net, model.spec)
    store, logs = tmp_path / "store", tmp_path / "logs"
    (tmp_path / "driver.py").write_text(DELAY_DRIVER)

    def args(port: int, process: int) -> list[str]:
        return [sys.executable, str(tmp_path / "driver.py"), f"127.0.0.1:{port}", str(process), str(database),
                str(store), str(logs), str(checkpoint), "40"]  # fmt: skip

    outputs = _finish(_start(args, tmp_path / "delayed"), tmp_path / "delayed")
    assert all("DONE" in output for output in outputs)
    descriptors, valid, paths = read_store(store)
    ref_descriptors, _, ref_paths = one_process_store
    assert paths == ref_paths and valid.all()
    np.testing.assert_allclose(np.asarray(descriptors), np.asarray(ref_descriptors), rtol=0, atol=1e-6)
