"""One classification request, stage by stage: decode, batch, predict, rank.

Knows nothing of HTTP: it takes the uploaded bytes and a ready model and returns predictions with
the time each stage took. Nothing of it runs on the event loop but the bookkeeping. A model's
batcher calls its :class:`ClassifierStages`: ``prepare`` decodes and preprocesses one upload,
``finish`` ranks its logits (softmax, top-k, labels) in the inference thread, right after its batch.

Where the decode runs was fixed when the model was served (``service/core/repository.py``):

* a model that batches (``MAX_BATCH_SIZE`` > 1) gets its images decoded in a pool sized for the
  machine, where the models take turns for its threads (:class:`FairPool`, so one model's backlog
  of uploads never queues ahead of another model's), and then batched;
* a model that runs one image at a time (the CPU default) has each image decoded in its inference
  thread, just before it runs: with nothing to batch, a separate decode stage would only add a
  hand-off between threads (and a cold cache) to every request. Each of its inference threads then
  does what one in-process worker does: decode, infer, rank.

Two entries share that path: :meth:`Pipeline.classify` (uploads -> top-k, for ``/classify``) and
:meth:`Pipeline.infer` (encoded images, or images the client already preprocessed -> each image's
logits row or its top-k, for the Open Inference Protocol's front doors). A preprocessed image skips the
decode; everything else (the model's places, its batcher, the deadline, the metrics) is the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from contract.manifest import Manifest
from service.core import imaging
from service.core.metrics import Metrics
from service.core.ranking import top_k as rank
from service.errors import ServiceError

if TYPE_CHECKING:
    from service.core.repository import ServedModel

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Upload:
    """One image as the client sent it."""

    filename: str | None
    data: bytes
    content_type: str | None  # as declared (for a raw body, the request's Content-Type); may lie


# ``top_k`` of a job whose answer is the image's logits row itself, not ranked classes.
LOGITS = 0


@dataclass(frozen=True, slots=True)
class ImageJob:
    """What the batcher queues for one image: the upload (or, with no upload, the model input the
    client made itself), and its answer: the top ``top_k`` classes, or for :data:`LOGITS` the row."""

    upload: Upload | None
    top_k: int
    tensor: np.ndarray | None = None  # (3, H, W) float32, when the client sent it preprocessed


class ClassifierStages:
    """One model's stages on either side of its runtime: an upload decoded to the model's input, and
    the model's logits ranked into the client's predictions."""

    __slots__ = ("_labels", "_max_image_pixels", "_spec")

    def __init__(self, manifest: Manifest, *, max_image_pixels: int) -> None:
        self._spec = manifest.preprocessing
        self._labels = manifest.labels
        self._max_image_pixels = max_image_pixels

    def prepare(self, job: ImageJob) -> np.ndarray:
        upload = job.upload
        if upload is None:
            assert job.tensor is not None
            return job.tensor
        try:
            imaging.sniff_media_type(upload.data, upload.content_type)
            return imaging.preprocess(upload.data, self._spec, self._max_image_pixels)
        except ServiceError as exc:
            if upload.filename is not None:  # say which of several files it was
                exc.message = f"{upload.filename}: {exc.message}"
            raise

    def finish(self, job: ImageJob, row: np.ndarray) -> list[dict] | np.ndarray:
        if job.top_k == LOGITS:
            # A copy: the row is a view of the whole batch's output, which a runtime may reuse.
            return np.array(row, dtype=np.float32)
        return rank(row, job.top_k, self._labels)


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One image's answer (its top-k predictions, or for :data:`LOGITS` its float32 logits row) and
    where its time went."""

    filename: str | None
    output: list[dict] | np.ndarray
    decode_s: float
    queue_s: float
    inference_s: float
    batch_size: int


class Pipeline:
    """Uploads -> the model's batcher (decode, infer, rank) -> results, with the decode metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

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
        jobs = [ImageJob(upload, top_k) for upload in uploads]
        return await _all([self._submit(model, job, deadline, request_id) for job in jobs])

    async def infer(
        self,
        model: ServedModel,
        images: Sequence[bytes] | np.ndarray,
        *,
        top_k: int,
        deadline: float,
        request_id: str | None = None,
    ) -> list[ImageResult]:
        """Each image's logits row (``top_k`` :data:`LOGITS`) or top-k predictions, in order.

        ``images`` are encoded images (decoded as ``/classify`` decodes an upload), or an (N, 3, H, W)
        float32 array of images preprocessed as the model's manifest says (no decode). The caller has
        taken a place in the model's line (``batcher.admit()``), as ``/classify`` does. The first
        failing image fails the request.
        """
        if isinstance(images, np.ndarray):
            jobs = [ImageJob(None, top_k, tensor) for tensor in images]
        else:
            # Named by position, so that an error says which image of a batch it was.
            jobs = [ImageJob(Upload(f"image {i}", data, None), top_k) for i, data in enumerate(images)]
        return await _all([self._submit(model, job, deadline, request_id) for job in jobs])

    async def _submit(
        self, model: ServedModel, job: ImageJob, deadline: float, request_id: str | None
    ) -> ImageResult:
        assert model.batcher is not None
        result = await model.batcher.submit(job, deadline=deadline, request_id=request_id)
        upload = job.upload
        if upload is not None:  # a preprocessed image had nothing decoded
            self._metrics.observe_decode(model.name, result.prepare_s)
        return ImageResult(
            filename=None if upload is None else upload.filename,
            output=result.output,
            decode_s=result.prepare_s,
            queue_s=result.queue_s,
            inference_s=result.inference_s,
            batch_size=result.batch_size,
        )


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
