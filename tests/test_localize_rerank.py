"""localize's --rerank stage without a model: the photos' second search against a NumPy transcription, the
settings key and records of runs without it, the calibration's stage check, serve's refusal."""

import hashlib
import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from attllm_jax.localization.api import LocalizeSettings, _Context, load_checked_calibration, search_photos
from attllm_jax.localization.api import settings_key as key_of
from attllm_jax.localization.calibration import Calibration, load_calibration
from attllm_jax.localization.results import PhotoResult
from attllm_jax.retrieval.retrieve import retrieve

N, D, P, TOP_K = 120, 24, 7, 8


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """``[N, D]`` database descriptors (row 3 unreadable) and ``[1, P, D]`` photo descriptors, correlated so that
    the first search's neighbours have positive and negative similarities."""
    rng = np.random.default_rng(7)
    database = _unit(rng.normal(size=(N, D)))
    valid = np.ones(N, bool)
    valid[3] = False
    photos = _unit(database[rng.choice(N, P)] + 0.8 * rng.normal(size=(P, D)))[None]
    return database, valid, photos


def _context(database, valid, rerank=None, top_k=TOP_K) -> _Context:
    settings = LocalizeSettings(images="p", output_dir="o", database_folder="db", top_k=top_k, rerank=rerank)
    return _Context(settings, settings.eval_config(), None, database, valid, None, None, None, None, None, "key")


def _numpy_search(database, valid, queries, k):
    """Inner-product search of ``[P, D]`` queries over the valid rows: ``[P, k]`` indices and scores."""
    scores = queries.astype(np.float64) @ database.T.astype(np.float64)
    scores[:, ~valid] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, 1)


def _numpy_expand(kind, q, neighbours, value):
    """AQE ``w q + (1 - w) mean d_i`` or alphaQE ``normalize(q + sum max(q.d_i, 0)^alpha d_i)``; ``[P, D]``."""
    q, d = q.astype(np.float64), neighbours.astype(np.float64)
    if kind == "aqe":
        return value * q + (1 - value) * d.mean(1)
    weights = np.maximum(np.einsum("pd,pkd->pk", q, d), 0.0) ** value
    out = q + np.einsum("pk,pkd->pd", weights, d)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    ("spec", "kind", "k", "value"), [("aqe:k=5,w=0.8", "aqe", 5, 0.8), ("alpha_qe:k=3,alpha=3", "alpha_qe", 3, 3.0)]
)
def test_reranked_matches_equal_the_numpy_transcription(data, spec, kind, k, value):
    database, valid, photos = data
    found, seconds = search_photos(_context(database, valid, spec), photos, np.ones(P, bool))
    first, _ = _numpy_search(database, valid, photos[0], TOP_K)
    expanded = _numpy_expand(kind, photos[0], database[first[:, :k]], value)
    top, scores = _numpy_search(database, valid, expanded, TOP_K)
    np.testing.assert_array_equal(found.predictions[0], top)
    np.testing.assert_allclose(found.scores[0], scores, atol=1e-6)
    assert seconds is not None and seconds >= 0.0
    # the expansion changed the ranking of some photo (else the test would not tell the two searches apart)
    assert (top != first).any()


def test_without_rerank_the_search_is_the_plain_one_bit_for_bit(data):
    database, valid, photos = data
    ctx = _context(database, valid)
    found, seconds = search_photos(ctx, photos, np.ones(P, bool))
    empty = [np.zeros(0, np.int64)] * P
    plain = retrieve(database, valid, photos, np.ones(P, bool), empty, (0.0,), (1,), TOP_K, spec=ctx.config.search)
    assert seconds is None
    np.testing.assert_array_equal(found.predictions, plain.predictions)
    np.testing.assert_array_equal(found.scores, plain.scores)


def test_k_beyond_the_matches_kept_is_one_error_naming_it(tmp_path):
    settings = LocalizeSettings(images=str(tmp_path), output_dir="o", database_folder="db", rerank="aqe:k=20,w=0.8")
    with pytest.raises(ValueError, match=r"--rerank aqe:k=20,w=0.8: k = 20 exceeds --top_k 10"):
        settings.validated()
    with pytest.raises(ValueError, match=r"--rerank 'aqe:k=5': missing w"):
        replace(settings, rerank="aqe:k=5").validated()


def test_settings_key_and_records_of_runs_without_rerank_are_unchanged():
    settings = LocalizeSettings(images="p", output_dir="o", database_folder="db")
    # the key as computed before the stage existed (no "rerank" field)
    fields = {k: v for k, v in asdict(settings).items() if k not in ("images", "output_dir", "batch_size")}
    fields.pop("chunk_photos")
    fields.pop("rerank")
    text = json.dumps({**fields, "weights": "w", "calibration": None}, sort_keys=True, default=str)
    assert key_of(settings, "w", None) == hashlib.sha256(text.encode()).hexdigest()[:16]
    reranked = key_of(replace(settings, rerank="aqe:k=5,w=0.80"), "w", None)
    assert reranked != key_of(settings, "w", None)
    assert reranked == key_of(replace(settings, rerank="aqe:w=0.8,k=5"), "w", None)  # the canonical spec is keyed
    old = {"photo": "a.jpg", "lat": 1.0, "lon": 2.0, "radius_m": 3.0, "confidence": None}
    old |= {"confidence_kind": "uncalibrated", "confidence_radius_m": 25.0, "features": {}, "matches": []}
    assert PhotoResult.from_dict({**old, "attention": "none"}).rerank is None  # a record written before the field


def _calibration(path, rerank):
    Calibration((0.0,) * 3, (1.0,) * 3, (1.0,) * 3, 0.0, 25.0, "top1", {}, rerank).save(path)
    return str(path)


def test_a_calibration_of_another_stage_is_refused_in_one_line(tmp_path):
    plain, reranked = _calibration(tmp_path / "plain.json", None), _calibration(tmp_path / "aqe.json", "aqe:k=5,w=0.8")
    assert "rerank" not in json.loads((tmp_path / "plain.json").read_text())  # plain files as before
    assert load_calibration(reranked).rerank == "aqe:k=5,w=0.8"
    base = LocalizeSettings(images="p", output_dir="o", database_folder="db")
    assert load_checked_calibration(replace(base, calibration=plain))[0].rerank is None
    assert load_checked_calibration(replace(base, calibration=reranked, rerank="aqe:w=0.8,k=5"))[1] is not None
    with pytest.raises(ValueError, match=r"fitted with rerank none, this run uses aqe:k=5,w=0.8") as error:
        load_checked_calibration(replace(base, calibration=plain, rerank="aqe:k=5,w=0.8"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"fitted with rerank aqe:k=5,w=0.8, this run uses none"):
        load_checked_calibration(replace(base, calibration=reranked))


def test_serve_refuses_a_rerank_stage_before_loading_anything():
    from attllm_jax.serve.engine import Engine

    settings = LocalizeSettings(images="p", output_dir="o", database_folder="missing", rerank="aqe:k=5,w=0.8")
    with pytest.raises(ValueError, match="the service has no re-ranking stage"):
        Engine(settings)
