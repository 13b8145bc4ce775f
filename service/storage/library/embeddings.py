"""Embeddings for hybrid search: the model factory and the vector arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings

__all__ = ["cosine", "make_embeddings", "vector_bytes"]


def make_embeddings(spec: str) -> Embeddings:
    """Make an embeddings model from a `provider:model` string (LangChain's `init_embeddings`).

    Raises:
        ValueError: the provider is unknown, its package is missing or it has no credentials.
    """
    from langchain.embeddings import init_embeddings

    try:
        return init_embeddings(spec)
    except Exception as exc:  # the providers raise many different types
        raise ValueError(
            f"cannot make embeddings {spec!r}: {exc}. Set AGENTFLOW_EMBEDDINGS to a "
            "`provider:model` whose package and credentials are present, or unset it."
        ) from exc


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Return the cosine similarity of two vectors (0 when either is all zeros)."""
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def vector_bytes(vector: Sequence[float]) -> bytes:
    """Pack a vector as float32 bytes, as the search index stores it."""
    import numpy as np

    return np.asarray(vector, dtype=np.float32).tobytes()
