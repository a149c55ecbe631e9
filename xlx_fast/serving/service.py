"""What one replica does per HTTP route, independent of Ray: auth, limits, validation, the
scheduler, the response. The Ray Serve deployment (:mod:`xlx_fast.serving.deployment`) only forwards
its routes here, so the same logic is used in-process by the benchmark.

Routes and their answers:

- ``POST /v1/images/generations``: 200 with ``{created, data: [{b64_json, seed, ids?}]}`` (or the
  PNG itself for ``Accept: image/png`` and n = 1); 401 without the API key (when one is set);
  503 + Retry-After before warm-up is done; 413 for a body over ``max_body_bytes``; 408 for a
  body that has not arrived in full within ``body_timeout_s``; 429 when the client's address
  already has ``max_slow_bodies`` slow bodies in progress (see below); 422 naming the field for
  a malformed or out-of-range body; 429 + Retry-After when the queue is full; 504
  past ``timeout_ms`` (its slot is freed at the next step boundary); 500 if the engine failed.
  A model whose grid no generator paints yet (``model_spec.grid``) answers 404 saying so.
- ``POST /v1/captions`` (a caption for the N² cluster ids of the model's N×N grid:
  ``{created, data: [{ids, text, probs}]}``) and ``POST /v1/answers`` (answers to a question about 64 cluster ids, two images' for nlvr2:
  ``{created, data: [{answer, score}, ...]}``): the same answers as the generation route (401,
  503, 413, 408, 429, 422 naming the field, 429 queue full, 504, 500), and 404 naming the
  option that turns the task on when this server does not run it (``captions`` /
  ``answer_task`` of the model spec; ``xlx-fast serve --captions`` / ``--answer-task``). The
  bodies are in :mod:`xlx_fast.serving.schema`.
- ``GET /health``: 200 once the model is built and the engines warmed up (every CUDA graph bucket
  captured), with the slots and the tasks served, 503 before; never needs the key, so its error
  text names no file path.
- ``GET /metrics``: this replica's Prometheus text; needs the key when one is set.

Slow bodies: Ray Serve routes a request to a replica once its headers are in, and the request
holds one of the replica's ``max_ongoing_requests`` while its body trickles in; clients that
send ``Content-Length: 1000`` and then 10 bytes would otherwise hold them all, and ``/health``
and new generations would wait behind them. So the body must arrive in full within
``body_timeout_s`` (408 and the connection closed otherwise), and a body still incomplete after
``SLOW_BODY_S`` counts against its client address: past ``max_slow_bodies`` of them, the newest
is answered 429 at once. A body that arrives at once never counts, so a client's concurrent
ordinary requests are not limited here (the queue bounds them). Behind a reverse proxy every
client has the proxy's address: bound slow clients there.

Start-up: the model is built and the engine warmed up on a background thread (the replica's
constructor returns at once, so ``/health`` can say "warming up"); the scheduler loop starts
on the replica's event loop at the first request after that.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field

from pydantic import ValidationError

from .metrics import ServerMetrics
from ..grid import N_CELLS
from .model_spec import ModelSpec
from .schema import (AnswersRequest, CaptionsRequest, ImageRequest, RequestError,
                     check_against_server, check_answer_against_server,
                     check_caption_against_server, validation_error)

API_KEY_ENV = "XLX_FAST_API_KEY"
SLOW_BODY_S = 0.5  # a body still incomplete after this counts against its client's slow bodies


@dataclass
class ServerOptions:
    """A replica's configuration (JSON-able: it travels in serve config files).

    model: a :class:`ModelSpec` as a dict. slots: engine batch capacity. max_queue: queued jobs
    before 429. policy: "step" (the server) | "request" | "sequential" (benchmark baselines).
    batch_wait_ms: the request-level batcher's wait. max_steps: largest ``steps`` accepted.
    default_timeout_ms: deadline of requests that give none (None: no deadline).
    max_body_bytes: larger bodies get 413. body_timeout_s: the whole body must arrive within it
    (408). max_slow_bodies: slow bodies in progress per client address (429 past it). api_key: required key (None: read ``$XLX_FAST_API_KEY``
    in the replica; empty: no key). warmup_delay_s: extra seconds before /health turns ready
    (staggers replicas; lets tests observe the warming state).
    """

    model: dict = field(default_factory=dict)
    slots: int = 8
    max_queue: int = 64
    policy: str = "step"
    batch_wait_ms: float = 50.0
    max_steps: int = 256
    default_timeout_ms: int | None = None
    max_body_bytes: int = 65536
    body_timeout_s: float = 10.0
    max_slow_bodies: int = 4
    api_key: str | None = None
    warmup_delay_s: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "ServerOptions":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"server options: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        # ``serve run xlx_fast.serving:app slots=16`` passes every value as a string
        numeric = {"slots": int, "max_queue": int, "max_steps": int, "max_body_bytes": int,
                   "default_timeout_ms": int, "batch_wait_ms": float, "warmup_delay_s": float,
                   "body_timeout_s": float, "max_slow_bodies": int}
        for name, kind in numeric.items():
            if isinstance(d.get(name), str):
                try:
                    d[name] = kind(d[name])
                except ValueError:
                    raise ValueError(f"server options: {name} must be a number, got {d[name]!r}") from None
        opts = cls(**d)
        opts.check()
        return opts

    def check(self) -> None:
        ModelSpec.from_dict(self.model)
        for name in ("slots", "max_queue", "max_steps", "max_body_bytes", "max_slow_bodies"):
            if getattr(self, name) < 1:
                raise ValueError(f"server options: {name} must be >= 1, got {getattr(self, name)}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"server options: body_timeout_s must be > 0, got {self.body_timeout_s}")
        from .policies import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"server options: policy must be one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reply:
    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, obj, headers: dict | None = None) -> "Reply":
        return cls(status, json.dumps(obj).encode(), "application/json", headers or {})

    @classmethod
    def error(cls, err: RequestError) -> "Reply":
        return cls.json(err.status, err.body(), err.headers)


class ImageService:
    """One replica's state: model, engine, scheduler, metrics. See the module docstring."""

    def __init__(self, options: ServerOptions | dict, *, replica_name: str = "local"):
        self.options = options if isinstance(options, ServerOptions) else ServerOptions.from_dict(options)
        self.options.check()
        key = self.options.api_key
        self.api_key = os.environ.get(API_KEY_ENV) or None if key is None else (key or None)
        self.replica_name = replica_name
        self.metrics = ServerMetrics()
        self.spec = ModelSpec.from_dict(self.options.model)
        self.model = self.tokenizer = self.engine = self.scheduler = None
        self.captioner = self.answer_model = None
        self.load_error: BaseException | None = None
        self._built = threading.Event()
        self._start_lock = asyncio.Lock()
        self._slow_bodies: dict[str, int] = {}  # client address -> slow bodies in progress
        threading.Thread(target=self._build, name="xlx-fast-warmup", daemon=True).start()

    # -- start-up ------------------------------------------------------------------------------

    def _build(self) -> None:
        try:
            from ..xuniter_engine import engine_class

            self.model, self.tokenizer = self.spec.build()
            # the model's own paint engine (X-UNITER's single stream has its own), same interface
            self.engine = engine_class(self.model)(self.model, slots=self.options.slots)
            self.engine.warmup()
            if self.spec.captions:
                from ..caption_engine import CaptionEngine

                self.captioner = CaptionEngine(self.model, slots=self.options.slots)
                self.captioner.warmup()
            if self.spec.answers_enabled:
                self.answer_model = self.spec.build_answer_model(self.model.centroids)
                self._warm_answers()
            if self.options.warmup_delay_s > 0:
                time.sleep(self.options.warmup_delay_s)
        except BaseException as e:  # reported by /health and check_health
            self.load_error = e
        finally:
            self._built.set()

    def _warm_answers(self) -> None:
        """One forward before traffic: the model is optimized in place at its first call."""
        import torch

        from .answerer import AnswerRequest, answer_batch

        ids, mask = self.tokenizer(["warm up"])
        # the answer model reads the default grid's cells, whatever the painting model's grid
        images = torch.zeros((self.answer_model.task.images, N_CELLS) if self.answer_model.task.images > 1
                             else (N_CELLS,), dtype=torch.int64)
        answer_batch(self.answer_model, [AnswerRequest(ids[0], mask[0], images, top_k=1)])

    def wait_built(self, timeout: float | None = None) -> bool:
        return self._built.wait(timeout)

    async def _ready(self) -> bool:
        """True once warmed up; starts the scheduler loop on this event loop the first time."""
        if self.scheduler is not None:
            return True
        if not self._built.is_set() or self.load_error is not None:
            return False
        async with self._start_lock:
            if self.scheduler is None:
                from .scheduler import Scheduler

                sched = Scheduler(self.engine, self.model, max_queue=self.options.max_queue,
                                  policy=self.options.policy, batch_wait_ms=self.options.batch_wait_ms,
                                  metrics=self.metrics, captioner=self.captioner,
                                  answer_model=self.answer_model)
                sched.start()
                self.scheduler = sched
        return True

    async def close(self) -> None:
        """Stop the scheduler loop (pending requests stay unanswered). A later request starts a
        new loop, on its own event loop."""
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
            self._start_lock = asyncio.Lock()

    def check_health(self) -> None:
        """Raises when the replica cannot serve (Ray Serve then replaces it)."""
        if self.load_error is not None:
            raise RuntimeError(f"model failed to load: {self.load_error!r}")
        if self.scheduler is not None and self.scheduler.broken is not None:
            raise RuntimeError(f"engine failed: {self.scheduler.broken!r}")

    @property
    def tasks(self) -> list[str]:
        """The routes this replica serves: images (when its model can paint), and captions /
        answers when on."""
        return ((["images"] if self.cannot_paint is None else [])
                + (["captions"] if self.spec.captions else [])
                + ([f"answers ({self.spec.answer_task})"] if self.spec.answers_enabled else []))

    @property
    def cannot_paint(self) -> str | None:
        """Why the built model cannot paint (e.g. a grid no generator paints yet), or None."""
        from .painter import cannot_paint

        return cannot_paint(self.model)

    @property
    def image_size(self) -> int:
        return self.model.generator.config.target_size

    # -- routes --------------------------------------------------------------------------------

    def _authorized(self, headers) -> bool:
        if self.api_key is None:
            return True
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    def _unauthorized(self) -> Reply:
        self.metrics.rejections.inc("unauthorized")
        return Reply.error(RequestError(401, "missing or wrong API key: send 'Authorization: "
                                        "Bearer KEY' or 'X-API-Key: KEY'", type_="authentication_error",
                                        headers={"WWW-Authenticate": "Bearer"}))

    async def health(self) -> Reply:
        ready = await self._ready()
        body = {"status": "ok" if ready else ("error" if self.load_error else "warming up"),
                "replica": self.replica_name}
        if self.load_error is not None:
            body["error"] = public_error(self.load_error)
        if ready:
            body["slots"] = self.engine.slots
            body["tasks"] = self.tasks
        return Reply.json(200 if ready else 503, body, {} if ready else {"Retry-After": "1"})

    async def metrics_text(self, headers) -> Reply:
        if not self._authorized(headers):
            return self._unauthorized()
        return Reply(200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def generate(self, headers, body_chunks, is_disconnected=None, client=None) -> Reply:
        """``POST /v1/images/generations``. ``body_chunks``: an async iterator of the body's bytes
        (read up to the limit only). ``client``: the peer's address, which slow bodies are
        counted by (None: one shared count)."""
        return await self._route(self._generate, None, headers, body_chunks, is_disconnected, client)

    async def caption(self, headers, body_chunks, is_disconnected=None, client=None) -> Reply:
        """``POST /v1/captions``; arguments as for :meth:`generate`."""
        off = None if self.spec.captions else (
            "this server does not caption: start it with captions on (xlx-fast serve --captions; "
            "model spec captions: true)")
        return await self._route(self._caption, off, headers, body_chunks, is_disconnected, client)

    async def answer(self, headers, body_chunks, is_disconnected=None, client=None) -> Reply:
        """``POST /v1/answers``; arguments as for :meth:`generate`."""
        off = None if self.spec.answers_enabled else (
            "this server has no answer model: start it with one (xlx-fast serve --answer-task "
            "vqa|gqa|nlvr2 [--answer-checkpoint FILE --answers FILE]; model spec answer_task)")
        return await self._route(self._answer, off, headers, body_chunks, is_disconnected, client)

    async def _route(self, handler, disabled: str | None, headers, body_chunks, is_disconnected,
                     client) -> Reply:
        """What every POST route does before its own work: the key, the task being on, warm-up,
        the body (in time, within the limit); then ``handler(headers, raw body, is_disconnected)``."""
        try:
            if not self._authorized(headers):
                return self._unauthorized()
            if disabled is not None:
                self.metrics.rejections.inc("not_enabled")
                raise RequestError(404, disabled, type_="not_found_error")
            if not await self._ready():
                self.metrics.rejections.inc("not_ready")
                status = 500 if self.load_error else 503
                raise RequestError(status, "the model is still warming up" if status == 503
                                   else f"the model failed to load: {public_error(self.load_error)}",
                                   type_="server_error", headers={"Retry-After": "1"})
            raw = await self._read_body_in_time(headers, body_chunks, client)
            return await handler(headers, raw, is_disconnected)
        except RequestError as e:
            return Reply.error(e)

    def _parse(self, model, raw: bytes, check=None):
        """The body as ``model`` (a pydantic request class), then ``check(request)``; a 422
        naming the field otherwise. Returns ``(request, check's result)``."""
        try:
            req = model.model_validate_json(raw)
            return req, (check(req) if check is not None else None)
        except ValidationError as e:
            self.metrics.rejections.inc("invalid")
            raise validation_error(e.errors()) from None
        except RequestError:
            self.metrics.rejections.inc("invalid")
            raise

    async def _run_job(self, rows: list, kind: str, timeout_ms: int | None, is_disconnected):
        """Queue ``rows`` as one job and wait for it; the scheduler's refusals as HTTP errors."""
        if timeout_ms is None:
            timeout_ms = self.options.default_timeout_ms
        from .scheduler import DeadlineExceeded, QueueFull, SchedulerBroken

        try:
            job = self.scheduler.submit(rows, None if timeout_ms is None else timeout_ms / 1000, kind=kind)
        except QueueFull as e:
            raise RequestError(429, f"the queue is full ({self.options.max_queue} requests "
                               f"waiting); retry after {e.retry_after_s} s", type_="rate_limit_error",
                               headers={"Retry-After": str(e.retry_after_s)}) from None
        except SchedulerBroken as e:
            raise RequestError(500, str(e), type_="server_error") from None
        try:
            results = await self._wait(job, is_disconnected)
        except DeadlineExceeded as e:
            raise RequestError(504, f"timeout_ms: {timeout_ms} ms passed ({e}); the request "
                               "was cancelled", param="timeout_ms", type_="timeout") from None
        except (ValueError, TypeError) as e:
            raise RequestError(422, f"the engine refused the request: {e}") from None
        except RuntimeError as e:  # the engine failed on this request (or on all: SchedulerBroken)
            raise RequestError(500, str(e), type_="server_error") from None
        return job, results

    async def _caption(self, headers, raw: bytes, is_disconnected) -> Reply:
        import torch

        from ..caption_engine import CaptionRequest
        from ..caption_io import MASK_ID

        req, steps = self._parse(CaptionsRequest, raw, lambda r: check_caption_against_server(
            r, n_clusters=self.model.centroids.shape[0], max_steps=self.options.max_steps,
            n_cells=self.model.n_cells))
        row = CaptionRequest(cluster_ids=torch.tensor(req.cluster_ids, dtype=torch.int64),
                             length=req.length, seed=req.seed, steps=steps, strategy=req.strategy,
                             temperature=req.temperature)
        job, (f,) = await self._run_job([row], "captions", req.timeout_ms, is_disconnected)
        ids = f.ids.tolist()
        text = self.tokenizer.decode([MASK_ID if i < 0 else i for i in ids])
        return Reply.json(200, {"created": int(time.time()),
                                "data": [{"ids": ids, "text": text, "probs": f.probs.tolist()}]},
                          _timing(job))

    async def _answer(self, headers, raw: bytes, is_disconnected) -> Reply:
        import torch

        from .answerer import AnswerRequest

        m = self.answer_model
        req, (images, top_k) = self._parse(AnswersRequest, raw, lambda r: check_answer_against_server(
            r, task=m.task.name, images=m.task.images, n_clusters=m.n_clusters, n_answers=m.n_answers))
        ids, mask = self.tokenizer([req.question])
        row = AnswerRequest(input_ids=ids[0], attention_mask=mask[0],
                            cluster_ids=torch.tensor(images, dtype=torch.int64), top_k=top_k)
        job, (pairs,) = await self._run_job([row], "answers", req.timeout_ms, is_disconnected)
        return Reply.json(200, {"created": int(time.time()),
                                "data": [{"answer": a, "score": s} for a, s in pairs]}, _timing(job))

    async def _read_body_in_time(self, headers, body_chunks, client) -> bytes:
        """The body, within ``body_timeout_s``; a slow one counts against ``client`` (module
        docstring)."""
        read = asyncio.ensure_future(self._read_body(headers, body_chunks))
        timeout = self.options.body_timeout_s
        try:
            done, _ = await asyncio.wait({read}, timeout=min(SLOW_BODY_S, timeout))
            if done:
                return read.result()
            key = client or "?"
            if self._slow_bodies.get(key, 0) >= self.options.max_slow_bodies:
                self.metrics.rejections.inc("slow_body")
                raise RequestError(429, f"body: {self.options.max_slow_bodies} request bodies from "
                                   "this address are already arriving slowly; send the body with "
                                   "the headers", param="body", type_="rate_limit_error",
                                   headers={"Connection": "close", "Retry-After": "1"})
            self._slow_bodies[key] = self._slow_bodies.get(key, 0) + 1
            try:
                done, _ = await asyncio.wait({read}, timeout=max(0.0, timeout - SLOW_BODY_S))
            finally:
                self._slow_bodies[key] -= 1
                if not self._slow_bodies[key]:
                    del self._slow_bodies[key]
            if done:
                return read.result()
            self.metrics.rejections.inc("body_timeout")
            raise RequestError(408, f"body: not received in full within {timeout:g} s",
                               param="body", type_="timeout", headers={"Connection": "close"})
        finally:
            if not read.done():
                read.cancel()

    async def _read_body(self, headers, body_chunks) -> bytes:
        limit = self.options.max_body_bytes
        too_large = RequestError(413, f"body: larger than the limit of {limit} bytes",
                                 param="body", headers={"Connection": "close"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.metrics.rejections.inc("too_large")
            raise too_large
        buf = bytearray()
        async for chunk in body_chunks:
            buf += chunk
            if len(buf) > limit:
                self.metrics.rejections.inc("too_large")
                raise too_large
        return bytes(buf)

    async def _generate(self, headers, raw: bytes, is_disconnected) -> Reply:
        reason = self.cannot_paint  # known once the model is built (a grid no generator paints)
        if reason is not None:
            self.metrics.rejections.inc("not_enabled")
            raise RequestError(404, f"this server does not paint: {reason}; it serves "
                               f"{', '.join(self.tasks) or 'nothing else'}", type_="not_found_error")
        req, steps = self._parse(ImageRequest, raw, lambda r: check_against_server(
            r, image_size=self.image_size, max_steps=self.options.max_steps,
            n_cells=self.model.n_cells))
        ids, mask = self.tokenizer([req.prompt])
        from ..engine import Request

        rows = [Request(input_ids=ids[0], attention_mask=mask[0], seed=req.seed + k,
                        steps=steps, strategy=req.strategy, temperature=req.temperature)
                for k in range(req.n)]
        job, results = await self._run_job(rows, "images", req.timeout_ms, is_disconnected)

        pngs = await asyncio.to_thread(_encode_all, [r.image for r in results])
        timing = _timing(job)
        if req.n == 1 and "image/png" in headers.get("accept", ""):
            return Reply(200, pngs[0], "image/png", {"X-Seed": str(results[0].seed), **timing})
        data = []
        for r, png in zip(results, pngs):
            item = {"b64_json": base64.b64encode(png).decode(), "seed": r.seed}
            if req.return_ids:
                item["ids"] = r.ids
            data.append(item)
        return Reply.json(200, {"created": int(time.time()), "data": data}, timing)

    async def _wait(self, job, is_disconnected):
        """Await the job; a client that disconnects cancels it (the scheduler frees its slots at
        the next step boundary). Cancellation of this coroutine does the same."""
        try:
            if is_disconnected is None:
                return await job.future
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.2)
                if done:
                    return job.future.result()
                if await is_disconnected():
                    raise asyncio.CancelledError("client disconnected")
        except asyncio.CancelledError:
            job.future.cancel()
            raise


_ABS_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\:,;()]+[/\\])*([^\s'\"/\\:,;()]*)")


def public_error(e: BaseException) -> str:
    """``e`` as ``Type: message`` with every absolute path cut to its file name: ``/health``
    answers without the key, and a path tells a stranger the machine's layout (the full text is
    in the replica's log)."""
    return f"{type(e).__name__}: {_ABS_PATH.sub(lambda m: m.group(1) or '<path>', str(e))}"


def _timing(job) -> dict:
    return {"X-Queue-Wait-Ms": f"{1000 * (job.queue_wait or 0.0):.3f}"}


def _encode_all(images) -> list[bytes]:
    from .painter import png_bytes

    return [png_bytes(im) for im in images]
