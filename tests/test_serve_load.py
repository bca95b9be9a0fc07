"""attllm-serve under load on the demo (slow): 200 requests from 16 clients equal attllm-localize's per-photo
results, the metrics count them, batches form; SIGTERM under load finishes the requests in flight and exits 0.

The demo runs at ``--image_size 96`` (both the reference and the service) to bound the time on a CPU.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_helpers import REPO, running_server, stop
from tests.test_serve import batch_counts, compare_with_localize, localize_count

pytestmark = pytest.mark.slow
IMAGE_SIZE = "96"
REQUESTS, CLIENTS = 200, 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_load")
    cache, out = root / "cache", root / "localize"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.localize", "--cache_dir", str(cache), "--image_size", IMAGE_SIZE]
        + ["--output_dir", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (out / "photos").glob("*.json")}
    benchmark = next(cache.glob("synthetic_flood_*"))
    args = ["--cache_dir", str(cache), "--image_size", IMAGE_SIZE, "--store_dir", str(out / "database_store")]
    return {
        "root": root,
        "reference": reference,
        "photos": benchmark / "queries_unlabelled",
        "attention": benchmark / "attention_unlabelled",
        "args": args,
    }


def request_files(demo, name: str) -> dict:
    answer = demo["attention"] / f"{Path(name).stem}.json"
    return {
        "image": (name, (demo["photos"] / name).read_bytes(), "image/jpeg"),
        "attention": (answer.name, answer.read_bytes(), "application/json"),
    }


def clients_post(url: str, demo, names: list[str], clients: int) -> list[tuple[str, httpx.Response]]:
    """Posts every photo of ``names`` from ``clients`` concurrent httpx clients (one connection each)."""
    shares = [names[i::clients] for i in range(clients)]

    def client(share):
        with httpx.Client(timeout=600) as c:
            return [(name, c.post(f"{url}/v1/localize", files=request_files(demo, name))) for name in share]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return [item for done in pool.map(client, shares) for item in done]


def test_200_requests_from_16_clients_equal_localize_and_are_batched(demo):
    names = sorted(demo["reference"])
    requests = [names[i % len(names)] for i in range(REQUESTS)]
    args = [*demo["args"], "--output_dir", str(demo["root"] / "serve"), "--max_batch", "16", "--max_wait_ms", "20"]
    with running_server([*args, "--warmup", "384x288"], demo["root"] / "server") as server:
        before = localize_count(server)
        answers = clients_post(server.url, demo, requests, CLIENTS)
        assert [r.status_code for _, r in answers] == [200] * REQUESTS
        for name, response in answers:
            compare_with_localize(response.json(), demo["reference"][name])
        assert localize_count(server) - before == REQUESTS
        batches = batch_counts(server)
        assert batches["+Inf"] > batches["1.0"], batches  # some forward passes held more than one photo


def test_sigterm_under_load_finishes_the_requests_in_flight_and_exits_0(demo):
    names = sorted(demo["reference"])[:CLIENTS]
    args = [*demo["args"], "--output_dir", str(demo["root"] / "serve_term"), "--max_batch", "4"]
    with running_server(args, demo["root"] / "server_term") as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(clients_post, server.url, demo, names, CLIENTS)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and server.log().count('"path": "/v1/localize"') < 1:
                time.sleep(0.05)  # the first answer is out: the others are in flight (compiling or queued)
            started = time.monotonic()
            server.process.terminate()
            answers = pending.result(timeout=600)
        assert stop(server.process, timeout_s=600) == 0
        assert [r.status_code for _, r in answers] == [200] * CLIENTS, server.log()[-3000:]
        for name, response in answers:
            compare_with_localize(response.json(), demo["reference"][name])
        assert time.monotonic() - started < 600
