"""The evaluation on hostile image files: oversized, 16-bit, rotated by EXIF, not regular files, symlinks out."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.evaluation.extract import FiniteGuard, NonFiniteDescriptorError
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


def _nan_weights_model():
    import jax
    from flax import nnx

    model = random_cosplace_model(seed=0)
    params = nnx.state(model.net, nnx.Param)
    nnx.update(model.net, jax.tree.map(lambda leaf: leaf * np.float32("nan"), params))
    return model


def test_weights_that_give_nan_descriptors_fail_naming_the_model_before_any_chunk_is_written(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    out = tmp_path / "out"
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(out),
        alphas=(0.0,),
        recall_values=(1,),
        image_size=64,
        chunk_size=4,
    )
    with pytest.raises(
        NonFiniteDescriptorError, match=r"model cosplace .*\(weights: random \(seed 0\)\) gives non-fin"
    ):
        run_evaluation(config, model=_nan_weights_model())
    assert not [p for p in out.rglob("*") if p.is_file() and "done" in p.parts]  # no chunk marked complete


def test_non_finite_rows_are_flagged_and_a_first_batch_of_nothing_finite_fails():
    guard = FiniteGuard("m")
    real = np.array([True, True, True, False])
    batch = np.ones((4, 3), np.float32)
    assert guard.finite_rows(batch, real, "a.jpg").tolist() == [True, True, True, True]
    batch[1, 2], batch[3, 0] = np.nan, np.nan  # a bad real row, and a padding row (not checked)
    assert guard.finite_rows(batch, real, "b.jpg").tolist() == [True, False, True, True]
    sweep = np.ones((2, 4, 3), np.float32)
    sweep[1, 2, 0] = np.inf  # a query row that is finite at alpha 0 only
    assert guard.finite_rows(sweep, real, "c.jpg").tolist() == [True, True, False, True]
    with pytest.raises(NonFiniteDescriptorError, match=r"model m gives .*\(e\.g\. d\.jpg\)"):
        FiniteGuard("m").finite_rows(np.full((2, 3), np.nan, np.float32), np.array([True, True]), "d.jpg")


def test_a_fifo_named_like_a_query_is_skipped_and_counted_not_waited_on(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    victim = sorted(queries.glob("*.jpg"))[1]
    victim.unlink()
    os.mkfifo(victim)  # nobody ever writes to it: a plain open() would block forever
    result = run_bounded(
        EVAL_SCRIPT, str(database), str(queries), str(tmp_path / "out"), address_space=8 * GIB, timeout_s=240
    )
    assert result["num_skipped"] == {"database": 0, "queries": 1}
    [skipped] = result["skipped_images"]["queries"]
    assert (
        skipped["path"] == str(victim)
        and skipped["error"] == f"NotRegularFileError: {victim} is a FIFO, not a regular file"
    )


def test_a_path_list_entry_through_a_symlinked_folder_out_of_the_database_is_skipped_and_counted(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    names = sorted(p.name for p in database.glob("*.jpg"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (database / names[4]).rename(elsewhere / names[4])
    (database / "linked").symlink_to(elsewhere, target_is_directory=True)
    listed = [f"linked/{n}" if i == 4 else n for i, n in enumerate(names)]
    (tmp_path / "database_images_paths.txt").write_text("\n".join(listed) + "\n")
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1, 5),
        image_size=64,
    )
    result = run_evaluation(config, model=random_cosplace_model(seed=0))
    assert result.results["num_database"] == 14 and result.results["num_skipped"] == {"database": 1, "queries": 0}
    [skipped] = result.results["skipped_images"]["database"]
    assert skipped["path"] == str(database / "linked" / names[4])
    assert skipped["error"].startswith("OutsideFolderError:") and f"outside {database.resolve()}" in skipped["error"]
    assert not np.isin(result.retrieval.predictions, [4]).any()  # never searched


def test_with_every_database_image_unreadable_the_note_says_recall_is_zero(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    for path in database.glob("*.jpg"):
        path.write_bytes(b"not a photo")
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1, 5),
        image_size=64,
    )
    result = run_evaluation(config, model=random_cosplace_model(seed=0))
    assert result.results["num_skipped"]["database"] == 14
    assert result.results["recalls"] == {"0.0": {"1": 0.0, "5": 0.0}}
    [note] = result.results["notes"]
    assert note.startswith("WARNING: no database image could be read") and "every recall is 0" in note
    assert "counts as a hit" not in note


def test_batches_are_capped_at_the_chunk_size_and_the_number_of_queries(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    model = random_cosplace_model(seed=0)
    rows, features = [], model.features
    model.features = lambda images: (rows.append(images.shape[0]), features(images))[1]  # records the batch rows
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1, 5),
        image_size=64,
        batch_size=1000,
        chunk_size=4,
    )
    result = run_evaluation(config, model=model)
    assert result.results["num_skipped"] == {"database": 0, "queries": 0}
    assert rows == [4, 4, 4, 4, 5]  # 14 database images in chunks of 4 (the last padded), then the 5 queries


@pytest.mark.slow
def test_a_database_image_replaced_in_place_rebuilds_the_store(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1, 5),
        image_size=64,
        chunk_size=7,
    )
    model = random_cosplace_model(seed=0)
    first = run_evaluation(config, model=model)
    before = np.asarray(first.database_descriptors)  # read now: the store is rebuilt in place below
    assert run_evaluation(config, model=model).results["store"]["status"] == "reused"
    replaced = sorted(database.glob("*.jpg"))[3]
    stat = replaced.stat()
    Image.new("RGB", (96, 72), (250, 250, 10)).save(replaced)  # another photo under the same name
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = run_evaluation(config, model=model)
    assert first.results["store"]["status"] == "created" and again.results["store"]["status"] == "rebuilt"
    changed = np.abs(np.asarray(again.database_descriptors) - before).max(axis=1) > 1e-4
    assert changed.tolist() == [i == 3 for i in range(14)]  # the new photo's descriptor, not the old one's
