"""The backend registry: every implementation of an op, what it needs, and which one runs here.

Each implementation registers itself beside its code::

    register_op("nearest", "triton", impl=nearest_triton,
                capability=Capability(devices=("cuda",), requires=(TRITON,)),
                preference_rank=0, tolerances={torch.float32: 1e-5, ...})

and one dispatcher, :func:`select_impl`, picks for a device (and dtype) the usable
implementation of lowest ``preference_rank``. The rules:

- Explicit. A backend that cannot run is skipped only for a reason it states ("triton not
  installed", "needs CUDA"); when none can run the call raises with every reason, never
  falling back to something unregistered. ``force=<backend>`` runs exactly that backend or
  raises naming why it cannot.
- ``on_request`` devices: a backend that runs there only when named (Triton's CPU interpreter,
  for tests; SDPA on CUDA, where the Triton kernel is the default): never chosen automatically.
- Tolerances: per dtype, the relative error ``||out - ref|| / ||ref||`` against the float64
  reference that the backend is held to (SPEC §4); tests read them from here
  (:func:`tolerance`), so the table an op declares is the table it is tested against.
- Measuring instead of ranking: :func:`set_chooser` installs, per op, a function that picks
  among the usable implementations and the stock ones that compete by measurement
  (``Capability.measured_on``), given a trial of the call (:mod:`xlx_fast.ops.measured` times
  them once per shape on a GPU). A chooser sees only implementations that can run, so it cannot
  pick a missing one.

:func:`explain` answers "which backend runs here, and why not the faster ones" for
``xlx-fast info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import _common

__all__ = ["Requirement", "Capability", "Impl", "TRITON", "register_op", "select_impl",
           "implementations", "explain", "tolerance", "set_chooser", "registered_ops",
           "backend_names"]

_DEVICE_WORDS = {"cuda": "CUDA", "cpu": "CPU"}


@dataclass(frozen=True)
class Requirement:
    """Something an implementation needs that is not a property of the inputs (a package, a
    built extension, a working driver): ``available()`` is asked when an (op, device, dtype)
    is first selected, and again after a registration or a change of triton's presence or of
    the interpreter flag (see :func:`select_impl`); ``missing`` is the reason given when it
    returns False."""
    available: Callable[[], bool]
    missing: str


TRITON = Requirement(lambda: _common.HAS_TRITON, "triton not installed (pip install xlx_fast[triton])")


def _interpreter_on_cpu(device: torch.device) -> str | None:
    if device.type == "cpu" and not _common.interpreting():
        return "CPU tensors only under TRITON_INTERPRET=1 (tests)"
    return None


@dataclass(frozen=True)
class Capability:
    """What an implementation needs to run on a device and dtype.

    ``devices``: device types it is chosen for automatically. ``on_request``: device types where
    it runs only when named (``force=``). ``measured_on``: device types (among ``on_request``)
    where it also competes when the op's chooser measures (a stock op timed against ours). ``dtypes``: accepted input dtypes (None: any).
    ``requires``: packages/extensions (:class:`Requirement`). ``probe``: a last check of the
    device, returning the reason it cannot run or None (e.g. a test launch of a CUDA kernel).
    """
    devices: tuple[str, ...]
    on_request: tuple[str, ...] = ()
    measured_on: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] | None = None
    requires: tuple[Requirement, ...] = ()
    probe: Callable[[torch.device], str | None] | None = None

    def unusable(self, device: torch.device, dtype: torch.dtype | None = None, *,
                 forced: bool = False) -> str | None:
        """Why it cannot run on ``device``/``dtype`` (``forced``: named by the caller), or None."""
        if device.type not in self.devices:
            native = " and ".join(_DEVICE_WORDS.get(d, d) for d in self.devices)
            if device.type in self.on_request:
                if not forced:
                    return (f"needs {native} ({_DEVICE_WORDS.get(device.type, device.type)} "
                            f"tensors only when named)")
            elif self.devices == ("cuda",):
                return "needs CUDA"
            else:
                return f"runs on {native} tensors only"
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"takes {_common.dtype_names(self.dtypes)}, not {dtype}"
        for req in self.requires:
            if not req.available():
                return req.missing
        return self.probe(device) if self.probe is not None else None


def triton_capability(**kwargs) -> Capability:
    """A Triton kernel's needs: CUDA (or CPU tensors under the interpreter, when named) and the
    triton package."""
    return Capability(devices=("cuda",), on_request=("cpu",), requires=(TRITON,),
                      probe=_interpreter_on_cpu, **kwargs)


@dataclass(frozen=True)
class Impl:
    """One registered implementation. ``impl`` is the callable the op dispatches to."""
    op: str
    backend: str
    impl: Callable
    capability: Capability | Callable
    preference_rank: int
    tolerances: Mapping[torch.dtype, float] = field(default_factory=dict)

    def unusable(self, device, dtype=None, *, forced: bool = False) -> str | None:
        cap = self.capability
        if isinstance(cap, Capability):
            return cap.unusable(device, dtype, forced=forced)
        return cap(device, dtype)

    def devices(self) -> tuple[str, ...]:
        cap = self.capability
        return (cap.devices + cap.on_request) if isinstance(cap, Capability) else ()


_OPS: dict[str, dict[str, Impl]] = {}
_CHOOSERS: dict[str, Callable] = {}
# (op, device, dtype, force, triton present, interpreting) -> the usable implementations,
# preferred first (forced: the one), CPU selections only: the selection runs on every op call,
# and building every refused backend's reason cost ~10 us a call, ~1 ms a batch-1 forward there
_USABLE: dict = {}


def register_op(op: str, backend: str, *, impl: Callable, capability: Capability | Callable,
                preference_rank: int, tolerances: Mapping[torch.dtype, float] | None = None) -> Impl:
    """Register (or, on a module reload, replace) ``backend`` of ``op``. ``capability``: a
    :class:`Capability`, or a callable ``(device, dtype) -> reason or None``. Lower
    ``preference_rank`` is preferred. ``tolerances``: dtype -> relative error bound."""
    entry = Impl(op, backend, impl, capability, int(preference_rank), dict(tolerances or {}))
    _OPS.setdefault(op, {})[backend] = entry
    _USABLE.clear()
    return entry


def _impls(op: str) -> dict[str, Impl]:
    if op not in _OPS:
        raise ValueError(f"no op named {op!r} is registered (registered: {sorted(_OPS)})")
    return _OPS[op]


def implementations(op: str) -> list[Impl]:
    """The implementations of ``op``, preferred first."""
    return sorted(_impls(op).values(), key=lambda i: (i.preference_rank, i.backend))


def registered_ops() -> list[str]:
    return sorted(_OPS)


def backend_names(op: str) -> list[str]:
    return [i.backend for i in implementations(op)]


def set_chooser(op: str, chooser: Callable | None):
    """Install (None: remove) the function that picks for an automatic choice of ``op`` when
    the caller can run a trial: ``chooser(op, candidates, device, dtype, key, trial) -> Impl``,
    where ``candidates`` are the usable implementations (preferred first) plus those that
    compete by measurement on this device (``Capability.measured_on``), ``key`` identifies the
    call's shapes and ``trial(impl)`` runs the call with ``impl``. Without a trial (or a
    chooser) the rank decides."""
    _impls(op)
    if chooser is None:
        _CHOOSERS.pop(op, None)
    else:
        _CHOOSERS[op] = chooser
    _USABLE.clear()


def _device_list(impls: Sequence[Impl]) -> str:
    seen: list[str] = []
    for i in impls:
        for d in i.devices():
            if d not in seen:
                seen.append(d)
    words = [_DEVICE_WORDS.get(d, d) for d in seen]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def select_impl(op: str, device, dtype: torch.dtype | None = None, force: str | None = None,
                key=None, trial: Callable[[Impl], object] | None = None) -> Impl:
    """The implementation of ``op`` that runs on ``device`` (and ``dtype``).

    ``force``: that backend or an error: ``ValueError`` for an unknown name, ``RuntimeError``
    naming why it cannot run here. Otherwise the usable implementation of lowest rank, or, when
    the caller passes ``key`` and ``trial`` and the op has a chooser, the chooser's pick
    (:mod:`xlx_fast.ops.measured`: the fastest, timed once per key); ``ValueError`` for a device type no backend
    runs on, ``RuntimeError`` listing every backend's reason when none can run.

    On a CPU, what can run is remembered per (op, dtype, force) until a backend is registered
    or triton's presence or the interpreter flag changes; a refusal is worked out again each
    time.
    """
    device = torch.device(device)
    if device.type != "cpu" or torch.compiler.is_compiling():
        # a GPU's backends answer from their probes, which keep their own record (and tests
        # replace it); a trace runs once per graph, and triton's flags do not trace
        found = _usable(op, device, dtype, force)
    else:
        memo = (op, device, dtype, force, _common.HAS_TRITON, _common.interpreting())
        found = _USABLE.get(memo)
        if found is None:
            found = _USABLE[memo] = _usable(op, device, dtype, force)
    usable, candidates = found
    chooser = _CHOOSERS.get(op)
    if force is not None or chooser is None or trial is None:
        return usable[0]
    return chooser(op, candidates, device, dtype, key, trial)


def _usable(op: str, device: torch.device, dtype, force) -> tuple[list[Impl], list[Impl]]:
    """The implementations that can run (forced: the named one), preferred first, and the
    candidates a chooser measures (those, then the stock ops that compete by measurement on
    this device); or the error :func:`select_impl` raises."""
    impls = _impls(op)
    if force is not None:
        if force not in impls:
            raise ValueError(f"{op} backend must be one of {backend_names(op)}, got {force!r}")
        chosen = impls[force]
        why = chosen.unusable(device, dtype, forced=True)
        if why is not None:
            raise RuntimeError(f"{op} backend {force!r} cannot run on {device}: {why}")
        return [chosen], [chosen]
    ordered = implementations(op)
    known = [d for i in ordered for d in i.devices()]
    if all(isinstance(i.capability, Capability) for i in ordered) and device.type not in known:
        raise ValueError(f"{op} supports {_device_list(ordered)} tensors, got {device}")
    usable, reasons = [], []
    for i in ordered:
        why = i.unusable(device, dtype)
        if why is None:
            usable.append(i)
        else:
            reasons.append(f"{i.backend}: {why}")
    if not usable:
        raise RuntimeError(f"no {op} backend can run on {device}"
                           f"{'' if dtype is None else f' ({dtype})'}: {'; '.join(reasons)}")
    rivals = [i for i in ordered if i not in usable and isinstance(i.capability, Capability)
              and device.type in i.capability.measured_on
              and i.unusable(device, dtype, forced=True) is None]
    return usable, usable + rivals


def explain(op: str, device, dtype: torch.dtype | None = None) -> dict:
    """Which backend of ``op`` runs on ``device`` and why the others do not::

        {"op", "device", "runs": backend or None, "error": why none runs or None,
         "backends": [{"backend", "rank", "usable", "why_not"}, ...] (preferred first),
         "measured_against": stock backends timed against "runs" per shape (``ops.measured``)}
    """
    device = torch.device(device)
    try:
        runs, error = select_impl(op, device, dtype).backend, None
    except (ValueError, RuntimeError) as e:
        runs, error = None, str(e)
    rows = []
    for i in implementations(op):
        why = i.unusable(device, dtype)
        rows.append({"backend": i.backend, "rank": i.preference_rank, "usable": why is None,
                     "why_not": why})
    rivals = [i.backend for i in implementations(op) if isinstance(i.capability, Capability)
              and device.type in i.capability.measured_on] if op in _CHOOSERS else []
    return {"op": op, "device": str(device), "runs": runs, "error": error, "backends": rows,
            "measured_against": rivals}


def tolerance(op: str, backend: str, dtype: torch.dtype) -> float:
    """The relative error ``backend`` of ``op`` declares for ``dtype`` (KeyError if none)."""
    impls = _impls(op)
    if backend not in impls:
        raise ValueError(f"{op} backend must be one of {backend_names(op)}, got {backend!r}")
    return impls[backend].tolerances[dtype]
