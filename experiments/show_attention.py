r"""Draws one attention file over its photo: the RBF (or grid) map as a heat overlay and the points with
their weights and reasoning.

    python -m experiments.show_attention --image X.jpg --attention X.json --output Z.png

Reads our attention files and the published code's per-image format alike.
"""

from absl import app, flags

from attllm_jax.attention import overlay, store, visualize
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("image", None, "The photo.", required=True)
flags.DEFINE_string("attention", None, "Its attention file (JSON).", required=True)
flags.DEFINE_string("output", None, "The PNG to write.", required=True)
flags.DEFINE_float("sigma", 0.2, "RBF width in normalized image units.", lower_bound=1e-3)
flags.DEFINE_bool("grid_interpolate", False, "Bilinear grid maps instead of sharp cells.")
flags.DEFINE_integer("max_points", 8, "N_max: points beyond it are dropped, as in evaluation.", lower_bound=1)
flags.DEFINE_integer("max_side", 1024, "Longest side of the photo drawn.", lower_bound=16)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        photo = overlay.load_photo(FLAGS.image)
        attention = store.read_attention(FLAGS.attention, max_points=FLAGS.max_points)
    except (OSError, ValueError) as e:
        cli.fail("show_attention", str(e))
    parsed = attention.parsed
    model = attention.field("model") or "?"
    prompt = attention.field("prompt_id")
    title = f"{FLAGS.image.rsplit('/', 1)[-1]}  ({model}{', ' + prompt if prompt else ''})"
    visualize.render_attention(
        photo,
        parsed,
        FLAGS.output,
        sigma=FLAGS.sigma,
        grid_interpolate=FLAGS.grid_interpolate,
        max_side=FLAGS.max_side,
        title=title,
    )
    print(f"wrote {FLAGS.output} ({parsed.kind})")


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-show-attention``, also ``python -m experiments.show_attention``)."""
    cli.run_command("show_attention", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
