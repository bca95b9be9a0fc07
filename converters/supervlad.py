"""Converts a SuperVLAD checkpoint (Lu-Feng/SuperVLAD) into an attllm_jax model directory (orbax state + config.json).

    python converters/supervlad.py --checkpoint SuperVLAD.pth --output DIR
    python converters/supervlad.py --checkpoint 1-ClusterVLAD.pth --ghost_clusters 2 --output DIR

The release files are on Google Drive (see the registry): download them by hand. The file is the training
checkpoint ``{"model_state_dict": ...}`` of a DataParallel model (``module.`` keys); the DINOv2 architecture and
the cluster count are inferred from the shapes, the ghost count is --ghost_clusters (not in the weights). The model
evaluates 322 x 322 images as VPR-methods-evaluation does. Load the result with ``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report
from absl import app, flags

from attllm_jax.convert.download import DEFAULT_CACHE_DIR
from attllm_jax.convert.supervlad import SuperVLADConvertOptions

flags.DEFINE_string("checkpoint", None, "Source .pth (SuperVLAD.pth or 1-ClusterVLAD.pth).", required=True)
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_string("backbone", None, "Expected DINOv2 backbone (e.g. dinov2_vitb14), checked against the shapes.")
flags.DEFINE_integer(
    "num_heads", None, "Attention heads, only for widths that are not a multiple of 64.", lower_bound=1
)
flags.DEFINE_integer(
    "ghost_clusters", 1, "Ghost clusters dropped after the softmax: 1 (SuperVLAD), 2 (1-ClusterVLAD).", lower_bound=1
)
flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE_DIR), "Unused (the release files are not downloaded).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    names = ("checkpoint", "output", "backbone", "num_heads", "ghost_clusters")
    convert_and_report(
        "supervlad",
        names,
        SuperVLADConvertOptions(
            backbone=FLAGS.backbone, num_heads=FLAGS.num_heads, ghost_clusters=FLAGS.ghost_clusters
        ),
    )


if __name__ == "__main__":
    app.run(main)
