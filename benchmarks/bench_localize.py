r"""Benchmark: attllm-localize with attention asked on the fly from an LLM that answers after a fixed delay.

    python -m benchmarks.bench_localize [--num_photos 24] [--delay_s 1.5] [--workers 8] [--output_json T.json]

On the demo (the synthetic database, its flooded query views renamed without coordinates), one process, one loaded
model (seeded random CosPlace ResNet-18/512 at the demo's 288 px), against the scripted LLM server of the tests
(tests/llm_server.py, 127.0.0.1) reached through the real google-genai client; the server answers every request
with the same point answer after --delay_s seconds. Runs, each into a fresh output folder (the database store is
built once and reused; every batch shape is compiled by a warm-up run first, so no run pays for compilation):

- per-stage latency p50/p95 one photo at a time (batch 1, one request in flight): attention (the LLM call),
  decode, backbone, aggregation, search;
- photos/s with the stored oracle answers (--attention_dir: no LLM at all), with --workers requests in flight, and
  with one request in flight (serial), at --batch_size.

Throughput is photos / (wall time of the localize call minus model loading and store loading). With W requests in
flight, each D seconds, a rate limit of Q per minute and a backbone rate of B photos/s, the expected rate is
min(W / D, Q / 60, B): the table says which bound applies. On a shared CPU only the ratios of one run mean much.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from absl import app, flags

from experiments import flagdefs

FLAGS = flags.FLAGS
flagdefs.define("cache_dir")
flags.DEFINE_integer("num_photos", 24, "Demo photos localized per run (of the demo's 40).", lower_bound=1)
flags.DEFINE_float("delay_s", 1.5, "Seconds the scripted LLM takes to answer each request.", lower_bound=0)
flags.DEFINE_integer("workers", 8, "Requests in flight in the concurrent run.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Photos per device batch in the throughput runs.", lower_bound=1)
flags.DEFINE_float("qpm", 0.0, "Rate limit of the LLM runs, requests per minute (0: none).", lower_bound=0)
flags.DEFINE_string("output_json", None, "Optional path for the table as JSON.")

POINTS = '[{"center": [0.5, 0.6], "weight": 1.8, "reasoning": "church tower"}, [0.2, 0.8, 0.1]]'


def _photos(cache_dir: str, root: Path, count: int) -> tuple[Path, Path, Path]:
    """The demo's database, its first ``count`` unlabelled photos (copied under ``root``) and their oracle answers."""
    from attllm_jax.localization.demo import prepare_localize_demo

    database, photos, answers = prepare_localize_demo(cache_dir)
    names = sorted(p.name for p in photos.glob("*.jpg"))[:count]
    subset = root / "photos"
    subset.mkdir()
    for name in names:
        shutil.copyfile(photos / name, subset / name)
    return database, subset, answers


def _ask(server_url: str, workers: int, qpm: float):
    from attllm_jax.attention.sources import SourceSettings
    from attllm_jax.localization.ask import AskSettings

    source = SourceSettings("gemini", base_url=server_url, qpm=qpm, timeout_s=60.0, max_attempts=1)
    return AskSettings(source, city="Demo City", workers=workers)


def _timed_run(settings, model) -> tuple[float, dict]:
    """Photos/s of one localize call (model and store loading excluded) and its summary."""
    from attllm_jax.localization import localize
    from attllm_jax.localization.writers import summary_dict

    run = localize(settings, model=model)
    stages = run.stage_seconds
    busy = stages["total"] - stages["load_model"] - stages["database"]
    return run.computed / busy, summary_dict(run, settings)


def main(argv):
    del argv
    from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE
    from attllm_jax.evaluation.pipeline import load_eval_model
    from attllm_jax.localization import LocalizeSettings
    from tests.llm_server import LLMServer, text_reply

    os.environ.setdefault("GEMINI_API_KEY", "bench-local-key")  # sent only to the local server
    root = Path(tempfile.mkdtemp(prefix="bench_localize_"))
    try:
        database, photos, answers = _photos(FLAGS.cache_dir, root, FLAGS.num_photos)
        base = LocalizeSettings(
            images=str(photos),
            output_dir="",
            database_folder=str(database),
            store_dir=str(root / "store"),
            image_size=DEMO_IMAGE_SIZE,
            alpha=0.5,
            batch_size=FLAGS.batch_size,
            chunk_photos=FLAGS.batch_size,
        )
        model = load_eval_model(base.eval_config())
        runs = {}
        with LLMServer(lambda seen: text_reply(seen, POINTS)) as fast:
            for name, batch in (("warm_batch", FLAGS.batch_size), ("warm_one", 1)):
                warm = replace(base, output_dir=str(root / name), batch_size=batch, chunk_photos=batch)
                _timed_run(replace(warm, ask=_ask(fast.url, FLAGS.workers, 0.0)), model)
                _timed_run(replace(warm, output_dir=str(root / f"{name}_oracle"), attention_dir=str(answers)), model)
        with LLMServer(lambda seen: text_reply(seen, POINTS, delay_s=FLAGS.delay_s)) as server:
            one = replace(base, output_dir=str(root / "one"), batch_size=1, chunk_photos=1)
            runs["one_at_a_time"] = _timed_run(replace(one, ask=_ask(server.url, 1, FLAGS.qpm)), model)
            no_llm = replace(base, output_dir=str(root / "no_llm"), attention_dir=str(answers))
            runs["no_llm"] = _timed_run(no_llm, model)
            concurrent = replace(base, output_dir=str(root / "concurrent"))
            runs["concurrent"] = _timed_run(replace(concurrent, ask=_ask(server.url, FLAGS.workers, FLAGS.qpm)), model)
            serial = replace(base, output_dir=str(root / "serial"))
            runs["serial"] = _timed_run(replace(serial, ask=_ask(server.url, 1, FLAGS.qpm)), model)
        _report(runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _report(runs: dict) -> None:
    latency = runs["one_at_a_time"][1]["latency_per_photo"]
    print(f"per-stage latency, one photo at a time (LLM answering after {FLAGS.delay_s:g} s), seconds:")
    print(f"{'stage':<12} {'p50':>8} {'p95':>8}")
    for stage in ("attention", "decode", "backbone", "aggregation", "search"):
        print(f"{stage:<12} {latency[stage]['p50_s']:>8.3f} {latency[stage]['p95_s']:>8.3f}")
    rate = {name: value[0] for name, value in runs.items()}
    llm_bound = FLAGS.workers / FLAGS.delay_s if FLAGS.delay_s > 0 else float("inf")
    qpm_bound = FLAGS.qpm / 60 if FLAGS.qpm > 0 else float("inf")
    bounds = {"LLM (workers / delay)": llm_bound, "rate limit (qpm / 60)": qpm_bound, "backbone": rate["no_llm"]}
    bound = min(bounds, key=bounds.get)
    print(f"\nthroughput, {FLAGS.num_photos} photos, batch {FLAGS.batch_size}:")
    print(f"{'run':<34} {'photos/s':>9} {'vs no LLM':>10}")
    rows = [
        ("no LLM (stored answers)", "no_llm"),
        (f"LLM, {FLAGS.workers} requests in flight", "concurrent"),
        ("LLM, 1 request in flight (serial)", "serial"),
    ]
    for label, name in rows:
        print(f"{label:<34} {rate[name]:>9.2f} {rate[name] / rate['no_llm']:>10.2f}")
    print(f"concurrent / serial: {rate['concurrent'] / rate['serial']:.2f}x")
    print(f"bound: {bound} ({', '.join(f'{k} {v:.2f}/s' for k, v in bounds.items())})")
    if FLAGS.output_json:
        table = {
            "settings": {k: FLAGS[k].value for k in ("num_photos", "delay_s", "workers", "batch_size", "qpm")},
            "latency_one_at_a_time": latency,
            "photos_per_s": rate,
            "bounds_photos_per_s": {k: (None if v == float("inf") else v) for k, v in bounds.items()},
            "bound": bound,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        Path(FLAGS.output_json).write_text(json.dumps(table, indent=1, default=str))


if __name__ == "__main__":
    app.run(main)
