r"""Localize photos posted over HTTP: ``attllm-serve`` (or ``python -m experiments.serve``).

Keeps the model and the database loaded and answers ``POST /v1/localize`` (multipart field ``image``; optional
``attention``, ``alpha``, ``top_k``) with localize's per-photo result, batching concurrent requests. With no
database flags it serves the demo (the synthetic database, as attllm-localize's demo). A real service:

    attllm-serve --database_folder DB --checkpoint MODEL --store_dir STORE --calibration C.json \
        --port 8080 --token_file /run/secrets/attllm_token --provider gemini --city "San Francisco"

then ``curl -F image=@photo.jpg -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/localize``.
Health: GET /v1/health; settings: GET /v1/info; Prometheus metrics: GET /metrics; OpenAPI: /docs.
SIGTERM (or Ctrl-C) finishes the requests in flight, then exits 0. README: "Run it as a service".
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from absl import flags

from experiments import cli, flagdefs
from experiments.cli import fail

FLAGS = flags.FLAGS

flagdefs.define(*flagdefs.LOCALIZE_MODEL_FLAGS, *flagdefs.LOCALIZE_FLAGS)
flags.DEFINE_string(
    "output_dir", None, "Folder of the database store (without --store_dir) and serve.log (default outputs/serve)."
)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (put a reverse proxy in front for TLS).")
flags.DEFINE_integer("port", 8080, "Port to listen on.", lower_bound=0, upper_bound=65535)
flags.DEFINE_integer("max_batch", 16, "Most photos per forward pass (1: batching off).", lower_bound=1)
flags.DEFINE_float("max_wait_ms", 5.0, "Longest a photo waits for others to join its batch, ms.", lower_bound=0)
flags.DEFINE_integer("max_queue", 64, "Most photos waiting for a batch; more get 503 + Retry-After.", lower_bound=1)
flags.DEFINE_float("max_upload_mb", 20.0, "Largest request body in MiB; larger gets 413.", lower_bound=0.001)
flags.DEFINE_string("token_file", None, "File holding a bearer token required on /v1/localize and /v1/info.")
flags.DEFINE_integer("workers_threads", 4, "Threads decoding uploads.", lower_bound=1)
flags.DEFINE_integer("max_top_k", 100, "Largest top_k a request may ask.", lower_bound=1)
flags.DEFINE_list(
    "warmup",
    None,
    "Photo sizes WxH (e.g. 4032x3024) compiled and timed for every batch bucket before the service is ready (other "
    "sizes compile on their first request; without timings a batch is always padded to its bucket).",
)
flags.DEFINE_enum("provider", "none", ["none", "gemini", "openai"], "LLM asked for attention=auto.")
flags.DEFINE_string("llm_model", None, "LLM name (default gemini-2.5-flash for gemini; required for openai).")
flags.DEFINE_string("base_url", None, "LLM endpoint instead of the provider's default (proxy, local server).")
flags.DEFINE_string("city", "unknown", "City named in the LLM prompt.")
flags.DEFINE_string("prompt", "axis_focus", "Prompt id of attention=auto.")
flags.DEFINE_float("attention_timeout", 10.0, "Seconds attention=auto waits for the LLM; then no attention.")
flags.register_validator("attention_timeout", lambda v: v > 0, "--attention_timeout must be > 0")
flags.register_validator(
    "warmup", lambda v: v is None or all(_size(s) for s in v), "--warmup entries must be WIDTHxHEIGHT, e.g. 640x480"
)


def _size(text: str) -> tuple[int, int] | None:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def localize_settings():
    """localize's settings of the flags (the demo's database without --database_folder)."""
    from attllm_jax.localization import LocalizeSettings

    database, image_size = FLAGS.database_folder, flagdefs.image_size()
    output = Path(FLAGS.output_dir or "outputs/serve")
    if database is None:
        from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE
        from attllm_jax.localization.demo import prepare_localize_demo

        if FLAGS.database_csv:
            fail("serve", "--database_csv needs --database_folder", usage=True)
        database = str(prepare_localize_demo(FLAGS.cache_dir)[0])
        image_size = image_size or DEMO_IMAGE_SIZE
    # the default alpha applies to requests with attention; one without is the plain model whatever alpha
    alpha, sigma, blend = cli.blend_from_flags("serve", 0.5)
    output.mkdir(parents=True, exist_ok=True)
    return LocalizeSettings(
        images=str(output),  # not read: uploads are decoded in memory
        output_dir=str(output),
        database_folder=database,
        image_size=image_size,
        alpha=alpha,
        sigma=sigma,
        blend=blend,
        **flagdefs.localize_fields(),
    )


def serve_settings():
    """The service's settings of the flags (one usage line for a bad one)."""
    from attllm_jax.serve.attention import ProviderSettings
    from attllm_jax.serve.service import ServeSettings

    token = None
    if FLAGS.token_file:
        try:
            token = Path(FLAGS.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            fail("serve", f"--token_file {FLAGS.token_file}: cannot read it ({error})")
        if not token:
            fail("serve", f"--token_file {FLAGS.token_file} is empty")
    localize = localize_settings()
    provider = ProviderSettings(
        FLAGS.provider, FLAGS.llm_model, FLAGS.base_url, FLAGS.attention_timeout, FLAGS.city, FLAGS.prompt
    )
    return ServeSettings(
        localize=localize,
        max_batch=FLAGS.max_batch,
        max_wait_ms=FLAGS.max_wait_ms,
        max_queue=FLAGS.max_queue,
        max_upload_mb=FLAGS.max_upload_mb,
        token=token,
        decode_threads=FLAGS.workers_threads,
        default_alpha=localize.alpha,
        max_top_k=FLAGS.max_top_k,
        provider=provider,
        warmup_sizes=tuple(_size(s) for s in FLAGS.warmup or ()),
    )


def main(argv):
    if len(argv) > 1:
        fail("serve", f"unexpected arguments: {argv[1:]}", usage=True)
    try:
        import uvicorn

        from attllm_jax.serve.app import configure_access_log, create_app
    except ImportError as error:
        fail("serve", f"{error.name or error} is missing: install the service's extra, pip install 'attllm-jax[serve]'")
    from attllm_jax.evaluation.progress import setup_logging
    from attllm_jax.serve.attention import AttentionAsker, make_provider
    from attllm_jax.serve.service import Service

    settings = serve_settings()
    try:
        settings = settings.validated()
        settings.localize.validated()
        asker = None
        if settings.provider.provider != "none":
            asker = AttentionAsker(make_provider(settings.provider), settings.provider)
    except (ValueError, FileNotFoundError, KeyError) as error:
        fail("serve", str(error).strip("'\""))
    setup_logging(Path(settings.localize.output_dir) / "serve.log")
    configure_access_log(Path(settings.localize.output_dir) / "serve.log")
    logging.getLogger("attllm_jax").info("serve flags: %s", cli.flag_values(__name__))
    cli.print_runtime("serve", settings.localize.precision)
    service = Service(settings, asker)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop(error: str) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(service, on_load_failure=stop)
    config = uvicorn.Config(app, host=FLAGS.host, port=FLAGS.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    for number in (signal.SIGTERM, signal.SIGINT):
        # uvicorn re-raises the signal it shut down on, with the handler found here: a graceful stop exits 0
        signal.signal(number, lambda *_: None)
    server.run()
    if failed:
        fail("serve", f"cannot start: {failed[0]}")
    return 0


def help_text() -> str:
    """This module's docstring and its flags."""
    return cli.help_text(__doc__, flagdefs.module_key(__name__))


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-serve``, also ``python -m experiments.serve``)."""
    cli.run_command("serve", main, help_text, argv)


if __name__ == "__main__":
    sys.exit(run())
