"""A full disk under the store or the output: one line naming the file, the flag and the reason.

The full disk is a real one: a tmpfs of a few hundred KB mounted in the test's folder (needs root, or the
permission to mount; skipped otherwise)."""

import contextlib
import errno
import subprocess
import uuid

import numpy as np
import pytest

from attllm_jax.files import atomic_write_json
from attllm_jax.retrieval.store import DescriptorStore, StoreError


@contextlib.contextmanager
def tiny_disk(folder, size_kb: int):
    """A tmpfs of ``size_kb`` KB mounted at ``folder`` for the duration of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", f"tiny-{uuid.uuid4().hex[:8]}", str(folder)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def test_a_full_disk_under_the_store_names_the_store_and_the_flag(tmp_path):
    with tiny_disk(tmp_path / "disk", 256) as disk:
        store = DescriptorStore.open(disk / "store", {"model": "m"}, num_items=4096, chunk_size=256, dim=64)
        with pytest.raises(StoreError) as info:
            for chunk in store.pending_chunks():  # 64 KB a chunk: the disk fills at the third or fourth
                start, stop = store.chunk_range(chunk)
                store.write_chunk(chunk, np.ones((stop - start, 64), np.float32), np.ones(stop - start, bool), [])
        store.close()
    message = str(info.value)
    assert "\n" not in message and f"descriptor store at {disk / 'store'}" in message
    assert "(No space left on device)" in message and "--store_dir" in message


def test_a_full_disk_under_the_output_names_the_file_and_the_flag(tmp_path):
    from attllm_jax.evaluation.config import EvalConfig
    from experiments.eval import _os_error_line

    with tiny_disk(tmp_path / "disk", 64) as disk:
        target = disk / "out" / "results.json"
        with pytest.raises(OSError) as info:
            atomic_write_json(target, {"rows": "x" * 200_000})
        assert sorted(p.name for p in (disk / "out").iterdir()) == []  # no temporary file left behind
    error = info.value
    assert error.errno == errno.ENOSPC and error.filename == str(target)
    config = EvalConfig(str(tmp_path / "db"), str(tmp_path / "q"), output_dir=str(disk / "out"))
    assert _os_error_line(error, config) == (
        f"cannot write {target} (No space left on device): free space on that disk or give another --output_dir"
    )


def test_a_full_disk_under_the_annotation_output_stops_the_run_naming_the_flag(tmp_path):
    from attllm_jax.attention import prompts, providers, runner
    from tests.llm_server import LLMServer, text_reply
    from tests.test_attention_annotate import REPO, annotate_command, make_images, run_env

    images = make_images(tmp_path / "images", range(6))
    long_answer = '[{"center": [0.3, 0.6], "weight": 1.8, "reasoning": "' + "x" * 3000 + '"}]'
    with tiny_disk(tmp_path / "disk", 12) as disk, LLMServer(lambda seen: text_reply(seen, long_answer)) as server:
        out = disk / "out"
        out.mkdir()
        provider = providers.GeminiProvider(api_key="k" * 39, base_url=server.url, timeout_s=5.0)
        config = runner.RunConfig(city="Rome", prompt=prompts.get_prompt("axis_focus"), workers=1)
        with provider, pytest.raises(OSError) as info:  # the summary cannot be written either
            runner.annotate_folder(images, out, provider, config)
        command = annotate_command(images, disk / "out2", server, "--workers=1")
        result = subprocess.run(command, cwd=REPO, env=run_env(), text=True, capture_output=True, timeout=120)
    assert info.value.filename == str(out / runner.SUMMARY_FILE) and info.value.errno == errno.ENOSPC
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith(f"annotate: error: cannot write {disk / 'out2'}"), result.stderr[
        -2000:
    ]
    assert "(No space left on device): free space there or give another --output_dir" in last
    assert "Traceback" not in result.stderr and "cannot write the log file" in result.stderr  # one line for the log
