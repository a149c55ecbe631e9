"""The Ray Serve application: a thin deployment over :class:`~xlx_fast.serving.service.ImageService`
with a FastAPI ingress. Each replica owns its engines, driven by one asyncio loop (SPEC §6a).

Routes: ``POST /v1/images/generations``, ``POST /v1/captions``, ``POST /v1/answers``,
``GET /health``, ``GET /metrics``. The caption and answer routes are always there and answer 404
(naming the option that turns them on) on a server whose model spec leaves them off, so a
client gets one clear answer whatever the server's configuration.

Deploy from the command line (``xlx-fast serve``), from Python
(``serve.run(build_app({...}))``) or from a config file::

    applications:
      - name: xlx_fast
        import_path: xlx_fast.serving:app          # the builder below
        args: {slots: 32, model: {device: cuda, dtype: bf16}}

``args`` are :class:`~xlx_fast.serving.service.ServerOptions` fields, plus ``deployment``: Ray
Serve deployment options (``num_replicas``, ``ray_actor_options``, ``autoscaling_config``, ...)
passed to ``.options()``. Ray routes at most ``max_ongoing_requests`` to a replica; it is set
above the replica's own bound (slots of each task it runs + queue) so the replica's queue, not
Ray's, answers 429, and Ray's own queue (``max_queued_requests``) is bounded too.

The API description (``/openapi.json``) needs the key like every route but ``/health``; the
interactive pages (``/docs``, ``/redoc``) load it without a key, so they are served only by a
server that has none.
"""

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve

from .service import ImageService, Reply, ServerOptions

# FastAPI's own documentation routes answer everyone: they are replaced by routes that ask for
# the key (below)
api = FastAPI(title="xlx_fast", description="X-LXMERT image generation (OpenAI-images-like API), "
              "captioning and question answering",
              docs_url=None, redoc_url=None, openapi_url=None)


def _response(reply: Reply, replica: str) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type,
                    headers={**reply.headers, "X-Replica": replica})


def _not_found() -> Response:
    return JSONResponse({"detail": "Not Found"}, status_code=404)


@serve.deployment(name="ImageServer", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class ImageServer:
    """One replica: model, engine, scheduler loop, metrics."""

    def __init__(self, options: dict):  # noqa: D107
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (unit use): a fixed name
            replica = "local"
        self.service = ImageService(options, replica_name=replica)

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        reply = await self.service.generate(request.headers, request.stream(),
                                            request.is_disconnected,
                                            client=request.client.host if request.client else None)
        return _response(reply, self.service.replica_name)

    @api.post("/v1/captions")
    async def captions(self, request: Request) -> Response:
        reply = await self.service.caption(request.headers, request.stream(), request.is_disconnected,
                                           client=request.client.host if request.client else None)
        return _response(reply, self.service.replica_name)

    @api.post("/v1/answers")
    async def answers(self, request: Request) -> Response:
        reply = await self.service.answer(request.headers, request.stream(), request.is_disconnected,
                                          client=request.client.host if request.client else None)
        return _response(reply, self.service.replica_name)

    @api.get("/health")
    async def health(self) -> Response:
        return _response(await self.service.health(), self.service.replica_name)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        return _response(await self.service.metrics_text(request.headers), self.service.replica_name)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(self, request: Request) -> Response:
        if not self.service._authorized(request.headers):
            return _response(self.service._unauthorized(), self.service.replica_name)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs_page(self) -> Response:
        if self.service.api_key is not None:
            return _not_found()
        return get_swagger_ui_html(openapi_url="openapi.json", title="xlx_fast")

    @api.get("/redoc", include_in_schema=False)
    async def redoc_page(self) -> Response:
        if self.service.api_key is not None:
            return _not_found()
        return get_redoc_html(openapi_url="openapi.json", title="xlx_fast")

    def check_health(self) -> None:
        self.service.check_health()


def build_app(args: "dict | None" = None):
    """Application builder (``serve run xlx_fast.serving:app key=value`` / config ``args``)."""
    args = dict(args or {})
    deployment = dict(args.pop("deployment", None) or {})
    options = ServerOptions.from_dict(args)
    spec = options.model
    tasks = 1 + bool(spec.get("captions")) + (spec.get("answer_task") is not None)
    bound = tasks * options.slots + options.max_queue  # answers: a batch of at most slots
    deployment.setdefault("max_ongoing_requests", bound + 16)  # + health/metrics probes
    deployment.setdefault("max_queued_requests", 4 * bound)
    if options.model.get("device", "cpu").startswith("cuda"):
        actor = dict(deployment.get("ray_actor_options") or {})
        actor.setdefault("num_gpus", 1)
        deployment["ray_actor_options"] = actor
    return ImageServer.options(**deployment).bind(options.to_dict())
