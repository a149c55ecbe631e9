"""Open-loop Poisson load: requests are sent at exponential inter-arrival times whatever the
server's answers (a closed loop would slow down with the server and hide its queueing).

Bounded twice: at most ``max_requests`` are sent and none after ``max_seconds``; in-flight ones
are then awaited up to ``drain_seconds`` (and counted as client timeouts past that). The HTTP
sender only targets loopback addresses unless told otherwise (``allow_remote``).

A *sender* is ``async send(body: dict) -> Outcome``: :func:`http_sender` (any server speaking the
API) or :func:`inprocess_sender` (a :class:`~xlx_fast.serving.scheduler.Scheduler` driven
directly: no Ray, no HTTP), for one task: ``images`` (the default), ``captions`` or ``answers``
(bodies from :func:`make_trace` and :func:`make_task_trace`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

STRATEGY_MIX = ("mask_predict", "mask_predict", "mask_predict", "confidence", "tlbr", "random")
PROMPTS = ("a red bus on a city street", "two dogs playing in the snow", "a plate of food on a table",
           "a man riding a wave on a surfboard", "a kitchen with a window and a stove",
           "a giraffe standing next to a tree", "people flying kites in a park", "a train at a station")


QUESTIONS = ("what color is the bus?", "how many dogs are there?", "is there a window?",
             "what is on the table?", "where is the giraffe standing?", "is it snowing?")
ROUTES = {"images": "/v1/images/generations", "captions": "/v1/captions", "answers": "/v1/answers"}


@dataclass
class Outcome:
    status: int            # HTTP status (0: client-side timeout or connection error)
    sent_at: float         # seconds since the run started
    e2e_s: float           # send → answer
    queue_wait_s: float | None = None
    steps: int = 0


def make_trace(n: int, seed: int = 0, steps: tuple = (2, 4, 6, 8), mixed: bool = True) -> list[dict]:
    """``n`` request bodies: prompts, seeds, steps drawn from ``steps`` and (``mixed``) strategies
    (AR orders get their steps too), reproducible from ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(2**31), "steps": rng.choice(steps)}
        if mixed:
            body["strategy"] = rng.choice(STRATEGY_MIX)
        out.append(body)
    return out


def make_task_trace(task: str, n: int, seed: int = 0, *, n_clusters: int = 10_000, images: int = 1,
                    steps: tuple = (2, 4, 6, 8), cells: int = 64) -> list[dict]:
    """``n`` request bodies for ``POST /v1/captions`` (``task="captions"``: random grids of
    ``cells`` cluster ids, the served model's grid, caption lengths 8..14, seeds, Mask-Predict
    ``steps``) or ``POST /v1/answers`` (``"answers"``: questions about random 8×8 grids, the
    answer model's, ``images`` per question), reproducible from ``seed``."""
    rng = random.Random(seed)

    def grid(size: int = 64):
        return [rng.randrange(n_clusters) for _ in range(size)]

    out = []
    for _ in range(n):
        if task == "captions":
            out.append({"cluster_ids": grid(cells), "length": rng.choice((8, 10, 12, 14)),
                        "seed": rng.randrange(2**31), "steps": rng.choice(steps)})
        elif task == "answers":
            out.append({"question": rng.choice(QUESTIONS),
                        "cluster_ids": grid() if images == 1 else [grid() for _ in range(images)]})
        else:
            raise ValueError(f"task must be captions or answers, got {task!r}")
    return out


def poisson_offsets(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times (s) of ``n`` requests of a Poisson process of ``rate`` per second."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def run_open_loop(send, trace: list[dict], rate: float, *, max_requests: int,
                        max_seconds: float, drain_seconds: float = 60.0, seed: int = 0) -> dict:
    """Send ``trace`` (cycled) at Poisson ``rate``; returns ``{"outcomes", "duration_s"}``."""
    if max_requests < 1 or not max_seconds > 0:
        raise ValueError("max_requests must be >= 1 and max_seconds > 0")
    offsets = poisson_offsets(rate, max_requests, seed)
    t0 = time.perf_counter()
    tasks = []

    async def one(body, at):
        o = await send(body)
        o.sent_at = at
        return o

    for i, at in enumerate(offsets):
        if at > max_seconds:
            break
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(dict(trace[i % len(trace)]), time.perf_counter() - t0)))
    done, pending = await asyncio.wait(tasks, timeout=drain_seconds) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    outcomes = [t.result() for t in tasks if t in done and not t.cancelled() and t.exception() is None]
    outcomes += [Outcome(0, 0.0, drain_seconds) for t in tasks if t not in done or t.exception() is not None]
    return {"outcomes": outcomes, "duration_s": time.perf_counter() - t0}


def _percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(q / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def summarize(run: dict, rate: float, slo_s: float) -> dict:
    """Per-rate figures: e2e latency percentiles (successful requests), queue wait, throughput
    and goodput (successful / within the SLO, per second of the run), rejections by status."""
    outs = run["outcomes"]
    ok = [o for o in outs if o.status == 200]
    lat = sorted(o.e2e_s for o in ok)
    waits = sorted(o.queue_wait_s for o in ok if o.queue_wait_s is not None)
    dur = max(run["duration_s"], 1e-9)
    rejected: dict[str, int] = {}
    for o in outs:
        if o.status != 200:
            rejected[str(o.status)] = rejected.get(str(o.status), 0) + 1
    return {
        "offered_rps": rate, "sent": len(outs), "ok": len(ok), "duration_s": dur,
        "throughput_rps": len(ok) / dur,
        "goodput_rps": sum(1 for x in lat if x <= slo_s) / dur, "slo_s": slo_s,
        "e2e_p50_s": _percentile(lat, 50), "e2e_p95_s": _percentile(lat, 95),
        "e2e_p99_s": _percentile(lat, 99), "e2e_max_s": lat[-1] if lat else None,
        "queue_wait_p50_s": _percentile(waits, 50), "queue_wait_p99_s": _percentile(waits, 99),
        "rejected": rejected,
    }


def check_target(url: str, allow_remote: bool = False) -> str:
    """``url`` without a trailing slash; refuses non-loopback hosts unless ``allow_remote``."""
    host = urlparse(url).hostname
    if host is None:
        raise ValueError(f"url: not an http URL: {url!r}")
    if not allow_remote:
        loopback = host == "localhost"
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if not loopback:
            raise ValueError(f"url: {host} is not a loopback address; the load generator only "
                             "targets this machine unless told otherwise (--allow-remote, or "
                             "allow_remote=True)")
    return url.rstrip("/")


def http_sender(session, url: str, headers: dict | None = None, timeout_s: float = 120.0,
                task: str = "images"):
    """A sender POSTing to ``url`` + the ``task``'s route (``ROUTES``) with an ``aiohttp``
    session."""
    import aiohttp

    endpoint = f"{url}{ROUTES[task]}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send(body: dict) -> Outcome:
        t = time.perf_counter()
        try:
            async with session.post(endpoint, data=json.dumps(body), headers={
                    "Content-Type": "application/json", **(headers or {})}, timeout=timeout) as r:
                await r.read()
                wait = r.headers.get("X-Queue-Wait-Ms")
                return Outcome(r.status, 0.0, time.perf_counter() - t,
                               None if wait is None else float(wait) / 1000, body.get("steps", 0))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return Outcome(0, 0.0, time.perf_counter() - t)

    return send


def inprocess_sender(scheduler, tokenizer, task: str = "images"):
    """A sender that drives a :class:`~xlx_fast.serving.scheduler.Scheduler` directly: tokenizer,
    engine, painting and PNG encoding (captions: the words decoded; answers: the batched
    forward), as a replica does, without HTTP, Ray or the pydantic schema (machines without them
    run this)."""
    from ..engine import Request
    from ..serving.painter import png_bytes
    from ..serving.scheduler import QueueFull

    if task != "images":
        return _task_sender(scheduler, tokenizer, task)

    async def send(body: dict) -> Outcome:
        t = time.perf_counter()
        ids, mask = tokenizer([body["prompt"]])
        req = Request(input_ids=ids[0], attention_mask=mask[0], seed=body.get("seed", 0),
                      steps=body.get("steps"), strategy=body.get("strategy", "mask_predict"),
                      temperature=body.get("temperature", 0.0))
        try:
            job = scheduler.submit([req])
        except QueueFull:
            return Outcome(429, 0.0, time.perf_counter() - t)
        try:
            rows = await scheduler.result(job)
        except Exception:
            return Outcome(500, 0.0, time.perf_counter() - t)
        await asyncio.to_thread(lambda: [png_bytes(r.image) for r in rows])
        return Outcome(200, 0.0, time.perf_counter() - t, job.queue_wait, body.get("steps", 0))

    return send


def _task_sender(scheduler, tokenizer, task: str):
    import torch

    from ..caption_engine import CaptionRequest
    from ..serving.answerer import AnswerRequest
    from ..serving.scheduler import QueueFull

    if task not in ("captions", "answers"):
        raise ValueError(f"task must be images, captions or answers, got {task!r}")

    async def send(body: dict) -> Outcome:
        t = time.perf_counter()
        image = torch.tensor(body["cluster_ids"], dtype=torch.int64)
        if task == "captions":
            row = CaptionRequest(cluster_ids=image, length=body.get("length", 12), seed=body.get("seed", 0),
                                 steps=body.get("steps"), strategy=body.get("strategy", "mask_predict"),
                                 temperature=body.get("temperature", 0.0))
        else:
            ids, mask = tokenizer([body["question"]])
            row = AnswerRequest(ids[0], mask[0], image, top_k=body.get("top_k", 5))
        try:
            job = scheduler.submit([row], kind=task)
        except QueueFull:
            return Outcome(429, 0.0, time.perf_counter() - t)
        try:
            (result,) = await scheduler.result(job)
        except Exception:
            return Outcome(500, 0.0, time.perf_counter() - t)
        if task == "captions":
            tokenizer.decode([i for i in result.ids.tolist() if i >= 0])
        return Outcome(200, 0.0, time.perf_counter() - t, job.queue_wait, body.get("steps") or 0)

    return send


def outcome_dict(o: Outcome) -> dict:
    return asdict(o)
