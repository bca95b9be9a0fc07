"""End-to-end evaluation on a tiny dataset of real JPEG files: contract, parity with direct model calls, sweeps,
and the documented behaviour on bad input."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention.maps import attention_maps
from attllm_jax.attention.store import read_attention_file
from attllm_jax.data.coordinates import CoordinateError
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.retrieval.recall import recall_at_n

TINY = SyntheticConfig(num_streets=2, street_length_m=60.0, num_queries=5, image_height=72, image_width=96, seed=7)
IMAGE_SIZE = 96  # shorter side: 96 x 128 inputs, a 3 x 4 feature grid


def _published(result):
    return {
        "image_path": "x.jpg",
        "model": "gemini-2.5-flash",
        "json_format_verified": True,
        "json_content_verified": result is not None,
        "no_weighting": result is None,
        "result": result,
    }


def make_dataset(root: Path) -> tuple[Path, Path, Path, list[str]]:
    """Copies a tiny synthetic benchmark (real JPEGs) and writes one attention file of each kind."""
    bench = generate_benchmark(root / "cache", TINY)
    database, queries = root / "database", root / "queries"
    shutil.copytree(bench.database, database)
    shutil.copytree(bench.queries, queries)
    stems = sorted(p.stem for p in queries.glob("*.jpg"))
    att = root / "attention"
    att.mkdir()
    points = [
        {"center": [0.5, 0.85], "weight": 0.05, "reasoning": "floodwater"},
        {"center": [0.3, 0.3], "weight": 1.8, "reasoning": "facade"},
        {"center": [0.8, 0.2], "weight": 1.2, "reasoning": "windows"},
    ]
    grid = {f"{r}{c}": (0.1 if r in "CD" else 1.5) for r in "ABCD" for c in "1234"}
    (att / f"{stems[0]}.json").write_text(json.dumps(_published(points)))
    (att / f"{stems[1]}.json").write_text(json.dumps(_published(grid)))
    (att / f"{stems[2]}.json").write_text(json.dumps(_published(None)))
    # stems[3]: no attention file at all
    (att / f"{stems[4]}.json").write_text(json.dumps(_published(points))[:57])  # truncated JSON
    return database, queries, att, stems


@pytest.fixture(scope="module")
def converted_checkpoint(tmp_path_factory):
    """A random-weight torchvision ResNet-18 CosPlace, torch.save'd and run through the production converter."""
    torch = pytest.importorskip("torch")
    from attllm_jax.checkpoint import save_model
    from attllm_jax.convert import convert_file
    from benchmarks.torch_baselines import TorchCosPlace, randomize_batchnorm_stats_

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = randomize_batchnorm_stats_(TorchCosPlace("ResNet18", fc_output_dim=64, gem_p=2.5), generator).eval()
    root = tmp_path_factory.mktemp("ckpt")
    torch.save(net.state_dict(), root / "resnet18_64.pth")
    jax_net, spec = convert_file("cosplace", root / "resnet18_64.pth")
    return save_model(root / "converted", jax_net, spec)


def _direct_descriptors(model, folder: Path, paths, parsed, alphas):
    """What the model's public API gives one image at a time, one alpha at a time ([K, N, D])."""
    out = []
    for rel, answer in zip(paths, parsed, strict=True):
        with Image.open(folder / rel) as image:
            feats = model.features(model.preprocess(image.convert("RGB"), image_size=IMAGE_SIZE)[None])
        if answer is None or not answer.has_attention:
            out.append([np.asarray(model.aggregate(feats))[0]] * len(alphas))
            continue
        att = attention_maps([answer], *model.feature_grid(feats))
        out.append([np.asarray(model.aggregate(feats, attention=att, alpha=a))[0] for a in alphas])
    return np.asarray(out).transpose(1, 0, 2)


@pytest.mark.torch
def test_end_to_end_contract_parity_and_sweep(tmp_path, converted_checkpoint):
    database, queries, att, stems = make_dataset(tmp_path)
    alphas = (0.0, 0.5, 1.0)
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(converted_checkpoint),
        attention_dir=str(att),
        alphas=alphas,
        recall_values=(1, 2, 5),
        positive_dist_threshold=25,
        image_size=IMAGE_SIZE,
        store_dir=str(tmp_path / "store"),
        chunk_size=4,
        num_preds_to_save=2,
    )
    result = run_evaluation(config)
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())

    # the contract's structure and spellings
    assert res["model"]["family"] == "cosplace" and res["model"]["architecture"]["descriptor_dim"] == 64
    assert res["num_database"] == 14 and res["num_queries"] == 5
    assert res["positive_dist_threshold"] == 25.0
    assert list(res["recalls"]) == ["0.0", "0.5", "1.0"]
    assert all(list(r) == ["1", "2", "5"] for r in res["recalls"].values())
    assert res["attention"]["counts"] == {"points": 1, "grid": 1, "none": 1, "invalid": 1, "missing": 1}
    assert res["attention"]["queries_with_attention"] == 2
    assert res["attention"]["missing_files"] == [f"{stems[3]}.jpg"]
    assert res["attention"]["unusable_files"][0]["query"] == f"{stems[4]}.jpg"
    assert res["num_skipped"] == {"database": 0, "queries": 0}
    assert res["store"]["status"] == "created" and res["store"]["chunks_total"] == 4
    for name in ("per_query.csv", "recall_vs_alpha.png", "eval.log"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "predictions" / "alpha_0.5").glob("*.jpg"))) == 5

    # descriptors and recalls equal those of the model called directly
    model = result.model
    assert res["model"] == model.spec.to_dict()
    assert model.spec.provenance.source_sha256 == res["model"]["provenance"]["source_sha256"]
    parsed = [read_attention_file(att / f"{s}.json") if (att / f"{s}.json").exists() else None for s in stems]
    want_q = _direct_descriptors(model, queries, [f"{s}.jpg" for s in stems], parsed, alphas)
    np.testing.assert_allclose(result.query_descriptors, want_q, atol=2e-5)
    db_paths = sorted(p.name for p in database.glob("*.jpg"))
    want_db = _direct_descriptors(model, database, db_paths, [None] * len(db_paths), (0.0,))[0]
    np.testing.assert_allclose(result.database_descriptors, want_db, atol=2e-5)
    assert not np.allclose(want_q[0, :2], want_q[2, :2], atol=1e-3)  # attention changed the attended queries
    np.testing.assert_allclose(want_q[0, 2:], want_q[2, 2:])  # and not the others
    for k, a in enumerate(alphas):
        order = np.argsort(-(want_q[k] @ want_db.T), axis=1, kind="stable")[:, :5]
        want = recall_at_n(order, result.positives, [1, 2, 5])
        assert [res["recalls"][str(a)][n] for n in ("1", "2", "5")] == pytest.approx(list(want), abs=1e-9)

    # the published code's CSV layout, with the threshold actually used
    csv_dir = out / "csv_results" / "alpha_0.5"
    rows = list(csv.DictReader((csv_dir / "aggregated_results.csv").read_text().splitlines()))
    metrics = {r["metric"]: r["value"] for r in rows}
    assert metrics["distance_threshold_m"] == "25" and metrics["total_queries"] == "5"
    assert float(metrics["success_rate_at_1_percent"]) == pytest.approx(res["recalls"]["0.5"]["1"], abs=0.01)
    individual = list(csv.DictReader((csv_dir / "individual_results.csv").read_text().splitlines()))
    assert [r["query_path"] for r in individual] == [f"{s}.jpg" for s in stems]
    # every path relative to its folder (given in results.json): no mix of full and bare paths
    db_names = set(db_paths)
    listed = [p for r in individual for p in (r["predicted_paths"] + ";" + r["gt_paths"]).split(";") if p]
    assert listed and set(listed) <= db_names
    assert res["database_folder"] == str(database) and res["queries_folder"] == str(queries)
    # the resize the run used, not the model's default
    assert res["preprocessing"] == {"resize": "shorter_side", "image_size": IMAGE_SIZE, "source": "--image_size"}
    assert res["model"]["preprocess"]["size"] == 512  # the model's own transform, recorded unchanged
    # R@5 with 14 database images is meaningful: no warning
    assert not [n for n in res["notes"] if "R@" in n]
    assert set(individual[0]) >= {"num_predicted_paths", "num_gt_paths", "predicted_paths", "gt_paths", "success_at_5"}

    # a one-alpha run (reusing the store) gives the same descriptors and recalls as the sweep
    single = run_evaluation(
        replace(config, alphas=(0.5,), output_dir=str(tmp_path / "one"), num_preds_to_save=0), model=model
    )
    assert single.results["store"]["status"] == "reused" and single.results["store"]["images_computed"] == 0
    np.testing.assert_allclose(single.query_descriptors[0], result.query_descriptors[1], atol=1e-6)
    assert single.results["recalls"]["0.5"] == res["recalls"]["0.5"]
    np.testing.assert_array_equal(single.retrieval.predictions[0], result.retrieval.predictions[1])


@pytest.fixture(scope="module")
def random_model():
    return random_cosplace_model(seed=0)


def test_corrupt_images_are_skipped_listed_and_counted(tmp_path, random_model):
    database, queries, att, stems = make_dataset(tmp_path)
    bad_db = sorted(database.glob("*.jpg"))[3]
    bad_db.write_bytes(bad_db.read_bytes()[:300])  # truncated JPEG
    bad_q = queries / f"{stems[1]}.jpg"
    bad_q.write_bytes(b"this is not an image")
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        attention_dir=str(att),
        alphas=(0.0, 1.0),
        recall_values=(1, 5),
        image_size=64,
        chunk_size=5,
    )
    result = run_evaluation(config, model=random_model)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["num_skipped"] == {"database": 1, "queries": 1}
    assert res["skipped_images"]["database"][0]["path"] == str(bad_db)
    assert res["skipped_images"]["queries"][0]["path"] == str(bad_q)
    assert res["num_database"] == 14 and res["num_queries"] == 5
    # the unreadable query is a miss at every N (recall is over all 5 queries), the bad database image is never
    # predicted, and the query's attention was not applied
    assert np.all(result.retrieval.first_hit[:, 1] == -1)
    assert not np.isin(
        result.retrieval.predictions, [sorted(p.name for p in database.glob("*.jpg")).index(bad_db.name)]
    ).any()
    assert res["attention"]["queries_with_attention"] == 1
    assert "unreadable" in (tmp_path / "out" / "per_query.csv").read_text()
    assert "skipping unreadable database image" in (tmp_path / "out" / "eval.log").read_text()


def test_a_name_without_coordinates_fails_before_any_work(tmp_path):
    database, queries, _, _ = make_dataset(tmp_path)
    Image.new("RGB", (96, 72)).save(queries / "IMG_1234.jpg")
    config = EvalConfig(database_folder=str(database), queries_folder=str(queries), output_dir=str(tmp_path / "out"))
    with pytest.raises(CoordinateError, match="IMG_1234.jpg"):
        run_evaluation(config, model=object())  # the model is never touched
    assert not (tmp_path / "out" / "database_store").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alphas": (0.0, 1.5)}, "alphas must lie in"),
        ({"alphas": ()}, "at least one"),
        ({"recall_values": (0, 5)}, "positive integers"),
        ({"positive_dist_threshold": -1}, "positive_dist_threshold"),
        ({"distance": "manhattan"}, "distance"),
        ({"image_size": (1, 2, 3)}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"attention_dir": "/no/such/dir"}, "attention_dir"),
        ({"checkpoint": "/no/such/model"}, "checkpoint"),
    ],
)
def test_bad_settings_are_rejected_before_any_work(tmp_path, change, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "q").mkdir()
    config = EvalConfig(
        database_folder=str(tmp_path / "d"),
        queries_folder=str(tmp_path / "q"),
        output_dir=str(tmp_path / "out"),
        **change,
    )
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_evaluation(config, model=object())
    assert not (tmp_path / "out").exists()


def test_an_image_too_large_for_a_batch_is_skipped_and_counted(tmp_path, random_model):
    database, queries, _, stems = make_dataset(tmp_path)
    wide = sorted(database.glob("*.jpg"))[2]
    Image.new("RGB", (20000, 200), (90, 90, 90)).save(wide)  # shorter side 64 -> 6400 x 64 = 409,600 pixels
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1, 5),
        image_size=64,
        batch_size=4,
        max_batch_pixels=100_000,  # 64 x 85 images: 4 rows of 5,440 pixels fit; the wide one alone does not
    )
    result = run_evaluation(config, model=random_model)
    res = result.results
    assert res["num_skipped"] == {"database": 1, "queries": 0}
    [skipped] = res["skipped_images"]["database"]
    assert skipped["path"] == str(wide) and "ImageTooLargeError" in skipped["error"] and "6400x64" in skipped["error"]
    assert not np.isin(
        result.retrieval.predictions, [sorted(p.name for p in database.glob("*.jpg")).index(wide.name)]
    ).any()


def test_recall_at_n_beyond_the_database_size_is_flagged(tmp_path, random_model):
    database, queries, _, _ = make_dataset(tmp_path)
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1, 14, 20),
        image_size=64,
    )
    result = run_evaluation(config, model=random_model)
    [note] = result.results["notes"]
    assert note.startswith("WARNING: R@14, R@20: N is not below the 14 readable database images")
    assert "R@14, R@20" in (tmp_path / "out" / "eval.log").read_text()
    assert result.results["preprocessing"]["image_size"] == 64
    with_positive = 100.0 * np.mean([len(p) > 0 for p in result.positives])
    assert result.results["recalls"]["0.0"]["20"] == pytest.approx(with_positive)
