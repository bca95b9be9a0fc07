"""The tail every converter script shares: quiet logs, convert, save, and a one- or two-line report.

By default a conversion prints two lines (what was written, and where the weights came from); ``--verbosity 1``
also shows the resolved flags, the full ``config.json`` and the libraries' INFO lines.
"""

import sys

from absl import flags, logging

from attllm_jax.convert import ConvertOptions, convert_to_directory
from attllm_jax.logs import quiet_library_logs

FLAGS = flags.FLAGS


def convert_and_report(family: str, flag_names: tuple[str, ...], options: ConvertOptions) -> None:
    """Converts ``--checkpoint`` (or the published file ``options`` name) of ``family`` into ``--output``.

    Args:
        family: the model family.
        flag_names: the script's flags, logged at INFO.
        options: the family's options dataclass (``CnnConvertOptions``, ``SaladConvertOptions``, ...).

    A bad input ends the script with one ``error: ...`` line and exit status 1.
    """
    quiet_library_logs(FLAGS.verbosity)
    logging.info("flags: %s", {k: FLAGS[k].value for k in flag_names})
    try:
        spec = convert_to_directory(family, FLAGS.output, FLAGS.checkpoint, FLAGS.cache_dir, options)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")  # one message naming the bad input, no traceback
    logging.info("wrote %s: %s", FLAGS.output, spec.to_dict())
    source = spec.provenance
    origin = f"published file {source.published_file}" if source.published_file else "not a published file"
    print(f"wrote {FLAGS.output}: {spec.describe()}")
    print(f"weights: {source.source_file} (sha256 {source.source_sha256[:12]}..., {origin})")
