"""Shared absl front end of the CosPlace and EigenPlaces converters (identical checkpoint layouts)."""

from _front import convert_and_report
from absl import app, flags

from attllm_jax.convert.cosplace import CnnConvertOptions
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
    names = ("checkpoint", "output", "backbone", "fc_output_dim", "cache_dir")
    convert_and_report(family, names, CnnConvertOptions(FLAGS.backbone, FLAGS.fc_output_dim))
