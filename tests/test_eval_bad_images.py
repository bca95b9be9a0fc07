"""The evaluation on hostile image files: oversized, 16-bit, rotated by EXIF, not regular files, symlinks out."""

import json

from PIL import Image

from tests.bounded import PEAK_RSS, run_bounded
from tests.test_eval_pipeline import make_dataset

GIB = 1 << 30

EVAL_SCRIPT = (
    PEAK_RSS
    + """
import sys
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
config = EvalConfig(database_folder=sys.argv[1], queries_folder=sys.argv[2], output_dir=sys.argv[3], alphas=(0.0,),
                    recall_values=(1, 5), image_size=128)
result = run_evaluation(config, model=random_cosplace_model(seed=0))
report({key: result.results[key] for key in ("num_skipped", "skipped_images", "num_database")})
"""
)


def test_eval_skips_a_tall_png_from_its_header_with_bounded_memory(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    victim = sorted(database.glob("*.jpg"))[2]
    victim.unlink()
    tall = victim.with_suffix(".png")
    # 20 x 400000: 8 Mpx as stored; 128 x 2,560,000 once resized (1 GB as uint8, 3.9 GB as float32)
    Image.new("RGB", (20, 400_000), (90, 90, 90)).save(tall)
    result = run_bounded(
        EVAL_SCRIPT, str(database), str(queries), str(tmp_path / "out"), address_space=3 * GIB + GIB // 2
    )
    assert result["num_database"] == 14 and result["num_skipped"] == {"database": 1, "queries": 0}
    [skipped] = result["skipped_images"]["database"]
    assert skipped["path"] == str(tall)
    assert skipped["error"].startswith("ImageTooLargeError: preprocessed to 128x2560000 pixels from 20x400000")
    assert result["peak_rss_mb"] < 900, result
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["num_skipped"]["database"] == 1
