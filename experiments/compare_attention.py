r"""How much do two attention sources agree? ``python -m experiments.compare_attention``.

    python -m experiments.compare_attention --a ATT_GEMINI --b ATT_GPT --output_dir OUT

Renders both answers of every image the two folders share on one fixed grid (--grid, default 24,32; points with
--sigma) and compares them: Pearson and Spearman correlation, IoU of the low-weight (< 0.5) and high-weight
(> 1.5) regions. Writes OUT/agreement.json (summary and per image) and OUT/agreement.png (a histogram of the
correlations and the 6 least-agreeing images, both maps side by side). Files in one folder only and answers
without attention ("none", unusable) on either side are skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "First attention folder.", required=True)
flags.DEFINE_string("b", None, "Second attention folder.", required=True)
flags.DEFINE_string("output_dir", None, "Where agreement.json and agreement.png go.", required=True)
flags.DEFINE_list("grid", ["24", "32"], "Height,width of the grid the maps are rendered on.")
flags.DEFINE_float("sigma", 0.2, "RBF width of point answers (normalized image units).", lower_bound=1e-3)
flags.DEFINE_bool("grid_interpolate", False, "Bilinear grid answers instead of sharp cells.")
flags.DEFINE_integer("num_worst", 6, "Least-agreeing images drawn in the figure.", lower_bound=0)
flags.register_validator(
    "grid", lambda v: len(v) == 2 and all(s.isdigit() and int(s) >= 2 for s in v), "--grid must be two integers >= 2"
)

JSON_FILE, FIGURE_FILE = "agreement.json", "agreement.png"


def plot_agreement(path: Path, agreement, label_a: str, label_b: str, num_worst: int = 6) -> None:
    """A histogram of the per-image Pearson and Spearman correlations, then the ``num_worst`` least-agreeing
    images: map A above map B (same colour scale, [0, 2], 1 = neutral)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = agreement.least_agreeing(num_worst)
    cols = max(1, len(worst))
    fig = plt.figure(figsize=(max(8, 2.6 * cols), 8.5))
    grid = fig.add_gridspec(3, cols, height_ratios=[1.2, 1, 1])
    hist = fig.add_subplot(grid[0, :])
    for name in ("pearson", "spearman"):
        values = [r[name] for r in agreement.images if r[name] is not None]
        hist.hist(values, bins=20, range=(-1, 1), alpha=0.6, label=f"{name} ({len(values)} images)")
    hist.set_xlabel("per-image correlation of the rendered maps")
    hist.set_ylabel("images")
    hist.legend()
    hist.set_title(f"A = {label_a}\nB = {label_b}", fontsize=9)
    for c, i in enumerate(worst):
        row = agreement.images[i]
        for r, (maps, label) in enumerate(((agreement.maps_a, "A"), (agreement.maps_b, "B"))):
            ax = fig.add_subplot(grid[1 + r, c])
            ax.imshow(maps[i], vmin=0.0, vmax=2.0, cmap="RdYlGn")
            ax.set_xticks([])
            ax.set_yticks([])
            pearson = "undefined" if row["pearson"] is None else f"{row['pearson']:.2f}"
            title = f"{label}: {Path(row['file']).stem[:22]}" + (f"\nr = {pearson}" if r == 0 else "")
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from attllm_jax.attention.agreement import compare_folders
    from attllm_jax.files import atomic_write_json

    grid = (int(FLAGS.grid[0]), int(FLAGS.grid[1]))
    try:
        agreement = compare_folders(FLAGS.a, FLAGS.b, grid, FLAGS.sigma, FLAGS.grid_interpolate)
    except (OSError, ValueError) as error:
        cli.fail("compare_attention", str(error))
    out = Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = agreement.summary()
    result = {
        "a": FLAGS.a,
        "b": FLAGS.b,
        "grid": list(grid),
        "sigma": FLAGS.sigma,
        "grid_interpolate": FLAGS.grid_interpolate,
        "thresholds": {"low": "< 0.5", "high": "> 1.5"},
        **summary,
        "skipped_files": agreement.skipped,
        "images": agreement.images,
    }
    atomic_write_json(out / JSON_FILE, result)
    plot_agreement(out / FIGURE_FILE, agreement, FLAGS.a, FLAGS.b, FLAGS.num_worst)
    print(json.dumps({"compared": summary["compared"], "skipped": summary["skipped"]}))
    for name, stat in summary["statistics"].items():
        mean = f"{stat['mean']:.3f}" if "mean" in stat else "-"
        print(f"{name}: mean {mean} over {stat['defined']} images ({stat['undefined']} undefined)")
    print(f"agreement: {out / JSON_FILE}, {out / FIGURE_FILE}")


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-compare-attention``, also ``python -m experiments.compare_attention``)."""
    cli.run_command("compare_attention", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
