"""Converts a MixVPR checkpoint (amaralibey/MixVPR, a plain state dict) into an attllm_jax model directory.

    python converters/mixvpr.py --checkpoint "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt" --output DIR

The released files are on Google Drive (see the registry's URLs); download one by hand. The ResNet-50 blocks, the
mixer and the projections are inferred from the tensor shapes; --descriptor_dim, when given, is checked against
them. Evaluation transform: ToTensor, Normalize, then an antialiased bilinear resize of the float image to 320 x 320,
which is what VPR-methods-evaluation's MixVPR model does to its input. Load the result with
``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report
from absl import app, flags

from attllm_jax.convert.download import DEFAULT_CACHE_DIR
from attllm_jax.convert.mixvpr import MixVPRConvertOptions

flags.DEFINE_string("checkpoint", None, "Source .ckpt/.pth/.safetensors (the released files are on Google Drive).")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_enum("descriptor_dim", None, ["128", "512", "4096"], "Expected descriptor dimension, checked.")
flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE_DIR), "Where downloaded checkpoints are kept.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    dim = None if FLAGS.descriptor_dim is None else int(FLAGS.descriptor_dim)
    convert_and_report(
        "mixvpr", ("checkpoint", "output", "descriptor_dim", "cache_dir"), MixVPRConvertOptions(descriptor_dim=dim)
    )


if __name__ == "__main__":
    app.run(main)
