r"""Benchmark: exact search of a synthetic unit-norm database, against this machine's measured limits.

    python -m benchmarks.bench_search [--sizes 100000] [--large] [--num_queries 1000] [--k 20] \
        [--single_queries 20] [--repeats 3] [--output_json outputs/bench_search.json]

In one process on the CPU (2 virtual XLA devices, set before JAX starts), for each database size N x 512:

- queries/s with 1,000-query blocks (compute-bound) of ``jax_exact_search`` on 1 and 2 devices, faiss
  ``IndexFlatIP`` and a NumPy matmul + ``argpartition`` baseline; achieved GFLOP/s (2 N D per query) against the
  float32 matmul peak measured in the same run (the best of XLA's and NumPy's BLAS ``[1000, 512] x [512, n]``,
  n = min(N, 131072) so the peak's score matrix stays at 0.5 GB); the JAX blocks hold at most 1 GiB of scores
  (1,000 queries up to N = 268k, 268 queries at N = 1M: still compute-bound, ~270 flop per database byte);
- queries/s with 1-query blocks (bandwidth-bound): database bytes read per second against the streaming-read
  bandwidth measured in the same run (the best of a NumPy sum, a jitted sum and a BLAS matrix-vector product over
  the database);
- with ``--large`` also N = 1,000,000, and that database read chunk by chunk from a store on disk (see
  ``--store_chunk_rows``) with a running top-k.

Every timing is the best of ``--repeats`` (the machine may be shared). Ratios are of rates measured in this run.

``--processes 2`` instead measures the pod-wide search (:mod:`attllm_jax.retrieval.pod_search`): two processes x
one CPU device each (gloo on 127.0.0.1) against one process x two devices, on the first of ``--sizes``, with
queries/s and the share of the float32 matmul peak measured in the same run. On one machine both run on the same
cores, so the two-process figure shows the cost of the broadcast, the cross-process gather and the merge, not a
speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["100000"], "Database sizes N (the 512-d float32 database is N x 2 KiB).")
flags.DEFINE_bool("large", False, "Also N = 1,000,000 (4 GiB for the database and its copies) and the store case.")
flags.DEFINE_integer("dim", 512, "Descriptor dimension.")
flags.DEFINE_integer("num_queries", 1000, "Queries of the compute-bound case (one block).")
flags.DEFINE_integer("single_queries", 20, "Queries searched one at a time in the bandwidth-bound case.")
flags.DEFINE_integer("k", 20, "Neighbours per query.")
flags.DEFINE_integer("repeats", 3, "Timings are the best of this many runs.")
flags.DEFINE_integer("store_chunk_rows", 131072, "Rows per chunk of the on-disk store case.")
flags.DEFINE_string("scratch_dir", None, "Folder for the store case's temporary 2 GiB store (default: the system's).")
flags.DEFINE_string("output_json", "outputs/bench_search.json", "Where the numbers are written.")
flags.DEFINE_integer("processes", 1, "2: the pod-wide search, 2 processes x 1 device vs 1 process x 2 devices.")
flags.DEFINE_integer("process_id", None, "Internal: this process's id in a --processes run.")
flags.DEFINE_string("coordinator", None, "Internal: the coordinator address of a --processes run.")


PEAK_ROWS = 131072
SCORE_BYTES = 2**30  # the most scores one JAX block may hold


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):  # in pieces, so the float64 draw never doubles the memory
        part = rng.standard_normal((min(65536, n - start), d), dtype=np.float32)
        out[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def _best(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def numpy_search(database: np.ndarray, queries: np.ndarray, k: int, block: int = 100):
    """Baseline: BLAS matmul per block of queries, ``argpartition`` for the top k, then a sort of those k."""
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), block):
        scores = queries[s : s + block] @ database.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def matmul_peak(database: np.ndarray, queries: np.ndarray, repeats: int) -> dict:
    """Float32 GFLOP/s of ``[Q, D] x [D, N]`` with NumPy's BLAS and with XLA (HIGHEST precision)."""
    import jax
    import jax.numpy as jnp

    n, d = database.shape
    flops = 2.0 * len(queries) * n * d
    t_np, _ = _best(lambda: queries @ database.T, repeats)
    dot = jax.jit(lambda q, x: jnp.einsum("bd,nd->bn", q, x, precision=jax.lax.Precision.HIGHEST))
    q, x = jax.device_put(queries, jax.devices()[0]), jax.device_put(database, jax.devices()[0])
    dot(q, x).block_until_ready()
    t_jax, _ = _best(lambda: dot(q, x).block_until_ready(), repeats)
    return {"numpy_gflops": flops / t_np / 1e9, "xla_gflops": flops / t_jax / 1e9}


def read_bandwidth(database: np.ndarray, repeats: int) -> dict:
    """GB/s of a streaming read of the database: NumPy sum, a jitted sum (XLA's threads), and a BLAS
    matrix-vector product (multi-threaded, one multiply-add per value read: the best pure read there is)."""
    import jax
    import jax.numpy as jnp

    t_np, _ = _best(lambda: np.add.reduce(database, axis=0), repeats)
    x = jax.device_put(database, jax.devices()[0])
    total = jax.jit(lambda a: jnp.sum(a, axis=0))
    total(x).block_until_ready()
    t_jax, _ = _best(lambda: total(x).block_until_ready(), repeats)
    vector = np.ones(database.shape[1], np.float32)
    t_gemv, _ = _best(lambda: database @ vector, repeats)
    return {
        "numpy_gbs": database.nbytes / t_np / 1e9,
        "xla_gbs": database.nbytes / t_jax / 1e9,
        "blas_gemv_gbs": database.nbytes / t_gemv / 1e9,
    }


def bench_size(n: int, rng: np.random.Generator) -> dict:
    import faiss
    import jax

    from attllm_jax.retrieval.jax_search import ShardedExactIndex

    d, k, repeats = FLAGS.dim, FLAGS.k, FLAGS.repeats
    database, queries = _unit(rng, n, d), _unit(rng, FLAGS.num_queries, d)
    singles = queries[: FLAGS.single_queries]
    row = {"N": n, "D": d, "Q": len(queries), "k": k}
    row["matmul_peak"] = matmul_peak(database[:PEAK_ROWS], queries, repeats)
    row["read_bandwidth"] = read_bandwidth(database, repeats)
    peak_gflops = max(row["matmul_peak"].values())
    peak_gbs = max(row["read_bandwidth"].values())
    flops_per_query = 2.0 * n * d

    methods = {}
    faiss_index = faiss.IndexFlatIP(d)
    faiss_index.add(database)
    t, (_, reference) = _best(lambda: faiss_index.search(queries, k), repeats)
    methods["faiss_flat"] = {"block": t}
    t, _ = _best(lambda: [faiss_index.search(q[None], k) for q in singles], repeats)
    methods["faiss_flat"]["single"] = t
    faiss_index.reset()  # frees its copy of the database
    t, found = _best(lambda: numpy_search(database, queries, k), repeats)
    methods["numpy"] = {"block": t, "agrees": float(np.mean(found == reference))}
    t, _ = _best(lambda: [numpy_search(database, q[None], k, 1) for q in singles], repeats)
    methods["numpy"]["single"] = t
    block = int(min(len(queries), max(1, SCORE_BYTES // (4 * n))))
    row["jax_block"] = block
    for devices in (1, 2):
        index = ShardedExactIndex(database, devices=jax.devices()[:devices])
        index.search(queries[:2], k, block_size=block)  # compile
        t, (_, found) = _best(lambda index=index: index.search(queries, k, block_size=block), repeats)
        name = f"jax_exact_search_{devices}dev"
        methods[name] = {"block": t, "agrees": float(np.mean(found == reference))}
        index.search(singles[:1], k, block_size=1)
        t, _ = _best(lambda index=index: index.search(singles, k, block_size=1), repeats)
        methods[name]["single"] = t
        del index
    for m in methods.values():
        m["block_qps"] = len(queries) / m.pop("block")
        m["block_gflops"] = m["block_qps"] * flops_per_query / 1e9
        m["block_pct_of_peak"] = 100.0 * m["block_gflops"] / peak_gflops
        m["single_qps"] = len(singles) / m.pop("single")
        m["single_gbs"] = m["single_qps"] * database.nbytes / 1e9
        m["single_pct_of_bandwidth"] = 100.0 * m["single_gbs"] / peak_gbs
    faiss_qps = methods["faiss_flat"]
    for m in methods.values():
        m["block_vs_faiss"] = m["block_qps"] / faiss_qps["block_qps"]
        m["single_vs_faiss"] = m["single_qps"] / faiss_qps["single_qps"]
    row["methods"] = methods
    if FLAGS.large and n >= 1_000_000:
        row["store"] = bench_store(database, queries, reference, k)
    return row


def bench_store(database: np.ndarray, queries: np.ndarray, reference: np.ndarray, k: int) -> dict:
    """The database written to a store on disk, then searched chunk by chunk (lazy reads) with a running top-k."""
    from attllm_jax.retrieval.search import SearchSpec, exact_search
    from attllm_jax.retrieval.store import DescriptorStore, read_store

    with tempfile.TemporaryDirectory(dir=FLAGS.scratch_dir) as tmp:
        location = Path(tmp) / "store"
        store = DescriptorStore.open(
            location, {"bench": "search"}, len(database), FLAGS.store_chunk_rows, dim=FLAGS.dim
        )
        t0 = time.perf_counter()
        for chunk in store.pending_chunks():
            start, stop = store.chunk_range(chunk)
            store.write_chunk(chunk, database[start:stop], np.ones(stop - start, bool), [])
        write_s = time.perf_counter() - t0
        store.close()
        descriptors, valid, _ = read_store(Path(tmp) / "store")
        out = {"write_s": write_s, "chunk_rows": FLAGS.store_chunk_rows}
        for method in ("exact_jax", "faiss_flat"):
            t0 = time.perf_counter()
            _, found = exact_search(method, descriptors, valid, queries, k, SearchSpec(method), FLAGS.store_chunk_rows)
            seconds = time.perf_counter() - t0
            out[method] = {"qps": len(queries) / seconds, "agrees": float(np.mean(found == reference))}
    return out


def _pod_child() -> None:
    """One process of a ``--processes`` run: joins, searches the database with the others, prints its timing."""
    from attllm_jax.evaluation import hosts

    hosts.initialize(hosts.HostSpec("env", FLAGS.coordinator, FLAGS.processes, FLAGS.process_id))
    from attllm_jax.retrieval import pod_search
    from attllm_jax.retrieval.search import SearchSpec

    n = int(FLAGS.sizes[0])
    rng = np.random.default_rng(0)
    database, queries = _unit(rng, n, FLAGS.dim), _unit(rng, FLAGS.num_queries, FLAGS.dim)
    valid = np.ones(n, bool)
    spec = SearchSpec("exact_jax", block_size=int(min(len(queries), max(1, SCORE_BYTES // (4 * n)))))
    times, found = [], None
    for _ in range(FLAGS.repeats + 1):  # the first call compiles
        t0 = time.perf_counter()
        if FLAGS.process_id == 0:
            found = pod_search.pod_search_database(database, valid, queries, FLAGS.k, spec)
            pod_search.finish_pod_searches(spec)
        else:
            pod_search.serve_pod_searches(database, valid, spec)
        times.append(time.perf_counter() - t0)
    if FLAGS.process_id == 0:
        print("POD " + json.dumps({"seconds": min(times[1:]), "indices": found.indices[:5, :3].tolist()}), flush=True)


def bench_processes() -> dict:
    """Two processes x 1 device (pod search) against one process x 2 devices, on the first of ``--sizes``."""
    import socket
    import subprocess
    import sys

    import jax

    from attllm_jax.retrieval.jax_search import ShardedExactIndex

    n, d, k = int(FLAGS.sizes[0]), FLAGS.dim, FLAGS.k
    rng = np.random.default_rng(0)
    database, queries = _unit(rng, n, d), _unit(rng, FLAGS.num_queries, d)
    peak = max(matmul_peak(database[:PEAK_ROWS], queries, FLAGS.repeats).values())
    block = int(min(len(queries), max(1, SCORE_BYTES // (4 * n))))
    index = ShardedExactIndex(database, devices=jax.devices()[:2])
    index.search(queries[:2], k, block_size=block)
    one_s, (_, reference) = _best(lambda index=index: index.search(queries, k, block_size=block), FLAGS.repeats)
    del index
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "benchmarks.bench_search", "--processes", str(FLAGS.processes),
            "--coordinator", f"127.0.0.1:{port}", "--sizes", str(n), "--dim", str(d), "--k", str(k),
            "--num_queries", str(FLAGS.num_queries), "--repeats", str(FLAGS.repeats)]  # fmt: skip
    procs = [subprocess.Popen([*args, "--process_id", str(p)], env=env, stdout=subprocess.PIPE, text=True)
             for p in range(FLAGS.processes)]  # fmt: skip
    try:
        outputs = [proc.communicate(timeout=3600)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    pod = json.loads(outputs[0].split("POD ", 1)[1].splitlines()[0])
    flops = 2.0 * n * d * len(queries)
    rates = {"1proc_x_2dev": len(queries) / one_s, f"{FLAGS.processes}proc_x_1dev": len(queries) / pod["seconds"]}
    return {
        "N": n, "D": d, "Q": len(queries), "k": k, "block": block, "matmul_peak_gflops": peak,
        "qps": rates, "pct_of_peak": {name: 100.0 * q * flops / len(queries) / 1e9 / peak for name, q in rates.items()},
        "agrees": pod["indices"] == reference[:5, :3].tolist(),
    }  # fmt: skip


def main(argv):
    del argv
    import jax

    if FLAGS.process_id is not None:
        return _pod_child()
    if FLAGS.processes > 1:
        row = bench_processes()
        print(json.dumps(row, indent=1))
        return None

    sizes = [int(s) for s in FLAGS.sizes] + ([1_000_000] if FLAGS.large else [])
    rng = np.random.default_rng(0)
    rows = [bench_size(n, rng) for n in sizes]
    for row in rows:
        print(
            f"\nN={row['N']} D={row['D']} k={row['k']} (JAX blocks of {row['jax_block']} queries): matmul peak "
            f"{max(row['matmul_peak'].values()):.1f} GFLOP/s, "
            f"read bandwidth {max(row['read_bandwidth'].values()):.1f} GB/s"
        )
        print(
            f"{'method':<24}{'q/s':>10}{'GFLOP/s':>10}{'% peak':>8}{'x faiss':>9}   1-query:{'q/s':>8}{'GB/s':>8}"
            f"{'% bw':>7}{'x faiss':>9}"
        )
        for name, m in row["methods"].items():
            print(
                f"{name:<24}{m['block_qps']:10.1f}{m['block_gflops']:10.1f}{m['block_pct_of_peak']:8.1f}"
                f"{m['block_vs_faiss']:9.2f}           {m['single_qps']:8.2f}{m['single_gbs']:8.2f}"
                f"{m['single_pct_of_bandwidth']:7.1f}{m['single_vs_faiss']:9.2f}"
            )
        if "store" in row:
            print(
                f"store on disk, chunks of {row['store']['chunk_rows']} rows: "
                + ", ".join(f"{k} {v['qps']:.1f} q/s" for k, v in row["store"].items() if isinstance(v, dict))
            )
    result = {"devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "rows": rows}
    path = Path(FLAGS.output_json)
    from attllm_jax.files import atomic_write_json

    atomic_write_json(path, result)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    app.run(main)
