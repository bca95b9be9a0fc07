r"""Asks a vision-language model where to look, one attention file per query photo.

    python -m experiments.annotate --images DIR --city "San Francisco" --provider gemini \
        --output_dir DIR [--workers 4 --qpm 60 --prompt axis_focus]

Resumable: images that already have a valid (or None) attention file in --output_dir are skipped, so
rerunning after a crash, a kill or Ctrl-C continues where it stopped; --retry_invalid also re-asks the
images whose answer could not be used. Ctrl-C (or SIGTERM) stops cleanly: no new image is started and
the answers in flight are still written. The summary (valid / none / invalid / failed, tokens, wall
time) is printed and written to OUTPUT_DIR/annotate_summary.json, the log to OUTPUT_DIR/annotate.log.

Providers: gemini (key from GEMINI_API_KEY or GOOGLE_API_KEY), openai (an OpenAI-compatible server
such as vLLM or Ollama at --base_url; optional key from OPENAI_API_KEY), files (re-reads the attention
files of --source_dir, ours or the published code's per-image format, into our format), masks (oracle
attention from the water masks in --masks: the upper bound of a perfect flood detector). Keys are
never printed, logged or written.

Exit status: 0 all images annotated; 3 some requests failed (rerun to retry them); 1 the run was
aborted (bad key, unknown model, too many failures in a row); 130 interrupted.
"""

import json
import logging
import signal
from pathlib import Path

from absl import app, flags

from attllm_jax.attention import masks, prompts, providers, runner, sources
from attllm_jax.evaluation.progress import Progress
from attllm_jax.logs import LogFileHandler
from experiments import cli

FLAGS = flags.FLAGS
_PROVIDERS = sources.SOURCES

flags.DEFINE_string("images", None, "Folder of query photos (searched recursively).", required=True)
flags.DEFINE_string("output_dir", None, "Folder for the attention files, summary and log.", required=True)
flags.DEFINE_string("city", None, "City named in the prompt, e.g. 'San Francisco'.")
flags.DEFINE_enum("provider", "gemini", _PROVIDERS, "Who answers.")
flags.DEFINE_string("model", None, "Model name (default gemini-2.5-flash for gemini; required for openai).")
flags.DEFINE_string("base_url", None, "Endpoint to use instead of the provider's default (proxy, local server).")
flags.DEFINE_string("api_version", "v1beta", "Gemini REST API version.")
flags.DEFINE_string("source_dir", None, "Attention files to read with --provider files.")
flags.DEFINE_string("masks", None, "Water masks (<stem>.png, 255 = water) for --provider masks: oracle attention.")
flags.DEFINE_enum("prompt", "axis_focus", sorted(prompts.PROMPTS), "Prompt id (recorded in every output file).")
flags.DEFINE_integer("grid_size", 4, "n of the n x n grid prompt.", lower_bound=2, upper_bound=26)
flags.DEFINE_integer("workers", 4, "Worker threads.", lower_bound=1)
flags.DEFINE_float("qpm", 60.0, "Requests per minute, all workers and retries together (0: no limit).", lower_bound=0)
flags.DEFINE_float(
    "timeout_s", 60.0, "Total deadline of each request in seconds (connect to last byte).", lower_bound=0.001
)
flags.DEFINE_integer("max_attempts", 5, "Attempts per image on 429/5xx/timeouts/dropped connections.", lower_bound=1)
flags.DEFINE_float("initial_backoff_s", 1.0, "First retry delay (doubles, with jitter).", lower_bound=0)
flags.DEFINE_float("max_backoff_s", 60.0, "Longest backoff (a longer server retry delay is honoured).", lower_bound=0)
flags.DEFINE_float("temperature", None, "Sampling temperature (default: the model's).")
flags.DEFINE_float("top_p", None, "Nucleus sampling (default: the model's).")
flags.DEFINE_integer("thinking_budget", None, "Gemini thinking budget in tokens (0: off on 2.5 Flash).")
flags.DEFINE_integer("max_output_tokens", None, "Cap on the answer length.")
flags.DEFINE_bool("json_mode", True, "Gemini: request application/json with the prompt's response schema.")
flags.DEFINE_integer("max_side", 1024, "Longest side of the photo sent.", lower_bound=16)
flags.DEFINE_float("ruler_step", None, "Ruler tick spacing (default 0.2; 1/n for the grid prompt).")
flags.DEFINE_bool("grid_lines", False, "Draw grid lines across the photo at the ticks.")
flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the image sent.", lower_bound=1, upper_bound=95)
flags.DEFINE_bool("retry_invalid", False, "Re-ask images whose attention file holds an invalid answer.")
flags.DEFINE_string("save_sent_images", None, "Debug: save the exact JPEG sent for each image in this folder.")
flags.DEFINE_integer("max_consecutive_failures", 20, "Abort after this many failed requests in a row (0: never).")

flags.register_validator("ruler_step", lambda v: v is None or 0 < v <= 1, "--ruler_step must be in (0, 1]")
flags.register_validator("temperature", lambda v: v is None or 0 <= v <= 2, "--temperature must be in [0, 2]")
flags.register_validator("top_p", lambda v: v is None or 0 < v <= 1, "--top_p must be in (0, 1]")
flags.register_multi_flags_validator(
    ["city", "provider"],
    lambda v: bool(v["city"]) or v["provider"] in ("files", "masks"),
    "--city is required (the city named in the prompt)",
)
flags.register_multi_flags_validator(
    ["model", "provider"],
    lambda v: bool(v["model"]) or v["provider"] != "openai",
    "--provider openai needs --model (the served model's name)",
)
flags.register_multi_flags_validator(
    ["masks", "provider"],
    lambda v: bool(v["masks"]) or v["provider"] != "masks",
    "--provider masks needs --masks (the folder of water masks, e.g. O/masks/level_0.4)",
)
flags.register_multi_flags_validator(
    ["source_dir", "provider"],
    lambda v: bool(v["source_dir"]) or v["provider"] != "files",
    "--provider files needs --source_dir (the folder of attention files to read)",
)


def make_provider() -> providers.AnswerSource:
    """The provider the flags ask for. Raises ValueError with a one-line message on bad settings."""
    return sources.make_answer_source(
        sources.SourceSettings(
            provider=FLAGS.provider,
            model=FLAGS.model,
            base_url=FLAGS.base_url,
            api_version=FLAGS.api_version,
            timeout_s=FLAGS.timeout_s,
            qpm=FLAGS.qpm,
            max_attempts=FLAGS.max_attempts,
            initial_backoff_s=FLAGS.initial_backoff_s,
            max_backoff_s=FLAGS.max_backoff_s,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            max_output_tokens=FLAGS.max_output_tokens,
            thinking_budget=FLAGS.thinking_budget,
            json_mode=FLAGS.json_mode,
            masks=FLAGS.masks,
            source_dir=FLAGS.source_dir,
        )
    )


class ProgressLines:
    """The run's progress as :class:`~attllm_jax.evaluation.progress.Progress` lines (done, rate, ETA, outcomes)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self.logger, self.interval_s = logger, interval_s
        self._progress: Progress | None = None

    def __call__(self, summary: runner.Summary, elapsed_s: float, final: bool) -> None:
        del elapsed_s  # Progress keeps its own clock, started at the first call (before the first request)
        if self._progress is None:
            self._progress = Progress("annotate", summary.to_ask, self.logger, self.interval_s)
        note = f"valid {summary.valid} none {summary.none} invalid {summary.invalid} failed {summary.failed}"
        self._progress.update(summary.done - self._progress.done, note=note)
        if final:
            self._progress.finish()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    output_dir = Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = LogFileHandler(output_dir / "annotate.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("httpx", "httpx2", "httpcore", "google_genai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("annotate")
    log.info("flags: %s", cli.flag_values(__name__))

    city = FLAGS.city
    try:
        provider = make_provider()
        config = runner.RunConfig(
            city=city or "unknown",
            prompt=masks.MASKS_PROMPT if FLAGS.provider == "masks" else prompts.get_prompt(FLAGS.prompt),
            grid_size=FLAGS.grid_size,
            max_side=FLAGS.max_side,
            ruler_step=FLAGS.ruler_step,
            grid_lines=FLAGS.grid_lines,
            jpeg_quality=FLAGS.jpeg_quality,
            workers=FLAGS.workers,
            retry_invalid=FLAGS.retry_invalid,
            save_sent_dir=FLAGS.save_sent_images,
            max_consecutive_failures=FLAGS.max_consecutive_failures,
        )
    except (ValueError, KeyError) as e:
        cli.fail("annotate", str(e))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        summary = runner.annotate_folder(FLAGS.images, output_dir, provider, config, progress=ProgressLines(log))
    except (FileNotFoundError, ValueError) as e:
        cli.fail("annotate", str(e))
    except OSError as e:  # the summary cannot be written: a full disk, a read-only folder
        cli.fail("annotate", f"cannot write {e.filename or output_dir} ({e.strerror or e}): {runner.OUTPUT_HINT}")
    finally:
        provider.close()
    log.info("summary: %s", runner.summarize_counts(summary))
    print(json.dumps(summary.to_dict(), indent=2))
    if summary.interrupted:
        return 130
    if summary.aborted:
        return 1
    return 3 if summary.failed else 0


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-annotate``, also ``python -m experiments.annotate``)."""
    cli.run_command("annotate", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
