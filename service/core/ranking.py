"""Logits -> the top-k predictions a client sees: softmax, ranking and the manifest's labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64 so that near-flat scores keep their order."""
    shifted = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[dict]:
    """The ``k`` most likely classes of one image's logits, best first (ties: lower class id first)."""
    scores = softmax(logits)
    k = min(k, scores.shape[-1])
    # A stable sort on the negated scores breaks ties by class id, so the answer is deterministic.
    ids = np.argsort(-scores, kind="stable")[:k]
    return [{"class_id": int(i), "label": labels[i], "score": float(scores[i])} for i in ids]
