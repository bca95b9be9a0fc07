"""Tests for attllm_jax.convert.common (strict state-dict reading and module filling) and convert.download."""

import hashlib
import http.server
import socket
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from attllm_jax.convert.common import (
    ConversionError,
    TensorSource,
    fill_module,
    read_state_dict,
    sha256_file,
)
from attllm_jax.convert.download import DownloadError, fetch_published
from attllm_jax.models.registry import PublishedCheckpoint


class Tiny(nnx.Module):
    """A conv + batch norm + linear: Params and BatchStats under nested paths."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.head = nnx.List([nnx.Linear(4, 2, rngs=rngs)])


def tiny_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.float32
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(f),
        "conv.bias": rng.standard_normal(4).astype(f),
        "bn.weight": rng.standard_normal(4).astype(f),
        "bn.bias": rng.standard_normal(4).astype(f),
        "bn.running_mean": rng.standard_normal(4).astype(f),
        "bn.running_var": rng.random(4).astype(f) + 0.5,
        "bn.num_batches_tracked": np.array(7, np.int64),
        "head.0.weight": rng.standard_normal((2, 4)).astype(f),
        "head.0.bias": rng.standard_normal(2).astype(f),
    }


def tiny_values(source: TensorSource) -> dict:
    conv = lambda w: np.transpose(w, (2, 3, 1, 0))  # noqa: E731
    return {
        "conv/kernel": source.take("conv.weight", conv),
        "conv/bias": source.take("conv.bias"),
        "bn/scale": source.take("bn.weight"),
        "bn/bias": source.take("bn.bias"),
        "bn/mean": source.take("bn.running_mean"),
        "bn/var": source.take("bn.running_var"),
        "head/0/kernel": source.take("head.0.weight", np.transpose),
        "head/0/bias": source.take("head.0.bias"),
    }


def snapshot(module: nnx.Module) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module))}


# ------------------------------------------------------------------------------------------------ sha256


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ reading


def test_read_safetensors_roundtrip_and_module_prefix(tmp_path):
    sd = {f"module.{k}": v for k, v in tiny_state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    out = read_state_dict(path)
    assert set(out) == set(tiny_state_dict())
    np.testing.assert_array_equal(out["conv.weight"], sd["module.conv.weight"])


@pytest.mark.torch
@pytest.mark.parametrize("wrap", ["plain", "lightning"])
def test_read_torch_plain_and_lightning(tmp_path, wrap):
    import torch

    sd = {k: torch.from_numpy(v) for k, v in tiny_state_dict().items()}
    sd["half"] = torch.ones(3, dtype=torch.bfloat16)
    obj = sd if wrap == "plain" else {"state_dict": sd, "epoch": 3, "global_step": 10}
    path = tmp_path / "m.ckpt"
    torch.save(obj, path)
    out = read_state_dict(path)
    assert set(out) == set(sd)
    np.testing.assert_array_equal(out["bn.running_var"], tiny_state_dict()["bn.running_var"])
    assert out["half"].dtype == np.float32


def test_read_missing_file_names_it(tmp_path):
    with pytest.raises(ConversionError, match="not found.*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


def test_read_unknown_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ConversionError, match="unknown checkpoint type '.npz'"):
        read_state_dict(path)


@pytest.mark.torch
def test_read_truncated_torch_file_names_it(tmp_path):
    import torch

    full = tmp_path / "full.pth"
    torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict().items()}, full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.pth"):
        read_state_dict(cut)


def test_read_corrupt_safetensors_names_it(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConversionError, match="bad.safetensors"):
        read_state_dict(path)


@pytest.mark.torch
def test_read_refuses_pickled_code_and_non_state_dicts(tmp_path):
    import collections

    import torch

    code = tmp_path / "code.pth"
    torch.save(collections.Counter(a=1), code)  # an arbitrary class: weights_only refuses to unpickle it
    with pytest.raises(ConversionError, match="code.pth"):
        read_state_dict(code)
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_sd)
    with pytest.raises(ConversionError, match="does not hold a state dict"):
        read_state_dict(not_sd)
    mixed = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(2), "step": 3}, mixed)
    with pytest.raises(ConversionError, match="non-tensor entries: 'step'"):
        read_state_dict(mixed)


# ------------------------------------------------------------------------------------------------ TensorSource


def test_tensor_source_records_taken_missing_and_ignored():
    source = TensorSource({"a.w": np.ones(2), "a.num_batches_tracked": np.array(1), "b": np.zeros(3)})
    assert source.take("a.w").shape == (2,)
    assert source.take("zzz") is None
    assert source.problems == ["missing source tensor 'zzz'"]
    assert source.unused() == ["b"]
    assert source.is_ignored("x.y.num_batches_tracked") and not source.is_ignored("num_batches")
    assert TensorSource({"k": np.ones(1)}, ignore=("k*",)).unused() == []


def test_tensor_source_origin_survives_transform():
    source = TensorSource({"w": np.ones((2, 3))})
    value = source.take("w", np.transpose)
    assert source.origin(value) == "source 'w' [2, 3]"
    assert source.origin(np.ones(1)) is None


# ------------------------------------------------------------------------------------------------ fill_module


@pytest.mark.parametrize("abstract", [False, True])
def test_fill_module_fills_every_variable(abstract):
    make = lambda: Tiny(nnx.Rngs(0))  # noqa: E731
    module = nnx.eval_shape(make) if abstract else make()
    sd = tiny_state_dict()
    source = TensorSource(sd)
    fill_module(module, tiny_values(source), source)
    np.testing.assert_array_equal(module.conv.kernel[...], np.transpose(sd["conv.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(module.bn.var[...], sd["bn.running_var"])
    np.testing.assert_array_equal(module.head[0].kernel[...], sd["head.0.weight"].T)
    x = jnp.ones((1, 5, 5, 3))
    assert module.head[0](module.bn(module.conv(x)).mean((1, 2))).shape == (1, 2)


def test_fill_module_reports_every_problem_at_once_and_leaves_module_untouched():
    module = Tiny(nnx.Rngs(0))
    before = snapshot(module)
    sd = tiny_state_dict()
    del sd["bn.running_mean"]  # missing source tensor
    sd["extra.weight"] = np.zeros((5, 5), np.float32)  # never consumed
    sd["head.0.bias"] = np.zeros(3, np.float32)  # wrong shape
    source = TensorSource(sd)
    values = tiny_values(source)
    del values["conv/bias"]  # a target the converter forgot
    source.take("conv.bias")
    values["head/1/kernel"] = np.zeros((1,), np.float32)  # no such target
    with pytest.raises(ConversionError) as err:
        fill_module(module, values, source)
    message = str(err.value)
    assert "5 problem(s)" in message
    assert "missing source tensor 'bn.running_mean'" in message
    assert "unused source tensor 'extra.weight' [5, 5]" in message
    assert "shape mismatch for 'head/0/bias': expected [2], got [3] (source 'head.0.bias' [3])" in message
    assert "target 'conv/bias' [4] was not filled" in message
    assert "value for unknown target 'head/1/kernel' [1]" in message
    after = snapshot(module)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_fill_module_rejects_integer_values_for_float_targets():
    module = Tiny(nnx.Rngs(0))
    sd = tiny_state_dict()
    sd["conv.bias"] = np.arange(4, dtype=np.int32)
    source = TensorSource(sd)
    with pytest.raises(ConversionError, match="dtype mismatch for 'conv/bias': expected float32, got int32"):
        fill_module(module, tiny_values(source), source)


def test_fill_module_casts_float64_to_float32():
    module = Tiny(nnx.Rngs(0))
    sd = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in tiny_state_dict().items()}
    source = TensorSource(sd)
    fill_module(module, tiny_values(source), source)
    assert module.conv.kernel[...].dtype == jnp.float32


# ------------------------------------------------------------------------------------------------ download


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests = 0
    truncate = False

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests += 1
        if self.path != "/release/model.pth":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload) * (2 if self.truncate else 1)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    handler = type("Handler", (_Handler,), {"payload": np.random.default_rng(0).bytes(300_000), "requests": 0})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def _entry(url: str) -> PublishedCheckpoint:
    return PublishedCheckpoint("cosplace", "resnet18", 32, "model.pth", url)


def test_fetch_published_downloads_records_sha_and_caches(server, tmp_path, capsys):
    base, handler = server
    import sys

    path = fetch_published(_entry(f"{base}/release/model.pth"), tmp_path / "cache", progress=sys.stderr)
    assert path.read_bytes() == handler.payload
    digest = hashlib.sha256(handler.payload).hexdigest()
    assert (tmp_path / "cache" / "model.pth.sha256").read_text().split()[0] == digest
    assert "downloading model.pth" in capsys.readouterr().err
    again = fetch_published(_entry(f"{base}/release/model.pth"), tmp_path / "cache", progress=None)
    assert again == path and handler.requests == 1  # served from the cache
    path.write_bytes(b"tampered")  # the recorded digest no longer matches: fetched again
    fetch_published(_entry(f"{base}/release/model.pth"), tmp_path / "cache", progress=None)
    assert handler.requests == 2 and path.read_bytes() == handler.payload


def test_fetch_published_http_error(server, tmp_path):
    base, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_published(_entry(f"{base}/missing.pth"), tmp_path, progress=None)
    assert not list(tmp_path.iterdir())


def test_fetch_published_incomplete_transfer_leaves_nothing(server, tmp_path):
    base, handler = server
    handler.truncate = True
    with pytest.raises(DownloadError, match="cannot download .*model.pth"):
        fetch_published(_entry(f"{base}/release/model.pth"), tmp_path, timeout=5, progress=None)
    assert not list(tmp_path.iterdir())


def test_fetch_published_offline_one_line_message(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        fetch_published(_entry(f"http://127.0.0.1:{port}/model.pth"), tmp_path, timeout=5, progress=None)
    assert "\n" not in str(err.value) and "offline?" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
