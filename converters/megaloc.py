"""Converts a MegaLoc checkpoint into an attllm_jax model directory (orbax state + config.json).

    python converters/megaloc.py --checkpoint model.safetensors --output DIR
    python converters/megaloc.py --checkpoint megaloc.torch --output DIR     # the earlier GitHub release
    python converters/megaloc.py --output DIR      # downloads model.safetensors from huggingface.co/gberton/MegaLoc

The DINOv2 architecture, the SALAD sizes and the output dimension are inferred from the tensor shapes; --backbone,
when given, is checked against them. The model evaluates images at their own size (it rounds the sides to multiples
of 14 itself, as upstream). Load the result with ``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report, run
from absl import flags

from attllm_jax.convert.megaloc import MegaLocConvertOptions
from experiments import flagdefs

flags.DEFINE_string("checkpoint", None, "Source .safetensors/.torch/.pth; omit to download model.safetensors.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected DINOv2 backbone (e.g. dinov2_vitb14), checked against the shapes.")
flags.DEFINE_integer(
    "num_heads", None, "Attention heads, only for widths that are not a multiple of 64.", lower_bound=1
)
flagdefs.define("cache_dir")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    names = ("checkpoint", "output", "backbone", "num_heads", "cache_dir")
    convert_and_report("megaloc", names, MegaLocConvertOptions(backbone=FLAGS.backbone, num_heads=FLAGS.num_heads))


if __name__ == "__main__":
    run(main, __doc__)
