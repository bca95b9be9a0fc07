"""One run per output folder (the lock, with real concurrent and killed processes) and nothing stale after a rerun."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from attllm_jax import outputs
from attllm_jax.evaluation.pipeline import strip_names

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}

HOLD = """
import sys, time
from attllm_jax.outputs import OutputLock
lock = OutputLock(sys.argv[1], "holder").acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(folder: Path, seconds: float = 120.0) -> subprocess.Popen:
    """A real process holding the folder's lock; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)], env=ENV, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_a_second_process_is_refused_naming_the_folder_and_the_holder(tmp_path):
    holder = _holder(tmp_path / "out")
    try:
        with pytest.raises(outputs.OutputLockError) as info:
            outputs.OutputLock(tmp_path / "out", "eval").acquire()
        message = str(info.value)
        assert str(tmp_path / "out") in message
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
        assert "\n" not in message
    finally:
        _stop(holder)


def test_the_lock_of_a_killed_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    holder = _holder(tmp_path / "out")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((tmp_path / "out" / outputs.LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    lock = outputs.OutputLock(tmp_path / "out", "eval").acquire()
    try:
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
        with caplog.at_level("WARNING", logger="attllm_jax.outputs"):
            lock.log_takeover()
        assert f"took over the stale lock of holder pid {holder.pid}" in caplog.text
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not lock.path.exists()
    again = outputs.OutputLock(tmp_path / "out", "eval").acquire()  # a released folder is free, nothing to take over
    assert again.took_over is None
    again.release()


def test_a_lock_written_on_another_host_is_not_taken_over(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    other = {"pid": 1234, "host": "another-host", "started": "2026-01-01T00:00:00Z", "command": "eval"}
    (folder / outputs.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(outputs.OutputLockError, match=r"pid 1234 on host another-host.*never taken over"):
        outputs.OutputLock(folder, "eval").acquire()


def test_remove_previous_outputs_removes_only_listed_files_inside_the_folder(tmp_path):
    out = tmp_path / "out"
    (out / "csv_results" / "alpha_0.5").mkdir(parents=True)
    (out / "csv_results" / "alpha_0.5" / "a.csv").write_text("x")
    (out / "csv_results" / "keep").mkdir()
    (out / "csv_results" / "keep" / "mine.txt").write_text("user")
    (tmp_path / "outside.txt").write_text("not ours")
    listed = ["csv_results/alpha_0.5/a.csv", "../outside.txt", "/etc/hostname", "csv_results/keep"]
    (out / "results.json").write_text(json.dumps({"outputs": listed}))
    removed = outputs.remove_previous_outputs(out, "results.json")
    assert removed == ["csv_results/alpha_0.5/a.csv", "results.json"]
    assert not (out / "csv_results" / "alpha_0.5").exists()
    assert (out / "csv_results" / "keep" / "mine.txt").read_text() == "user"
    assert (tmp_path / "outside.txt").exists()


def test_strip_names_keep_folders_apart():
    names = strip_names(["a/X.jpg", "b/X.jpg", "c/Y.png", "d/Z.jpg", "d/Z.png"])
    assert names == ["a/X.jpg", "b/X.jpg", "c/Y.jpg", "d/Z.jpg.jpg", "d/Z.png.jpg"]
    assert len(set(names)) == len(names)


# ----------------------------------------------------------------------------------------------------------------
# The eval command


def _jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (shade, 100, 200 - shade)).save(path, format="JPEG")


@pytest.fixture()
def dataset(tmp_path):
    _jpeg(tmp_path / "db" / "@551294.51@4177187.54@db7@.jpg", 10)
    _jpeg(tmp_path / "db" / "@551394.51@4177187.54@street 2@.jpg", 90)
    _jpeg(tmp_path / "q" / "a" / "@551295.00@4177187.54@X@.jpg", 12)
    _jpeg(tmp_path / "q" / "b" / "@551393.00@4177187.54@X@.jpg", 88)
    return tmp_path


def _eval_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.eval",
        "--database_folder",
        str(root / "db"),
        "--queries_folder",
        str(root / "q"),
        "--output_dir",
        str(out),
        "--image_size",
        "48",
        "--recall_values",
        "1",
        *extra,
    ]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_two_evals_on_one_folder_one_refuses_and_the_results_are_the_winners(dataset):
    out = dataset / "out"
    args = [_eval_args(dataset, out, "--alphas", alphas) for alphas in ("0,0.5", "0,1")]
    procs = [
        subprocess.Popen(a, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in args
    ]
    try:
        done = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    codes = [p.returncode for p in procs]
    assert sorted(codes) != [0, 0], "both runs wrote into one folder"
    winner = codes.index(0)
    loser = 1 - winner
    lines = done[loser][1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval: error: output folder"), done[loser][1]
    assert str(out) in lines[0] and f"eval pid {procs[winner].pid} on host {socket.gethostname()}" in lines[0]
    results = json.loads((out / "results.json").read_text())
    assert results["alphas"] == [[0.0, 0.5], [0.0, 1.0]][winner]
    assert sorted(p.name for p in (out / "csv_results").iterdir()) == [f"alpha_{a}" for a in results["recalls"]]
    assert not (out / outputs.LOCK_FILE).exists()


def test_eval_takes_over_the_lock_of_a_killed_run(dataset):
    out = dataset / "out"
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    proc = _run(_eval_args(dataset, out, "--alphas", "0"))
    assert proc.returncode == 0, proc.stderr
    assert f"took over the stale lock of holder pid {holder.pid}" in (out / "eval.log").read_text()


# two evals (19 s on the quiet 2-core machine); remove_previous_outputs itself is tested above in the default suite
@pytest.mark.slow
def test_a_rerun_with_other_alphas_leaves_only_its_own_results_and_the_users_files(dataset):
    out = dataset / "out"
    first = _run(_eval_args(dataset, out, "--alphas", "0,0.5", "--num_preds_to_save", "1"))
    assert first.returncode == 0, first.stderr
    # queries a/X.jpg and b/X.jpg have strips of their own
    assert sorted(p.relative_to(out).as_posix() for p in (out / "predictions" / "alpha_0.5").rglob("*.jpg")) == [
        "predictions/alpha_0.5/a/@551295.00@4177187.54@X@.jpg",
        "predictions/alpha_0.5/b/@551393.00@4177187.54@X@.jpg",
    ]
    (out / "my_notes.txt").write_text("mine")
    (out / "predictions" / "alpha_0.5" / "keep.txt").write_text("mine too")
    second = _run(_eval_args(dataset, out, "--alphas", "0,1"))
    assert second.returncode == 0, second.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["alphas"] == [0.0, 1.0]
    assert not (out / "csv_results" / "alpha_0.5").exists()
    assert [p.name for p in (out / "predictions" / "alpha_0.5").rglob("*")] == ["keep.txt"]
    assert not (out / "predictions" / "alpha_0.0").exists()  # this run saved no strips
    assert (out / "my_notes.txt").read_text() == "mine"
    assert "removed" in (out / "eval.log").read_text() and "files of the previous run" in second.stderr
    # every result file in the folder is this run's: listed in results.json (beside the log, store, user files)
    listed = set(results["outputs"])
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    others = {"results.json", "eval.log", "my_notes.txt", "predictions/alpha_0.5/keep.txt"}
    assert present - listed - others == {p for p in present if p.startswith("database_store/")}
    assert listed <= present


@pytest.mark.parametrize(
    ("inside", "flag"), [("db", "--database_folder"), ("db/results", "--database_folder"), ("q/x", "--queries_folder")]
)
def test_an_eval_output_inside_an_input_folder_is_refused_before_work(dataset, inside, flag):
    proc = _run(_eval_args(dataset, dataset / inside))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("eval: error: --output_dir") and flag in lines[0], lines[0]
    assert not (dataset / inside / "results.json").exists() and not (dataset / inside / "eval.log").exists()


def test_flood_refuses_a_held_folder_and_an_output_inside_its_images(dataset):
    out = dataset / "flooded"
    holder = _holder(out)
    try:
        args = [sys.executable, "-m", "experiments.flood", "--images", str(dataset / "q"), "--levels", "0.3"]
        proc = _run([*args, "--output_dir", str(out)], timeout=120)
        assert proc.returncode != 0 and f"in use by holder pid {holder.pid}" in proc.stderr, proc.stderr
        assert not (out / "level_0.3").exists() and not (out / "flood.log").exists()
        inside = _run([*args, "--output_dir", str(dataset / "q")], timeout=120)
        assert inside.returncode != 0 and "is --images" in inside.stderr, inside.stderr
        assert not (dataset / "q" / "flood.log").exists() and not (dataset / "q" / "level_0.3").exists()
    finally:
        _stop(holder)


@pytest.mark.parametrize("command", ["tune", "severity"])
def test_tune_and_severity_refuse_a_held_folder_in_one_line(dataset, command):
    out = dataset / f"{command}_out"
    holder = _holder(out)
    try:
        args = [sys.executable, "-m", f"experiments.{command}", "--database_folder", str(dataset / "db"),
                "--queries_folder", str(dataset / "q"), "--output_dir", str(out)]  # fmt: skip
        proc = _run(args, timeout=180)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and lines[-1].startswith(f"{command}: error: output folder {out} is in use by "
                                                             f"holder pid {holder.pid}"), proc.stderr  # fmt: skip
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [outputs.LOCK_FILE]  # nothing written beside the lock
    finally:
        _stop(holder)
