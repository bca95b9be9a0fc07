"""Shortlist-symmetric attention on the synthetic benchmark with database clutter (real JPEGs, the real masks
provider through the real annotation runner): alpha_db = 0 is the plain ranking, the cache annotates each database
image once, the cost model counts the calls made, and the clutter option leaves the default benchmark alone."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention.masks import MASKS_PROMPT, MasksProvider
from attllm_jax.attention.runner import RunConfig
from attllm_jax.data.dataset import load_image_set
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.evaluation.demo import write_oracle_attention
from attllm_jax.evaluation.post_search import symmetric_stage
from attllm_jax.evaluation.symmetric import DescribedRows, SymmetricSpec, run_symmetric, shortlist_rows

TINY = SyntheticConfig(
    num_streets=3, street_length_m=60.0, num_queries=10, image_height=72, image_width=96, seed=5, database_clutter=3
)


class CountingMasks(MasksProvider):
    """The masks provider, counting the images it is asked about."""

    def __init__(self, masks_dir):
        super().__init__(masks_dir)
        self.asked: list[str] = []

    def generate(self, request, stop=None, on_attempt=None):
        self.asked.append(request.image_path)
        return super().generate(request, stop, on_attempt)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sym")
    bench = generate_benchmark(root / "cache", TINY)
    config = EvalConfig(
        database_folder=str(bench.database),
        queries_folder=str(bench.queries),
        output_dir=str(root / "out"),
        attention_dir=str(write_oracle_attention(bench, root / "attention")),
        alphas=(0.0, 1.0),
        recall_values=(1, 5, 10),
        image_size=64,
    )
    model = random_cosplace_model(0)
    return bench, config, model, run_evaluation(config, model=model), root


def _run(setup, spec, provider, described=None):
    bench, config, model, result, _ = setup
    database = load_image_set(bench.database)
    run_config = RunConfig(city="unknown", prompt=MASKS_PROMPT, workers=2)
    return run_symmetric(
        spec, model, database, result.database_descriptors, result.query_descriptors, result.retrieval,
        result.positives, provider, run_config, described, batch_size=8, image_size=64,
    )  # fmt: skip


def test_alpha_db_zero_is_the_plain_ranking(setup, tmp_path):
    bench, _, _, result, _ = setup
    found, costs = _run(setup, SymmetricSpec(5, 0.0, str(tmp_path / "att")), MasksProvider(bench.database_masks))
    assert costs["with_attention"] == costs["unique_database_images_annotated"] > 0
    np.testing.assert_array_equal(found.predictions, result.retrieval.predictions)
    np.testing.assert_array_equal(found.recalls, result.retrieval.recalls)


def test_each_database_image_is_annotated_once_and_the_costs_count_the_calls(setup, tmp_path):
    bench, _, _, result, _ = setup
    spec = SymmetricSpec(5, 0.8, str(tmp_path / "att"), cost_per_1000_calls=2.5)
    provider = CountingMasks(bench.database_masks)
    found, costs = _run(setup, spec, provider)
    rows = shortlist_rows(result.retrieval.predictions, 5)
    num_alphas, num_queries = result.query_descriptors.shape[:2]
    assert len(rows) < num_alphas * num_queries * 5  # shortlists overlap: the cache is what makes one call each
    assert sorted(provider.asked) == sorted({load_image_set(bench.database).paths[i] for i in rows})
    assert len(provider.asked) == len(set(provider.asked)) == len(rows)
    assert len(list((tmp_path / "att").glob("@*.json"))) == len(rows)
    assert costs["llm_calls"] == len(rows) == costs["unique_database_images_annotated"]
    assert costs["estimated_cost"] == pytest.approx(len(rows) / 1000 * 2.5)
    assert costs["full_symmetric"] == {"llm_calls": 21, "estimated_cost": pytest.approx(21 / 1000 * 2.5)}
    assert costs["projection"]["llm_calls_at_most"] == min(1_000_000, 1000 * 5 * num_alphas)
    assert costs["extra_backbone_passes"] == len(rows) and costs["reused_from_cache"] == 0
    # ranks beyond the shortlist are untouched, the shortlist is a permutation of itself
    np.testing.assert_array_equal(found.predictions[..., 5:], result.retrieval.predictions[..., 5:])
    np.testing.assert_array_equal(np.sort(found.predictions[..., :5]), np.sort(result.retrieval.predictions[..., :5]))
    shortlist = found.scores[..., :5]
    assert (np.diff(shortlist, axis=-1) <= 0).all()  # re-sorted by the new scores
    before = np.sort(result.retrieval.scores[..., :5], axis=-1)
    assert np.abs(np.sort(shortlist, axis=-1) - before).max() > 1e-6  # the database attention changed the scores

    again = CountingMasks(bench.database_masks)
    found2, costs2 = _run(setup, spec, again)
    assert again.asked == [] and costs2["llm_calls"] == 0 and costs2["reused_from_cache"] == len(rows)
    np.testing.assert_array_equal(found2.predictions, found.predictions)


def test_a_later_call_of_the_run_reuses_the_database_side_descriptors(setup, tmp_path):
    bench, _, _, result, _ = setup
    spec = SymmetricSpec(5, 0.8, str(tmp_path / "att"))
    described = DescribedRows(0.8)
    found, costs = _run(setup, spec, MasksProvider(bench.database_masks), described)
    rows = shortlist_rows(result.retrieval.predictions, 5)
    assert (
        costs["extra_backbone_passes"] == len(rows) == len(described.descriptors) and costs["descriptors_reused"] == 0
    )
    again, costs2 = _run(setup, spec, MasksProvider(bench.database_masks), described)
    assert costs2["extra_backbone_passes"] == 0 and costs2["descriptors_reused"] == len(rows)
    assert costs2["with_attention"] == costs["with_attention"] == len(rows)
    np.testing.assert_array_equal(again.predictions, found.predictions)
    np.testing.assert_array_equal(again.scores, found.scores)
    # a fresh call describes them again and gets the same ranking: the reused descriptors are the described ones
    fresh, costs3 = _run(setup, spec, None)
    assert costs3["extra_backbone_passes"] == len(rows)
    np.testing.assert_array_equal(fresh.predictions, found.predictions)
    np.testing.assert_allclose(fresh.scores, found.scores, atol=1e-6)
    with pytest.raises(ValueError, match="described at alpha_db 0.8 reused at 0.5"):
        _run(setup, SymmetricSpec(5, 0.5, str(tmp_path / "att")), None, described)


def test_eval_writes_the_stage_and_its_costs(setup, tmp_path):
    bench, config, model, result, _ = setup
    symmetric = replace(
        config,
        output_dir=str(tmp_path / "out"),
        symmetric_k=5,
        alpha_db=0.8,
        db_masks=str(bench.database_masks),
        db_attention_dir=str(tmp_path / "att"),
    )
    res = run_evaluation(symmetric, model=model).results
    stage = res["symmetric"]
    assert stage["params"] == {"k": 5, "alpha_db": 0.8}
    assert list(stage["recalls"]) == list(res["recalls"]) and stage["recalls_before"] == res["recalls"]
    assert stage["cost"]["llm_calls"] == len(list((tmp_path / "att").glob("@*.json")))
    assert stage["cost"]["estimated_cost"] is None  # no price given, no made-up cost
    with pytest.raises(ValueError, match=r"--symmetric_k must be in \[0, 10\]"):
        run_evaluation(replace(symmetric, symmetric_k=11), model=object())


def test_clutter_draws_objects_with_their_masks_and_leaves_the_default_alone(setup, tmp_path):
    bench = setup[0]
    plain = generate_benchmark(tmp_path, replace(TINY, database_clutter=0))
    assert plain.database_masks is None and SyntheticConfig().digest() == "0ea7dcaab4db36f7"
    masks = sorted(bench.database_masks.glob("*.png"))
    assert len(masks) == len(list(bench.database.glob("*.jpg"))) == 21
    clutter = np.stack([np.asarray(Image.open(m)) > 127 for m in masks])
    assert 0.005 < clutter.mean() < 0.3  # some of every view, never most of it
    name = masks[0].stem + ".jpg"
    dirty = np.asarray(Image.open(bench.database / name), np.float32)
    clean = np.asarray(Image.open(plain.database / name), np.float32)
    changed = np.abs(dirty - clean).max(-1) > 40
    assert changed[~clutter[0]].mean() < 0.01 and changed[clutter[0]].mean() > 0.3  # drawn where the mask says
    for folder in ("queries", "masks"):  # the queries are the same world with or without clutter
        a, b = sorted((bench.root / folder).iterdir()), sorted((plain.root / folder).iterdir())
        assert [p.name for p in a] == [p.name for p in b] and a[0].read_bytes() == b[0].read_bytes()
    assert json.loads((bench.root / "meta.json").read_text())["config"]["database_clutter"] == 3


def test_an_image_the_provider_cannot_answer_keeps_its_plain_descriptor_and_is_counted(setup, tmp_path):
    bench, _, _, result, _ = setup
    rows = shortlist_rows(result.retrieval.predictions, 2)
    database = load_image_set(bench.database)
    masks = tmp_path / "masks"
    masks.mkdir()
    missing = database.paths[int(rows[0])]
    for mask in bench.database_masks.glob("*.png"):
        if mask.stem != missing[:-4]:
            (masks / mask.name).write_bytes(mask.read_bytes())
    found, costs = _run(setup, SymmetricSpec(2, 1.0, str(tmp_path / "att")), MasksProvider(masks))
    assert costs["failed"] == 1 and costs["llm_calls"] == len(rows)  # asked, not answered
    assert costs["with_attention"] == len(rows) - 1
    assert not (tmp_path / "att" / f"{missing[:-4]}.json").exists()  # nothing cached: asked again next run
    # its re-scored entries use the store's descriptor: the score of the first search
    k, q, r = [int(v[0]) for v in np.nonzero(found.predictions[..., :2] == rows[0])]
    want = float(result.query_descriptors[k, q] @ result.database_descriptors[rows[0]])
    assert found.scores[k, q, r] == pytest.approx(want, abs=1e-5)


@pytest.mark.slow  # three evaluations and two symmetric stages: ~40 s on a loaded CPU
def test_chained_stages_are_symmetric_on_the_expanded_ranking_and_leave_each_stage_alone(setup, tmp_path):
    bench, config, model, result, _ = setup
    chained = replace(
        config, output_dir=str(tmp_path / "out"), rerank=("aqe:k=3,w=0.6",), symmetric_k=5, alpha_db=0.8,
        db_masks=str(bench.database_masks), db_attention_dir=str(tmp_path / "att"), chain_stages=True,
        alpha_policy="margin",
    )  # fmt: skip
    res = run_evaluation(chained, model=model).results
    alone = run_evaluation(replace(chained, output_dir=str(tmp_path / "alone"), chain_stages=False), model=model)
    for key in ("recalls", "rerank", "symmetric"):  # each stage's own entry is the same with or without the chain
        got, want = res[key], alone.results[key]
        if key == "symmetric":
            got, want = {k: v for k, v in got.items() if k != "cost"}, {k: v for k, v in want.items() if k != "cost"}
        assert got == want
    chain = res["chained"]["aqe"]
    assert chain["stages"] == ["aqe:k=3,w=0.6", "symmetric:k=5,alpha_db=0.8", "alpha_policy:margin"]
    assert chain["recalls_before"] == res["rerank"]["aqe"]["recalls"]
    assert chain["cost"]["llm_calls"] < chain["cost"]["unique_database_images_annotated"]  # the cache is shared
    # the chain, composed by hand from the library stages: AQE, then symmetric re-ranking of its ranking
    from attllm_jax.retrieval.rerank import parse_rerank, rerank

    found, expanded = rerank(
        parse_rerank("aqe:k=3,w=0.6"), result.database_descriptors, np.ones(21, bool), result.query_descriptors,
        np.ones(10, bool), result.retrieval, result.positives,
    )  # fmt: skip
    database = load_image_set(bench.database)
    composed, _ = run_symmetric(
        SymmetricSpec(5, 0.8, str(tmp_path / "att")), model, database, result.database_descriptors, expanded, found,
        result.positives, None, None, batch_size=8, image_size=64,
    )  # fmt: skip
    assert chain["recalls"] == composed.recalls_dict()
    plain, _ = run_symmetric(
        SymmetricSpec(5, 0.0, str(tmp_path / "att")), model, database, result.database_descriptors, expanded, found,
        result.positives, None, None, batch_size=8, image_size=64,
    )  # fmt: skip
    np.testing.assert_array_equal(plain.predictions, found.predictions)  # alpha_db 0: the expanded ranking itself


def test_chain_stages_needs_both_stages(setup, tmp_path):
    config = replace(setup[1], output_dir=str(tmp_path / "out"), chain_stages=True, rerank=("aqe:k=3,w=0.6",))
    with pytest.raises(ValueError, match="--chain_stages chains --rerank and --symmetric_k"):
        run_evaluation(config, model=object())
    with pytest.raises(ValueError, match="--chain_stages chains --rerank and --symmetric_k"):
        run_evaluation(replace(config, rerank=(), symmetric_k=3), model=object())
    assert not (tmp_path / "out").exists()


POINTS = '[{"center": [0.3, 0.6], "weight": 1.8, "reasoning": "a shop sign"}, [0.7, 0.2, 0.1]]'


def test_db_provider_asks_the_llm_once_per_shortlisted_image_and_the_costs_count_its_requests(
    setup, tmp_path, monkeypatch
):
    from attllm_jax.attention.sources import SourceSettings
    from tests.llm_server import LLMServer, text_reply

    bench, config, model, result, _ = setup
    monkeypatch.setenv("GEMINI_API_KEY", "AIzaTEST-symmetric-secret-123456")
    with LLMServer(lambda seen: text_reply(seen, POINTS)) as server:
        asking = replace(
            config, output_dir=str(tmp_path / "out"), symmetric_k=3, alpha_db=0.8, db_city="Lisbon",
            db_attention_dir=str(tmp_path / "att"), llm_cost_per_1000=2.0, batch_size=8,
            db_provider=SourceSettings("gemini", base_url=server.url, qpm=0, timeout_s=30.0, max_attempts=1),
        ).validated()  # fmt: skip
        # eval's stage with the provider eval builds from the config (the full run: test_eval_writes_the_stage...)
        _, cost = symmetric_stage(
            asking, model, load_image_set(bench.database), result.database_descriptors, result.query_descriptors,
            result.retrieval, result.positives, tmp_path / "out",
        )  # fmt: skip
        seen = list(server.seen)
    rows = shortlist_rows(result.retrieval.predictions, 3)
    assert len(seen) == len(rows) == cost["unique_database_images_annotated"] > 0
    assert cost["llm_calls"] == cost["llm_requests"] == len(seen) and cost["failed"] == 0
    assert len({s.image_bytes for s in seen}) == len(seen)  # each database image asked once
    assert all(s.api == "gemini" and "Lisbon" in s.prompt for s in seen)
    assert cost["estimated_cost"] == pytest.approx(len(seen) / 1000 * 2.0)
    assert cost["with_attention"] == len(rows)  # every answer was usable
    assert len(list((tmp_path / "att").glob("@*.json"))) == len(rows)  # cached for the next run (tested above)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--symmetric_k", "3"], "--db_provider gemini needs --db_city"),
        (["--db_city", "Lisbon"], "--db_provider annotates the --symmetric_k shortlists"),
    ],
)
def test_bad_db_provider_flags_are_one_error_line_before_any_work(setup, tmp_path, extra, message):
    bench, config, *_ = setup
    cmd = [
        sys.executable, "-m", "experiments.eval", "--database_folder", str(bench.database),
        "--queries_folder", str(bench.queries), "--output_dir", str(tmp_path / "out"), "--db_provider", "gemini",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "GEMINI_API_KEY": "AIzaTEST-x"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("eval: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()
