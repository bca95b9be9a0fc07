"""After ``pip install``, the console scripts work from any directory (here: a throwaway venv, run from /tmp)."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.marks import slow_after

REPO = Path(__file__).resolve().parents[1]
# script -> flags its --help must list: its own and the shared ones the README tells users to pass
SCRIPT_FLAGS = {
    "attllm-eval": ("--queries_folder", "--image_size", "--precision", "--alphas", "--cache_dir", "--process_id"),
    "attllm-annotate": ("--images", "--city", "--provider"),
    "attllm-extract": ("--store_dir", "--image_size", "--precision", "--database_folder", "--random_model"),
    "attllm-tune": ("--sigmas", "--method", "--image_size", "--precision", "--queries_folder"),
    "attllm-flood": ("--levels", "--method", "--rain"),
    "attllm-severity": ("--levels", "--alphas", "--image_size", "--recall_values", "--precision"),
    "attllm-show-attention": ("--image", "--attention", "--sigma"),
    "attllm-doctor": ("--check",),
    "attllm-localize": ("--images", "--alpha", "--top_k", "--estimator"),
    "attllm-compare-attention": ("--a", "--b", "--grid"),
    "attllm-serve": ("--max_batch", "--token_file", "--provider", "--alpha", "--database_folder"),
    "attllm-accelerator-check": ("--tiny", "--models", "--output_json"),
}
SCRIPTS = (*SCRIPT_FLAGS, "attllm-convert")


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.splitlines() if (REPO / p).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv that inherits this interpreter's packages, with the project installed (not editable) from a copy."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    for rel in _tracked_files():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, source / rel)
    venv = root / "venv"
    # A venv of its own whose site-packages point at this interpreter's (jax, absl, setuptools...): a plain
    # --system-site-packages venv would see the base interpreter's packages instead when this one is a venv.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site_packages] = (venv / "lib").glob("python*/site-packages")
    (site_packages / "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: str = "/tmp") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_every_script_of_pyproject_is_checked_here():
    """A console script added to pyproject.toml without an entry above would escape the convention test."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(declared) == set(SCRIPTS)


def test_console_scripts_are_installed(installed):
    for name in SCRIPTS:
        assert (installed / name).is_file(), name


def test_attllm_eval_help_from_another_directory(installed):
    proc = _run(installed, "attllm-eval", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--queries_folder" in proc.stdout and "--database_folder" in proc.stdout
    # the installed copy, not this checkout, was imported
    where = _run(installed, str(installed / "python"), "-c", "import experiments.eval as e; print(e.__file__)")
    assert where.returncode == 0 and str(REPO) not in where.stdout, where.stdout + where.stderr


def test_attllm_localize_help_and_its_report_script_are_installed(installed):
    proc = _run(installed, "attllm-localize", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--images" in proc.stdout and "--calibrate_with" in proc.stdout
    code = "from attllm_jax.localization.report import _ASSETS; print((_ASSETS / 'report.js').is_file(), _ASSETS)"
    where = _run(installed, str(installed / "python"), "-c", code)
    assert where.stdout.startswith("True") and str(REPO) not in where.stdout, where.stdout + where.stderr


def test_attllm_convert_lists_the_families(installed):
    proc = _run(installed, "attllm-convert", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "cosplace" in proc.stdout and "salad" in proc.stdout
    bad = _run(installed, "attllm-convert", "nosuchfamily")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("convert: error: unknown family 'nosuchfamily'")


def test_benchmarks_and_torch_references_are_not_installed(installed, tmp_path):
    """The front ends are installed; the benchmarks and the PyTorch references stay in the checkout."""
    probe = (
        "import importlib.util as u\n"
        "names = ['experiments.eval', 'benchmarks', 'experiments.bench_models', 'experiments.torch_zoo']\n"
        "print(' '.join(str(u.find_spec(n) is not None) for n in names))\n"
    )
    proc = _run(installed, str(installed / "python"), "-c", probe, cwd=str(tmp_path))  # no checkout on sys.path
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False", "False"]
    assert (REPO / "benchmarks" / "bench_models.py").is_file() and (REPO / "benchmarks" / "torch_zoo.py").is_file()


def _command(script: str) -> str:
    return script.removeprefix("attllm-").replace("-", "_")


# attllm-eval in the default suite, every script with -m slow (two start-ups of each: ~8 s apiece on 2 cores)
@pytest.mark.parametrize("script", slow_after(SCRIPTS))
def test_every_console_script_follows_the_convention(installed, script):
    """--help exits 0 and lists the flags; a bogus flag is one ``<command>: error:`` line, exit 2, nothing else."""
    proc = _run(installed, script, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in SCRIPT_FLAGS.get(script, ()):
        assert flag in proc.stdout, (script, flag)
    bad = _run(installed, script, "--no_such_flag=1")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2, bad.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{_command(script)}: error: "), bad.stderr
    assert "no_such_flag" in lines[0] and "FATAL" not in bad.stderr and bad.stdout == "", bad.stderr


@pytest.mark.parametrize("family", slow_after(["cosplace", "salad"]))
def test_a_converter_follows_the_convention(installed, family):
    proc = _run(installed, "attllm-convert", family, "--help")
    assert proc.returncode == 0 and "--output" in proc.stdout and "--cache_dir" in proc.stdout, proc.stderr
    bad = _run(installed, "attllm-convert", family, "--no_such_flag=1")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("convert: error: "), bad.stderr
    missing = _run(installed, "attllm-convert", family)
    [line] = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and line.startswith("convert: error: ") and "--output must have a value" in line


@pytest.mark.slow
def test_annotate_logs_its_flags_through_the_console_script(installed, tmp_path):
    """The log's ``flags:`` line holds the command's flags (it was ``{}`` through the console script)."""
    (tmp_path / "q").mkdir()
    (tmp_path / "src").mkdir()
    out = tmp_path / "a"
    args = ["--images", str(tmp_path / "q"), "--output_dir", str(out), "--provider", "files"]
    proc = _run(installed, "attllm-annotate", *args, "--source_dir", str(tmp_path / "src"))
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in (out / "annotate.log").read_text().splitlines() if " flags: " in x]
    assert f'"images": "{tmp_path / "q"}"' in line and '"provider": "files"' in line, line
    usage = _run(installed, "attllm-annotate", "--images", str(tmp_path / "q"), "--output_dir", str(tmp_path / "b"))
    [line] = usage.stderr.strip().splitlines()
    assert usage.returncode == 2 and line.startswith("annotate: error: ") and "--city is required" in line, line
    assert not (tmp_path / "b").exists()  # refused before any work: no folder, no log


def test_the_installed_accelerator_check_says_it_needs_a_checkout(installed):
    """The check times against benchmarks/, which the wheel leaves out: outside a checkout a run is one line."""
    proc = _run(installed, "attllm-accelerator-check", "--tiny")
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("accelerator_check: error: it needs the repository's benchmarks/ folder")
