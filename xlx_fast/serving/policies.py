"""Admission policies: which queued rows a replica's scheduler lets into the engine, and when.

The scheduler loop (:mod:`xlx_fast.serving.scheduler`) is the same for every policy: expire,
admit, step, hand complete jobs to the painter. A policy answers three questions at each step
boundary, so that benchmarks compare policies and not plumbing:

- :meth:`AdmissionPolicy.admissible`: how many queued rows to admit now;
- :meth:`AdmissionPolicy.wake_at`: when an idle loop should look again though nothing arrived;
- :meth:`AdmissionPolicy.release`: which complete jobs to answer now.

Three policies:

- :class:`StepLevel` (``"step"``, the server's): every free slot takes the oldest queued row at
  every step boundary; a job is answered as soon as its own rows are done;
- :class:`StaticBatch` (``"request"``): request-level batching, what a ``@serve.batch``
  deployment over ``generate`` + painting does -- when the engine is empty, wait until ``slots``
  rows are queued or the oldest has waited ``batch_wait_ms``, admit them as one batch, step until
  the whole batch is done (no joining), then answer the batch together. Rows of fewer steps stop
  stepping early (the engine's advantage, kept), but their answers wait for the batch, as a static
  batch's do;
- :class:`Sequential` (``"sequential"``): one job at a time, stepped to completion.

A policy object may hold the jobs it releases later (:class:`StaticBatch` does): one object per
scheduler. :func:`policy_named` builds one from its name (the CLI's and the server options').
"""
from __future__ import annotations

from typing import ClassVar, Sequence


class AdmissionPolicy:
    """What the scheduler asks at each step boundary; see the module docstring."""

    name: ClassVar[str]
    # a static batch's jobs are answered (and painted) together, not one by one
    answers_together: ClassVar[bool] = False

    @classmethod
    def from_options(cls, *, batch_wait_ms: float) -> "AdmissionPolicy":
        """This policy built from the server's options (those it does not use are ignored)."""
        return cls()

    def admissible(self, free: int, active: int, queue: Sequence, now: float) -> int:
        """How many queued rows to admit at this boundary: ``free`` slots, ``active`` rows in
        the engine, ``queue`` the waiting jobs, oldest first (``job.pending``: their rows not
        yet admitted; ``job.arrival``: ``time.perf_counter()`` at submission)."""
        raise NotImplementedError

    def wake_at(self, queue: Sequence) -> float | None:
        """A ``time.perf_counter()`` at which rows may become admissible with no new arrival
        (None: only an arrival or a deadline changes anything)."""
        return None

    def release(self, complete: list, active: int) -> list:
        """The jobs to answer now, given the jobs that completed at this boundary and the rows
        still ``active`` in the engine."""
        return complete


class StepLevel(AdmissionPolicy):
    """Join at every step boundary: a freed slot takes the next row at once."""

    name = "step"

    def admissible(self, free, active, queue, now):
        return free


class StaticBatch(AdmissionPolicy):
    """Request-level batching: a full batch, or what came within ``batch_wait_ms``, run to its
    end and answered together."""

    name = "request"
    answers_together = True

    def __init__(self, batch_wait_ms: float = 50.0):
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._held: list = []  # complete jobs of the running batch

    @classmethod
    def from_options(cls, *, batch_wait_ms: float) -> "StaticBatch":
        return cls(batch_wait_ms)

    def admissible(self, free, active, queue, now):
        if active > 0 or not queue:
            return 0
        queued = sum(len(j.pending) for j in queue)
        waited = now - queue[0].arrival
        return free if queued >= free or waited >= self.batch_wait_s else 0

    def wake_at(self, queue):
        return queue[0].arrival + self.batch_wait_s if queue else None

    def release(self, complete, active):
        self._held += complete
        if active > 0:
            return []
        out, self._held = self._held, []
        return out


class Sequential(AdmissionPolicy):
    """One job at a time, stepped to completion."""

    name = "sequential"

    def admissible(self, free, active, queue, now):
        if active > 0 or not queue:
            return 0
        return min(free, len(queue[0].pending))


POLICIES: dict[str, type[AdmissionPolicy]] = {p.name: p for p in (StepLevel, StaticBatch, Sequential)}


def policy_named(policy: str | AdmissionPolicy, *, batch_wait_ms: float = 50.0) -> AdmissionPolicy:
    """``policy`` itself if it is a policy object, else a new one of that name (``POLICIES``)."""
    if isinstance(policy, AdmissionPolicy):
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return POLICIES[policy].from_options(batch_wait_ms=batch_wait_ms)
