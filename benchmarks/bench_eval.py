r"""Benchmark: our evaluation vs a PyTorch reference pipeline written the way the published code works.

    python -m benchmarks.bench_eval [--num_queries 40] [--image_size 288]

Both sides evaluate the demo's synthetic flooded-street benchmark with the SAME weights (a seeded random
torchvision ResNet-18 + CosPlace GeM head, 512-d, saved with torch.save and converted with our converter) and the
same oracle attention files, on this CPU, in one process:

- ours: ``attllm_jax.evaluation.run_evaluation`` from the converted checkpoint (database into a fresh store,
  query features once, every alpha in one vmapped call, faiss exact search, all result files written);
- reference (the published VPR-AttLLM code's procedure): torch model in ``inference_mode``, database batched (32),
  then FOR EACH ALPHA every query re-read from disk and extracted alone (batch 1) with a backbone pass to learn the
  feature-map size followed by the attention forward (as its ``extract_features_with_attention`` does), faiss
  ``IndexFlatL2`` search, recall@N. Its database is extracted once (the published code caches it).

Timings are wall-clock of a cold run each (model loading, JIT compilation and image decoding included), for one
alpha (0.5) and an 11-alpha sweep (0, 0.1, ..., 1). Recall agreement between the two sides is printed too.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import flagdefs

FLAGS = flags.FLAGS
flagdefs.define("cache_dir")
flags.DEFINE_integer("num_queries", 40, "Synthetic queries (the database has 124 images).")
flags.DEFINE_integer("image_size", 288, "Shorter side both pipelines resize to (the synthetic views are 288x384).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default).")
flags.DEFINE_string("output_json", None, "Optional path for the table as JSON.")
flagdefs.define("precision")

SWEEP = tuple(round(0.1 * i, 1) for i in range(11))
RECALL_VALUES = (1, 5, 10, 20)


def _torch_model(path: Path):
    import torch

    from benchmarks.torch_baselines import TorchCosPlace, randomize_batchnorm_stats_

    torch.manual_seed(0)
    model = TorchCosPlace("ResNet18", fc_output_dim=512, gem_p=3.0)
    randomize_batchnorm_stats_(model, torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), path)


def _reference_run(pth: Path, database, queries, attention_dir: Path, alphas, positives, image_size: int) -> dict:
    """The published code's procedure in PyTorch (see the module docstring); returns recalls and timings."""
    import faiss
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from benchmarks.torch_baselines import (
        TorchCosPlace,
        torch_cosplace_with_attention,
        torch_grid_attention_map,
    )

    start = time.perf_counter()
    model = TorchCosPlace("ResNet18", fc_output_dim=512)
    model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
    model.eval()
    transform = T.Compose(
        [T.Resize(image_size, antialias=True), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )

    def load(path):
        with Image.open(path) as image:
            return transform(image.convert("RGB"))

    with torch.inference_mode():
        db = []
        for s in range(0, len(database), 32):
            batch = torch.stack([load(database.absolute(i)) for i in range(s, min(s + 32, len(database)))])
            db.append(model(batch).numpy())
        db = np.concatenate(db)
        index = faiss.IndexFlatL2(db.shape[1])
        index.add(db)
        recalls = {}
        for alpha in alphas:
            descriptors = []
            for i, rel in enumerate(queries.paths):
                image = load(queries.absolute(i))[None]
                answer_path = attention_dir / (Path(rel).stem + ".json")
                grid = json.loads(answer_path.read_text())["result"] if answer_path.exists() else None
                if alpha <= 1e-6 or grid is None:
                    descriptors.append(model(image).numpy())
                    continue
                h, w = model.backbone(image).shape[-2:]  # the published code's shape probe
                attention = torch_grid_attention_map(grid, h, w)
                descriptors.append(torch_cosplace_with_attention(model, image, attention, alpha).numpy())
            _, predictions = index.search(np.concatenate(descriptors), max(RECALL_VALUES))
            recalls[str(float(alpha))] = _recalls(predictions, positives)
    return {"seconds": time.perf_counter() - start, "recalls": recalls}


def _recalls(predictions, positives) -> dict[str, float]:
    """recall@N of the reference's predictions, with the library's recall (VPR-methods-evaluation's procedure)."""
    from attllm_jax.retrieval.recall import recall_at_n

    values = recall_at_n(predictions, positives, RECALL_VALUES)
    return {str(n): float(v) for n, v in zip(RECALL_VALUES, values, strict=True)}


def main(argv):
    del argv
    from benchmarks.torch_env import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()
    import torch

    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    from attllm_jax.checkpoint import save_model
    from attllm_jax.convert import convert_file
    from attllm_jax.data.dataset import geo_pair, load_image_set
    from attllm_jax.data.synthetic import SyntheticConfig
    from attllm_jax.evaluation import EvalConfig, run_evaluation
    from attllm_jax.evaluation.demo import prepare_demo
    from attllm_jax.retrieval.positives import find_positives

    bench, attention_dir = prepare_demo(FLAGS.cache_dir, SyntheticConfig(num_queries=FLAGS.num_queries))
    database, queries = load_image_set(bench.database), load_image_set(bench.queries)
    geo = geo_pair(database, queries)
    positives = find_positives(geo.database, geo.queries, 25.0)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    pth = work / "resnet18_512_random.pth"
    _torch_model(pth)
    net, spec = convert_file("cosplace", pth)
    checkpoint = save_model(work / "converted", net, spec)
    print(
        f"dataset: {len(database)} database, {len(queries)} queries, {FLAGS.image_size}px; torch threads "
        f"{torch.get_num_threads()}; work dir {work}"
    )

    rows = []
    for name, alphas in (("1 alpha (0.5)", (0.5,)), ("11-alpha sweep", SWEEP)):
        tag = f"{len(alphas)}a"
        t0 = time.perf_counter()
        ours = run_evaluation(
            EvalConfig(
                database_folder=str(bench.database),
                queries_folder=str(bench.queries),
                output_dir=str(work / f"ours_{tag}"),
                checkpoint=str(checkpoint),
                attention_dir=str(attention_dir),
                alphas=alphas,
                recall_values=RECALL_VALUES,
                image_size=FLAGS.image_size,
                precision=FLAGS.precision,
            )
        )
        ours_s = time.perf_counter() - t0
        ref = _reference_run(pth, database, queries, attention_dir, alphas, positives, FLAGS.image_size)
        worst = max(
            abs(ours.results["recalls"][a][n] - ref["recalls"][a][n]) for a in ref["recalls"] for n in ref["recalls"][a]
        )
        rows.append(
            {
                "case": name,
                "ours_s": ours_s,
                "reference_s": ref["seconds"],
                "speedup": ref["seconds"] / ours_s,
                "max_recall_difference": worst,
                "ours_timings_s": ours.results["timings_s"],
            }
        )
        print(f"{name}: ours {ours_s:.1f} s ({ours.results['timings_s']}), reference {ref['seconds']:.1f} s")

    print()
    print(f"{'case':<16}{'ours (s)':>10}{'PyTorch ref (s)':>17}{'speed-up':>10}{'max |dR@N|':>12}")
    for r in rows:
        print(
            f"{r['case']:<16}{r['ours_s']:>10.1f}{r['reference_s']:>17.1f}{r['speedup']:>9.2f}x"
            f"{r['max_recall_difference']:>12.2f}"
        )
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app.run(main)
