"""Killing the database extraction part-way and resuming; store invalidation; the command line's flag checks."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from tests.marks import slow_after

REPO = Path(__file__).resolve().parents[1]
DRIVER = textwrap.dedent(
    """
    import sys
    from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
    from tests.slow_model import SlowModel

    database, queries, out = sys.argv[1:4]
    config = EvalConfig(database_folder=database, queries_folder=queries, output_dir=out, alphas=(0.0,),
                        recall_values=(1,), image_size=64, chunk_size=3, batch_size=2, num_workers=1)
    run_evaluation(config, model=SlowModel(random_cosplace_model(seed=0), 0.3))
    """
)


def _dataset(root: Path) -> tuple[Path, Path]:
    from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark

    bench = generate_benchmark(
        root,
        SyntheticConfig(num_streets=1, street_length_m=120.0, num_queries=2, image_height=48, image_width=64, seed=11),
    )
    return bench.database, bench.queries


def _chunks(store: Path) -> list[Path]:
    """The completion markers of the store's written chunks."""
    return sorted(store.glob("done/chunk_*.json"))


@pytest.fixture(scope="module")
def model():
    return random_cosplace_model(seed=0)


def test_killed_extraction_resumes_without_redoing_chunks(tmp_path, model):
    database, queries = _dataset(tmp_path / "data")
    num_images = len(list(database.glob("*.jpg")))
    assert num_images == 13  # 5 chunks of 3 (the last one holds 1)
    out = tmp_path / "out"
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), str(database), str(queries), str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    store = out / "database_store"
    deadline = time.monotonic() + 120
    while len(_chunks(store)) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the extraction did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _chunks(store)
    assert 2 <= len(done) < 5, "the kill must land part-way"
    first_bytes = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in done}
    done_images = 3 * len(done)

    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(out),
        alphas=(0.0,),
        recall_values=(1,),
        image_size=64,
        chunk_size=3,
        batch_size=2,
    )
    resumed = run_evaluation(config, model=model)
    store_info = resumed.results["store"]
    assert store_info["status"] == "resumed"
    assert store_info["chunks_computed"] == 5 - len(done)
    assert store_info["images_computed"] == num_images - done_images  # no duplicated work
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == first_bytes[p.name] for p in done)  # never rewritten

    fresh = run_evaluation(EvalConfig(**{**config.__dict__, "output_dir": str(tmp_path / "fresh")}), model=model)
    assert fresh.results["store"]["images_computed"] == num_images
    np.testing.assert_array_equal(resumed.database_descriptors, fresh.database_descriptors)

    # a changed checkpoint (other weights) or image list never reuses the store
    other = run_evaluation(config, model=random_cosplace_model(seed=1))
    assert other.results["store"]["status"] == "rebuilt"
    assert other.results["store"]["images_computed"] == num_images
    sorted(database.glob("*.jpg"))[-1].unlink()
    fewer = run_evaluation(config, model=model)
    assert fewer.results["store"]["status"] == "rebuilt"
    assert fewer.results["store"]["images_computed"] == num_images - 1
    again = run_evaluation(config, model=model)
    assert again.results["store"]["status"] == "reused" and again.results["store"]["images_computed"] == 0
    np.testing.assert_array_equal(again.database_descriptors, fresh.database_descriptors[:-1])


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.eval", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    slow_after(
        [
            (["--alphas", "0,1.5"], "--alphas must be distinct numbers in [0, 1]"),
            (["--alphas", "0,abc"], "--alphas"),
            (["--recall_values", "1,0"], "--recall_values"),
            (["--positive_dist_threshold", "-5"], "--positive_dist_threshold"),
            (["--image_size", "0"], "--image_size"),
            (["--distance", "l1"], "--distance"),
            (["--database_folder", "/nowhere"], "--queries_folder"),
            (["--precision", "fp16"], "--precision"),
        ],
        keep=2,
    ),
)
def test_cli_rejects_bad_flags_before_any_work(tmp_path, args, message):
    result = _cli(*args, "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), cwd=REPO)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_demo_command_prints_the_recall_table(tmp_path):
    result = _cli("--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model weights are RANDOM" in result.stdout and "ORACLE" in result.stdout
    assert "R@1" in result.stdout and "R@20" in result.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(res["recalls"]) == ["0.0", "0.25", "0.5", "0.75", "1.0"]
    assert res["num_database"] == 124 and res["num_queries"] == 40


# extract then eval (16 s); the extract command is also run by test_cli_extract_demo.py in the default suite
@pytest.mark.slow
def test_extract_command_builds_a_store_that_eval_reuses(tmp_path):
    database, queries = _dataset(tmp_path / "data")
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["--image_size", "64", "--batch_size", "4", "--store_dir", str(store), "--chunk_size", "5"]
    built = subprocess.run(
        [sys.executable, "-m", "experiments.extract", "--database_folder", str(database), *common],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "created, 3 of 3 chunks computed, 13 images" in built.stdout and "images/s" in built.stdout
    assert "extract: backend cpu: 1 device (cpu), precision float32 (matmul highest)" in built.stderr
    from attllm_jax.retrieval.store import read_store

    descriptors, valid, paths = read_store(store)
    assert descriptors.shape == (13, 512) and valid.all() and paths == sorted(p.name for p in database.glob("*.jpg"))
    result = _cli(
        "--database_folder", str(database), "--queries_folder", str(queries), "--output_dir", str(tmp_path / "out"),
        "--alphas", "0", "--recall_values", "1", *common, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval: backend cpu: 1 device (cpu), precision float32" in result.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["store"]["status"] == "reused" and res["store"]["images_computed"] == 0
    assert res["precision"] == "float32"


def test_an_evaluation_lists_the_store_markers_once(tmp_path, model, monkeypatch):
    """An evaluation resuming a store of 13 one-image chunks lists done/ once (was 4-5 times: costly on gs://)."""
    from attllm_jax.retrieval import store as store_module

    database, queries = _dataset(tmp_path / "data")
    config = EvalConfig(database_folder=str(database), queries_folder=str(queries), output_dir=str(tmp_path / "a"),
                        alphas=(0.0,), recall_values=(1,), image_size=64, chunk_size=1, batch_size=2,
                        store_dir=str(tmp_path / "store"))  # fmt: skip
    run_evaluation(config, model=model)
    for marker in _chunks(config.resolved_store_dir)[::2]:  # 7 of 13 chunks to recompute
        marker.unlink()
    listed = []
    plain_list = store_module._Root.list
    monkeypatch.setattr(
        store_module._Root, "list", lambda self, prefix: listed.append(prefix) or plain_list(self, prefix)
    )
    again = run_evaluation(EvalConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b")}), model=model)
    assert again.results["store"]["status"] == "resumed" and again.results["store"]["chunks_computed"] == 7
    assert listed == ["done/"]
