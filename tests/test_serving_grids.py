"""The server on a 16×16 grid, in-process (the service object as the Ray deployment calls it).

``grid`` is a property of the served model (``ModelSpec.grid``), never a request field; the
checks of cluster-id lengths and step limits use the served model's cells. A generation's ids
are the model's 256 cells and equal ``xlx_fast.generate`` on the replica's own model (through
the scheduler without painting, and through the HTTP route where a generator paints 16×16
codes; where none does, the route answers 404 saying why). The tiny default's heads are
sharpened so ids stand clear of float rounding (SPEC §4).
"""
import asyncio
import json

import pytest
import torch

import xlx_fast
from xlx_fast.engine import Request
from xlx_fast.serving.model_spec import ModelSpec
from xlx_fast.serving.scheduler import Scheduler
from xlx_fast.serving.schema import ImageRequest, RequestError, check_against_server
from xlx_fast.serving.service import ImageService

KEY = "grid-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SPEC = {"size": "tiny", "grid": 16, "seed": 3, "head_scale": 3.0, "captions": True,
        "word_head_scale": 40.0}
HANG_GUARD_S = 120  # only stops a wait that would never end: nothing here is timed


@pytest.fixture(scope="module")
def svc():
    svc = ImageService({"model": SPEC, "slots": 4, "api_key": KEY, "max_steps": 400})
    assert svc.wait_built(HANG_GUARD_S) and svc.load_error is None, svc.load_error
    return svc


def run(svc, coro):
    async def go():
        try:
            return await asyncio.wait_for(coro, HANG_GUARD_S)
        finally:
            await svc.close()
    return asyncio.run(go())


async def post(svc, route, body):
    async def chunks():
        yield json.dumps(body).encode()

    reply = await getattr(svc, route)(AUTH, chunks())
    return reply.status, json.loads(reply.body)


def ids_of(n, seed, k=97):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct_ids(svc, prompt, **kw):
    ids, mask = svc.tokenizer([prompt])
    return xlx_fast.generate(svc.model, ids, mask, **kw).ids[0].tolist()


IMAGES = [dict(prompt="a red bus", seed=1, steps=5),
          dict(prompt="two dogs in the snow", seed=2, steps=200, strategy="confidence"),
          dict(prompt="a kitchen", seed=3, steps=4, temperature=0.8)]


def test_the_grid_is_the_models_and_a_request_cannot_choose_it(svc):
    assert svc.model.grid == 16 and svc.model.n_cells == 256
    assert ModelSpec.from_dict(SPEC).to_dict()["grid"] == 16
    with pytest.raises(ValueError, match="grid"):
        ModelSpec.from_dict({"size": "tiny", "grid": 33})
    with pytest.raises(Exception, match="grid"):
        ImageRequest.model_validate({"prompt": "x", "grid": 8})


def test_step_limits_are_the_served_models_cells():
    req = ImageRequest(prompt="x", strategy="tlbr")
    assert check_against_server(req, image_size=256, max_steps=2000, n_cells=256) == 256
    assert check_against_server(req, image_size=256, max_steps=2000) == 64  # the default grid
    assert check_against_server(ImageRequest(prompt="x", strategy="confidence", steps=256),
                                image_size=256, max_steps=2000, n_cells=256) == 256
    with pytest.raises(RequestError) as e:
        check_against_server(ImageRequest(prompt="x", strategy="tlbr", steps=257),
                             image_size=256, max_steps=2000, n_cells=256)
    assert e.value.param == "steps" and "256" in e.value.message


def test_scheduled_generations_return_the_grids_ids_and_equal_generate(svc):
    """The replica's own engine and scheduler, painting off: 256 ids a row, as generate's."""
    sched = Scheduler(svc.engine, svc.model, paint_images=False)

    async def go():
        sched.start()
        try:
            jobs = []
            for b in IMAGES:
                ids, mask = svc.tokenizer([b["prompt"]])
                row = Request(input_ids=ids[0], attention_mask=mask[0], seed=b["seed"], steps=b["steps"],
                              strategy=b.get("strategy", "mask_predict"),
                              temperature=b.get("temperature", 0.0))
                jobs.append(sched.submit([row], None))
            return [await j.future for j in jobs]
        finally:
            await sched.stop()

    results = asyncio.run(asyncio.wait_for(go(), HANG_GUARD_S))
    for b, (r,) in zip(IMAGES, results):
        assert len(r.ids) == 256
        want = direct_ids(svc, b["prompt"], steps=b["steps"], strategy=b.get("strategy", "mask_predict"),
                          temperature=b.get("temperature", 0.0), seed=b["seed"])
        assert r.ids == want


def test_the_generation_route_on_the_grid(svc):
    if svc.cannot_paint is None:
        body = dict(IMAGES[0], return_ids=True, size=f"{svc.image_size}x{svc.image_size}")  # a generator paints 16×16 codes: the full route
        status, reply = run(svc, post(svc, "generate", body))
        assert status == 200, reply
        ids = reply["data"][0]["ids"]
        assert len(ids) == 256 and ids == direct_ids(svc, body["prompt"], steps=5, seed=1)
        assert "images" in svc.tasks
    else:  # none yet: a clear 404 saying why, and the other tasks still served
        body = dict(IMAGES[0], return_ids=True)
        status, reply = run(svc, post(svc, "generate", body))
        assert status == 404 and "16×16" in reply["error"]["message"], reply
        assert "images" not in svc.tasks and "captions" in svc.tasks


def test_a_model_without_a_generator_for_its_grid_does_not_paint():
    from xlx_fast.models import XLxmertForImageGeneration
    from xlx_fast.serving.painter import cannot_paint, paint

    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny", grid=16)
    model.generator = None
    assert "16×16" in cannot_paint(model)
    with pytest.raises(ValueError, match="cannot paint"):
        paint(model, torch.zeros(1, 256, model.centroids.shape[1]), [0])


def test_a_caption_takes_the_grids_ids(svc):
    body = {"cluster_ids": ids_of(256, 1), "length": 5, "seed": 4}
    status, reply = run(svc, post(svc, "caption", body))
    assert status == 200, reply
    out = xlx_fast.caption(svc.model, cluster_ids=torch.tensor([body["cluster_ids"]]), length=5, seed=4)
    assert reply["data"][0]["ids"] == out.ids[0, :int(out.lengths[0])].tolist()


@pytest.mark.parametrize("n", [64, 255, 257, 1024])
def test_a_caption_of_another_cell_count_is_a_422_naming_cluster_ids(svc, n):
    status, reply = run(svc, post(svc, "caption", {"cluster_ids": ids_of(n, 2)}))
    err = reply["error"]
    assert status == 422 and err["param"] == "cluster_ids", reply
    assert err["message"].startswith("cluster_ids:") and "256" in err["message"]
