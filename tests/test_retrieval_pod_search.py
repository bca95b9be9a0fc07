"""Pod-wide search: two processes x two virtual CPU devices (gloo on 127.0.0.1) against one-process faiss Flat.

Every process is a subprocess with a bounded timeout, killed in a ``finally`` whatever happens.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.retrieval.pod_search import PodLayout, merge_by_row
from attllm_jax.retrieval.search import SearchSpec, _exact_in_memory
from tests.test_eval_hosts import ENV, _free_port, _kill

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
TWO_DEVICES = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
K = 7  # more than the 3 rows a device holds
# a budget that holds 2 rows of a process's share beside the queries: 3 passes over a share of 5 rows
STREAMED_GB = (4 * 6 * 8 + 12 * 6 * K + 2 * 2 * 8 * 8) / 2**30

DRIVER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from attllm_jax.evaluation import hosts
    hosts.initialize(hosts.HostSpec("env", sys.argv[1], 2, int(sys.argv[2])))
    from attllm_jax.retrieval import pod_search
    from attllm_jax.retrieval.search import SearchSpec

    data = np.load(sys.argv[3])
    read = []

    class Recorded:  # the database, recording which rows this process reads
        shape = data["database"].shape
        def __getitem__(self, index):
            read.append([index.start, index.stop])
            return data["database"][index]

    specs = {"exact": SearchSpec("exact_jax"), "streamed": SearchSpec("exact_jax", memory_gb=float(sys.argv[5])),
             "approx": SearchSpec("approx_tpu", recall_target=0.9)}
    record = {"process": hosts.process_index(), "devices": [d.id for d in pod_search.pod_devices()]}
    for name, spec in specs.items():
        if hosts.process_index() == 0:
            found = pod_search.pod_search_database(Recorded(), data["valid"], data["queries"], int(sys.argv[4]), spec,
                                                   (1, 5))
            pod_search.finish_pod_searches(spec)
            np.save(f"{sys.argv[3]}.{name}.scores.npy", found.scores)
            np.save(f"{sys.argv[3]}.{name}.indices.npy", found.indices)
            record[name] = found.info
        else:
            record[name] = {"served": pod_search.serve_pod_searches(Recorded(), data["valid"], spec)}
    record["read"] = read
    print("RECORD " + json.dumps(record), flush=True)
    """
)


def _data(path: Path) -> dict:
    """10 rows (not divisible by 4 devices), exact ties across the process boundary (rows 4 | 5) and inside."""
    rng = np.random.default_rng(3)
    database = rng.normal(size=(10, 8)).astype(np.float32)
    database[5] = database[4]  # process 0 holds rows 0-4, process 1 rows 5-9
    database[8] = database[1]
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    valid = np.ones(10, bool)
    valid[7] = False
    queries = np.concatenate([database[[4, 1]], rng.normal(size=(4, 8)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.savez(path, database=database, valid=valid, queries=queries)
    return {"database": database, "valid": valid, "queries": queries}


def _run_two(args_of, log: Path) -> list[str]:
    port = _free_port()
    procs = []
    try:
        for process in (0, 1):
            out = open(f"{log}.{process}.txt", "w")
            procs.append(subprocess.Popen(args_of(port, process), env=TWO_DEVICES, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT))  # fmt: skip
            out.close()
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill(procs)
    outputs = [Path(f"{log}.{p}.txt").read_text() for p in (0, 1)]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def _reference(data: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy exact top-k with ties to the lower row (the documented order)."""
    # elementwise in float64: identical rows get identical scores (a BLAS matmul may round columns differently)
    scores = (data["queries"][:, None, :].astype(np.float64) * data["database"][None]).sum(-1)
    scores[:, ~data["valid"]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(10), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    data = _data(root / "data.npz")
    (root / "driver.py").write_text(DRIVER)

    def args_of(port: int, process: int) -> list[str]:
        return [sys.executable, str(root / "driver.py"), f"127.0.0.1:{port}", str(process), str(root / "data.npz"),
                str(K), repr(STREAMED_GB)]  # fmt: skip

    outputs = _run_two(args_of, root / "run")
    records = [json.loads(o.split("RECORD ", 1)[1].splitlines()[0]) for o in outputs]
    found = {
        name: (np.load(root / f"data.npz.{name}.scores.npy"), np.load(root / f"data.npz.{name}.indices.npy"))
        for name in ("exact", "streamed", "approx")
    }
    return data, records, found


@pytest.mark.parametrize("name", ["exact", "streamed", "approx"])
def test_two_processes_find_the_one_process_faiss_flat_neighbours(pod_run, name):
    data, records, found = pod_run
    scores, indices = found[name]
    flat_scores, flat_indices = _exact_in_memory(
        "faiss_flat", data["database"], data["valid"], data["queries"], K, SearchSpec("faiss_flat")
    )
    ref_scores, ref_indices = _reference(data, K)
    np.testing.assert_allclose(scores, flat_scores, rtol=0, atol=1e-6)  # float32 round-off of 8-d products
    # the same neighbours as faiss Flat; faiss orders exact ties by the higher row, ours by the lower (documented)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(flat_indices, axis=1))
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    assert indices[0, 0] == 4 and indices[0, 1] == 5  # equal scores across the process boundary: lower row first
    assert 7 not in indices  # the invalid row is never returned
    info = records[0][name]
    assert info["processes"] == 2 and info["rows_per_process"] == [5, 5]
    assert records[1][name]["served"] == (2 if name == "approx" else 1)  # approx: then the exact reference


def test_each_process_reads_only_its_share_and_the_streamed_run_takes_passes(pod_run):
    _, records, _ = pod_run
    assert records[0]["devices"] == records[1]["devices"] and len(records[0]["devices"]) == 4
    for process, (low, high) in enumerate([(0, 5), (5, 10)]):
        read = records[process]["read"]
        assert read and all(low <= a < b <= high for a, b in read), read
    assert records[0]["exact"]["passes"] == 1 and records[0]["exact"]["rows_per_device"] == 3
    streamed = records[0]["streamed"]
    assert streamed["passes"] == 3 and streamed["rows_per_device"] == 1 and streamed["chunk_rows"] == 2


def test_approx_tpu_on_cpu_is_reported_approximate_with_its_measured_recall(pod_run):
    _, records, _ = pod_run
    info = records[0]["approx"]
    assert info["method"] == "approx_tpu" and info["exact"] is False and info["recall_target"] == 0.9
    assert info["recall_vs_exact"] == {"1": 100.0, "5": 100.0}  # exact off TPU


def test_the_layout_balances_shares_and_pads_passes():
    layout = PodLayout(num_rows=10, processes=2, local_devices=2, rows_per_device=1, passes=3)
    assert layout.rows_per_process == [5, 5] and layout.share(1) == (5, 10)
    assert layout.rows_of_pass(0).tolist() == [0, 1, 5, 6]
    assert layout.rows_of_pass(2).tolist() == [4, -1, 9, -1]  # padding (-inf rows) where a share ends
    odd = PodLayout(num_rows=11, processes=3, local_devices=1, rows_per_device=4, passes=1)
    assert odd.rows_per_process == [3, 4, 4]


def test_merging_passes_puts_ties_on_the_lower_row():
    scores = np.array([[0.9, 0.5]], np.float32)
    rows = np.array([[6, 2]])
    new_scores = np.array([[0.9, -np.inf]], np.float32)
    new_rows = np.array([[1, -1]])
    s, r = merge_by_row(scores, rows, new_scores, new_rows, 3)
    assert r.tolist() == [[1, 6, 2]] and s[0].tolist() == pytest.approx([0.9, 0.9, 0.5])


def _predictions(path: Path) -> list[list[str]]:
    """The alpha, query and pred_* columns of per_query.csv (scores differ by float32 round-off only)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [[r["alpha"], r["query"], *(v for k, v in r.items() if k.startswith("pred_"))] for r in rows]


@pytest.mark.slow
# 25056 bytes: the sweep of 4 query vectors (2 alphas x 2 queries) x 512 floats with their top 10 (8672 bytes),
# then 2 rows of 512 floats per pass, counted twice (host and device copy) and twice again (one read ahead)
@pytest.mark.parametrize("memory_gb", [None, 25056 / 2**30], ids=["in_memory", "streamed"])
def test_a_two_process_eval_searches_on_every_device(tmp_path, memory_gb):
    """experiments.eval, 2 processes x 2 CPU devices, --search exact_jax: the one-process faiss Flat results."""
    from attllm_jax.evaluation import EvalConfig, run_evaluation
    from tests.test_eval_resume import _dataset

    database, queries = _dataset(tmp_path / "data")  # 13 database images: not divisible by 4 devices
    common = dict(alphas=(0.0, 1.0), recall_values=(1, 5, 10), image_size=64, chunk_size=3, batch_size=2,
                  num_workers=1)  # fmt: skip
    folders = dict(database_folder=str(database), queries_folder=str(queries), output_dir=str(tmp_path / "one"))
    one = run_evaluation(EvalConfig(**folders, search=SearchSpec("faiss_flat"), **common))
    out = tmp_path / "two"
    budget = [] if memory_gb is None else ["--search_memory_gb", repr(memory_gb)]

    def args_of(port: int, process: int) -> list[str]:
        return [
            sys.executable, "-m", "experiments.eval", "--database_folder", str(database), "--queries_folder",
            str(queries), "--output_dir", str(out), "--alphas", "0,1", "--recall_values", "1,5,10", "--image_size",
            "64", "--chunk_size", "3", "--batch_size", "2", "--num_workers", "1", "--search", "exact_jax", *budget,
            "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process),
        ]  # fmt: skip

    _run_two(args_of, tmp_path / "eval")
    results = json.loads((out / "results.json").read_text())
    assert results["recalls"] == one.results["recalls"]
    assert _predictions(out / "per_query.csv") == _predictions(tmp_path / "one" / "per_query.csv")
    search = results["search"]
    assert search["method"] == "exact_jax" and search["exact"] is True
    assert search["processes"] == 2 and search["rows_per_process"] == [6, 7]
    assert results["hosts"]["devices_per_process"] == [2, 2]
    if memory_gb is None:
        assert search["passes"] == 1 and search["chunk_rows"] is None and search["rows_per_device"] == 4
    else:  # 2 rows per process and pass, 1 per device: 4 passes over a share of 7
        assert search["passes"] == 4 and search["chunk_rows"] == 2 and search["rows_per_device"] == 1
