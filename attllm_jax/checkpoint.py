"""Saving and restoring converted models: an orbax checkpoint of the NNX state plus ``config.json``.

Layout of a model directory::

    DIR/config.json   family, backbone, dims, preprocessing, source sha256, converter version
    DIR/state/        orbax checkpoint of the network's nnx state (Params and BatchStats)

Restoring builds the abstract network from the config with ``nnx.eval_shape`` and lets orbax fill it, so no
torch (and no random initialization) is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from attllm_jax.models import registry
from attllm_jax.models.vpr import VPRModel

CONFIG_FILE = "config.json"
STATE_DIR = "state"


def save_model(directory: str | os.PathLike, net: nnx.Module, config: dict) -> Path:
    """Writes ``net``'s state and ``config`` to ``directory`` (created; an existing model there is replaced).

    Args:
        directory: output directory.
        net: the network (e.g. from a converter).
        config: JSON-serializable dict; must name the ``family`` so :func:`load_model` can rebuild the net.

    Returns:
        The absolute directory path.

    Raises:
        ValueError: ``config`` lacks ``family`` or is not JSON-serializable.
    """
    directory = Path(directory).absolute()
    if "family" not in config:
        raise ValueError("config must name the model 'family' (cosplace, eigenplaces or salad)")
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"config is not JSON-serializable: {e}") from e
    directory.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(net)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, state, force=True)
        checkpointer.wait_until_finished()
    (directory / CONFIG_FILE).write_text(config_text + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """Reads and checks ``DIR/config.json``.

    Raises:
        FileNotFoundError: the directory or its config is missing.
        ValueError: the config is not valid JSON or not an object naming a known family.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a converted model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or str(config.get("family", "")).lower() not in registry.FAMILIES:
        family = config.get("family") if isinstance(config, dict) else None
        raise ValueError(f"{path}: 'family' must be one of {registry.FAMILIES}, got {family!r}")
    return config


def load_model(directory: str | os.PathLike) -> VPRModel:
    """Restores a model written by :func:`save_model` (a converter's output directory).

    Args:
        directory: the model directory.

    Returns:
        A :class:`VPRModel` on the default device.

    Raises:
        FileNotFoundError: missing directory, config or state.
        ValueError: malformed config, or a state that does not match the network the config describes.
    """
    directory = Path(directory).absolute()
    config = read_config(directory)
    state_path = directory / STATE_DIR
    if not state_path.is_dir():
        raise FileNotFoundError(f"{state_path} not found: the checkpoint state of {directory} is missing")
    abstract = nnx.eval_shape(lambda: registry.build_net(config))
    graphdef, abstract_state = nnx.split(abstract)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)
    where = f"cannot restore {state_path} into the {config.get('family')} / {config.get('backbone')} network"
    with ocp.StandardCheckpointer() as checkpointer:
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
            raise ValueError(f"{where}: corrupt checkpoint data ({_first_line(e)})") from e
    return VPRModel(nnx.merge(graphdef, state), config)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
