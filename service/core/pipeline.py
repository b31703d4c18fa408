"""One classification request, stage by stage: decode, batch, predict, rank.

Knows nothing of HTTP: it takes the uploaded bytes and a ready model and returns predictions with
the time each stage took. Nothing of it runs on the event loop but the bookkeeping:

* a model that batches (``MAX_BATCH_SIZE`` > 1) gets its images decoded in a pool sized for the
  machine, where the models take turns for its threads (:class:`FairPool`, so one model's backlog
  of uploads never queues ahead of another model's), and then batched;
* a model that runs one image at a time (the CPU default) has each image decoded in its inference
  thread, just before it runs: with nothing to batch, a separate decode stage would only add a
  hand-off between threads (and a cold cache) to every request. Each of its inference threads then
  does what one in-process worker does: decode, infer, rank.

Ranking (softmax, top-k, labels) runs in the inference thread, right after its batch.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from contract.manifest import PreprocessingSpec
from service.core import imaging
from service.core.fair_pool import FairPool
from service.core.metrics import Metrics
from service.core.ranking import top_k as rank
from service.core.repository import ServedModel
from service.errors import ServiceError
from service.http.uploads import Upload

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ImageResult:
    filename: str | None
    predictions: list[dict]
    decode_s: float
    queue_s: float
    inference_s: float
    batch_size: int


class Pipeline:
    """Decode -> batcher -> top-k, with the decode pool and limits it needs."""

    def __init__(self, decode_pool: FairPool, metrics: Metrics, *, max_image_pixels: int) -> None:
        self._decode_pool = decode_pool
        self._metrics = metrics
        self._max_image_pixels = max_image_pixels

    async def classify(
        self,
        model: ServedModel,
        uploads: list[Upload],
        *,
        top_k: int,
        deadline: float,
        request_id: str | None = None,
    ) -> list[ImageResult]:
        """Top-k predictions for every upload, in order. The first failing image fails the request."""
        assert model.manifest is not None
        finish = functools.partial(rank, k=top_k, labels=model.manifest.labels)
        return await _all([self._one(model, upload, finish, deadline, request_id) for upload in uploads])

    async def _one(
        self,
        model: ServedModel,
        upload: Upload,
        finish: functools.partial[list[dict]],
        deadline: float,
        request_id: str | None,
    ) -> ImageResult:
        assert model.manifest is not None and model.batcher is not None
        decode = functools.partial(
            _decode_blocking, upload, model.manifest.preprocessing, self._max_image_pixels
        )
        item: np.ndarray | functools.partial[np.ndarray] = decode  # decoded in the inference thread
        decode_s = 0.0
        if model.batcher.max_batch_size > 1:
            started = time.monotonic()
            item = await self._decode_pool.run(model.name, decode)
            # Wall time of the stage, waiting for a decode thread included: that is what it cost.
            decode_s = time.monotonic() - started
        result = await model.batcher.submit(item, deadline=deadline, request_id=request_id, finish=finish)
        decode_s += result.prepare_s
        self._metrics.observe_decode(model.name, decode_s)
        return ImageResult(
            filename=upload.filename,
            predictions=result.output,
            decode_s=decode_s,
            queue_s=result.queue_s,
            inference_s=result.inference_s,
            batch_size=result.batch_size,
        )


def _decode_blocking(upload: Upload, spec: PreprocessingSpec, max_image_pixels: int) -> np.ndarray:
    try:
        imaging.sniff_media_type(upload.data, upload.content_type)
        return imaging.preprocess(upload.data, spec, max_image_pixels)
    except ServiceError as exc:
        if upload.filename is not None:  # say which of several files it was
            exc.message = f"{upload.filename}: {exc.message}"
        raise


async def _all(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest (their queue slots are given back)."""
    if len(awaitables) == 1:
        return [await awaitables[0]]  # no task needed for the one image of a plain request
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
