"""The eval (and tune, extract) command lines: known bad inputs end in ONE ``<command>: error:`` line naming the
input (no traceback, no 70-line usage text), and ``--help`` exits 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.marks import slow_after

REPO = Path(__file__).resolve().parents[1]
SFXL_DB = "@0551294.51@4177187.54@10@S@037.74054@-122.41781@6ndRH0-kf_BJq0ZASDu5ZQ@@300@@@@201311@@.jpg"
QUERY = "37.74054_-122.41781@q.jpg"


def run_eval(*args: str, timeout: float = 240, command: str = "eval") -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{command}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess, only: bool = True, command: str = "eval") -> str:
    """The run failed with one ``eval: error: ...`` line as the last stderr line, no traceback, no results.

    With ``only``, that line is all the run printed (errors found before any work); otherwise progress lines of
    the work done before the error may precede it.
    """
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in lines if line.startswith(f"{command}: error: ")] == lines[-1:], proc.stderr
    assert len(lines) == 1 or not only, proc.stderr
    assert proc.stdout.strip() == ""
    return lines[-1]


def _jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (120, 130, 140)).save(path, format="JPEG")


@pytest.fixture()
def folders(tmp_path):
    _jpeg(tmp_path / "db" / SFXL_DB)
    _jpeg(tmp_path / "q" / QUERY)
    return tmp_path


def dataset_flags(root: Path, *extra: str) -> list[str]:
    return ["--database_folder", str(root / "db"), "--queries_folder", str(root / "q"), *extra]


def test_help_exits_zero_and_lists_the_flags():
    proc = run_eval("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--queries_folder" in proc.stdout and "--max_batch_pixels" in proc.stdout


def test_a_missing_folder_prints_the_error_and_a_pointer_to_help_only(folders):
    proc = run_eval(
        "--database_folder",
        str(folders / "db"),
        "--queries_folder",
        str(folders / "nope"),
        "--output_dir",
        str(folders / "out"),
    )
    line = one_error_line(proc)
    assert "--queries_folder" in line and "nope" in line and "--help" in line


def test_a_pytorch_file_as_checkpoint_says_convert_it_first(folders):
    pth = folders / "ResNet50_2048_cosplace.pth"
    pth.write_bytes(b"not really a checkpoint")
    line = one_error_line(
        run_eval(*dataset_flags(folders, "--output_dir", str(folders / "out"), "--checkpoint", str(pth)))
    )
    assert "ResNet50_2048_cosplace.pth" in line and "convert it first" in line and "attllm-convert" in line


@pytest.mark.parametrize(
    ("config", "expected"),
    slow_after(
        [
            ({"family": "no_such_family"}, "no_such_family"),
            ({"family": "cosplace", "backbone": "resnet18"}, "descriptor_dim"),
            ({"family": "cosplace", "backbone": "resnet1000", "descriptor_dim": 512}, "resnet1000"),
        ]
    ),
)
def test_a_bad_config_json_is_one_line_naming_the_model(folders, config, expected):
    model = folders / "model"
    (model / "state").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(config))
    line = one_error_line(
        run_eval(*dataset_flags(folders, "--output_dir", str(folders / "out"), "--checkpoint", str(model))), only=False
    )
    assert str(model) in line and expected in line


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder in which nothing can be created (sysfs as root, a chmod 500 folder otherwise)."""
    if os.geteuid() == 0:
        return Path("/sys/attllm_eval_test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


def test_a_read_only_output_dir_is_one_line_naming_the_flag(folders):
    out = _read_only_dir(folders)
    try:
        out.mkdir()
    except OSError:
        pass
    else:
        pytest.skip("could not make a read-only folder here")
    line = one_error_line(run_eval(*dataset_flags(folders, "--output_dir", str(out))))
    assert str(out) in line and "--output_dir" in line


def test_a_name_without_coordinates_suggests_the_folder_convention(folders):
    _jpeg(folders / "db" / "IMG_1234.jpg")
    line = one_error_line(run_eval(*dataset_flags(folders, "--output_dir", str(folders / "out"))), only=False)
    assert "IMG_1234.jpg" in line and "SF-XL convention" in line


def test_a_path_list_escaping_the_folder_is_one_line_naming_the_line(folders):
    (folders / "db_images_paths.txt").write_text(f"{SFXL_DB}\n../q/{QUERY}\n")
    line = one_error_line(run_eval(*dataset_flags(folders, "--output_dir", str(folders / "out"))), only=False)
    assert "db_images_paths.txt:2" in line and "outside the image folder" in line


# two evals per case (252 s and 304 s measured on the loaded 2-core machine): the second damage runs with -m slow
@pytest.mark.parametrize("damage", ["flipped", pytest.param("truncated", marks=pytest.mark.slow)])
def test_a_corrupt_store_chunk_is_one_line_naming_the_store_and_what_to_do(folders, damage):
    out, store = folders / "out", folders / "store"
    flags = dataset_flags(folders, "--output_dir", str(out), "--store_dir", str(store))
    first = run_eval(*flags)
    assert first.returncode == 0, first.stderr
    chunk = store / "descriptors" / "0.0"  # zarr chunk 0 of the [N, D] descriptor array (no compressor)
    data = chunk.read_bytes()
    chunk.write_bytes(bytes(b ^ 0xFF for b in data) if damage == "flipped" else data[: len(data) // 2])
    line = one_error_line(run_eval(*flags), only=False)
    assert str(store) in line and "chunk 0" in line and "delete" in line, line


@pytest.mark.parametrize(
    "command, args, expected",
    slow_after(
        [
            ("tune", ["--folds", "1"], "--folds must be >= 2"),
            ("extract", ["--database_folder", "/tmp"], "--store_dir must have a value"),
            ("eval", ["--alphas", "2"], "--alphas must be distinct numbers in [0, 1]"),
            ("tune", ["stray"], "unexpected arguments: ['stray']"),
            ("tune", ["--queries_folder", "/q"], "give both --database_folder and --queries_folder"),
            (
                "tune",
                ["--coordinator_address", "127.0.0.1:9", "--num_processes", "2", "--process_id", "0"],
                "one process",
            ),
            ("extract", ["--database_folder", "/nope", "--store_dir", "S"], "'/nope' is not a directory"),
            (
                "extract",
                ["--database_folder", "/tmp", "--store_dir", "S", "--image_size", "abc"],
                "one or two integers",
            ),
        ],
        keep=3,
    ),
)
def test_usage_errors_are_one_line_and_a_pointer_to_help(tmp_path, command, args, expected):
    args = [str(tmp_path / a) if a == "S" else a for a in args]
    proc = run_eval(*args, command=command)
    line = one_error_line(proc, command=command)
    assert proc.returncode == 2 and expected in line and line.endswith("(see --help for the flags)"), line


@pytest.mark.parametrize(
    "command, flag", [("tune", "--folds"), ("tune", "--queries_folder"), ("extract", "--store_dir")]
)
def test_help_of_tune_and_extract_exits_zero_and_lists_their_flags(command, flag):
    proc = run_eval("--help", command=command)
    assert proc.returncode == 0 and flag in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    slow_after(
        [
            (("--search", "faiss_flat", "--search_recall_target", "0.9"), "--search approx_tpu only"),
            (("--search", "approx_tpu", "--search_recall_target", "1.5"), "must lie in (0, 1]"),
            (
                ("--search", "approx_tpu", "--search_shortlist_dtype", "bfloat16"),
                "cannot take --search_shortlist_dtype",
            ),
        ]
    ),
)
def test_approx_tpu_flags_are_checked_before_any_work(folders, flags, expected):
    out = folders / "approx_out"
    line = one_error_line(run_eval(*dataset_flags(folders, "--output_dir", str(out), *flags)))
    assert expected in line and "--search" in line
    assert not (out / "results.json").exists()
