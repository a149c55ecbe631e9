"""Serving X-LXMERT over HTTP: a Ray Serve application whose replicas each drive one step-level
engine from one asyncio loop (SPEC §6a).

One idea per module:

- :mod:`.schema`: the HTTP request/response models and the 4xx error shape;
- :mod:`.model_spec`: the serialisable description a replica builds its model from;
- :mod:`.scheduler`: the replica's loop (admit at step boundaries, step, paint, resolve);
- :mod:`.policies`: what the loop admits when (step-level joining; the baselines it is compared with);
- :mod:`.painter`: batched painting with per-request noise;
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
