"""Shared absl front end of the CosPlace and EigenPlaces converters (identical checkpoint layouts)."""

import sys

from absl import app, flags, logging

from attllm_jax.convert import convert_to_directory
from attllm_jax.convert.download import DEFAULT_CACHE_DIR

flags.DEFINE_string("checkpoint", None, "Source .pth/.pt/.ckpt/.safetensors; omit to download the published file.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected backbone (ResNet18/50/101/152, VGG16); needed to download.")
flags.DEFINE_integer("fc_output_dim", None, "Expected descriptor dimension; needed to download.", lower_bound=1)
flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE_DIR), "Where downloaded checkpoints are kept.")
FLAGS = flags.FLAGS


def run(family: str) -> None:
    """Runs the converter for ``family`` ("cosplace" or "eigenplaces") with the flags above.

    The scripts adopt these flags as their key flags (``flags.adopt_module_key_flags``), so ``--help`` lists them.
    """
    app.run(lambda argv: _main(family))


def _main(family: str) -> None:
    logging.info(
        "flags: %s", {k: FLAGS[k].value for k in ("checkpoint", "output", "backbone", "fc_output_dim", "cache_dir")}
    )
    try:
        spec = convert_to_directory(
            family,
            FLAGS.output,
            FLAGS.checkpoint,
            FLAGS.cache_dir,
            backbone=FLAGS.backbone,
            fc_output_dim=FLAGS.fc_output_dim,
        )
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")  # one message naming the bad input, no traceback
    logging.info("wrote %s: %s", FLAGS.output, spec.to_dict())
    print(f"wrote {FLAGS.output}: {spec.describe()}")
