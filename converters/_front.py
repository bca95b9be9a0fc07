"""The tail every converter script shares: quiet logs, convert, save, and a one- or two-line report.

By default a conversion prints two lines (what was written, and where the weights came from); ``--verbosity 1``
also shows the resolved flags, the full ``config.json`` and the libraries' INFO lines.
"""

from collections.abc import Callable

from absl import app, flags, logging

from attllm_jax.convert import ConvertOptions, convert_to_directory
from experiments import cli

FLAGS = flags.FLAGS

flags.DEFINE_bool(
    "random_weights",
    False,
    "Offline trial: convert an upstream-shaped state dict with random weights (CNN families: --backbone, default "
    "ResNet18, and --fc_output_dim, default 512; the others as released) instead of --checkpoint or a download. "
    "The model's provenance says its weights are random.",
)
flags.DEFINE_integer("random_seed", 0, "Seed of --random_weights.")


def convert_and_report(family: str, flag_names: tuple[str, ...], options: ConvertOptions) -> None:
    """Converts ``--checkpoint`` (or the published file ``options`` name) of ``family`` into ``--output``.

    Args:
        family: the model family.
        flag_names: the script's flags, logged at INFO.
        options: the family's options dataclass (``CnnConvertOptions``, ``SaladConvertOptions``, ...).

    A bad input ends the script with one ``convert: error: ...`` line and exit status 1.
    """
    if FLAGS.random_weights and FLAGS.checkpoint:
        raise app.UsageError("give --checkpoint or --random_weights, not both")
    logging.info("flags: %s", {k: FLAGS[k].value for k in (*flag_names, "random_weights", "random_seed")})
    try:
        if FLAGS.random_weights:
            from attllm_jax.convert.random_weights import convert_random

            spec = convert_random(family, FLAGS.output, FLAGS.random_seed, options)
        else:
            spec = convert_to_directory(family, FLAGS.output, FLAGS.checkpoint, FLAGS.cache_dir, options)
    except (ValueError, OSError, RuntimeError) as e:
        cli.fail("convert", str(e))  # one message naming the bad input, no traceback
    logging.info("wrote %s: %s", FLAGS.output, spec.to_dict())
    source = spec.provenance
    origin = f"published file {source.published_file}" if source.published_file else "not a published file"
    print(f"wrote {FLAGS.output}: {spec.describe()}")
    if source.weights:
        origin = f"{origin}; weights {source.weights}"
    print(f"weights: {source.source_file} (sha256 {source.source_sha256[:12]}..., {origin})")


def run(main: Callable[[list[str]], None], doc: str) -> None:
    """Runs a converter script's ``main`` (the script is ``__main__``) with the commands' conventions
    (:mod:`experiments.cli`): ``--help`` lists its flags and exits 0, a flag error is one ``convert: error:`` line."""

    def checked(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        main(argv)

    cli.run_command("convert", checked, cli.module_help(doc, "__main__", __name__))
