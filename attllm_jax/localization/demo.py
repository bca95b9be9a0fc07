"""The localize demo: the synthetic benchmark's query views copied under names that carry no coordinates."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from attllm_jax.data.dataset import list_images
from attllm_jax.evaluation.demo import prepare_demo


def unlabelled_name(index: int) -> str:
    """The demo name of the ``index``-th query (sorted order): ``photo_000.jpg``."""
    return f"photo_{index:03d}.jpg"


def prepare_localize_demo(cache_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Copies the demo queries to ``<benchmark>/queries_unlabelled/photo_NNN.jpg`` (sorted order) and their
    oracle attention files to ``<benchmark>/attention_unlabelled/photo_NNN.json``.

    Returns:
        The database folder, the unlabelled photo folder and its attention folder.
    """
    benchmark, attention = prepare_demo(cache_dir)
    photos, answers = benchmark.root / "queries_unlabelled", benchmark.root / "attention_unlabelled"
    if not photos.is_dir():
        tmp_photos, tmp_answers = photos.with_name(photos.name + ".tmp"), answers.with_name(answers.name + ".tmp")
        for folder in (tmp_photos, tmp_answers):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        for i, rel in enumerate(list_images(benchmark.queries)):
            shutil.copyfile(benchmark.queries / rel, tmp_photos / unlabelled_name(i))
            shutil.copyfile(attention / f"{Path(rel).stem}.json", tmp_answers / f"photo_{i:03d}.json")
        shutil.rmtree(answers, ignore_errors=True)
        os.replace(tmp_answers, answers)
        os.replace(tmp_photos, photos)
    return benchmark.database, photos, answers
