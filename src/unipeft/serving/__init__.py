"""Serving many deltas on one base: an engine with a byte-sized cache, an HTTP server, tenants.

* ``engine.py``   ``Engine``: one base in memory, deltas loaded on first use into a cache sized in
                  bytes (LRU), requests batched across deltas through ``up.route``.
* ``batch.py``    one batch on the model: padding, per-row sampling, stopping and streaming.
* ``app.py``      ``create_app``: the OpenAI-compatible FastAPI app (completions, chat, classify,
                  models, uploads, tenants, health, Prometheus metrics).
* ``uploads.py``  reading and validating delta uploads before anything is stored.
* ``store.py``    the SQLite registry: tenants, hashed keys, which delta belongs to whom.
* ``metrics.py``  per-delta counters in the Prometheus text format.
* ``demo.py``     the embedded default that ``unipeft serve`` runs with no arguments.
* ``cli.py``      ``unipeft serve`` and ``unipeft tenants``.

The HTTP side needs ``pip install "unipeft[serve]"`` (FastAPI, uvicorn, python-multipart);
the engine alone needs nothing beyond unipeft.
"""
from .engine import BadRequest, DeltaNotFound, Engine

__all__ = ["Engine", "BadRequest", "DeltaNotFound", "create_app"]


def __getattr__(name):
    if name == "create_app":   # imports FastAPI: only when the HTTP side is used
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'unipeft.serving' has no attribute {name!r}")
