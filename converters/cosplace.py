"""Converts a CosPlace PyTorch checkpoint into an attllm_jax model directory (orbax state + config.json).

    python converters/cosplace.py --checkpoint ResNet50_2048_cosplace.pth --output DIR
    python converters/cosplace.py --backbone ResNet50 --fc_output_dim 2048 --output DIR   # downloads the release

The backbone and descriptor dimension are inferred from the tensor shapes; --backbone / --fc_output_dim, when
given, are checked against them. Load the result with ``attllm_jax.load_model(DIR)``.
"""

import sys

from absl import app, flags, logging

from attllm_jax.convert.cosplace import convert_cnn_to_directory
from attllm_jax.convert.download import DEFAULT_CACHE_DIR

FAMILY = "cosplace"

flags.DEFINE_string("checkpoint", None, "Source .pth/.pt/.ckpt/.safetensors; omit to download the published file.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected backbone (ResNet18/50/101/152, VGG16); needed to download.")
flags.DEFINE_integer("fc_output_dim", None, "Expected descriptor dimension; needed to download.", lower_bound=1)
flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE_DIR), "Where downloaded checkpoints are kept.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    logging.info(
        "flags: %s", {k: FLAGS[k].value for k in ("checkpoint", "output", "backbone", "fc_output_dim", "cache_dir")}
    )
    try:
        config = convert_cnn_to_directory(
            FAMILY, FLAGS.output, FLAGS.checkpoint, FLAGS.backbone, FLAGS.fc_output_dim, FLAGS.cache_dir
        )
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")  # one message naming the bad input, no traceback
    logging.info("wrote %s: %s", FLAGS.output, config)
    print(f"wrote {FLAGS.output}: {config['family']} {config['backbone']} dim {config['descriptor_dim']}")


if __name__ == "__main__":
    app.run(main)
