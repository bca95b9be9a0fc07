"""Converts a DINOv2 + SALAD PyTorch checkpoint into an attllm_jax model directory (orbax state + config.json).

    python converters/salad.py --checkpoint dino_salad.ckpt --output DIR
    python converters/salad.py --output DIR          # downloads serizba/salad's released dino_salad.ckpt
    python converters/salad.py --checkpoint cliquemining.ckpt --output DIR   # CliqueMining: the same architecture
                                                     # (its file is on Google Drive: download it by hand)

The DINOv2 architecture and the SALAD head sizes are inferred from the tensor shapes; --backbone, when given, is
checked against them. Load the result with ``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report, run
from absl import flags

from attllm_jax.convert.salad import SaladConvertOptions
from experiments import flagdefs

flags.DEFINE_string("checkpoint", None, "Source .ckpt/.pth/.pt/.safetensors; omit to download dino_salad.ckpt.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected DINOv2 backbone (e.g. dinov2_vitb14), checked against the shapes.")
flags.DEFINE_integer(
    "num_heads", None, "Attention heads, only for widths that are not a multiple of 64.", lower_bound=1
)
flags.DEFINE_list("image_size", ["322", "322"], "Evaluation HEIGHT,WIDTH (multiples of 14).")
flagdefs.define("cache_dir")
FLAGS = flags.FLAGS


@flags.validator("image_size", message="--image_size must be two positive integers HEIGHT,WIDTH")
def _check_image_size(value: list[str]) -> bool:
    return len(value) == 2 and all(v.strip().isdigit() and int(v) > 0 for v in value)


def main(argv: list[str]) -> None:
    del argv
    names = ("checkpoint", "output", "backbone", "num_heads", "image_size", "cache_dir")
    image_size = [int(v) for v in FLAGS.image_size]
    options = SaladConvertOptions(backbone=FLAGS.backbone, num_heads=FLAGS.num_heads, image_size=image_size)
    convert_and_report("salad", names, options)


if __name__ == "__main__":
    run(main, __doc__)
