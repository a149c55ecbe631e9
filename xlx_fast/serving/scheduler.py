"""A replica's scheduler: one asyncio loop drives one engine, step by step.

The loop (with the server's admission policy, :class:`~xlx_fast.serving.policies.StepLevel`)::

    forever:
        expire: queued jobs past their deadline → 504; active ones → engine.cancel (slot freed
                at this boundary); jobs whose caller went away (future cancelled) → engine.cancel
        admit:  queued rows, oldest first, as many as the policy admits (every free slot) (a
                job's rows may span steps), in a worker thread (await asyncio.to_thread(engine.admit))
        step:   await asyncio.to_thread(engine.step)   one forward; the event loop stays free
        hand the jobs that are now complete to the painter, and go on stepping

    the painter (a second task, one at a time, so one generator call in flight):
        paint:  the rows of every complete job handed over so far, per-row seeded; on a CPU job
                by job (it paints a row per call anyway, see painter.rows_per_call), on a GPU
                all together
        resolve each job's future as soon as its rows are painted

Painting overlaps the next steps (both run in worker threads; on a GPU both queue kernels, on a
CPU they share the cores), so a step never waits for another request's picture. On a CPU the
sharing costs nothing measurable (2-core AMD EPYC, base model: 8 full steps and 16 paintings
took 6.26 s in two threads, 6.42 s one after the other; p99 under load within run-to-run noise
either way). The hand-over is bounded: at most ``max_paint_backlog`` batches wait for the
painter, then the loop waits too (painting slower than generation slows admission instead of
piling up finished rows).

Only this loop touches the engine (it is not thread-safe), one call at a time. The queue is
bounded (``max_queue`` jobs): :meth:`Scheduler.submit` raises :class:`QueueFull` with a
Retry-After estimate instead of growing it. A request's result depends only on the request
(the engine's contract, SPEC §6a; painting noise from the request's seed only).

What to admit at a boundary, and when to answer a complete job, is the admission policy's
(:mod:`xlx_fast.serving.policies`: the server's step-level joining, and the static-batch and
sequential baselines that benchmarks compare it with on this same loop).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from .metrics import ServerMetrics
from .painter import paint, rows_per_call
from .policies import AdmissionPolicy, policy_named

__all__ = ["Scheduler", "Job", "RowResult", "QueueFull", "DeadlineExceeded", "SchedulerBroken"]


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    pass


class SchedulerBroken(RuntimeError):
    pass


def _clocked(fn, *args):
    """``(fn(*args), its wall time)``, timed in the worker thread that runs it: the event loop's
    delay in noticing the end (a reply being written, a request parsed) is not the step's time."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


@dataclass
class RowResult:
    """One image of a job: the engine's ``Finished`` and the painted uint8 [S, S, 3] image."""

    seed: int
    ids: list[int]
    image: object


@dataclass(eq=False)  # identity: a job is in the queue or not, whatever its fields
class Job:
    requests: list  # engine Requests, one per image (tag = (job, row))
    arrival: float
    deadline: float | None
    future: asyncio.Future
    pending: deque = field(default_factory=deque)   # row indices not yet admitted
    handles: dict = field(default_factory=dict)      # row -> engine handle, while active
    finished: dict = field(default_factory=dict)     # row -> Finished
    admitted_at: float | None = None
    done: bool = False

    @property
    def queue_wait(self) -> float | None:
        return None if self.admitted_at is None else self.admitted_at - self.arrival


class Scheduler:
    """Owns an engine (and the model whose generator paints); see the module docstring.
    ``policy``: an :class:`~xlx_fast.serving.policies.AdmissionPolicy`, or its name (``POLICIES``;
    ``batch_wait_ms`` then configures the static batch's wait)."""

    def __init__(self, engine, model, *, max_queue: int = 64, policy: str | AdmissionPolicy = "step",
                 batch_wait_ms: float = 50.0, paint_images: bool = True,
                 metrics: ServerMetrics | None = None, max_paint_backlog: int = 2):
        policy = policy_named(policy, batch_wait_ms=batch_wait_ms)
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_paint_backlog < 1:
            raise ValueError(f"max_paint_backlog must be >= 1, got {max_paint_backlog}")
        self.engine, self.model = engine, model
        self.max_queue, self.policy = max_queue, policy
        self.paint_images = paint_images
        self.metrics = metrics or ServerMetrics()
        self.metrics.slots.set(engine.slots)
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._painter: asyncio.Task | None = None
        self._to_paint: asyncio.Queue[list[Job]] = asyncio.Queue(max_paint_backlog)
        # a static batch is answered together, and a GPU paints batches; a CPU paints a row per
        # call anyway, so it answers job by job (the first job need not wait for the last's image)
        self._paint_together = (policy.answers_together or not paint_images
                                or rows_per_call(engine.device) is None)
        self.broken: BaseException | None = None
        self.steps_run = 0

    # -- the caller's side ---------------------------------------------------------------------

    def submit(self, requests: list, timeout_s: float | None = None) -> Job:
        """Queue one job (its rows are engine ``Request``s); raises :class:`QueueFull`."""
        if self.broken is not None:
            raise SchedulerBroken(f"the engine failed: {self.broken!r}")
        if len(self._queue) >= self.max_queue:
            self.metrics.rejections.inc("queue_full")
            raise QueueFull(self.retry_after())
        now = time.perf_counter()
        job = Job(requests=list(requests), arrival=now,
                  deadline=None if timeout_s is None else now + timeout_s,
                  future=asyncio.get_running_loop().create_future())
        for row, req in enumerate(job.requests):
            req.tag = (job, row)
        job.pending.extend(range(len(job.requests)))
        self._queue.append(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._wake.set()
        return job

    async def result(self, job: Job) -> list[RowResult]:
        """Wait for ``job``; if the waiter is cancelled (client gone) the job is cancelled at the
        next step boundary. Raises :class:`DeadlineExceeded` past the job's deadline."""
        return await job.future

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: queued rows / slots batches of the mean
        request time (≥ 1)."""
        e2e = self.metrics.e2e
        mean = e2e.sum / e2e.count if e2e.count else 1.0
        rows = sum(len(j.pending) for j in self._queue)
        return max(1, math.ceil(mean * (rows / max(1, self.engine.slots) + 1)))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._painter = loop.create_task(self._paint_loop())
            self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._painter):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._painter = None

    async def _run(self) -> None:
        try:
            while True:
                self._expire()
                if self.engine.active() == 0:
                    await self._hand_over([])  # a batch emptied by cancellations is done too
                await self._admit()
                if self.engine.active() == 0:
                    self._update_gauges()
                    await self._idle_wait()
                    continue
                await self._step()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine failed: fail every job, refuse new ones
            self.broken = e
            for job in list(self._active) + list(self._queue):
                self._fail(job, SchedulerBroken(f"the engine failed: {e!r}"), "error")
            self._queue.clear()
            raise

    async def _idle_wait(self) -> None:
        timeout = None
        deadlines = [j.deadline for j in self._queue if j.deadline is not None]
        wake = self.policy.wake_at(self._queue)
        if wake is not None:
            deadlines.append(wake)
        if deadlines:
            timeout = max(0.0, min(deadlines) - time.perf_counter())
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.active_rows.set(self.engine.active())

    def _fail(self, job: Job, exc: BaseException, outcome: str) -> None:
        if job.done:
            return
        job.done = True
        for handle in job.handles.values():
            self.engine.cancel(handle)
        job.handles.clear()
        if job in self._active:
            self._active.remove(job)
        if not job.future.done():
            job.future.set_exception(exc)
            job.future.exception()  # mark retrieved: a caller that left never reads it
        self.metrics.requests.inc(outcome)

    def _expire(self) -> None:
        now = time.perf_counter()
        for job in list(self._queue):
            if job.future.cancelled():
                self._queue.remove(job)
                job.done = True
                self.metrics.requests.inc("cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._queue.remove(job)
                self._fail(job, DeadlineExceeded("timeout_ms passed before the request was "
                                                 "admitted"), "timeout")
        for job in list(self._active):
            if job.future.cancelled():
                self._fail(job, asyncio.CancelledError(), "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._fail(job, DeadlineExceeded("timeout_ms passed while generating"), "timeout")

    async def _admit(self) -> None:
        budget = self.policy.admissible(self.engine.free_slots(), self.engine.active(),
                                        self._queue, time.perf_counter())
        picked: list[tuple[Job, int]] = []
        for job in self._queue:  # oldest first: the policy's count, from the head of the queue
            if budget == 0:
                break
            while job.pending and budget > 0:
                picked.append((job, job.pending.popleft()))
                budget -= 1
        if not picked:
            return
        requests = [job.requests[row] for job, row in picked]
        # in a worker thread like the step: on a GPU admit's copies wait for the step in flight,
        # and the event loop (arrivals, replies) must not wait with them
        try:
            handles = await asyncio.to_thread(self.engine.admit, requests)
        except (ValueError, TypeError):
            handles = None
        if handles is None:  # one bad request must not sink the others: admit one by one
            handles = []
            for job, row in picked:
                try:
                    handles.append((await asyncio.to_thread(self.engine.admit, [job.requests[row]]))[0])
                except (ValueError, TypeError) as e:
                    handles.append(e)
        now = time.perf_counter()
        for (job, row), handle in zip(picked, handles):
            if isinstance(handle, Exception):
                if job in self._queue:
                    self._queue.remove(job)
                self._fail(job, handle, "error")
                continue
            if job.done:  # a sibling row failed: drop this one too
                self.engine.cancel(handle)
                continue
            job.handles[row] = handle
            if job.admitted_at is None:
                job.admitted_at = now
                self.metrics.queue_wait.observe(job.queue_wait)
            if job not in self._active:
                self._active.append(job)
        for job in list(self._queue):
            if not job.pending:
                self._queue.remove(job)
        self._update_gauges()

    async def _step(self) -> None:
        active = self.engine.active()
        self.metrics.occupancy.observe(active / self.engine.slots)
        finished, seconds = await asyncio.to_thread(_clocked, self.engine.step)
        self.metrics.step_seconds.observe(seconds)
        self.steps_run += 1
        self.metrics.engine_steps.inc()
        complete: list[Job] = []
        for f in finished:
            job, row = f.request.tag
            if f.cancelled or job.done:
                continue
            job.handles.pop(row, None)  # the engine freed the row's slot
            if f.error is not None:  # e.g. NaN from the weights: this job fails, the replica serves on
                self._fail(job, RuntimeError(f"the engine failed on this request: {f.error}"), "error")
                continue
            job.finished[row] = f
            if len(job.finished) == len(job.requests):
                complete.append(job)
        await self._hand_over(complete)
        self._update_gauges()

    async def _hand_over(self, complete: list[Job]) -> None:
        """Give the complete jobs the policy releases to the painter. Waits only when the painter
        is behind (bounded backlog)."""
        complete = self.policy.release(complete, self.engine.active())
        if complete:
            await self._to_paint.put(complete)

    async def _paint_loop(self) -> None:
        """The painter task: every batch handed over since its last call, painted and answered
        (together or job by job, see ``_paint_together``)."""
        while True:
            jobs = await self._to_paint.get()
            while not self._to_paint.empty():
                jobs += self._to_paint.get_nowait()
            try:
                await self._paint_and_resolve(jobs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed painting fails its jobs, not the replica
                for job in jobs:
                    self._fail(job, RuntimeError(f"painting failed: {e!r}"), "error")

    async def _paint_and_resolve(self, jobs: list[Job]) -> None:
        for group in [jobs] if self._paint_together else [[job] for job in jobs]:
            await self._paint_group(group)

    async def _paint_group(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.done]  # expired or cancelled while waiting
        rows = [(job, r) for job in jobs for r in range(len(job.requests))]
        if not rows:
            return
        images = [None] * len(rows)
        if self.paint_images:
            import torch

            codes = torch.stack([job.finished[r].codes for job, r in rows])
            seeds = [job.requests[r].seed for job, r in rows]
            images, seconds = await asyncio.to_thread(_clocked, paint, self.model, codes, seeds)
            self.metrics.paint_seconds.observe(seconds)
        now = time.perf_counter()
        by_job: dict[int, list[RowResult]] = {}
        for (job, r), image in zip(rows, images):
            f = job.finished[r]
            by_job.setdefault(id(job), []).append(
                RowResult(seed=job.requests[r].seed, ids=f.ids.tolist(), image=image))
        for job in jobs:
            if job.done:  # expired or cancelled while painting
                continue
            job.done = True
            self._active.remove(job)
            if job.future.done():  # cancelled by its caller meanwhile
                self.metrics.requests.inc("cancelled")
                continue
            if job.deadline is not None and now >= job.deadline:
                job.future.set_exception(DeadlineExceeded("timeout_ms passed while generating"))
                self.metrics.requests.inc("timeout")
                continue
            job.future.set_result(by_job[id(job)])
            self.metrics.requests.inc("ok")
            self.metrics.e2e.observe(now - job.arrival)
