"""The tuning figure: recall@N against alpha on each fold's held-out queries and on all queries."""

from __future__ import annotations

import os

import numpy as np

from attllm_jax.retrieval.recall import recall_from_ranks


def plot_folds(
    path: str | os.PathLike,
    source,
    ranks: np.ndarray,
    settings,
    fold_of: np.ndarray,
    best,
    fold_choices: list[dict],
    n: int,
    title: str,
) -> None:
    """Saves a PNG with one panel per blend: recall@``n`` against the alpha grid at the best sigma.

    Args:
        path: Output PNG.
        source: The rank source (its ``recall_values``).
        ranks: ``[blends, sigmas, K, Q]`` grid first-hit ranks.
        settings: The :class:`~attllm_jax.tuning.run.TuneSettings` (alphas, sigmas, blends, folds).
        fold_of: ``[Q]`` fold of each query.
        best: The all-queries :class:`~attllm_jax.tuning.search.Setting`.
        fold_choices: Each fold's chosen setting (dicts with alpha, sigma, blend).
        n: The N plotted.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = np.asarray(settings.alphas)
    order = np.argsort(alphas)
    sigmas = np.asarray(settings.sigmas)
    s = int(np.argmin(np.abs(np.log(sigmas) - np.log(best.sigma))))
    fig, axes = plt.subplots(1, len(settings.blends), figsize=(6.4 * len(settings.blends), 4.2), dpi=120, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for b, blend in enumerate(settings.blends):
        ax = axes[0, b]
        line = ranks[b, s]

        def curve(queries, line=line):
            return np.array([recall_from_ranks(r[queries], [n])[0] for r in line])

        for f in range(settings.folds):
            held = np.flatnonzero(fold_of == f)
            color = colors[f % len(colors)]
            ax.plot(alphas[order], curve(held)[order], lw=1, color=color, alpha=0.8, label=f"fold {f} held-out")
            choice = fold_choices[f]
            if choice["blend"] == blend:
                ax.axvline(choice["alpha"], color=color, lw=0.8, ls=":")
        ax.plot(alphas[order], curve(np.arange(source.num_queries))[order], lw=2.2, color="black", label="all queries")
        if best.blend == blend:
            ax.axvline(best.alpha, color="black", lw=1.2, ls="--", label=f"best alpha {best.alpha:.3g}")
        ax.set_xlabel("alpha (attention blend)")
        ax.set_ylabel(f"recall@{n} (%)")
        ax.set_title(f"blend {blend}, sigma {sigmas[s]:g} (dotted: fold choices)", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
