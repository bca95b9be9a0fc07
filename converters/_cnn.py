"""Shared absl front end of the CosPlace and EigenPlaces converters (identical checkpoint layouts)."""

from _front import convert_and_report
from _front import run as run_converter
from absl import flags

from attllm_jax.convert.cosplace import CnnConvertOptions
from experiments import flagdefs

flags.DEFINE_string("checkpoint", None, "Source .pth/.pt/.ckpt/.safetensors; omit to download the published file.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected backbone (ResNet18/50/101/152, VGG16); needed to download.")
flags.DEFINE_integer("fc_output_dim", None, "Expected descriptor dimension; needed to download.", lower_bound=1)
flagdefs.define("cache_dir")
FLAGS = flags.FLAGS


def run(family: str, doc: str) -> None:
    """Runs the converter for ``family`` ("cosplace" or "eigenplaces") with the flags above; ``doc`` heads --help.

    The scripts adopt these flags as their key flags (``flags.adopt_module_key_flags``), so ``--help`` lists them.
    """
    run_converter(lambda argv: _main(family, argv), doc)


def _main(family: str, argv: list[str]) -> None:
    del argv
    names = ("checkpoint", "output", "backbone", "fc_output_dim", "cache_dir")
    convert_and_report(family, names, CnnConvertOptions(FLAGS.backbone, FLAGS.fc_output_dim))
