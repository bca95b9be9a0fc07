"""Data-parallel extraction on 8 virtual CPU devices equals the one-device store (run in a subprocess)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.data.dataset import load_image_set
from attllm_jax.evaluation import random_cosplace_model
from attllm_jax.evaluation.extract import build_database_store
from attllm_jax.retrieval.store import read_store
from tests.test_eval_resume import _dataset

REPO = Path(__file__).resolve().parents[1]
DRIVER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from attllm_jax.data.dataset import load_image_set
    from attllm_jax.evaluation import random_cosplace_model
    from attllm_jax.evaluation.extract import build_database_store
    assert jax.device_count() == 8, jax.devices()
    model = random_cosplace_model(seed=0)
    # record the parameter arrays the jitted forward actually receives (not only what model.net holds)
    received = []
    jitted = model._jit_features
    def recording(state, images):
        received.append({(str(tuple(leaf.sharding.spec)), len(leaf.sharding.device_set))
                         for leaf in jax.tree_util.tree_leaves(state)})
        return jitted(state, images)
    model._jit_features = recording
    store, summary = build_database_store(model, load_image_set(sys.argv[2]), sys.argv[3], chunk_size=5,
                                          batch_size=3, image_size=64, num_workers=1)
    store.close()
    leaves = jax.tree_util.tree_leaves(__import__("flax").nnx.state(model.net))
    shardings = {str(tuple(leaf.sharding.spec)) for leaf in leaves}
    devices = {len(leaf.sharding.device_set) for leaf in leaves}
    print("PARAMS", shardings, devices, summary.images_computed)
    print("FORWARD", len(received), set.union(*received))
    """
)


@pytest.mark.slow
def test_eight_devices_extract_the_one_device_store(tmp_path):
    database, _ = _dataset(tmp_path / "data")
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(REPO), str(database), str(tmp_path / "store8")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # parameters replicated on all 8 devices (PartitionSpec()), batches of 3 padded to 8
    assert "PARAMS {'()'} {8} 13" in result.stdout, result.stdout
    # each of the 3 forward calls (chunks of 5, 5, 3 images, rows padded to 8) got parameters replicated on all 8
    assert "FORWARD 3 {('()', 8)}" in result.stdout, result.stdout
    store, _ = build_database_store(
        random_cosplace_model(seed=0), load_image_set(database), tmp_path / "store1", chunk_size=5, batch_size=3,
        image_size=64, num_workers=1,
    )  # fmt: skip
    store.close()
    one, valid1, paths1 = read_store(tmp_path / "store1")
    eight, valid8, paths8 = read_store(tmp_path / "store8")
    assert paths1 == paths8 and valid1.all() and valid8.all()
    np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=0, atol=1e-6)
