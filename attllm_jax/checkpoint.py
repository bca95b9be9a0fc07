"""Saving and restoring converted models: an orbax checkpoint of the NNX state plus ``config.json``.

Layout of a model directory::

    DIR/config.json   the ModelSpec (format 2: family, architecture, preprocess, provenance); see models/spec.py
    DIR/state/        orbax checkpoint of the network's nnx state (Params and BatchStats)

Restoring builds the abstract network from the spec with ``nnx.eval_shape`` and lets orbax fill it, so no
torch (and no random initialization) is needed. Directories written by release 0.1.0 (a flat config.json) load too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from attllm_jax.errors import CoordinationError
from attllm_jax.files import atomic_write_json
from attllm_jax.models.precision import DEFAULT_PRECISION, validate_precision
from attllm_jax.models.spec import ConfigError, ModelSpec
from attllm_jax.models.vpr import VPRModel

CONFIG_FILE = "config.json"
STATE_DIR = "state"
# orbax and absl log every save/restore step at INFO ("Finished saving checkpoint ..."); a model load is one step
# of our commands, so those lines are raised to WARNING while we call orbax (verbose=True keeps them).
_ORBAX_LOGGERS = ("absl", "orbax", "orbax.checkpoint")


@contextlib.contextmanager
def _quiet_orbax(verbose: bool = False):
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _ORBAX_LOGGERS]
    levels = [lg.level for lg in loggers]
    absl_verbosity = None
    try:
        from absl import logging as absl_logging

        absl_verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # absl is a dependency of orbax; be safe anyway
        pass
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        if absl_verbosity is not None:  # first: set_verbosity also sets the "absl" logger's level
            absl_logging.set_verbosity(absl_verbosity)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def save_model(directory: str | os.PathLike, net: nnx.Module, spec: ModelSpec, verbose: bool = False) -> Path:
    """Writes ``net``'s state and ``spec`` to ``directory`` (created; an existing model there is replaced).

    Args:
        directory: output directory.
        net: the network (e.g. from a converter).
        spec: its :class:`ModelSpec`; written to ``config.json``.
        verbose: keep orbax's INFO log lines.

    Returns:
        The absolute directory path.

    Raises:
        TypeError: ``spec`` is not a ModelSpec.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(net)
    with _quiet_orbax(verbose), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, state, force=True)
        checkpointer.wait_until_finished()
    atomic_write_json(directory / CONFIG_FILE, spec.to_dict())
    return directory


def read_spec(directory: str | os.PathLike) -> ModelSpec:
    """Reads and checks ``DIR/config.json``.

    Raises:
        FileNotFoundError: the directory or its config is missing.
        ConfigError: the config is not valid JSON, or a field is unknown, missing or invalid (the message names
            the file and the field).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a converted model directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return ModelSpec.from_dict(data, source=str(path))


def load_model(directory: str | os.PathLike, precision: str = DEFAULT_PRECISION, verbose: bool = False) -> VPRModel:
    """Restores a model written by :func:`save_model` (a converter's output directory).

    Args:
        directory: the model directory.
        precision: ``"float32"`` (default: highest matmul precision on every backend), ``"tf32"`` (the backend's
            fast float32 products) or ``"bfloat16"`` (bfloat16 backbone); see :mod:`attllm_jax.models.precision`.
        verbose: keep orbax's INFO log lines.

    Returns:
        A :class:`VPRModel` on the default device.

    Raises:
        FileNotFoundError: missing directory, config or state.
        ConfigError: malformed config.json.
        ValueError: an unknown ``precision`` (checked first), a state that does not match the network the config
            describes, or corrupt state data.
    """
    precision = validate_precision(precision)
    directory = Path(directory).absolute()
    spec = read_spec(directory)
    state_path = directory / STATE_DIR
    if not state_path.is_dir():
        raise FileNotFoundError(f"{state_path} not found: the checkpoint state of {directory} is missing")
    abstract = nnx.eval_shape(lambda: spec.build())
    graphdef, abstract_state = nnx.split(abstract)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)
    where = f"cannot restore {state_path} into the {spec.family} / {spec.backbone} network"
    with _quiet_orbax(verbose), _local_checkpointer() as checkpointer:
        try:
            saved = _saved_shapes(checkpointer, state_path)
        except Exception as e:  # orbax raises several types for unreadable metadata
            raise ValueError(f"{where}: unreadable checkpoint metadata ({_first_line(e)})") from e
        problems = _compare_shapes(saved, _expected_shapes(abstract_state))
        if problems:
            raise ValueError(f"{where} its config describes (config edited?): " + "; ".join(problems))
        try:
            state = checkpointer.restore(state_path, abstract_state)
        except Exception as e:  # corrupt or truncated array data
            if _is_coordination_failure(e):
                raise CoordinationError(
                    f"restoring {state_path} on process {jax.process_index()} met a failure of the multi-process "
                    f"coordination, not of the checkpoint ({_first_line(e)})"
                ) from e
            raise ValueError(f"{where}: corrupt checkpoint data ({_first_line(e)})") from e
    return VPRModel(nnx.merge(graphdef, state), spec, precision)


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer that restores on this process alone: no barrier, no collective with the other processes.

    By default orbax synchronizes every process of a ``jax.distributed`` run around a restore (a device
    collective through gloo on the CPU, with a 30 s rendezvous): processes that reach their model load further
    apart than that died with a gloo DEADLINE_EXCEEDED. Every process reads the whole (small) model itself, onto
    its own first device, so none needs the others.
    """
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


_COORDINATION_MARKERS = ("DEADLINE_EXCEEDED", "Gloo", "gloo", "barrier", "coordination service", "GetKeyValue")


def _is_coordination_failure(e: Exception) -> bool:
    """Whether a restore failed in the processes' coordination (a timeout, gloo), not in reading the data."""
    return jax.process_count() > 1 and any(marker in str(e) for marker in _COORDINATION_MARKERS)


def _first_line(e: Exception) -> str:
    """The first line of ``e``'s message, without the tensorstore spec dump orbax appends to read errors."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(" See full TensorStore details")[0]


def _saved_shapes(checkpointer: ocp.StandardCheckpointer, path: Path) -> dict[str, tuple[int, ...]]:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    shapes = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys]
        if names and names[-1] == "value":  # nnx Variables are saved as {"value": array}
            names = names[:-1]
        shapes["/".join(names)] = tuple(leaf.shape)
    if not shapes:
        raise ValueError("it lists no arrays")
    return shapes


def _expected_shapes(abstract_state) -> dict[str, tuple[int, ...]]:
    return {"/".join(str(p) for p in path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(abstract_state)}


def _compare_shapes(saved: dict, expected: dict, limit: int = 10) -> list[str]:
    problems = [f"missing {k} {list(v)}" for k, v in expected.items() if k not in saved]
    problems += [f"unexpected {k} {list(v)}" for k, v in saved.items() if k not in expected]
    problems += [
        f"{k}: saved {list(saved[k])}, expected {list(v)}" for k, v in expected.items() if k in saved and saved[k] != v
    ]
    if len(problems) > limit:
        problems = problems[:limit] + [f"... {len(problems) - limit} more"]
    return problems
