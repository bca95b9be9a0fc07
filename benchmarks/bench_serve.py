r"""Benchmark: attllm-serve's latency and throughput on the demo, batching on and off, against in-process calls.

    python -m benchmarks.bench_serve [--image_size 288] [--requests 64] [--concurrency 1,4,16] \
        [--max_batch 16] [--max_wait_ms 5] [--repeats 2] [--output_json outputs/bench_serve.json]

Without the LLM (each request uploads the demo photo's oracle attention file), in one run, all measured while
the other parts stay loaded and idle, each pair of things compared measured in alternation (a change of the
machine's load hits both):

- the model's own batch gain, the ceiling of batching here: the service's engine called directly, photos decoded
  first, one photo per forward pass against passes of ``--max_batch`` photos (ms per photo, alternating);
- C = 1, paired: for each photo in turn, the engine called in process (decode, one forward pass, search and
  result: what a request costs without HTTP), then one request to each server; plus one HTTP round trip
  (p50 of ``GET /v1/health``). The ratio is the HTTP p50 over (in-process p50 + round trip);
- for each concurrency C: the service with dynamic batching (``--max_batch``) and without (``--max_batch 1``):
  latency p50/p95/p99 per request (client side, the whole HTTP exchange) and photos/s, from C httpx clients (one
  connection each) posting ``--requests`` photos in all; both servers run at once (each compiled and timed every
  bucket for the demo's photo size first: ``--warmup``) and their cases alternate, each the best of ``--repeats``;
  the batching server's batch sizes (its ``/metrics``);
- ``attllm_jax.localization.localize`` over the demo's photo folder with the model already loaded (photos/s).

Targets (issue 22): at C = 16 batching gives >= 2x the photos/s of batch 1; p50 at C = 1 within 25% of the
in-process call plus one HTTP round trip. Timings on a shared machine vary: compare the ratios of one run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from absl import app, flags

from benchmarks.serve_process import running_server

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 288, "Model input's shorter side (the demo's own 288; smaller is faster).")
flags.DEFINE_integer("requests", 64, "Requests per (server, concurrency) case.")
flags.DEFINE_list("concurrency", ["1", "4", "16"], "Concurrent clients.")
flags.DEFINE_integer("max_batch", 16, "The batching server's --max_batch (and the in-process batch).")
flags.DEFINE_float("max_wait_ms", 5.0, "The servers' --max_wait_ms (how long a batch waits to fill).")
flags.DEFINE_integer("repeats", 2, "Each HTTP case is the best (photos/s) of this many runs.")
flags.DEFINE_string("cache_dir", None, "attllm_jax cache holding the demo (default: the package default).")
flags.DEFINE_string("output_json", "outputs/bench_serve.json", "Where the numbers are written.")


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}


def http_case(url: str, uploads: list[tuple[str, bytes, bytes]], requests: int, clients: int) -> dict:
    """``requests`` posts from ``clients`` concurrent clients: latency percentiles and photos/s."""
    plan = [uploads[i % len(uploads)] for i in range(requests)]
    shares = [plan[i::clients] for i in range(clients)]

    def client(share) -> list[float]:
        times = []
        with httpx.Client(timeout=600) as c:
            for name, image, attention in share:
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/localize", files={"image": (name, image), "attention": ("a.json", attention)})
                r.raise_for_status()
                times.append(time.perf_counter() - t0)
        return times

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [t for done in pool.map(client, shares) for t in done]
    wall = time.perf_counter() - t0
    return {**percentiles(latencies), "photos_per_s": round(requests / wall, 3)}


def round_trip(url: str, repeats: int = 50) -> float:
    """p50 seconds of ``GET /v1/health``."""
    times = []
    with httpx.Client(timeout=30) as c:
        for _ in range(repeats):
            t0 = time.perf_counter()
            c.get(f"{url}/v1/health")
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


class InProcess:
    """The service's own engine, called directly (the same model, database and search as the servers)."""

    def __init__(self, settings, uploads, max_batch: int):
        from attllm_jax.serve.engine import Engine

        self.settings, self.uploads, self.max_batch = settings, uploads, max_batch
        self.engine = Engine(settings, max_batch=max_batch)
        for rows in (1, max_batch):  # compile both shapes
            self.engine.localize_batch([self.photo(0)] * rows, rows)

    def photo(self, i: int):
        """Upload ``i`` (cycled) decoded, with its attention, as the service queues it."""
        from attllm_jax.attention.store import parse_record, record_from_bytes
        from attllm_jax.serve.engine import Photo

        name, image, attention = self.uploads[i % len(self.uploads)]
        decoded = self.engine.decode(name, image)
        return Photo(name, image, decoded.pixels, parse_record(record_from_bytes(attention, name)), 0.5, 10)

    def single(self, i: int) -> float:
        """Seconds of one photo from its bytes: decode, one forward pass, search, result."""
        t0 = time.perf_counter()
        self.engine.localize_batch([self.photo(i)], 1)
        return time.perf_counter() - t0

    def model_gain(self, repeats: int) -> dict:
        """ms per photo of forward passes (with search and result) of 1 and of ``max_batch`` decoded photos."""
        photos = [self.photo(i) for i in range(self.max_batch)]
        one, batched = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for photo in photos:
                self.engine.localize_batch([photo], 1)
            one.append((time.perf_counter() - t0) / len(photos))
            t0 = time.perf_counter()
            self.engine.localize_batch(photos, self.max_batch)
            batched.append((time.perf_counter() - t0) / len(photos))
        ms = {"batch_1": round(float(np.median(one)) * 1000, 2), "batched": round(float(np.median(batched)) * 1000, 2)}
        return {"ms_per_photo": ms, "gain": round(ms["batch_1"] / ms["batched"], 3)}

    def localize_folder(self) -> float:
        """photos/s of ``localize()`` over the demo folder with the model loaded."""
        from dataclasses import replace

        from attllm_jax.localization import localize

        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            run = localize(replace(self.settings, output_dir=out), model=self.engine.ctx.model)
            return len(run.photos) / (time.perf_counter() - t0)


def paired_single(inproc: InProcess, servers: dict, requests: int) -> dict:
    """C = 1 in alternation: each photo in process, then to each server; p50/p95/p99 of each."""
    times: dict[str, list[float]] = {"in_process": [], **{label: [] for label in servers}}
    clients = {label: httpx.Client(timeout=600) for label in servers}
    try:
        for i in range(requests):
            times["in_process"].append(inproc.single(i))
            name, image, attention = inproc.uploads[i % len(inproc.uploads)]
            for label, server in servers.items():
                t0 = time.perf_counter()
                r = clients[label].post(
                    f"{server.url}/v1/localize", files={"image": (name, image), "attention": ("a.json", attention)}
                )
                r.raise_for_status()
                times[label].append(time.perf_counter() - t0)
    finally:
        for client in clients.values():
            client.close()
    return {label: percentiles(t) for label, t in times.items()}


def batch_sizes(url: str) -> dict[str, float]:
    """The server's cumulative batch-size histogram (``le`` -> batches)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.findall(r'attllm_serve_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)
    return {le: float(count) for le, count in found}


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    from attllm_jax.files import default_cache_dir
    from attllm_jax.localization import LocalizeSettings
    from attllm_jax.localization.demo import prepare_localize_demo

    cache = FLAGS.cache_dir or str(default_cache_dir())
    database, photos, answers = prepare_localize_demo(cache)
    names = sorted(p.name for p in photos.glob("*.jpg"))
    uploads = [(n, (photos / n).read_bytes(), (answers / f"{Path(n).stem}.json").read_bytes()) for n in names]
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    store = work / "store"
    settings = LocalizeSettings(
        images=str(photos),
        output_dir=str(work / "inproc"),
        database_folder=str(database),
        store_dir=str(store),
        image_size=FLAGS.image_size,
        attention_dir=str(answers),
        alpha=0.5,
    )
    results = {"image_size": FLAGS.image_size, "requests": FLAGS.requests, "max_wait_ms": FLAGS.max_wait_ms}
    inproc = InProcess(settings, uploads, FLAGS.max_batch)
    common = ["--cache_dir", cache, "--image_size", str(FLAGS.image_size), "--store_dir", str(store)]
    common += ["--warmup", "384x288", "--max_queue", "256", "--max_wait_ms", str(FLAGS.max_wait_ms)]
    batches = {"batching": FLAGS.max_batch, "batch_1": 1}
    with contextlib.ExitStack() as stack:
        servers = {
            label: stack.enter_context(
                running_server(
                    [*common, "--max_batch", str(b), "--output_dir", str(work / label)],
                    work / f"server_{label}",
                    ready_timeout_s=1800,
                )
            )
            for label, b in batches.items()
        }
        results["model_gain"] = inproc.model_gain(FLAGS.repeats + 1)
        results["http_round_trip_ms"] = round(round_trip(servers["batching"].url) * 1000, 3)
        results["paired_c1"] = paired_single(inproc, servers, FLAGS.requests)
        results["http"] = {label: {} for label in servers}
        for c in FLAGS.concurrency:  # the two servers alternate, so a change of the machine's load hits both
            for _ in range(FLAGS.repeats):
                for label, server in servers.items():
                    case = http_case(server.url, uploads, FLAGS.requests, int(c))
                    best = results["http"][label].get(c)
                    if best is None or case["photos_per_s"] > best["photos_per_s"]:
                        results["http"][label][c] = case
        results["batching_batch_sizes"] = batch_sizes(servers["batching"].url)
    results["localize_folder_photos_per_s"] = round(inproc.localize_folder(), 3)
    report(results)
    Path(FLAGS.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.output_json).write_text(json.dumps(results, indent=2))
    print(f"written: {FLAGS.output_json} (work folder {work})")


def report(results: dict) -> None:
    """Prints the table and the two target ratios (``results["ratios"]``)."""
    print(f"{'case':<28}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'photos/s':>10}")
    for label, cases in results["http"].items():
        for c, r in cases.items():
            print(f"{label + ' C=' + c:<28}{r['p50']:>10}{r['p95']:>10}{r['p99']:>10}{r['photos_per_s']:>10}")
    for label, r in results["paired_c1"].items():
        print(f"{'paired C=1 ' + label:<28}{r['p50']:>10}{r['p95']:>10}{r['p99']:>10}")
    gain = results["model_gain"]
    print(
        f"model's own batch gain (in process, ms/photo): {gain['ms_per_photo']} = {gain['gain']}x; localize() on the "
        f"folder: {results['localize_folder_photos_per_s']} photos/s; HTTP round trip p50 "
        f"{results['http_round_trip_ms']} ms; batching server's batch sizes (le: count) "
        f"{results['batching_batch_sizes']}"
    )
    top = max(results["http"]["batching"], key=int)
    speedup = results["http"]["batching"][top]["photos_per_s"] / results["http"]["batch_1"][top]["photos_per_s"]
    paired = results["paired_c1"]
    ceiling = paired["in_process"]["p50"] + results["http_round_trip_ms"]
    p50 = {label: paired[label]["p50"] / ceiling for label in ("batching", "batch_1")}
    print(f"batching / batch 1 photos/s at C={top}: {speedup:.2f}x (target >= 2; the model's own gain {gain['gain']}x)")
    print(f"p50 at C=1 / (in-process p50 + round trip), paired: batching {p50['batching']:.2f}, batch 1 "
          f"{p50['batch_1']:.2f} (target <= 1.25)")  # fmt: skip
    results["ratios"] = {
        "batching_speedup": round(speedup, 3),
        "model_gain": gain["gain"],
        "p50_c1_over_ceiling": {label: round(v, 3) for label, v in p50.items()},
    }


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
