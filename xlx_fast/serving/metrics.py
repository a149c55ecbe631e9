"""A replica's Prometheus metrics, written in the Prometheus text format (version 0.0.4).

Self-contained (no ``prometheus_client``) so the in-process benchmark on machines without it
uses the same numbers, and so every scheduler owns its own registry (several schedulers in one
process do not clash in a global one). The exposition is parsed back by
``prometheus_client.parser`` in the tests.

What a replica exports (``xlx_`` prefix):

- ``xlx_queue_depth`` (gauge): requests waiting for a slot (every task: one queue);
- ``xlx_active_rows`` (gauge): occupied paint-engine slots; ``xlx_slots`` (gauge): capacity;
- ``xlx_batch_occupancy`` (histogram): active rows / slots at each paint-engine step;
- ``xlx_step_seconds`` (histogram): wall time of one paint-engine step;
- ``xlx_paint_seconds`` (histogram): wall time of one batched painting;
- ``xlx_queue_wait_seconds`` (histogram): arrival → first row admitted;
- ``xlx_e2e_seconds`` (histogram): arrival → images ready, for requests that succeeded;
- ``xlx_engine_steps_total`` (counter): engine steps run;
- ``xlx_requests_total{outcome}`` (counter): ok | timeout | cancelled | error, every task;
- ``xlx_task_requests_total{task,outcome}`` (counter): the same by task (images | captions |
  answers);
- ``xlx_rejections_total{reason}`` (counter): queue_full | too_large | invalid | unauthorized |
  not_ready | body_timeout (408) | slow_body (429: too many slow bodies from one address) |
  not_enabled (404: a task this server does not run);
- captions (``POST /v1/captions``, the caption engine): ``xlx_caption_slots`` and
  ``xlx_caption_active_rows`` (gauges), ``xlx_caption_step_seconds`` (histogram),
  ``xlx_caption_steps_total`` (counter);
- answers (``POST /v1/answers``, one forward per batch): ``xlx_answer_seconds`` (histogram: one
  batched forward), ``xlx_answer_batch_rows`` (histogram: questions per forward).
"""
from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OCCUPANCY_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(names: tuple, values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{str(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labelnames: tuple = ()):
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help_, labelnames=(), initial_labels=()):
        super().__init__(name, help_, labelnames)
        self._values = {tuple(v) if isinstance(v, tuple) else (v,): 0.0 for v in initial_labels}

    def inc(self, *labels, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels) -> float:
        return self._values.get(labels, 0.0)

    def lines(self) -> list[str]:
        # The text format names a counter's sample <name>_total; ``name`` already ends so.
        return [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}"
                for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help_):
        super().__init__(name, help_)
        self._value = 0.0

    def set(self, v: float) -> None:
        self._value = float(v)

    def value(self) -> float:
        return self._value

    def lines(self) -> list[str]:
        return [f"{self.name} {_fmt(self._value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_, buckets):
        super().__init__(name, help_)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, v: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if v <= bound:
                    self._counts[i] += 1
                    break
            self._sum += v
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    def lines(self) -> list[str]:
        out, running = [], 0
        for bound, c in zip(self.buckets, self._counts):
            running += c
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        out.append(f"{self.name}_sum {_fmt(self._sum)}")
        out.append(f"{self.name}_count {self._count}")
        return out


class ServerMetrics:
    """The metrics one scheduler updates; :meth:`render` gives the /metrics body."""

    REJECT_REASONS = ("queue_full", "too_large", "invalid", "unauthorized", "not_ready",
                      "body_timeout", "slow_body", "not_enabled")
    OUTCOMES = ("ok", "timeout", "cancelled", "error")
    TASKS = ("images", "captions", "answers")

    def __init__(self):
        self.queue_depth = Gauge("xlx_queue_depth", "Requests waiting for an engine slot.")
        self.active_rows = Gauge("xlx_active_rows", "Occupied engine slots.")
        self.slots = Gauge("xlx_slots", "Engine slots (batch capacity).")
        self.occupancy = Histogram("xlx_batch_occupancy",
                                   "Active rows / slots at each engine step.", OCCUPANCY_BUCKETS)
        self.step_seconds = Histogram("xlx_step_seconds", "Wall time of one engine step.",
                                      LATENCY_BUCKETS)
        self.paint_seconds = Histogram("xlx_paint_seconds", "Wall time of one batched painting.",
                                       LATENCY_BUCKETS)
        self.queue_wait = Histogram("xlx_queue_wait_seconds",
                                    "Arrival to first row admitted.", LATENCY_BUCKETS)
        self.e2e = Histogram("xlx_e2e_seconds", "Arrival to images ready (successful requests).",
                             LATENCY_BUCKETS)
        self.engine_steps = Counter("xlx_engine_steps_total", "Engine steps run.", (), [()])
        self.requests = Counter("xlx_requests_total", "Requests that reached the scheduler, by outcome.",
                                ("outcome",), self.OUTCOMES)
        self.rejections = Counter("xlx_rejections_total", "Requests refused before scheduling, by reason.",
                                  ("reason",), self.REJECT_REASONS)
        self.task_requests = Counter("xlx_task_requests_total", "Requests that reached the scheduler, "
                                     "by task and outcome.", ("task", "outcome"),
                                     [(t, o) for t in self.TASKS for o in self.OUTCOMES])
        self.caption_slots = Gauge("xlx_caption_slots", "Caption engine slots (batch capacity).")
        self.caption_active_rows = Gauge("xlx_caption_active_rows", "Occupied caption engine slots.")
        self.caption_step_seconds = Histogram("xlx_caption_step_seconds",
                                              "Wall time of one caption engine step.", LATENCY_BUCKETS)
        self.caption_steps = Counter("xlx_caption_steps_total", "Caption engine steps run.", (), [()])
        self.answer_seconds = Histogram("xlx_answer_seconds", "Wall time of one batched answer forward.",
                                        LATENCY_BUCKETS)
        self.answer_batch_rows = Histogram("xlx_answer_batch_rows", "Questions per answer forward.",
                                           BATCH_BUCKETS)
        self._all = [self.queue_depth, self.active_rows, self.slots, self.occupancy,
                     self.step_seconds, self.paint_seconds, self.queue_wait, self.e2e,
                     self.engine_steps, self.requests, self.rejections, self.task_requests,
                     self.caption_slots, self.caption_active_rows, self.caption_step_seconds,
                     self.caption_steps, self.answer_seconds, self.answer_batch_rows]

    def render(self) -> str:
        lines = []
        for m in self._all:
            lines += m.header()
            lines += m.lines()
        return "\n".join(lines) + "\n"
