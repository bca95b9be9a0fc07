"""Converts the NetVLAD release (hloc's MATLAB struct ``Pitts30K_struct.mat``) into an attllm_jax model directory.

    python converters/netvlad.py --checkpoint Pitts30K_struct.mat --output DIR
    python converters/netvlad.py --output DIR                          # downloads Pitts30K_struct.mat (hloc)
    python converters/netvlad.py --descriptor_dim 32768 --output DIR   # the VLAD vector, without the whitening

The struct is read with scipy (no PyTorch needed): VGG-16 conv5_3, the VLAD layer (64 clusters; the file's centres
are negated back), the PCA whitening (4096-d, the default) and the mean pixel the network subtracts. Evaluation
transform: VPR-methods-evaluation's, ToTensor and ImageNet Normalize at the image's own size; the network maps that
back to 0-255 RGB minus the file's mean pixel. Load the result with ``attllm_jax.load_model(DIR)``.
"""

from _front import convert_and_report
from absl import app, flags

from attllm_jax.convert.download import DEFAULT_CACHE_DIR
from attllm_jax.convert.netvlad import NetVLADConvertOptions

flags.DEFINE_string("checkpoint", None, "Source .mat struct; omit to download Pitts30K_struct.mat.")
flags.DEFINE_string("output", None, "Output model directory.", required=True)
flags.DEFINE_enum(
    "descriptor_dim", None, ["4096", "32768"], "4096: PCA-whitened (the default); 32768: the VLAD vector."
)
flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE_DIR), "Where downloaded checkpoints are kept.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    names = ("checkpoint", "output", "descriptor_dim", "cache_dir")
    dim = None if FLAGS.descriptor_dim is None else int(FLAGS.descriptor_dim)
    if dim is None and FLAGS.checkpoint is None:
        dim = 4096  # names the one published file to download; a given file is whitened when it can be
    convert_and_report("netvlad", names, NetVLADConvertOptions(descriptor_dim=dim))


if __name__ == "__main__":
    app.run(main)
