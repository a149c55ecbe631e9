"""Serving X-LXMERT over HTTP: a Ray Serve application whose replicas each drive their step-level
engines from one asyncio loop (SPEC §6a). Routes: ``POST /v1/images/generations`` (paint),
``POST /v1/captions`` and ``POST /v1/answers`` (the other two tasks, when the model spec turns
them on), ``GET /health``, ``GET /metrics``.

One idea per module:

- :mod:`.schema`: the HTTP request/response models and the 4xx error shape;
- :mod:`.model_spec`: the serialisable description a replica builds its model from;
- :mod:`.scheduler`: the replica's loop (admit at step boundaries, step, paint, resolve), over
  the paint engine and, when on, the caption engine and the answer model;
- :mod:`.policies`: what the loop admits when (step-level joining; the baselines it is compared with);
- :mod:`.painter`: batched painting with per-request noise;
- :mod:`.answerer`: batched answering (the questions waiting at a step boundary, one forward);
- :mod:`.metrics`: the Prometheus text exposition;
- :mod:`.service`: what each route does (auth, limits, validation), independent of Ray;
- :mod:`.deployment`: the Ray Serve deployment + FastAPI ingress and the application builder.

The load generator and the scheduler comparison behind ``xlx-fast bench-serve`` are benchmark
code: :mod:`xlx_fast.bench.loadgen`, :mod:`xlx_fast.bench.serving`.

``xlx_fast.serving:app`` is the application builder for ``serve run`` / ``serve deploy``. Ray is
imported only when the app is (``import xlx_fast.serving`` does not need it).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "app": ("xlx_fast.serving.deployment", "build_app"),
    "build_app": ("xlx_fast.serving.deployment", "build_app"),
    "ImageService": ("xlx_fast.serving.service", "ImageService"),
    "ServerOptions": ("xlx_fast.serving.service", "ServerOptions"),
    "ModelSpec": ("xlx_fast.serving.model_spec", "ModelSpec"),
    "Scheduler": ("xlx_fast.serving.scheduler", "Scheduler"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'xlx_fast.serving' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
