"""Run a Python script in a subprocess under a bounded address space (``ulimit -v``), always killed at the end."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bounded(script: str, *args: str, address_space: int, timeout_s: float = 300.0) -> dict:
    """Runs ``script`` with ``args`` under RLIMIT_AS = ``address_space`` bytes; returns the JSON of its last line.

    Start the script with :data:`PEAK_RSS` and end it with ``report({...})``: its peak RSS is added in MiB.
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        cwd=REPO,
        env=env,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"exit {process.returncode}\n{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


# The peak is VmHWM, the high-water mark of this process's own address space. ``ru_maxrss`` is not: Linux
# carries the forking parent's resident size into the child across exec, so a child of a 1 GB pytest worker
# reports at least 1 GB whatever it did itself.
PEAK_RSS = """
import json
def _peak_rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
def report(data):
    data["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(data))
"""
