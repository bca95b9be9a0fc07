"""The typed stages (attllm_jax/evaluation/stages.py, docs/DESIGN.md section 5) and the function-length rule."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation, stages
from tests.test_eval_pipeline import make_dataset

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80  # docs/DESIGN.md section 2: no package function over ~80 lines, docstring included


def test_the_stages_composed_by_hand_are_what_run_evaluation_computes(tmp_path):
    """Stages 1-7 called one by one give run_evaluation's descriptors, ranking and recalls bit for bit, and the
    re-rank stage is the identity today (the search's Retrieval object itself, method "none")."""
    database, queries, attention, stems = make_dataset(tmp_path)
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(tmp_path / "by_hand"),
        attention_dir=str(attention),
        alphas=(0.0, 0.5, 1.0),
        recall_values=(1, 3),
        image_size=128,
    ).validated()
    model = random_cosplace_model(seed=0)

    sets = stages.load_image_sets(config)
    answers = stages.load_attention(config, sets.queries)
    loaded = stages.prepare_model(config, model)
    plan = stages.plan_search(config, len(sets.database), len(sets.queries), model.spec.descriptor_dim)
    db = stages.open_database(config, loaded.model, sets.database, loaded.digest)
    try:
        contents = db.contents()
        extracted = stages.extract_query_descriptors(config, sets.queries, answers, loaded.model)
        found = stages.search(config, contents, extracted, sets.positives_all, plan)
        ranked = stages.rerank(stages.RerankInput(found, extracted, contents))
        database_descriptors = np.asarray(contents.descriptors)
    finally:
        db.store.close()

    assert ranked.retrieval is found.retrieval and ranked.method == "none"
    assert db.extraction.status == "created" and db.extraction.images_computed == len(sets.database)
    assert answers.counts == {"points": 1, "grid": 1, "none": 1, "invalid": 1, "missing": len(stems) - 4}
    assert extracted.descriptors.shape == (3, len(sets.queries), model.spec.descriptor_dim)

    result = run_evaluation(replace(config, output_dir=str(tmp_path / "pipeline")), model=model)
    np.testing.assert_array_equal(np.asarray(result.database_descriptors), database_descriptors)
    np.testing.assert_array_equal(result.query_descriptors, extracted.descriptors)
    np.testing.assert_array_equal(result.retrieval.predictions, ranked.retrieval.predictions)
    np.testing.assert_array_equal(result.retrieval.scores, ranked.retrieval.scores)
    np.testing.assert_array_equal(result.retrieval.recalls, ranked.retrieval.recalls)
    saved = json.loads((tmp_path / "pipeline" / "results.json").read_text())
    assert saved["recalls"] == ranked.retrieval.recalls_dict()
    assert saved["weights"]["sha256"] == loaded.digest
    assert saved["attention"]["queries_with_attention"] == int(extracted.with_attention.sum()) == 2


def long_functions(root: Path, package: str, limit: int) -> list[str]:
    """``"path:line name (n lines)"`` for every function of ``package`` longer than ``limit`` lines."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_the_length_check_sees_a_long_function(tmp_path):
    """Positive control: an 81-line function (nested in a class) is reported, an 80-line one is not."""
    body = "".join(f"        x{i} = {i}\n" for i in range(79))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"class A:\n    def f(self):\n{body}        return 0\n")
    assert long_functions(tmp_path, "pkg", MAX_FUNCTION_LINES) == ["pkg/m.py:2 f (81 lines)"]
    (tmp_path / "pkg" / "m.py").write_text(f"def g():\n{body}")
    assert long_functions(tmp_path, "pkg", MAX_FUNCTION_LINES) == []


def test_no_package_function_is_over_80_lines():
    assert long_functions(ROOT, "attllm_jax", MAX_FUNCTION_LINES) == []
