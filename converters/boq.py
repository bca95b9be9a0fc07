"""Converts a BoQ checkpoint (DINOv2 or ResNet-50 backbone) into an attllm_jax model directory.

    python converters/boq.py --checkpoint dinov2_12288.pth --output DIR
    python converters/boq.py --checkpoint resnet50_16384.pth --output DIR
    python converters/boq.py --backbone=resnet50 --output DIR     # downloads the released file of that backbone

The backbone, the widths, the queries, the blocks and the output dimension are inferred from the tensor shapes;
--backbone, when given, is checked against them. Evaluation transform: normalize, then an antialiased bilinear resize
of the float image to 322x322 (DINOv2) or 384x384 (ResNet-50), as VPR-methods-evaluation. Load the result with
``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report, run
from absl import flags

from attllm_jax.convert.boq import BoQConvertOptions
from experiments import flagdefs

BACKBONES = {"dinov2": "dinov2_vitb14", "dinov2_vitb14": "dinov2_vitb14", "resnet50": "resnet50"}

flags.DEFINE_string("checkpoint", None, "Source .pth/.safetensors; omit to download the file of --backbone.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_enum(
    "backbone", None, list(BACKBONES), "Expected backbone, checked against the shapes; needed to download."
)
flags.DEFINE_list("image_size", None, "Evaluation HEIGHT,WIDTH (default 322,322 for DINOv2, 384,384 for ResNet-50).")
flagdefs.define("cache_dir")
FLAGS = flags.FLAGS


@flags.validator("image_size", message="--image_size must be two positive integers HEIGHT,WIDTH")
def _check_image_size(value: list[str] | None) -> bool:
    return value is None or (len(value) == 2 and all(v.strip().isdigit() and int(v) > 0 for v in value))


def main(argv: list[str]) -> None:
    del argv
    image_size = None if FLAGS.image_size is None else tuple(int(v) for v in FLAGS.image_size)
    backbone = None if FLAGS.backbone is None else BACKBONES[FLAGS.backbone]
    names = ("checkpoint", "output", "backbone", "image_size", "cache_dir")
    convert_and_report("boq", names, BoQConvertOptions(backbone=backbone, image_size=image_size))


if __name__ == "__main__":
    run(main, __doc__)
