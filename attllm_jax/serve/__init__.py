"""``attllm-serve``: localize as an HTTP service for a live stream of photos (issue 22; docs/DESIGN.md, the service).

* :mod:`.app`: the FastAPI application (routes, middleware, error answers).
* :mod:`.service`: one request from its form to its answer, and the service's state and settings.
* :mod:`.engine`: the loaded model and database; decoding an upload, localizing a batch (localize's own code).
* :mod:`.batcher`: dynamic batching into size buckets.
* :mod:`.attention`: an uploaded attention answer, or one asked from the LLM within a deadline.
* :mod:`.errors`, :mod:`.metrics`: the error answers and the Prometheus metrics.
"""
