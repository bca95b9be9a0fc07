"""``localize(settings)``: place photos without coordinates on the map, with the eval pipeline's own stages.

The stages are the library's: the database image set and its resumable descriptor store
(:func:`~attllm_jax.evaluation.pipeline.database_store`), the model (:func:`load_eval_model`), the attention
answers (:func:`load_query_attention`), query extraction (:func:`extract_queries`) and search
(:func:`~attllm_jax.evaluation.pipeline.retrieve`). Photos are processed in chunks; each photo's result is written
atomically to ``OUT/photos/<photo>.json`` as soon as its chunk is searched, so a kill loses nothing written and a
rerun with the same settings key skips them. With ``settings.ask`` the attention is asked on the fly
(:mod:`attllm_jax.localization.ask`): chunks are formed from the photos whose answers are stored while the other
requests are in flight. One run holds the output folder (:class:`~attllm_jax.outputs.OutputLock`, "localize").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from attllm_jax.data.coordinates import Location
from attllm_jax.data.dataset import ImageSet, load_image_set
from attllm_jax.evaluation.attention_source import load_query_attention
from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.extract import extract_queries, weights_digest
from attllm_jax.evaluation.pipeline import database_store, load_eval_model, retrieve
from attllm_jax.evaluation.strips import applied_kind
from attllm_jax.files import atomic_write_json, list_image_files
from attllm_jax.localization.ask import ATTENTION_DIR, AskSettings, AttentionStream
from attllm_jax.localization.calibration import FEATURES, Calibration, load_calibration
from attllm_jax.localization.estimate import ESTIMATORS, estimate_position, ranking_features
from attllm_jax.localization.exif import read_exif_gps
from attllm_jax.localization.geo import database_positions, database_zone, to_latlon
from attllm_jax.localization.results import Match, PhotoResult
from attllm_jax.localization.timing import TimedModel
from attllm_jax.models.blend import with_blend
from attllm_jax.ops.gem import BLENDS
from attllm_jax.outputs import OutputLock
from attllm_jax.retrieval.positives import haversine_m
from attllm_jax.retrieval.rerank import RerankSpec, parse_rerank, rerank
from attllm_jax.retrieval.retrieve import Retrieval

log = logging.getLogger("attllm_jax.localization")
PHOTOS_DIR = "photos"


@dataclass(frozen=True)
class LocalizeSettings:
    """What to localize and how.

    Attributes:
        images: Folder of photos (nested folders allowed); names need no coordinates.
        output_dir: Where results go.
        database_folder: Database images (coordinates in names or ``database_csv``).
        database_csv: Optional coordinates CSV of the database.
        store_dir: Optional descriptor store (e.g. built by attllm-extract); default ``OUT/database_store``.
        utm_zone: Zone of plain-UTM database names, e.g. "10S".
        checkpoint / random_model / model_seed / precision / image_size: the model, as in eval.
        attention_dir: Attention files of the photos (annotate's naming), or None.
        alpha / sigma: The attention blend factor and the RBF width of point answers.
        blend: "native" (the published method) or "uniform" (:func:`attllm_jax.ops.gem.modulated_gem`).
        ask: Ask the photos' attention on the fly (stored in ``OUT/attention``), or None; not with
            ``attention_dir``.
        top_k: Candidates kept per photo.
        estimator: "top1" or "cluster".
        cluster_radius_m: Cluster radius of the "cluster" estimator, metres.
        radius_m: The radius the confidence refers to, metres.
        calibration: A calibration JSON (calibration.py), or None (confidence "uncalibrated").
        batch_size: Photos per device batch.
        chunk_photos: Photos per chunk written before the next starts.
        convention: Database file-name convention.
        rerank: One query-expansion stage (``aqe:k=5,w=0.8`` or ``alpha_qe:k=5,alpha=3``, eval's ``--rerank``
            syntax) or None: each photo's descriptor is expanded with its top-k matches of the first search and
            searched again; estimate, features and matches come from the second search. ``k <= top_k``.
    """

    images: str
    output_dir: str
    database_folder: str
    database_csv: str | None = None
    store_dir: str | None = None
    utm_zone: str | None = None
    checkpoint: str | None = None
    random_model: str = "cosplace"
    model_seed: int = 0
    precision: str = "float32"
    image_size: int | tuple[int, int] | None = None
    attention_dir: str | None = None
    alpha: float = 0.0
    sigma: float = 0.2
    blend: str = "native"
    ask: AskSettings | None = None
    top_k: int = 10
    estimator: str = "top1"
    cluster_radius_m: float = 25.0
    radius_m: float = 25.0
    calibration: str | None = None
    batch_size: int = 8
    chunk_photos: int = 32
    convention: str = "auto"
    rerank: str | None = None

    def validated(self) -> LocalizeSettings:
        """Checks the settings that need no data.

        Raises:
            ValueError: naming the first bad setting.
            FileNotFoundError: for a missing folder or file.
        """
        if not (math.isfinite(float(self.alpha)) and 0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"--alpha must lie in [0, 1], got {self.alpha}")
        for name in ("top_k", "batch_size", "chunk_photos"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cluster_radius_m", "radius_m"):
            if not (math.isfinite(float(getattr(self, name))) and float(getattr(self, name)) > 0):
                raise ValueError(f"--{name.removesuffix('_m')} must be a positive number of metres")
        if self.blend not in BLENDS:
            raise ValueError(f"--blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.ask is not None:
            if self.attention_dir is not None:
                raise ValueError("give --attention_dir (stored answers) or --provider (ask on the fly), not both")
            self.ask.validated()
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not Path(self.images).is_dir():
            raise FileNotFoundError(f"--images {self.images!r} is not a directory")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise FileNotFoundError(f"--calibration {self.calibration!r} is not a file")
        spec = self.rerank_spec  # RerankSpecError (a ValueError) names a malformed value
        if spec is not None and spec.k > int(self.top_k):
            raise ValueError(f"--rerank {self.rerank}: k = {spec.k} exceeds --top_k {self.top_k} (the matches kept)")
        replace(self.eval_config(), attention_dir=self.attention_dir).validated()  # OUT/attention: made later
        return replace(self, alpha=float(self.alpha), top_k=int(self.top_k))

    @property
    def rerank_spec(self) -> RerankSpec | None:
        """The parsed ``rerank`` stage, or None."""
        return None if self.rerank is None else parse_rerank(self.rerank)

    @property
    def answers_dir(self) -> str | None:
        """Where the photos' attention answers are read: ``attention_dir``, or ``OUT/attention`` when asking."""
        if self.ask is not None:
            return str(Path(self.output_dir) / ATTENTION_DIR) if self.ask.asks else None
        return self.attention_dir

    def eval_config(self) -> EvalConfig:
        """The eval settings of the shared stages (model, store, attention, extraction, search)."""
        return EvalConfig(
            database_folder=self.database_folder,
            queries_folder=self.images,
            output_dir=self.output_dir,
            checkpoint=self.checkpoint,
            attention_dir=self.answers_dir,
            alphas=(float(self.alpha),),
            recall_values=(1,),
            database_csv=self.database_csv,
            convention=self.convention,
            image_size=self.image_size,
            batch_size=self.batch_size,
            store_dir=self.store_dir,
            sigma=self.sigma,
            model_seed=self.model_seed,
            random_model=self.random_model,
            precision=self.precision,
        )


@dataclass
class LocalizeRun:
    """What :func:`localize` did.

    Attributes:
        photos: Every localized photo (this run's and earlier runs' with the same key), sorted by path.
        computed: Photos computed in this run.
        reused: Photos taken from an earlier run with the same settings key.
        skipped: ``{"photo", "reason"}`` for unreadable photos.
        settings_key: sha256 prefix of the settings that change a result.
        zone: The UTM zone of the database.
        database_latlon: ``[N, 2]`` database positions (for the report's street cloud).
        stage_seconds: Wall seconds per stage.
        calibration: The calibration used, or None.
        attention: The on-the-fly attention run's summary (annotate's ``Summary.to_dict()``), or None.
    """

    photos: list[PhotoResult]
    computed: int
    reused: int
    skipped: list[dict]
    settings_key: str
    zone: tuple[int, str]
    database_latlon: np.ndarray
    stage_seconds: dict
    calibration: Calibration | None
    attention: dict | None = None


def claim_output_dir(output_dir: str | Path) -> OutputLock:
    """Takes the output folder for one run: THE one claim of it (the CLI once for a whole run, --watch included;
    :func:`localize` itself when it is given no lock). Creates ``OUT`` and ``OUT/photos``.

    Raises:
        OutputLockError: another live run holds the folder (the message names the folder and the holder).
    """
    lock = OutputLock(output_dir, "localize").acquire()
    (Path(output_dir) / PHOTOS_DIR).mkdir(exist_ok=True)
    return lock


def list_photos(images: str | Path, output_dir: str | Path) -> list[str]:
    """The photos under ``images`` (sorted relative paths), the output folder excluded.

    Raises:
        FileNotFoundError: one line naming the folder when it holds no photo.
    """
    photos = list_image_files(images, exclude=output_dir)
    if not photos:
        raise FileNotFoundError(f"--images {images}: no .jpg/.jpeg/.png photo in the folder")
    return photos


def settings_key(settings: LocalizeSettings, digest: str, calibration_sha: str | None) -> str:
    """sha256 prefix of everything that changes a photo's result."""
    fields = asdict(settings)
    for name in ("images", "output_dir", "batch_size", "chunk_photos"):
        fields.pop(name)
    fields["ask"] = None if settings.ask is None else settings.ask.key_fields()
    if settings.rerank is None:
        fields.pop("rerank")  # the key of a run without re-ranking is the key it had before the stage existed
    else:
        fields["rerank"] = settings.rerank_spec.label()
    text = json.dumps({**fields, "weights": digest, "calibration": calibration_sha}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(out: Path, photo: str) -> Path:
    """Where one photo's result is stored."""
    return out / PHOTOS_DIR / f"{photo}.json"


def load_done(out: Path, photos: list[str], key: str) -> dict[str, PhotoResult]:
    """Results of earlier runs with the same key (an unreadable or other-key record is recomputed)."""
    done = {}
    for photo in photos:
        path = record_path(out, photo)
        if not path.is_file():
            continue
        try:
            result = PhotoResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError):
            continue
        if result.settings_key == key:
            done[photo] = result
    return done


def localize(
    settings: LocalizeSettings, model=None, photos: list[str] | None = None, lock: OutputLock | None = None
) -> LocalizeRun:
    """Localizes every photo of ``settings.images``; writes ``OUT/photos/<photo>.json`` per photo.

    The map files (GeoJSON, CSV, KML, report) are written by :func:`attllm_jax.localization.writers.write_outputs`.

    Args:
        settings: The run's settings.
        model: Optional already loaded model.
        photos: Only these photos (relative paths), e.g. the settled files of a watched folder; default all.
        lock: The output folder's lock when the caller holds it (:func:`claim_output_dir`); else this call takes
            the folder for its duration.

    Returns:
        The per-photo results and the bookkeeping.

    Raises:
        ValueError / FileNotFoundError: bad settings, an empty photo folder, or a database without zone
            information (:class:`~attllm_jax.localization.geo.ZoneUnknownError`), before any model work.
        OutputLockError: another run holds the output folder.
    """
    t_start = time.perf_counter()
    settings = settings.validated()
    config = settings.eval_config()
    photos = list_photos(settings.images, settings.output_dir) if photos is None else list(photos)
    database = load_image_set(config.database_folder, config.convention, config.database_csv)
    zone = database_zone(database, settings.utm_zone)
    own_lock = lock is None
    lock = claim_output_dir(settings.output_dir) if own_lock else lock
    try:
        return _localize_claimed(settings, config, model, photos, database, zone, t_start)
    finally:
        if own_lock:
            lock.release()


def _localize_claimed(settings, config, model, photos, database, zone, t_start) -> LocalizeRun:
    """:func:`localize` once the output folder is held: model, settings key, the database store, then the photos
    not yet done, chunk by chunk (with ``settings.ask``: as their answers arrive), each result written at once."""
    out = Path(settings.output_dir)
    planar, latlon = database_positions(database, zone)
    calibration, calibration_sha = load_checked_calibration(settings)
    stages = dict.fromkeys(("load_model", "database", "attention", "decode", "backbone", "aggregation", "search"), 0.0)
    t0 = time.perf_counter()
    model = load_localize_model(config, settings.blend, model)
    digest = weights_digest(model)
    stages["load_model"] = time.perf_counter() - t0
    key = settings_key(settings, digest, calibration_sha)
    done = load_done(out, photos, key)
    todo = [p for p in photos if p not in done]
    log.info("%d photos: %d done with settings key %s, %d to localize", len(photos), len(done), key, len(todo))
    results, skipped, attention_summary = dict(done), [], None
    if todo:
        stream = None
        if settings.ask is not None and settings.ask.asks:
            stream = AttentionStream(settings.images, settings.answers_dir, todo, settings.ask).start()
        try:
            t0 = time.perf_counter()
            store, _ = database_store(config, model, database, digest)
            try:
                contents = store.load()
            finally:
                store.close()
            stages["database"] = time.perf_counter() - t0
            context = _Context(
                settings,
                config,
                TimedModel(model),
                contents.descriptors,
                contents.valid,
                database,
                planar,
                latlon,
                zone,
                calibration,
                key,
                {} if stream is None else stream.asked,
            )
            for chunk, failed in _chunks(todo, settings, stream):
                skipped.extend(failed)
                if not chunk:
                    continue
                new, unreadable = _localize_chunk(context, chunk, stages)
                for result in new:
                    atomic_write_json(record_path(out, result.photo), result.to_dict())
                    results[result.photo] = result
                skipped.extend(unreadable)
        finally:
            if stream is not None:
                stream.close()
                attention_summary = None if stream.summary is None else stream.summary.to_dict()
    stages["extract"] = stages["decode"] + stages["backbone"] + stages["aggregation"]
    stages["total"] = time.perf_counter() - t_start
    ordered = [results[p] for p in photos if p in results]
    computed = len(ordered) - len(done)
    return LocalizeRun(ordered, computed, len(done), skipped, key, zone, latlon, stages, calibration, attention_summary)


def load_checked_calibration(settings: LocalizeSettings) -> tuple[Calibration | None, str | None]:
    """The settings' calibration and its file's sha256, or ``(None, None)``.

    Raises:
        ValueError: one line when the calibration was fitted on scores of another ``--rerank`` stage (or none):
            its confidence would be applied to a score distribution it never saw (docs/DESIGN.md section 10).
    """
    if not settings.calibration:
        return None, None
    calibration = load_calibration(settings.calibration)
    wanted = None if settings.rerank is None else settings.rerank_spec.label()
    if calibration.rerank != wanted:
        raise ValueError(
            f"--calibration {settings.calibration}: fitted with rerank {calibration.rerank or 'none'}, this run "
            f"uses {wanted or 'none'}; calibrate on scores of the same stage or drop --calibration"
        )
    return calibration, hashlib.sha256(Path(settings.calibration).read_bytes()).hexdigest()


def load_localize_model(config: EvalConfig, blend: str, model=None):
    """The eval model of ``config`` (or ``model``) aggregating with ``blend``.

    Raises:
        ValueError: a blend the model's family does not offer (only CosPlace / EigenPlaces have "uniform").
    """
    model = model if model is not None else load_eval_model(config)
    model = model.wrapped if isinstance(model, TimedModel) else model
    return with_blend(model, blend)


def _chunks(todo: list[str], settings: LocalizeSettings, stream: AttentionStream | None):
    """Yields ``(photos, skipped)``: the next photos to localize, and ``{"photo", "reason"}`` for photos whose
    attention could not be had. Without a stream, ``chunk_photos`` at a time; with one, the photos whose answers
    are stored, a device batch at a time (fewer only once no other answer is coming)."""
    if stream is None:
        for start in range(0, len(todo), settings.chunk_photos):
            yield todo[start : start + settings.chunk_photos], []
        return
    while True:
        got = stream.take(min(settings.batch_size, settings.chunk_photos))
        if not got:
            return
        ready = [photo for photo, error in got if error is None]
        failed = [{"photo": photo, "reason": f"attention: {error}"} for photo, error in got if error is not None]
        yield ready, failed


@dataclass
class _Context:
    settings: LocalizeSettings
    config: EvalConfig
    model: TimedModel
    descriptors: np.ndarray
    valid: np.ndarray
    database: ImageSet
    planar: np.ndarray
    latlon: np.ndarray
    zone: tuple[int, str]
    calibration: Calibration | None
    key: str
    asked: dict = field(default_factory=dict)


def _localize_chunk(ctx: _Context, chunk: list[str], stages: dict) -> tuple[list[PhotoResult], list[dict]]:
    """Attention, extraction and search of some photos, then one :class:`PhotoResult` each.

    Per-photo latency: each stage's time for the chunk divided by its photos, except the attention of a photo
    asked in this run, which is its own request's time (the LLM call, retries and rate-limit waits included).
    """
    s, config = ctx.settings, ctx.config
    images = ImageSet(root=Path(s.images), paths=tuple(chunk), locations=(Location(),) * len(chunk))
    t0 = time.perf_counter()
    attention = load_query_attention(images, s.answers_dir, list_unused=False)
    t1 = time.perf_counter()
    ctx.model.take()
    q = extract_queries(
        ctx.model,
        images,
        attention.parsed,
        (s.alpha,),
        batch_size=config.batch_size,
        image_size=config.image_size,
        sigma=config.sigma,
    )
    t2 = time.perf_counter()
    model_seconds = ctx.model.take()
    retrieval, rerank_s = search_photos(ctx, q.descriptors, q.valid)
    t3 = time.perf_counter()
    seconds = {
        "attention": t1 - t0,
        "decode": max(0.0, (t2 - t1) - model_seconds["backbone"] - model_seconds["aggregation"]),
        **model_seconds,
        "search": t3 - t2,
    }
    if rerank_s is not None:
        seconds["rerank"] = rerank_s  # expansion + second search, also inside "search"
    for name, value in seconds.items():
        stages[name] = stages.get(name, 0.0) + value  # "rerank" only with --rerank
    shared = {name: value / len(chunk) for name, value in seconds.items()}
    shared["extract"] = (t2 - t1) / len(chunk)
    results = []
    for i, photo in enumerate(chunk):
        if not q.valid[i]:
            continue
        latency = dict(shared)
        if ctx.asked.get(photo) is not None:
            latency["attention"] = latency["llm_call"] = ctx.asked[photo]
        kind = applied_kind(attention.parsed[i], bool(q.with_attention[i]))
        results.append(photo_result(ctx, photo, retrieval.predictions[0, i], retrieval.scores[0, i], kind, latency))
    failed = [
        {"photo": f.path if not Path(f.path).is_absolute() else _relative(f.path, s.images), "reason": f.error}
        for f in q.failures
    ]
    return results, failed


def search_photos(ctx: _Context, descriptors: np.ndarray, valid: np.ndarray) -> tuple[Retrieval, float | None]:
    """The photos' search: the first one, then with ``settings.rerank`` the expanded descriptors' search.

    Args:
        ctx: The context (database descriptors ``[N, D]`` and validity ``[N]``).
        descriptors: ``[1, P, D]`` the photos' descriptors at the run's alpha; ``valid`` ``[P]`` bool.

    Returns:
        The retrieval whose ``predictions`` / ``scores`` ``[1, P, K]`` give the matches (K = ``top_k``, at most
        the valid database rows), and the re-ranking's seconds (None without it).
    """
    s = ctx.settings
    empty = [np.zeros(0, np.int64)] * descriptors.shape[1]
    top_k = min(s.top_k, int(ctx.valid.sum()))
    first = retrieve(
        ctx.descriptors, ctx.valid, descriptors, valid, empty, (s.alpha,), (1,), top_k, spec=ctx.config.search
    )
    spec = s.rerank_spec
    if spec is None:
        return first, None
    t0 = time.perf_counter()
    if spec.k > top_k:
        raise ValueError(f"--rerank {s.rerank}: k = {spec.k} exceeds the {top_k} valid database descriptors")
    second, _ = rerank(spec, ctx.descriptors, ctx.valid, descriptors, valid, first, empty, search=ctx.config.search)
    return second, time.perf_counter() - t0


def _relative(path: str, root: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def photo_result(
    ctx: _Context, photo: str, indices: np.ndarray, scores: np.ndarray, kind: str, latency: dict, source=None
):
    """One photo's result from its top-K; ``source`` (a path or file object) is where its EXIF is read, default
    the photo's file under the images folder (the service passes the uploaded bytes)."""
    s = ctx.settings
    keep = indices >= 0
    indices, scores = indices[keep], scores[keep].astype(np.float64)
    positions = ctx.planar[indices]
    estimate = estimate_position(positions, scores, s.estimator, s.cluster_radius_m)
    lat, lon = to_latlon(np.array([[estimate.east, estimate.north]]), ctx.zone)[0]
    features = ranking_features(positions, scores, estimate, s.radius_m)
    distances = np.hypot(positions[:, 0] - estimate.east, positions[:, 1] - estimate.north)
    matches = tuple(
        Match(r + 1, ctx.database.paths[i], float(ctx.latlon[i, 0]), float(ctx.latlon[i, 1]), float(sc), float(d))
        for r, (i, sc, d) in enumerate(zip(indices, scores, distances, strict=True))
    )
    confidence = None
    if ctx.calibration is not None:
        confidence = float(ctx.calibration.predict(np.array([[features[f] for f in FEATURES]]))[0])
    claimed = read_exif_gps(Path(s.images) / photo if source is None else source)
    claimed_distance = None if claimed is None else float(haversine_m(claimed[0], claimed[1], lat, lon))
    return PhotoResult(
        photo,
        float(lat),
        float(lon),
        estimate.radius_m,
        confidence,
        "calibrated" if confidence is not None else "uncalibrated",
        s.radius_m,
        features,
        matches,
        kind,
        claimed,
        claimed_distance,
        latency,
        ctx.key,
        None if s.rerank is None else {"spec": s.rerank_spec.label()},
    )


@dataclass
class SettledFiles:
    """Which photos of a watched folder are complete: a file is settled when its size and modification time are
    the same at two polls and it was last modified at least ``settle_s`` seconds ago (a file still being copied
    keeps changing, so it is not read).
    """

    settle_s: float = 2.0
    last: dict = field(default_factory=dict)

    def poll(self, images: str | Path, output_dir: str | Path) -> list[str]:
        """The settled photos now (sorted relative paths)."""
        now, ready, seen = time.time(), [], {}
        for photo in list_image_files(images, exclude=output_dir):
            try:
                stat = (Path(images) / photo).stat()
            except OSError:
                continue
            seen[photo] = (stat.st_size, stat.st_mtime_ns)
            if stat.st_size > 0 and self.last.get(photo) == seen[photo] and now - stat.st_mtime >= self.settle_s:
                ready.append(photo)
        self.last = seen
        return ready


def open_context(settings: LocalizeSettings, model=None) -> _Context:
    """Everything :func:`localize` loads before its first photo, for callers that localize photos as they come
    (``attllm_jax.serve``): the model, the database store's descriptors, positions and zone, the calibration.

    Args:
        settings: The settings (``images`` must be an existing folder; it is not listed).
        model: Optional already loaded model.

    Returns:
        The context :func:`_localize_chunk` and :func:`photo_result` take.

    Raises:
        ValueError / FileNotFoundError: as :func:`localize`.
    """
    settings = settings.validated()
    config = settings.eval_config()
    database = load_image_set(config.database_folder, config.convention, config.database_csv)
    zone = database_zone(database, settings.utm_zone)
    planar, latlon = database_positions(database, zone)
    calibration, calibration_sha = load_checked_calibration(settings)
    model = load_localize_model(config, settings.blend, model)
    digest = weights_digest(model)
    store, _ = database_store(config, model, database, digest)
    try:
        contents = store.load()
    finally:
        store.close()
    key = settings_key(settings, digest, calibration_sha)
    return _Context(
        settings, config, model, contents.descriptors, contents.valid, database, planar, latlon, zone, calibration, key
    )
