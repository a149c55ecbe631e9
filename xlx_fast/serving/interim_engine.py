"""A stand-in with the step-level engine's interface (``xlx_fast.engine``), driving
``xlx_fast.generate``; used only while ``xlx_fast.engine`` is not part of the package.

It is NOT step-level: ``step()`` runs every occupied slot to completion (one ``generate`` call
per group of rows that share steps, strategy and greedy decoding; a row with temperature > 0 or
the ``random`` order runs alone, because ``generate`` derives their noise from the batch row).
A request's ids therefore depend only on the request, as the real engine's do, but a request
cannot join a running batch. :func:`load_engine_class` prefers the real engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference.sampler import STRATEGIES, check_steps


@dataclass
class Request:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    seed: int = 0
    steps: int | None = None
    strategy: str = "mask_predict"
    temperature: float = 0.0
    tag: object = None


@dataclass
class Finished:
    request: Request
    ids: torch.Tensor
    codes: torch.Tensor
    probs: torch.Tensor
    masks: torch.Tensor
    cancelled: bool


class Engine:
    """See the module docstring; same signatures as ``xlx_fast.engine.Engine``."""

    def __init__(self, model, slots: int = 8, *, max_length: int = 20, cuda_graph=None,
                 buckets=None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.slots, self.max_length = model, slots, max_length
        self._rows: dict[int, Request] = {}
        self._cancelled: set[int] = set()
        self._next = 0

    def free_slots(self) -> int:
        return self.slots - len(self._rows)

    def active(self) -> int:
        return len(self._rows)

    def warmup(self) -> None:
        import xlx_fast

        ids = torch.zeros(1, self.max_length, dtype=torch.int64, device=self.model.centroids.device)
        ids[0, 0] = 101
        xlx_fast.generate(self.model, ids, steps=1)

    def _check(self, r: Request) -> None:
        if not isinstance(r.input_ids, torch.Tensor) or r.input_ids.dim() != 1:
            raise TypeError("input_ids must be a 1-D torch.Tensor")
        if not 1 <= r.input_ids.numel() <= self.max_length:
            raise ValueError(f"input_ids length must be in [1, {self.max_length}], got {r.input_ids.numel()}")
        if r.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {r.strategy!r}")
        check_steps(r.strategy, r.steps)
        if not float(r.temperature) >= 0:
            raise ValueError(f"temperature must be >= 0, got {r.temperature}")

    def admit(self, requests) -> list[int]:
        requests = list(requests)
        for r in requests:
            self._check(r)
        if len(requests) > self.free_slots():
            raise ValueError(f"admit: {len(requests)} requests but {self.free_slots()} free slots")
        handles = []
        for r in requests:
            self._rows[self._next] = r
            handles.append(self._next)
            self._next += 1
        return handles

    def cancel(self, handle: int) -> None:
        if handle in self._rows:
            self._cancelled.add(handle)

    @torch.no_grad()
    def step(self) -> list:
        import xlx_fast

        out = []
        for h in sorted(self._cancelled):
            r = self._rows.pop(h)
            out.append(Finished(r, torch.full((64,), -1), torch.empty(0), torch.empty(0),
                                torch.empty(0, 64, dtype=torch.bool), True))
        self._cancelled.clear()
        groups: dict[tuple, list[int]] = {}
        for h, r in self._rows.items():
            steps = check_steps(r.strategy, r.steps)
            alone = r.temperature > 0 or r.strategy == "random"
            key = ("alone", h) if alone else (steps, r.strategy)
            groups.setdefault(key, []).append(h)
        device = self.model.centroids.device
        for handles in groups.values():
            reqs = [self._rows[h] for h in handles]
            ids = torch.stack([r.input_ids for r in reqs]).to(device)
            mask = torch.stack([r.attention_mask if r.attention_mask is not None else r.input_ids != 0
                                for r in reqs]).to(device)
            first = reqs[0]
            res = xlx_fast.generate(self.model, ids, mask, steps=first.steps, strategy=first.strategy,
                                    temperature=first.temperature, seed=first.seed)
            for i, (h, r) in enumerate(zip(handles, reqs)):
                out.append(Finished(r, res.ids[i].cpu(), res.codes[i].cpu(), res.probs[i].cpu(),
                                    res.masks[:, i].cpu(), False))
                del self._rows[h]
        return out


def load_engine_class():
    """``(Engine, Request)``: the step-level engine when the package has it, else this stand-in."""
    try:
        from .. import engine as real
    except ImportError:
        return Engine, Request
    return real.Engine, real.Request
