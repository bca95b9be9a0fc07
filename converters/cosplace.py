"""Converts a CosPlace PyTorch checkpoint into an attllm_jax model directory (orbax state + config.json).

    python converters/cosplace.py --checkpoint ResNet50_2048_cosplace.pth --output DIR
    python converters/cosplace.py --backbone ResNet50 --fc_output_dim 2048 --output DIR   # downloads the release

The backbone and descriptor dimension are inferred from the tensor shapes; --backbone / --fc_output_dim, when
given, are checked against them. Load the result with ``attllm_jax.load_model(DIR)``.
"""

import _cnn
from absl import flags

flags.adopt_module_key_flags(_cnn)  # --help lists the flags _cnn defines

if __name__ == "__main__":
    _cnn.run("cosplace", __doc__)
