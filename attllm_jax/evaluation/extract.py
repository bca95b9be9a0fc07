"""Descriptor extraction: the database into a resumable store, the queries for a whole alpha grid at once.

Batches are sharded over all local devices (a 1-D ``data`` mesh); on one CPU device that is a no-op. The device
computes batch k while the host converts batch k-1's descriptors and the decode threads prepare later images.

In a multi-process run (:mod:`~attllm_jax.evaluation.hosts`) every process fills its share of one store on shared
storage (a shared directory or a kvstore URL): process 0 opens (creates, resumes or rebuilds) the store, then the
others open it; every process reads the pending chunks, and after a barrier takes every P-th of them (round robin,
so the shares differ by at most one chunk). A process decodes only its share's images and runs the model on its
own devices, so the extraction needs no cross-host collective and the processes need not run in lockstep: a
process whose share is done waits at the next barrier; the last batch of every chunk is padded to the local device
count and the padding rows are masked out (never written). Each process writes the chunks it owns (data, then the
chunk's marker), so a killed run of any process resumes per chunk and no complete chunk is computed again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attllm_jax.attention.maps import Answer, attention_maps, attention_mask
from attllm_jax.data.dataset import ImageSet
from attllm_jax.data.images import DECODING
from attllm_jax.data.loading import Batch, LoadFailure, batch_pixel_budget, load_batches
from attllm_jax.evaluation import hosts
from attllm_jax.evaluation.progress import Progress
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.retrieval.store import DescriptorStore

log = logging.getLogger("attllm_jax.evaluation")


def data_sharding() -> NamedSharding:
    """Batch-dimension sharding over every local device (a 1-D mesh named "data")."""
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def database_batch_size(batch_size: int, chunk_size: int) -> int:
    """Rows of a database batch: ``batch_size`` capped at ``chunk_size``, rounded up to the device count.

    A batch never holds images of two chunks (every chunk is flushed when the next begins), so rows beyond the chunk
    size would only be padding: ``--batch_size 1000 --chunk_size 4`` would compute 1000 rows for 4 images. The
    pixel budget stays that of the batch size asked for, so the same images are refused as too large.
    """
    return device_batch_size(min(int(batch_size), int(chunk_size)))


def device_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of the local device count."""
    n = jax.local_device_count()
    return -(-int(batch_size) // n) * n


def weights_digest(model: DescriptorModel) -> str:
    """sha256 over the model's parameter and statistic arrays (with their paths), keys descriptor stores."""
    from flax import nnx

    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model.net))
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _preprocess_fn(model: DescriptorModel, image_size) -> Callable:
    return lambda image: model.preprocess(image, image_size=image_size)


def output_size_fn(model, image_size) -> Callable[[int, int], tuple[int, int]]:
    """Source ``(width, height)`` -> preprocessed ``(width, height)``, for refusing images from their header."""
    return lambda width, height: model.output_size(width, height, image_size)


class NonFiniteDescriptorError(ValueError):
    """The model gives NaN or infinite descriptors from its first batch on: its weights are broken."""


@dataclass
class FiniteGuard:
    """Finds non-finite descriptor rows; fails fast when the model gives nothing finite at all.

    A row with a NaN or infinite value is never stored as valid nor searched: the caller skips and counts it like
    an unreadable image. A batch in which every real row is non-finite, before any finite descriptor was seen in
    this extraction, raises :class:`NonFiniteDescriptorError` naming the model (weights that give NaN everywhere),
    before anything of it is written.
    """

    model_label: str
    seen_finite: bool = False

    def finite_rows(self, descriptors: np.ndarray, real: np.ndarray, first_path: str) -> np.ndarray:
        """``[B]`` bool, True where the row of ``descriptors`` (``[B, D]`` or ``[K, B, D]``) is all finite.

        Args:
            descriptors: The batch's descriptors, rows on the second-to-last axis.
            real: ``[B]`` bool, False for padding rows (not checked).
            first_path: The batch's first image, named in the error.
        """
        values = np.asarray(descriptors)
        finite = np.isfinite(values).all(axis=-1)
        if finite.ndim == 2:  # [K, B]: a query row is finite only if it is at every alpha
            finite = finite.all(axis=0)
        if real.any() and not finite[real].any() and not self.seen_finite:
            raise NonFiniteDescriptorError(
                f"model {self.model_label} gives non-finite (NaN or infinite) descriptors for every image of its "
                f"first batch (e.g. {first_path}); its weights are broken: convert the checkpoint again"
            )
        self.seen_finite = self.seen_finite or bool(finite[real].any())
        return finite | ~real


def model_label(model) -> str:
    """``"cosplace resnet18/512 (weights: resnet18_512.pth)"``: the model and where its weights came from."""
    provenance = model.spec.provenance
    return f"{model.spec.describe()} (weights: {provenance.weights or provenance.source_file or 'unknown'})"


def non_finite_failure(index: int, path: str, label: str) -> LoadFailure:
    """The failure record of an image whose descriptor is not finite."""
    return LoadFailure(index, path, f"NonFiniteDescriptorError: model {label} gave a NaN or infinite descriptor")


def _pipelined(batches, compute: Callable[[Batch], object]):
    """Yields ``(batch, result)`` with the next batch dispatched before the previous result is read."""
    pending = None
    for batch in batches:
        result = compute(batch)  # asynchronous dispatch
        if pending is not None:
            yield pending
        pending = (batch, result)
    if pending is not None:
        yield pending


@dataclass
class DatabaseExtraction:
    """What extracting (or reusing) the database store did.

    Attributes:
        status: The store's status as this process opened it ("created", "reused", "resumed", "rebuilt").
        chunks_total: Chunks in the store.
        chunks_computed: Chunks computed by this process in this run.
        images_computed: Images decoded and run through the model by this process in this run.
        seconds: Wall time of this process's extraction.
        per_process: On process 0, every process's ``{"process", "status", "chunks_computed", "images_computed",
            "seconds"}`` (one entry in a one-process run); on the others, their own only.
    """

    status: str
    chunks_total: int
    chunks_computed: int = 0
    images_computed: int = 0
    seconds: float = 0.0
    per_process: list[dict] = field(default_factory=list)

    @property
    def all_chunks_computed(self) -> int:
        """Chunks computed in this run by every process (known on process 0)."""
        return sum(p["chunks_computed"] for p in self.per_process) if self.per_process else self.chunks_computed

    @property
    def all_images_computed(self) -> int:
        """Images computed in this run by every process (known on process 0)."""
        return sum(p["images_computed"] for p in self.per_process) if self.per_process else self.images_computed

    def entry(self) -> dict:
        """The figures of this extraction (results.json's ``store`` entry adds the store's layout)."""
        return {
            "status": self.per_process[0]["status"] if self.per_process else self.status,
            "chunks_total": self.chunks_total,
            "chunks_computed": self.all_chunks_computed,
            "images_computed": self.all_images_computed,
            "per_process": self.per_process,
        }


@dataclass
class _ChunkBuffer:
    start: int
    stop: int
    dim: int | None
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def __post_init__(self):
        self.valid = np.zeros(self.stop - self.start, dtype=bool)
        self.remaining = self.stop - self.start

    def put(self, index: int, descriptor: np.ndarray) -> None:
        self.rows[index] = descriptor
        self.valid[index - self.start] = True
        self.dim = self.dim or descriptor.shape[-1]
        self.remaining -= 1

    def fail(self, failure: LoadFailure) -> None:
        self.failures.append({"index": failure.index, "path": failure.path, "error": failure.error})
        self.remaining -= 1

    def descriptors(self) -> np.ndarray:
        out = np.zeros((self.stop - self.start, int(self.dim or 1)), dtype=np.float32)
        for index, row in self.rows.items():
            out[index - self.start] = row
        return out


@dataclass
class _ChunkFill:
    """The open chunk buffers of one database extraction: each chunk is written as soon as its last image is done."""

    store: DescriptorStore
    images: ImageSet
    summary: DatabaseExtraction
    progress: Progress
    buffers: dict[int, _ChunkBuffer]

    def finish_if_complete(self, chunk: int) -> None:
        buffer = self.buffers[chunk]
        if buffer.remaining == 0:
            self.store.write_chunk(chunk, buffer.descriptors(), buffer.valid, buffer.failures)
            log.info("wrote store chunk %d (images %d..%d)", chunk, buffer.start, buffer.stop)
            self.summary.chunks_computed += 1
            del self.buffers[chunk]

    def on_failure(self, failure: LoadFailure) -> None:
        """An image that could not be decoded: recorded in its chunk as a failure."""
        log.warning("skipping unreadable database image %s (%s)", failure.path, failure.error)
        chunk = self.store.chunk_of(failure.index)
        self.buffers[chunk].fail(failure)
        self.progress.update()
        self.finish_if_complete(chunk)

    def add_batch(self, batch: Batch, descriptors: np.ndarray, finite: np.ndarray, label: str) -> None:
        """Puts a batch's finite rows into their chunk buffers and records the others as failures."""
        touched = set()
        for row, index in enumerate(int(i) for i in batch.indices):
            if index < 0:
                continue
            chunk = self.store.chunk_of(index)
            if finite[row]:
                self.buffers[chunk].put(index, descriptors[row])
            else:
                failure = non_finite_failure(index, str(self.images.absolute(index)), label)
                log.warning("skipping database image %s: %s", failure.path, failure.error)
                self.buffers[chunk].fail(failure)
            touched.add(chunk)
        self.summary.images_computed += batch.num_valid
        self.progress.update(batch.num_valid)
        for chunk in sorted(touched):
            self.finish_if_complete(chunk)


def extract_database(
    model: DescriptorModel,
    images: ImageSet,
    store: DescriptorStore,
    *,
    batch_size: int,
    image_size=None,
    num_workers: int | None = None,
    max_batch_pixels: int | None = None,
    progress_interval_s: float = 5.0,
    chunks: Sequence[int] | None = None,
) -> DatabaseExtraction:
    """Fills the store's missing chunks (or the missing ones of ``chunks``) with database descriptors.

    Unreadable images are skipped: their row is zeros with ``valid`` False, and a failure record is kept in the
    chunk. A chunk is written (atomically) as soon as all its images are done, so an interrupted run resumes
    from the last complete chunk.

    Args:
        model: A :class:`~attllm_jax.models.vpr.VPRModel`.
        images: The database image set.
        store: The opened store (its ``num_items`` must equal ``len(images)``).
        batch_size: Images per device batch (capped at the chunk size, see :func:`database_batch_size`).
        image_size: Optional resize override passed to ``model.preprocess``.
        num_workers: Decode threads.
        max_batch_pixels: Pixel budget of a batch (None = batch_size megapixels); larger images are skipped.
        progress_interval_s: Seconds between progress lines.
        chunks: The chunks this call may fill (a process's share); default every chunk.

    Returns:
        A summary of the work done.
    """
    if store.num_items != len(images):
        raise ValueError(f"store covers {store.num_items} items, the database has {len(images)} images")
    wanted = None if chunks is None else {int(c) for c in chunks}
    pending = [c for c in store.pending_chunks() if wanted is None or c in wanted]
    summary = DatabaseExtraction(store.status, store.num_chunks)
    if not pending:
        return summary
    max_batch_pixels = batch_pixel_budget(batch_size, max_batch_pixels)  # the budget of the batch size asked for
    batch_size = database_batch_size(batch_size, store.chunk_size)
    sharding = data_sharding()
    model.replicate(sharding.mesh)
    buffers = {c: _ChunkBuffer(*store.chunk_range(c), model.spec.descriptor_dim) for c in pending}
    todo = [i for c in pending for i in range(*store.chunk_range(c))]
    label = "database images" + (f" (process {hosts.process_index()})" if hosts.process_count() > 1 else "")
    fill = _ChunkFill(store, images, summary, Progress(label, len(todo), log, progress_interval_s), buffers)
    batches = load_batches(
        ((i, str(images.absolute(i))) for i in todo),
        _preprocess_fn(model, image_size),
        batch_size,
        fill.on_failure,
        group_of=store.chunk_of,
        num_workers=num_workers,
        max_batch_pixels=max_batch_pixels,
        row_multiple=jax.local_device_count(),
        output_size=output_size_fn(model, image_size),
        root=images.root,
    )
    # features + aggregate (not __call__): the queries reuse the same compiled backbone for the same shape
    compute = lambda batch: model.aggregate(model.features(jax.device_put(batch.images, sharding)))  # noqa: E731
    guard = FiniteGuard(model_label(model))
    for batch, result in _pipelined(batches, compute):
        descriptors = np.asarray(result)
        finite = guard.finite_rows(descriptors, batch.indices >= 0, str(images.absolute(int(batch.indices[0]))))
        fill.add_batch(batch, descriptors, finite, guard.model_label)
    if fill.buffers:  # only reachable if the stream lost items, which would be a bug
        raise RuntimeError(f"database extraction left chunks {sorted(fill.buffers)} incomplete")
    summary.seconds = fill.progress.finish()
    return summary


def database_store_key(
    model: DescriptorModel, database: ImageSet, image_size=None, weights_sha256: str | None = None
) -> dict:
    """What database descriptors depend on: the model and its precision, its weights, the resize override, how
    images are decoded (:data:`~attllm_jax.data.images.DECODING`) and the image list."""
    return {
        "model": model.spec.to_dict(),
        "decoding": DECODING,
        "precision": model.precision,
        "weights_sha256": weights_sha256 or weights_digest(model),
        "image_size": image_size,
        "images": database.fingerprint(),
    }


def build_database_store(
    model: DescriptorModel,
    database: ImageSet,
    location,
    *,
    chunk_size: int,
    store_dtype: str = "float32",
    batch_size: int,
    image_size=None,
    num_workers: int | None = None,
    weights_sha256: str | None = None,
    max_batch_pixels: int | None = None,
) -> tuple[DescriptorStore, DatabaseExtraction]:
    """Opens (creating, resuming or rebuilding) the database store and fills its missing chunks.

    Args:
        model: A :class:`~attllm_jax.models.vpr.VPRModel`.
        database: The database image set.
        location: Store directory or kvstore URL.
        chunk_size: Images per chunk.
        store_dtype: "float32" or "float16".
        batch_size: Images per device batch.
        image_size: Optional resize override.
        num_workers: Decode threads.
        weights_sha256: The model's weights digest when already computed.
        max_batch_pixels: Pixel budget of a batch (None = batch_size megapixels); larger images are skipped.

    Returns:
        The open store (the caller closes it) and what the extraction did.

    In a multi-process run every process calls this with the same arguments; each fills its share (see the module
    notes) and all return once the store is complete. Only process 0 writes the image list.
    """
    key = database_store_key(model, database, image_size, weights_sha256)
    dim = model.spec.descriptor_dim
    store = _open_on_every_process(
        lambda: DescriptorStore.open(location, key, len(database), chunk_size, dim=dim, dtype=store_dtype)
    )
    try:
        mine = _my_pending_chunks(store)
        summary = extract_database(
            model,
            database,
            store,
            batch_size=batch_size,
            image_size=image_size,
            num_workers=num_workers,
            max_batch_pixels=max_batch_pixels,
            chunks=mine,
        )
        record = {"process": hosts.process_index(), **asdict(summary)}
        del record["per_process"]
        summary.per_process = hosts.gather_json("database_extraction", record)  # a barrier: every share is done
        if hosts.process_index() == 0:
            _check_complete(store)
            store.write_paths(list(database.paths))
    except BaseException:
        store.close()
        raise
    return store, summary


def _open_on_every_process(open_store: Callable[[], DescriptorStore]) -> DescriptorStore:
    """Process 0 creates, resumes or rebuilds the store; after a barrier the others open it."""
    store = open_store() if hosts.process_index() == 0 else None
    hosts.barrier("store_opened")
    return store or open_store()


def _my_pending_chunks(store: DescriptorStore) -> list[int]:
    """This process's share of the store's pending chunks, once every process has read the same pending list."""
    pending = store.pending_chunks()
    hosts.barrier("store_pending_read")  # nobody writes before every process has read the same pending list
    mine = hosts.share(pending)
    log.info(
        "descriptor store %s: %s (%d chunks pending of %d, %d images each, %s)%s",
        store.directory,
        store.status,
        len(pending),
        store.num_chunks,
        store.chunk_size,
        store.dtype,
        f"; process {hosts.process_index()} of {hosts.process_count()} takes {len(mine)}"
        if hosts.process_count() > 1
        else "",
    )
    return mine


def _check_complete(store: DescriptorStore) -> None:
    """Raises when chunks are still missing after every process's share is done (a store not on shared storage)."""
    left = store.pending_chunks(refresh=True) if hosts.process_count() > 1 else []  # the others wrote chunks
    if left:
        raise RuntimeError(
            f"store {store.directory} still misses chunks {left[:5]} after every process finished; in a "
            "multi-process run the store must be on storage every process sees (a shared folder or a URL)"
        )


@dataclass
class QueryDescriptors:
    """Query descriptors for every alpha.

    Attributes:
        descriptors: ``[K, Q, D]`` float32 (zeros for unreadable queries).
        valid: ``[Q]`` bool, False for unreadable queries.
        with_attention: ``[Q]`` bool, True where an attention map was applied.
        failures: The unreadable queries.
        seconds: Wall time.
    """

    descriptors: np.ndarray
    valid: np.ndarray
    with_attention: np.ndarray
    failures: list[LoadFailure]
    seconds: float


@dataclass
class _QueryRows:
    """The query descriptors of every alpha as batches come in; unreadable and non-finite queries counted."""

    images: ImageSet
    num_alphas: int
    guard: FiniteGuard
    progress: Progress
    out: np.ndarray | None = None
    failures: list[LoadFailure] = field(default_factory=list)

    def __post_init__(self):
        self.valid = np.zeros(len(self.images), dtype=bool)
        self.applied = np.zeros(len(self.images), dtype=bool)

    def on_failure(self, failure: LoadFailure) -> None:
        """A query image that could not be decoded."""
        log.warning("skipping unreadable query image %s (%s)", failure.path, failure.error)
        self.failures.append(failure)
        self.progress.update()

    def add_batch(self, batch: Batch, mask: np.ndarray, result: np.ndarray) -> None:
        """Keeps a batch's ``[K, B, D]`` rows that are real and finite; records the non-finite ones as failures."""
        if self.out is None:
            self.out = np.zeros((self.num_alphas, len(self.images), result.shape[-1]), dtype=np.float32)
        real = batch.indices >= 0
        finite = self.guard.finite_rows(result, real, str(self.images.absolute(int(batch.indices[0]))))
        for index in batch.indices[real & ~finite]:
            path = str(self.images.absolute(int(index)))
            self.failures.append(non_finite_failure(int(index), path, self.guard.model_label))
            log.warning("skipping query image %s: %s", self.failures[-1].path, self.failures[-1].error)
        keep = real & finite
        self.out[:, batch.indices[keep]] = result[:, keep]
        self.valid[batch.indices[keep]] = True
        self.applied[batch.indices[keep]] = mask[keep]
        self.progress.update(batch.num_valid)

    def finish(self, descriptor_dim: int) -> QueryDescriptors:
        """The descriptors (zeros ``[K, Q, descriptor_dim]`` when no query could be read) and bookkeeping."""
        out = self.out
        if out is None:
            out = np.zeros((self.num_alphas, len(self.images), descriptor_dim), dtype=np.float32)
        seconds = self.progress.finish()
        return QueryDescriptors(out, self.valid, self.applied, self.failures, seconds)


def extract_queries(
    model: DescriptorModel,
    images: ImageSet,
    attention: Sequence[Answer],
    alphas: Sequence[float],
    *,
    batch_size: int,
    image_size=None,
    num_workers: int | None = None,
    sigma: float = 0.2,
    grid_interpolate: bool = False,
    max_batch_pixels: int | None = None,
    progress_interval_s: float = 5.0,
) -> QueryDescriptors:
    """Backbone features once per query, attention maps once per query, every alpha in one vmapped call.

    A query without attention (no file, "none" or invalid answer) gets the plain descriptor for every alpha: an
    all-ones map blended with alpha > 0 would not be "no attention" under the native blend.

    Args:
        model: A :class:`~attllm_jax.models.vpr.VPRModel`.
        images: The query image set.
        attention: One parsed answer (or None, or an ensemble ``MeanAttention``) per query.
        alphas: ``[K]`` blend factors.
        batch_size: Queries per device batch (capped at the number of queries; the pixel budget stays that of
            ``batch_size``).
        image_size: Optional resize override.
        num_workers: Decode threads.
        sigma: RBF width of point answers.
        grid_interpolate: Bilinear grid maps.
        max_batch_pixels: Pixel budget of a batch (None = batch_size megapixels); larger images are skipped.
        progress_interval_s: Seconds between progress lines.

    Returns:
        The descriptors and bookkeeping.
    """
    if len(attention) != len(images):
        raise ValueError(f"{len(attention)} attention entries for {len(images)} queries")
    alphas = np.asarray(alphas, dtype=np.float32)
    max_batch_pixels = batch_pixel_budget(batch_size, max_batch_pixels)
    batch_size = device_batch_size(min(int(batch_size), max(1, len(images))))  # never more rows than queries
    sharding = data_sharding()
    model.replicate(sharding.mesh)
    progress = Progress("query images", len(images), log, progress_interval_s)
    rows = _QueryRows(images, len(alphas), FiniteGuard(model_label(model)), progress)

    def compute(batch: Batch):
        feats = model.features(jax.device_put(batch.images, sharding))
        answers = [attention[i] if i >= 0 else None for i in batch.indices]
        return aggregate_query_batch(model, feats, answers, batch.indices >= 0, alphas, sigma, grid_interpolate)

    batches = load_batches(
        ((i, str(images.absolute(i))) for i in range(len(images))),
        _preprocess_fn(model, image_size),
        batch_size,
        rows.on_failure,
        num_workers=num_workers,
        max_batch_pixels=max_batch_pixels,
        row_multiple=jax.local_device_count(),
        output_size=output_size_fn(model, image_size),
        root=images.root,
    )
    for batch, (mask, sweep, plain) in _pipelined(batches, compute):
        rows.add_batch(batch, mask, combine_query_batch(mask, sweep, plain, len(alphas)))
    return rows.finish(model.spec.descriptor_dim)


def aggregate_query_batch(
    model: DescriptorModel,
    feats,
    rows: Sequence[Answer],
    real: np.ndarray,
    alphas: np.ndarray,
    sigma: float,
    grid_interpolate: bool,
):
    """Dispatches (asynchronously) one feature batch's descriptors for every alpha.

    Args:
        model: A :class:`~attllm_jax.models.vpr.VPRModel`.
        feats: :meth:`features` output of a ``[B, H, W, 3]`` batch.
        rows: ``[B]`` parsed answers (None for padding rows or queries without one).
        real: ``[B]`` bool, False for padding rows.
        alphas: ``[K]`` float32.
        sigma: RBF width of point answers.
        grid_interpolate: Bilinear grid maps.

    Returns:
        ``(mask [B] bool, sweep [K, B, D] or None, plain [B, D] or None)``: rows with attention take ``sweep``,
        the others ``plain`` (see :func:`combine_query_batch`).
    """
    mask = attention_mask(rows)
    plain = None if mask[real].all() else model.aggregate(feats)
    if not mask.any():
        return mask, None, plain
    height, width = model.feature_grid(feats)
    maps = attention_maps(rows, height, width, sigma=sigma, grid_interpolate=grid_interpolate)
    return mask, model.aggregate_sweep(feats, maps, alphas), plain


def combine_query_batch(mask: np.ndarray, sweep, plain, num_alphas: int) -> np.ndarray:
    """``[K, B, D]`` host descriptors of :func:`aggregate_query_batch` output: sweep rows where ``mask``, else plain."""
    if plain is None:
        return np.asarray(sweep)  # every real row has attention (padding rows are the caller's to drop)
    plain = np.asarray(plain)
    result = np.broadcast_to(plain, (num_alphas, *plain.shape))
    if sweep is not None:
        result = np.where(mask[None, :, None], np.asarray(sweep), result)
    return result
