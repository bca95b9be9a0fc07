"""Converts an ImAge checkpoint (Lu-Feng/ImAge) into an attllm_jax model directory (orbax state + config.json).

    python converters/image4vpr.py --checkpoint ImAge_Merged.pth --output DIR
    python converters/image4vpr.py --output DIR      # downloads ImAge_Merged.pth (GitHub release v1.0.0)

The file is the training checkpoint ``{"model_state_dict": ...}`` of a DataParallel model (``module.`` keys); the
DINOv2 architecture and the number of aggregation tokens are inferred from the shapes, the block they enter before
is --insertion_block (upstream's freeze_te, 8; not in the weights). The model evaluates 322 x 322 images as
upstream's test transform does. Load the result with ``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report
from absl import app, flags

from attllm_jax.convert.download import DEFAULT_CACHE_DIR
from attllm_jax.convert.image4vpr import ImAgeConvertOptions

flags.DEFINE_string("checkpoint", None, "Source .pth; omit to download ImAge_Merged.pth.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected DINOv2 backbone (dinov2_vitb14_reg), checked against the shapes.")
flags.DEFINE_integer(
    "num_heads", None, "Attention heads, only for widths that are not a multiple of 64.", lower_bound=1
)
flags.DEFINE_integer(
    "insertion_block", 8, "0-based block the aggregation tokens enter before (freeze_te).", lower_bound=1
)
flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE_DIR), "Where downloaded checkpoints are kept.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    names = ("checkpoint", "output", "backbone", "num_heads", "insertion_block", "cache_dir")
    convert_and_report(
        "image4vpr",
        names,
        ImAgeConvertOptions(backbone=FLAGS.backbone, num_heads=FLAGS.num_heads, insertion_block=FLAGS.insertion_block),
    )


if __name__ == "__main__":
    app.run(main)
