"""A replica's scheduler: one asyncio loop drives the replica's engines, step by step.

A job is one HTTP request of one task (``Job.kind``): ``"images"`` (rows of the paint engine,
:class:`xlx_fast.engine.Engine`, then painted), ``"captions"`` (a row of the caption engine,
:class:`xlx_fast.caption_engine.CaptionEngine`, over the same model) or ``"answers"`` (one
forward of the answer model, no steps: :mod:`xlx_fast.serving.answerer`). The two engines are
optional beside the paint engine (``captioner``, ``answer_model``); every kind shares the one
bounded queue.

The loop (with the server's admission policy, :class:`~xlx_fast.serving.policies.StepLevel`)::

    forever:
        expire: queued jobs past their deadline → 504; active ones → engine.cancel (slot freed
                at this boundary); jobs whose caller went away (future cancelled) → engine.cancel
        admit:  queued rows, oldest first, as many as the policy admits (every free slot) (a
                job's rows may span steps), in a worker thread (await asyncio.to_thread(engine.admit));
                caption rows into the caption engine's free slots the same way (always step-level)
        answer: the answer jobs waiting now (up to ``max_answer_batch``), one forward, resolved
        step:   await asyncio.to_thread(captioner.step), resolve the captions that finished;
                await asyncio.to_thread(engine.step)   one forward; the event loop stays free
        hand the image jobs that are now complete to the painter, and go on stepping

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

from .answerer import answer_batch
from .metrics import ServerMetrics
from .painter import paint, rows_per_call
from .policies import AdmissionPolicy, StepLevel, policy_named

__all__ = ["Scheduler", "Job", "RowResult", "QueueFull", "DeadlineExceeded", "SchedulerBroken",
           "KINDS"]

KINDS = ("images", "captions", "answers")  # what a job asks for (the route it came from)


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
    """One request: ``requests`` are its rows (tag = (job, row)): engine ``Request``s, one per
    image (kind "images"), a ``CaptionRequest`` ("captions") or an ``AnswerRequest``
    ("answers"). Its future's result: a list of :class:`RowResult` for images, of
    ``CaptionFinished`` for captions, of [(answer, score), ...] for answers."""

    requests: list
    arrival: float
    deadline: float | None
    future: asyncio.Future
    kind: str = "images"
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
    ``batch_wait_ms`` then configures the static batch's wait); it admits image rows (caption
    rows join at every step boundary). ``captioner``: a ``CaptionEngine`` (None: no caption
    jobs); ``answer_model``: an ``XLxmertForQuestionAnswering`` (None: no answer jobs), run on at
    most ``max_answer_batch`` questions a forward (default: the engine's slots)."""

    def __init__(self, engine, model, *, max_queue: int = 64, policy: str | AdmissionPolicy = "step",
                 batch_wait_ms: float = 50.0, paint_images: bool = True,
                 metrics: ServerMetrics | None = None, max_paint_backlog: int = 2,
                 captioner=None, answer_model=None, max_answer_batch: int | None = None):
        policy = policy_named(policy, batch_wait_ms=batch_wait_ms)
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_paint_backlog < 1:
            raise ValueError(f"max_paint_backlog must be >= 1, got {max_paint_backlog}")
        max_answer_batch = engine.slots if max_answer_batch is None else max_answer_batch
        if max_answer_batch < 1:
            raise ValueError(f"max_answer_batch must be >= 1, got {max_answer_batch}")
        self.engine, self.model = engine, model
        self.captioner, self.answer_model = captioner, answer_model
        self.max_answer_batch = max_answer_batch
        self._engines = {"images": engine, "captions": captioner}
        self._caption_policy = StepLevel()
        self.max_queue, self.policy = max_queue, policy
        self.paint_images = paint_images
        self.metrics = metrics or ServerMetrics()
        self.metrics.slots.set(engine.slots)
        if captioner is not None:
            self.metrics.caption_slots.set(captioner.slots)
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

    def submit(self, requests: list, timeout_s: float | None = None, kind: str = "images") -> Job:
        """Queue one job of ``kind`` (see :class:`Job` for its rows); raises :class:`QueueFull`,
        and ValueError for a kind this scheduler has no engine for."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if (kind == "captions" and self.captioner is None) or (kind == "answers" and self.answer_model is None):
            raise ValueError(f"this scheduler runs no {kind} (no engine or model for them)")
        if self.broken is not None:
            raise SchedulerBroken(f"the engine failed: {self.broken!r}")
        if len(self._queue) >= self.max_queue:
            self.metrics.rejections.inc("queue_full")
            raise QueueFull(self.retry_after())
        now = time.perf_counter()
        job = Job(requests=list(requests), arrival=now,
                  deadline=None if timeout_s is None else now + timeout_s,
                  future=asyncio.get_running_loop().create_future(), kind=kind)
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

    def _queued(self, kind: str) -> list[Job]:
        return [job for job in self._queue if job.kind == kind]

    async def _run(self) -> None:
        try:
            while True:
                self._expire()
                if self.engine.active() == 0:
                    await self._hand_over([])  # a batch emptied by cancellations is done too
                await self._admit()
                if self.captioner is not None:
                    await self._admit(self.captioner, "captions", self._caption_policy)
                worked = False
                if self.answer_model is not None and self._queued("answers"):
                    await self._answer()
                    worked = True
                if self.captioner is not None and self.captioner.active():
                    await self._step_captions()
                    worked = True
                if self.engine.active():
                    await self._step()
                    worked = True
                if not worked:
                    self._update_gauges()
                    await self._idle_wait()
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
        wake = self.policy.wake_at(self._queued("images"))
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
        if self.captioner is not None:
            self.metrics.caption_active_rows.set(self.captioner.active())

    def _count(self, job: Job, outcome: str) -> None:
        self.metrics.requests.inc(outcome)
        self.metrics.task_requests.inc(job.kind, outcome)

    def _fail(self, job: Job, exc: BaseException, outcome: str) -> None:
        if job.done:
            return
        job.done = True
        engine = self._engines.get(job.kind)
        for handle in job.handles.values():
            engine.cancel(handle)
        job.handles.clear()
        if job in self._active:
            self._active.remove(job)
        if not job.future.done():
            job.future.set_exception(exc)
            job.future.exception()  # mark retrieved: a caller that left never reads it
        self._count(job, outcome)

    def _resolve(self, job: Job, result, now: float) -> None:
        """Answer a job whose rows are all done (unless it expired or its caller left)."""
        if job.done:  # expired or cancelled meanwhile
            return
        job.done = True
        if job in self._active:
            self._active.remove(job)
        if job.future.done():  # cancelled by its caller meanwhile
            self._count(job, "cancelled")
            return
        if job.deadline is not None and now >= job.deadline:
            job.future.set_exception(DeadlineExceeded("timeout_ms passed while generating"))
            job.future.exception()
            self._count(job, "timeout")
            return
        job.future.set_result(result)
        self._count(job, "ok")
        self.metrics.e2e.observe(now - job.arrival)

    def _expire(self) -> None:
        now = time.perf_counter()
        for job in list(self._queue):
            if job.future.cancelled():
                self._queue.remove(job)
                job.done = True
                self._count(job, "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._queue.remove(job)
                self._fail(job, DeadlineExceeded("timeout_ms passed before the request was "
                                                 "admitted"), "timeout")
        for job in list(self._active):
            if job.future.cancelled():
                self._fail(job, asyncio.CancelledError(), "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._fail(job, DeadlineExceeded("timeout_ms passed while generating"), "timeout")

    async def _admit(self, engine=None, kind: str = "images", policy: AdmissionPolicy | None = None) -> None:
        """Queued rows of ``kind`` into ``engine`` (default: image rows into the paint engine,
        as the admission policy says)."""
        engine = self.engine if engine is None else engine
        policy = self.policy if policy is None else policy
        queue = self._queued(kind)
        budget = policy.admissible(engine.free_slots(), engine.active(), queue, time.perf_counter())
        picked: list[tuple[Job, int]] = []
        for job in queue:  # oldest first: the policy's count, from the head of the queue
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
            handles = await asyncio.to_thread(engine.admit, requests)
        except (ValueError, TypeError):
            handles = None
        if handles is None:  # one bad request must not sink the others: admit one by one
            handles = []
            for job, row in picked:
                try:
                    handles.append((await asyncio.to_thread(engine.admit, [job.requests[row]]))[0])
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
                engine.cancel(handle)
                continue
            job.handles[row] = handle
            if job.admitted_at is None:
                job.admitted_at = now
                self.metrics.queue_wait.observe(job.queue_wait)
            if job not in self._active:
                self._active.append(job)
        for job in queue:
            if not job.pending and job in self._queue:
                self._queue.remove(job)
        self._update_gauges()

    async def _answer(self) -> None:
        """The answer jobs waiting now (oldest first, up to ``max_answer_batch``): one forward,
        each job answered from its own row. A request the forward refuses (ValueError, e.g. NaN
        logits) fails alone: the batch is rerun one by one; any other failure fails the batch's
        jobs, not the replica (the answer model holds no state between forwards)."""
        jobs = self._queued("answers")[:self.max_answer_batch]
        now = time.perf_counter()
        for job in jobs:
            self._queue.remove(job)
            job.pending.clear()
            job.admitted_at = now
            self.metrics.queue_wait.observe(job.queue_wait)
            self._active.append(job)
        self._update_gauges()
        requests = [job.requests[0] for job in jobs]
        self.metrics.answer_batch_rows.observe(len(jobs))
        try:
            rows, seconds = await asyncio.to_thread(_clocked, answer_batch, self.answer_model, requests)
            self.metrics.answer_seconds.observe(seconds)
        except (ValueError, TypeError) as e:
            rows = [e]
            if len(jobs) > 1:  # one bad request must not sink the others: one by one
                rows = [await self._answer_alone(r) for r in requests]
        except Exception as e:
            rows = [RuntimeError(f"answering failed: {e!r}")] * len(jobs)
        now = time.perf_counter()
        for job, row in zip(jobs, rows):
            if isinstance(row, (ValueError, TypeError)):
                self._fail(job, RuntimeError(f"the answer model failed on this request: {row}"), "error")
            elif isinstance(row, Exception):
                self._fail(job, RuntimeError(f"answering failed: {row!r}"), "error")
            else:
                self._resolve(job, [row], now)

    async def _answer_alone(self, request):
        try:
            return (await asyncio.to_thread(answer_batch, self.answer_model, [request]))[0]
        except Exception as e:
            return e

    async def _step_captions(self) -> None:
        """One caption-engine step; the caption jobs it finished are answered at once (nothing
        to paint)."""
        captioner = self.captioner
        finished, seconds = await asyncio.to_thread(_clocked, captioner.step)
        self.metrics.caption_step_seconds.observe(seconds)
        self.metrics.caption_steps.inc()
        now = time.perf_counter()
        for job in self._collect(finished):
            self._resolve(job, [job.finished[r] for r in range(len(job.requests))], now)
        self._update_gauges()

    def _collect(self, finished: list) -> list[Job]:
        """Record an engine step's finished rows in their jobs; the jobs now complete."""
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
        return complete

    async def _step(self) -> None:
        active = self.engine.active()
        self.metrics.occupancy.observe(active / self.engine.slots)
        finished, seconds = await asyncio.to_thread(_clocked, self.engine.step)
        self.metrics.step_seconds.observe(seconds)
        self.steps_run += 1
        self.metrics.engine_steps.inc()
        await self._hand_over(self._collect(finished))
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
            self._resolve(job, by_job.get(id(job)), now)
