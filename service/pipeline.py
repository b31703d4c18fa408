"""One classification request, stage by stage: decode in a thread pool, batch, predict.

Knows nothing of HTTP: it takes the uploaded bytes and a ready model and returns predictions with
the time each stage took. Decoding runs in a pool sized for the machine, never on the event loop,
and the models take turns for its threads (:class:`FairPool`), so one model's backlog of uploads
never queues ahead of another model's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service import imaging
from service.errors import ServiceError
from service.fair_pool import FairPool
from service.http_input import Upload
from service.inference import top_k as rank
from service.manifest import PreprocessingSpec
from service.metrics import Metrics
from service.repository import ServedModel

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
        assert model.manifest is not None and model.batcher is not None
        spec = model.manifest.preprocessing
        labels = model.manifest.labels
        tensors = await _all(self._decode(model.name, upload, spec) for upload in uploads)
        batched = await _all(
            model.batcher.submit(tensor, deadline=deadline, request_id=request_id) for tensor, _ in tensors
        )
        return [
            ImageResult(
                filename=upload.filename,
                predictions=rank(result.output, top_k, labels),
                decode_s=decode_s,
                queue_s=result.queue_s,
                inference_s=result.inference_s,
                batch_size=result.batch_size,
            )
            for upload, (_, decode_s), result in zip(uploads, tensors, batched, strict=True)
        ]

    async def _decode(self, model: str, upload: Upload, spec: PreprocessingSpec) -> tuple[np.ndarray, float]:
        started = time.monotonic()
        try:
            tensor = await self._decode_pool.run(
                model, _decode_blocking, upload, spec, self._max_image_pixels
            )
        except ServiceError as exc:
            if upload.filename is not None:  # say which of several files it was
                exc.message = f"{upload.filename}: {exc.message}"
            raise
        # Wall time of the stage, waiting for a decode thread included: that is what the request paid.
        seconds = time.monotonic() - started
        self._metrics.observe_decode(model, seconds)
        return tensor, seconds


def _decode_blocking(upload: Upload, spec: PreprocessingSpec, max_image_pixels: int) -> np.ndarray:
    imaging.sniff_media_type(upload.data, upload.content_type)
    return imaging.preprocess(upload.data, spec, max_image_pixels)


async def _all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest (their queue slots are given back)."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    if len(tasks) == 1:
        return [await tasks[0]]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
