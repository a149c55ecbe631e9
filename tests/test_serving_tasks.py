"""The caption and answer routes (``POST /v1/captions``, ``POST /v1/answers``) without Ray: the
service object in-process, as the Ray deployment calls it.

Each 200 body equals ``xlx_fast.caption`` / ``xlx_fast.answer`` called directly on the replica's
own model; bad bodies answer 422 naming the field; the key, the shared queue bound and the
deadlines hold for every task; a request's result does not depend on the traffic it shares the
replica with (images, captions and answers at once). The random default's heads are sharpened
(``head_scale``, ``word_head_scale``) so that ids stand clear of float rounding (SPEC §4).
"""
import asyncio
import json
import time

import pytest
import torch

import xlx_fast
from xlx_fast.caption_io import MASK_ID
from xlx_fast.serving.answerer import AnswerRequest, answer_batch
from xlx_fast.serving.model_spec import ANSWER_TASKS, ModelSpec
from xlx_fast.serving.scheduler import Scheduler
from xlx_fast.serving.service import ImageService

KEY = "tasks-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SPEC = {"size": "tiny", "seed": 3, "head_scale": 3.0, "captions": True, "word_head_scale": 40.0,
        "answer_task": "vqa"}
HANG_GUARD_S = 120  # only stops a wait that would never end: nothing here is timed


def make_service(model=SPEC, **options):
    svc = ImageService({"model": model, "slots": 4, "api_key": KEY, "max_steps": 400} | options)
    assert svc.wait_built(HANG_GUARD_S) and svc.load_error is None, svc.load_error
    return svc


@pytest.fixture(scope="module")
def svc():
    return make_service()


@pytest.fixture(scope="module")
def nlvr2():
    return make_service({"size": "tiny", "seed": 5, "answer_task": "nlvr2"})


def run(svc, coro):
    """Run ``coro`` on a fresh event loop, then stop the service's scheduler loop (the next call
    starts one on its own loop)."""
    async def go():
        try:
            return await asyncio.wait_for(coro, HANG_GUARD_S)
        finally:
            await svc.close()
    return asyncio.run(go())


async def post(svc, route, body, headers=AUTH):
    """``(status, JSON body, headers)`` of one POST through the service."""
    async def chunks():
        yield json.dumps(body).encode()

    reply = await getattr(svc, route)(headers, chunks())
    return reply.status, json.loads(reply.body), reply.headers


def image(seed, k=97):
    return torch.randint(0, k, (64,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct_caption(svc, body):
    out = xlx_fast.caption(svc.model, cluster_ids=torch.tensor([body["cluster_ids"]]),
                           length=body.get("length", 12), steps=body.get("steps"),
                           strategy=body.get("strategy", "mask_predict"),
                           temperature=body.get("temperature", 0.0), seed=body.get("seed", 0))
    n = int(out.lengths[0])
    return out.ids[0, :n].tolist(), out.probs[0, :n].tolist()


def direct_answer(svc, body, model=None):
    model = model or svc.answer_model
    ids, mask = svc.tokenizer([body["question"]])
    out = xlx_fast.answer(model, ids, mask, cluster_ids=torch.tensor([body["cluster_ids"]]),
                          top_k=body.get("top_k"))
    return [{"answer": a, "score": s} for a, s in zip(out.answers[0], out.top_scores[0].tolist())]


def direct_image_ids(svc, body):
    ids, mask = svc.tokenizer([body["prompt"]])
    return xlx_fast.generate(svc.model, ids, mask, steps=body.get("steps"),
                             strategy=body.get("strategy", "mask_predict"),
                             temperature=body.get("temperature", 0.0),
                             seed=body.get("seed", 0)).ids[0].tolist()


# -- 200: the direct call's result ------------------------------------------------------------

CAPTIONS = [{"cluster_ids": image(1)},
            {"cluster_ids": image(2), "length": 5, "strategy": "confidence", "steps": 4},
            {"cluster_ids": image(3), "length": 18, "strategy": "random", "seed": 9, "steps": 7},
            {"cluster_ids": image(4), "length": 7, "temperature": 0.7, "seed": 2**40}]

ANSWERS = [{"question": "what color is the bus?", "cluster_ids": image(1)},
           {"question": "how many dogs are there?", "cluster_ids": image(2), "top_k": 1},
           {"question": "is it snowing", "cluster_ids": image(5), "top_k": 12}]

IMAGES = [{"prompt": "a red bus", "seed": 1, "steps": 5},
          {"prompt": "two dogs in the snow", "seed": 2, "steps": 7, "strategy": "confidence"},
          {"prompt": "a kitchen", "seed": 3, "steps": 4, "temperature": 0.8}]


async def one_by_one(svc, route, bodies):
    return [await post(svc, route, b) for b in bodies]


def test_caption_200_is_xlx_fast_caption(svc):
    replies = run(svc, one_by_one(svc, "caption", CAPTIONS))
    for body, (status, reply, headers) in zip(CAPTIONS, replies):
        assert status == 200, reply
        assert isinstance(reply["created"], int) and len(reply["data"]) == 1
        (got,) = reply["data"]
        ids, probs = direct_caption(svc, body)
        assert got["ids"] == ids and got["probs"] == probs
        assert len(ids) == body.get("length", 12)
        # the fallback tokenizer shows [id]; an undecided word (-1) reads [MASK]
        assert got["text"] == svc.tokenizer.decode([MASK_ID if i < 0 else i for i in ids])
        assert float(headers["X-Queue-Wait-Ms"]) >= 0
    assert -1 in replies[1][1]["data"][0]["ids"]  # confidence, 4 steps for 5 words: one undecided


def test_answer_200_is_xlx_fast_answer(svc):
    replies = run(svc, one_by_one(svc, "answer", ANSWERS))
    for body, (status, reply, _) in zip(ANSWERS, replies):
        assert status == 200, reply
        assert len(reply["data"]) == body.get("top_k", 5)
        assert reply["data"] == direct_answer(svc, body)
        scores = [d["score"] for d in reply["data"]]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)


def test_nlvr2_takes_two_images(nlvr2):
    body = {"question": "the left image has two dogs", "cluster_ids": [image(6), image(7)]}
    status, reply, _ = run(nlvr2, post(nlvr2, "answer", body))
    assert status == 200, reply
    assert [d["answer"] for d in reply["data"]] == [d["answer"] for d in direct_answer(nlvr2, body)]
    assert sum(d["score"] for d in reply["data"]) == pytest.approx(1.0)  # softmax over 2 classes
    for bad, msg in (({**body, "cluster_ids": image(6)}, "takes 2 images"),
                     ({**body, "cluster_ids": [image(6)]}, "takes 2 images"),
                     ({**body, "cluster_ids": [image(6), image(7)[:60]]}, "image 1 must be 64 ids"),
                     ({**body, "cluster_ids": [image(6), [97] * 64]}, "[0, 97)"),
                     ({**body, "top_k": 3}, "top_k: must be <= 2")):
        status, reply, _ = run(nlvr2, post(nlvr2, "answer", bad))
        err = reply["error"]
        assert status == 422 and msg in err["message"], reply
        assert err["param"] == ("top_k" if "top_k" in msg else "cluster_ids")
    # this server does not caption
    status, reply, _ = run(nlvr2, post(nlvr2, "caption", CAPTIONS[0]))
    assert status == 404 and "--captions" in reply["error"]["message"]


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,field", [
    ({"cluster_ids": image(1)[:63]}, "cluster_ids"), ({"cluster_ids": image(1) + [0]}, "cluster_ids"),
    ({"cluster_ids": [97] + image(1)[1:]}, "cluster_ids"), ({"cluster_ids": [-1] + image(1)[1:]}, "cluster_ids"),
    ({"cluster_ids": [1.0] + image(1)[1:]}, "cluster_ids.0"), ({"cluster_ids": "1 2 3"}, "cluster_ids"),
    ({"length": 0}, "length"), ({"length": 19}, "length"), ({"length": "5"}, "length"),
    ({"colour": "red"}, "colour"), ({"steps": 0}, "steps"), ({"steps": 401}, "steps"),
    ({"strategy": "tlbr", "length": 5, "steps": 6}, "steps"), ({"strategy": "zigzag"}, "strategy"),
    ({"temperature": -1}, "temperature"), ({"seed": -1}, "seed"), ({"timeout_ms": 0}, "timeout_ms"),
])
def test_caption_422_names_the_field(svc, change, field):
    status, reply, _ = run(svc, post(svc, "caption", {"cluster_ids": image(1), **change}))
    err = reply["error"]
    assert status == 422 and err["param"] == field and err["message"].startswith(f"{field}:"), reply


@pytest.mark.parametrize("change,field", [
    ({"cluster_ids": image(1)[:10]}, "cluster_ids"), ({"cluster_ids": [image(1), image(2)]}, "cluster_ids"),
    ({"cluster_ids": [97] + image(1)[1:]}, "cluster_ids"), ({"cluster_ids": [True] + image(1)[1:]}, "cluster_ids"),
    ({"cluster_ids": None}, "cluster_ids"), ({"top_k": 0}, "top_k"), ({"top_k": 3130}, "top_k"),
    ({"question": ""}, "question"), ({"question": "  "}, "question"), ({"question": 5}, "question"),
    ({"image": [1]}, "image"), ({"timeout_ms": -5}, "timeout_ms"),
])
def test_answer_422_names_the_field(svc, change, field):
    status, reply, _ = run(svc, post(svc, "answer", {"question": "what?", "cluster_ids": image(1), **change}))
    err = reply["error"]
    assert status == 422 and err["param"] == field and err["message"].startswith(f"{field}:"), reply


def test_missing_fields_answer_422(svc):
    assert run(svc, post(svc, "caption", {"length": 3}))[1]["error"]["param"] == "cluster_ids"
    assert run(svc, post(svc, "answer", {"question": "q"}))[1]["error"]["param"] == "cluster_ids"
    assert run(svc, post(svc, "answer", {"cluster_ids": image(1)}))[1]["error"]["param"] == "question"


def test_401_without_the_key(svc):
    for route, body in (("caption", CAPTIONS[0]), ("answer", ANSWERS[0])):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            status, reply, h = run(svc, post(svc, route, body, headers))
            assert status == 401 and "API key" in reply["error"]["message"] and h["WWW-Authenticate"]
        assert run(svc, post(svc, route, body, {"x-api-key": KEY}))[0] == 200


def test_404_when_the_task_is_off():
    """A server that only paints (the default) answers 404 on the other routes, naming the
    option that turns each on; the key is still asked first."""
    plain = make_service({"size": "tiny", "seed": 3})
    assert plain.captioner is None and plain.answer_model is None and plain.model.cls is None
    for route, option in (("caption", "--captions"), ("answer", "--answer-task")):
        assert run(plain, post(plain, route, {}, {}))[0] == 401
        status, reply, _ = run(plain, post(plain, route, {"anything": 1}))
        assert status == 404 and option in reply["error"]["message"], reply
    assert plain.metrics.rejections.value("not_enabled") == 2
    assert json.loads(run(plain, plain.health()).body)["tasks"] == ["images"]


def test_health_names_the_tasks(svc, nlvr2):
    assert json.loads(run(svc, svc.health()).body)["tasks"] == ["images", "captions", "answers (vqa)"]
    assert json.loads(run(nlvr2, nlvr2.health()).body)["tasks"] == ["images", "answers (nlvr2)"]


def test_504_past_timeout_ms(svc):
    async def go():
        slow = await post(svc, "caption", {"cluster_ids": image(1), "steps": 400, "timeout_ms": 50})
        # an answer is one forward, longer than 1 ms: it is resolved past its deadline
        quick = await post(svc, "answer", {**ANSWERS[0], "timeout_ms": 1})
        after = await post(svc, "caption", {"cluster_ids": image(2), "length": 3})
        return slow, quick, after
    before = svc.metrics.task_requests.value("captions", "timeout")
    slow, quick, after = run(svc, go())
    for status, reply, _ in (slow, quick):
        assert status == 504 and reply["error"]["param"] == "timeout_ms", reply
    assert after[0] == 200  # the slot of the expired caption was freed
    assert svc.metrics.task_requests.value("captions", "timeout") - before == 1
    assert svc.metrics.caption_active_rows.value() == 0


async def _until(done, what):
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < HANG_GUARD_S, f"gave up waiting for {what}"
        await asyncio.sleep(0.01)


def test_429_when_the_shared_queue_is_full():
    """One slot per engine and a queue of one: a long caption holds the caption slot, a second
    waits in the queue, and then every task is refused with 429 + Retry-After (one queue bounds
    them all)."""
    small = make_service(max_queue=1, slots=1)

    async def go():
        long = {"cluster_ids": image(1), "strategy": "random", "steps": 400}
        first = asyncio.ensure_future(post(small, "caption", long))
        await _until(lambda: small.metrics.caption_active_rows.value() == 1, "the first caption's slot")
        second = asyncio.ensure_future(post(small, "caption", {**long, "cluster_ids": image(2)}))
        await _until(lambda: small.metrics.queue_depth.value() == 1, "the second caption to queue")
        refused = [await post(small, "answer", ANSWERS[0]), await post(small, "caption", CAPTIONS[0]),
                   await post(small, "generate", {"prompt": "a cat", "size": "32x32", "steps": 1})]
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        return refused

    refused = run(small, go())
    for status, reply, headers in refused:
        assert status == 429 and "queue is full" in reply["error"]["message"], reply
        assert int(headers["Retry-After"]) >= 1
    assert small.metrics.rejections.value("queue_full") == 3


# -- determinism under mixed traffic ----------------------------------------------------------

def test_each_result_is_its_alone_result_under_mixed_traffic(svc):
    """Images, captions and answers at once, arriving staggered (captions join the caption
    engine at different steps, answers share forwards): each reply equals the same request sent
    alone, which equals the direct call."""
    alone_captions = [direct_caption(svc, b) for b in CAPTIONS]
    alone_answers = [direct_answer(svc, b) for b in ANSWERS]
    alone_images = [direct_image_ids(svc, b) for b in IMAGES]

    async def go(delay):
        calls = [("generate", {**b, "size": "32x32", "return_ids": True}) for b in IMAGES]
        calls += [("caption", b) for b in CAPTIONS] + [("answer", b) for b in ANSWERS]
        calls = calls[::2] + calls[1::2]  # kinds interleaved
        tasks = []
        for route, body in calls:
            tasks.append(asyncio.ensure_future(post(svc, route, body)))
            await asyncio.sleep(delay)
        return calls, await asyncio.gather(*tasks)

    for delay in (0.0, 0.004, 0.011):
        calls, replies = run(svc, go(delay))
        for (route, body), (status, reply, _) in zip(calls, replies):
            assert status == 200, (route, reply)
            (first, *rest) = reply["data"]
            if route == "generate":
                assert first["ids"] == alone_images[IMAGES.index({k: v for k, v in body.items()
                                                                   if k not in ("size", "return_ids")})]
            elif route == "caption":
                ids, probs = alone_captions[CAPTIONS.index(body)]
                assert first["ids"] == ids
                assert first["probs"] == pytest.approx(probs, rel=1e-5, abs=1e-7)
            else:
                expect = alone_answers[ANSWERS.index(body)]
                assert [d["answer"] for d in reply["data"]] == [d["answer"] for d in expect]
                assert [d["score"] for d in reply["data"]] == pytest.approx(
                    [d["score"] for d in expect], rel=1e-5)


# -- the scheduler's batching -----------------------------------------------------------------

def test_waiting_answers_share_one_forward_and_a_bad_one_fails_alone(svc):
    """Three answer jobs queued before the loop starts: one forward. Then a batch where one
    request is bad (an id outside the codebook, past the service's checks): it fails alone."""
    tok, m = svc.tokenizer, svc.answer_model

    def req(q, img, k):
        ids, mask = tok([q])
        return AnswerRequest(ids[0], mask[0], torch.tensor(img), top_k=k)

    good = [req(b["question"], b["cluster_ids"], b.get("top_k", 5)) for b in ANSWERS]
    bad = req("bad", [10_000] * 64, 5)

    async def go():
        sched = Scheduler(svc.engine, svc.model, answer_model=m, paint_images=False)
        jobs = [sched.submit([r], kind="answers") for r in good]
        sched.start()
        first = await asyncio.gather(*(sched.result(j) for j in jobs))
        jobs = [sched.submit([r], kind="answers") for r in (good[0], bad, good[1])]
        second = await asyncio.gather(*(sched.result(j) for j in jobs), return_exceptions=True)
        await sched.stop()
        return first, second, sched

    first, second, sched = asyncio.run(asyncio.wait_for(go(), HANG_GUARD_S))
    rows = sched.metrics.answer_batch_rows
    assert rows.count == 2 and rows.sum == 3 + 3  # 3 together; 3 together (then one by one)
    for got, body in zip(first, ANSWERS):
        assert [a for a, _ in got[0]] == [d["answer"] for d in direct_answer(svc, body)]
    assert isinstance(second[1], RuntimeError) and "cluster_ids out of range" in str(second[1])
    def answers(result):
        return [a for a, _ in result[0]]

    assert answers(second[0]) == answers(first[0]) and answers(second[2]) == answers(first[1])
    assert sched.broken is None and sched.metrics.task_requests.value("answers", "error") == 1
    assert answer_batch(m, []) == []


def test_captions_are_batched_step_level(svc):
    """Two captions of 3 and 6 steps queued together on the caption engine: 6 steps in all (the
    short one shares the long one's first 3), and a third that arrives later joins mid-flight."""
    from xlx_fast.caption_engine import CaptionRequest

    def req(img, steps):
        return CaptionRequest(cluster_ids=torch.tensor(img), length=6, steps=steps)

    async def go():
        sched = Scheduler(svc.engine, svc.model, captioner=svc.captioner, paint_images=False)
        a, b = sched.submit([req(image(1), 3)], kind="captions"), sched.submit([req(image(2), 6)], kind="captions")
        sched.start()
        await _until(lambda: sched.metrics.caption_steps.value() >= 1, "the first caption step")
        c = sched.submit([req(image(3), 2)], kind="captions")
        res = await asyncio.gather(*(sched.result(j) for j in (a, b, c)))
        await sched.stop()
        return res, sched

    res, sched = asyncio.run(asyncio.wait_for(go(), HANG_GUARD_S))
    assert sched.metrics.caption_steps.value() <= 6 + 2 and sched.steps_run == 0
    for (f,), (img, steps) in zip(res, ((image(1), 3), (image(2), 6), (image(3), 2))):
        got = xlx_fast.caption(svc.model, cluster_ids=torch.tensor([img]), length=6, steps=steps)
        assert f.ids.tolist() == got.ids[0].tolist()


def test_a_scheduler_refuses_a_task_it_has_no_engine_for(svc):
    async def go():
        sched = Scheduler(svc.engine, svc.model, paint_images=False)
        for kind in ("captions", "answers"):
            with pytest.raises(ValueError, match=f"no {kind}"):
                sched.submit([object()], kind=kind)
        with pytest.raises(ValueError, match="kind must be one of"):
            sched.submit([object()], kind="videos")
    asyncio.run(go())


# -- the model spec -----------------------------------------------------------------------------

def test_captions_leave_the_painting_model_as_it_was():
    """Captions add the masked-LM head; every other weight of the random default is unchanged, so
    a server's pictures do not depend on whether it also captions."""
    plain, _ = ModelSpec.from_dict({"size": "tiny", "seed": 3}).build()
    both, _ = ModelSpec.from_dict({"size": "tiny", "seed": 3, "captions": True}).build()
    assert plain.cls is None and both.cls is not None
    mine = both.state_dict()
    for name, t in plain.state_dict().items():
        assert torch.equal(t, mine[name]), name


def test_the_answer_model_reads_the_painting_models_codebook(svc):
    assert torch.equal(svc.answer_model.vis_emb.weight, svc.model.centroids)
    assert svc.answer_model.task.name == "vqa" and not svc.answer_model.training


@pytest.mark.parametrize("spec,msg", [
    ({"answers": "a.json"}, "need answer_task"), ({"answer_checkpoint": "q.pth"}, "need answer_task"),
    ({"answer_task": "vqa", "answer_checkpoint": "q.pth"}, "needs answers"),
    ({"answer_task": "okvqa"}, "answer_task must be one of vqa, gqa, nlvr2"),
    ({"word_head_scale": 2.0}, "word_head_scale needs captions"),
    ({"captions": "yes"}, "captions must be true or false"),
])
def test_model_spec_refuses_bad_task_options(spec, msg):
    with pytest.raises(ValueError, match=msg):
        ModelSpec.from_dict({"size": "tiny", **spec})


def test_answer_task_names_match_the_models():
    from xlx_fast.cli.serve import ANSWER_TASKS as CLI_TASKS
    from xlx_fast.models import TASKS

    assert set(ANSWER_TASKS) == set(TASKS) == set(CLI_TASKS)


def test_an_answer_table_names_the_default_models_answers(tmp_path):
    table = tmp_path / "label2ans.json"
    table.write_text(json.dumps(["yes", "no"]))
    spec = ModelSpec.from_dict({"size": "tiny", "answer_task": "nlvr2", "answers": str(table)})
    model, _ = spec.build()
    answer_model = spec.build_answer_model(model.centroids)
    assert answer_model.labels == ["yes", "no"]


# -- xlx-fast serve: the options, checked before Ray ------------------------------------------

def _app_model(*argv):
    import argparse

    from xlx_fast.cli import serve as serve_cli

    p = argparse.ArgumentParser()
    serve_cli.add_parser(p)
    return serve_cli.app_args(p.parse_args(list(argv)))["model"]


def test_serve_options_reach_the_model_spec():
    assert "captions" not in _app_model() and "answer_task" not in _app_model()
    model = _app_model("--captions", "--answer-task", "gqa", "--size", "tiny")
    assert model["captions"] is True and model["answer_task"] == "gqa"


@pytest.mark.parametrize("args,msg", [
    (["--answers", "t.json"], "--answers needs --answer-task"),
    (["--answer-checkpoint", "q.pth"], "--answer-checkpoint needs --answer-task"),
    (["--answer-task", "vqa", "--answer-checkpoint", "q.pth"], "--answer-checkpoint needs --answers"),
    (["--answer-task", "vqa", "--answer-checkpoint", "/nonexistent/q.pth", "--answers", "/nonexistent/t.json"],
     "--answer-checkpoint /nonexistent/q.pth: no such file"),
    (["--answer-task", "nlvr2", "--answer-checkpoint", "{table}"], "needs the vocabulary"),
    (["--answer-task", "vqa", "--answers", "/nonexistent/t.json"], "--answers /nonexistent/t.json: no such file"),
    (["--answer-task", "gqa", "--answers", "{table}"], "2 answers, but the gqa head of the default model has 1842"),
    (["--answer-task", "vqa", "--answers", "{broken}"], "not valid JSON"),
])
def test_serve_refuses_bad_task_options_before_ray(args, msg, tmp_path, capsys):
    from xlx_fast.cli import main

    (tmp_path / "t.json").write_text('["yes", "no"]')
    (tmp_path / "b.json").write_text('["yes", ')
    args = [a.format(table=tmp_path / "t.json", broken=tmp_path / "b.json") for a in args]
    assert main(["serve", "--size", "tiny", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], lines

