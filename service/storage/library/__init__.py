"""The workflow library on Redis, and workflow templates written by hand in YAML.

- `search`: `RedisWorkflowLibrary`, its redisvl index and queries, `open_library`, and
  `UnavailableLibrary` for a Redis without the query engine;
- `templates`: load and check YAML templates, seed a library with them;
- `embeddings`: the embeddings model for hybrid search and the vector helpers.
"""

from __future__ import annotations

from service.storage.library.embeddings import make_embeddings
from service.storage.library.search import (
    RedisWorkflowLibrary,
    UnavailableLibrary,
    open_library,
)
from service.storage.library.templates import load_templates, seed_library

__all__ = [
    "RedisWorkflowLibrary",
    "UnavailableLibrary",
    "load_templates",
    "make_embeddings",
    "open_library",
    "seed_library",
]
