"""The server against a real Ray Serve instance on 127.0.0.1 (no mocks of Ray or HTTP).

Ray starts once for the module (``ray.init`` ≈ 5 s, each ``serve.run`` ≈ 7 s on 2 cores) with two
applications of a tiny sharpened model that paints 256×256:

- ``/a``: one replica, 2 slots, a queue of 2, an API key, captions and a VQA answer model on:
  round trip, every error code, determinism, cancellation, queue limit, metrics, and the
  caption and answer routes beside the image route;
- ``/b``: two replicas with a warm-up delay: health only after warm-up, traffic sharing;
- ``/c``: one replica, a short body timeout: slow clients (raw sockets) cannot starve it.

Ray starts under the file lock of the ``ray_lock`` fixture (tests/conftest.py) (two Ray instances on one machine break each other).
"""
import base64
import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is in the test extras")
requests = pytest.importorskip("requests")
from ray import serve  # noqa: E402

import xlx_fast  # noqa: E402
from xlx_fast.serving import build_app  # noqa: E402
from xlx_fast.serving.model_spec import ModelSpec  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY = {"size": "tiny", "seed": 1, "image_size": 256, "head_scale": 3.0}
TASKS = {**TINY, "captions": True, "word_head_scale": 40.0, "answer_task": "vqa"}  # /a's model
MAX_STEPS = 400
BODY_TIMEOUT_S, MAX_SLOW = 3.0, 4


HANG_GUARD_S = 180  # only stops a wait that would never end: nothing here is timed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture(scope="module")
def server(ray_lock):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        no_cpu = {"ray_actor_options": {"num_cpus": 0}}
        serve.run(build_app({"model": TASKS, "slots": 2, "max_queue": 2, "api_key": KEY,
                             "max_steps": MAX_STEPS, "max_body_bytes": 4096, "deployment": no_cpu}),
                  name="a", route_prefix="/a")
        serve.run(build_app({"model": TINY, "slots": 2, "warmup_delay_s": 6.0,
                             "deployment": {**no_cpu, "num_replicas": 2}}),
                  name="b", route_prefix="/b")
        base = f"http://127.0.0.1:{port}"
        # /b was just deployed: its replicas are still warming up (the delay is 6 s). Asked at
        # once, before /c is deployed: deploying /c takes seconds, more on a busy machine, and
        # the delay could be over by then.
        first_health = requests.get(f"{base}/b/health", timeout=10)
        first_generate = requests.post(f"{base}/b/v1/images/generations", json={"prompt": "x"},
                                       timeout=10)
        serve.run(build_app({"model": TINY, "slots": 2, "max_queue": 2, "body_timeout_s": BODY_TIMEOUT_S,
                             "max_slow_bodies": MAX_SLOW, "deployment": no_cpu}),
                  name="c", route_prefix="/c")
        _wait_ready(f"{base}/a", replicas=1)
        _wait_ready(f"{base}/b", replicas=2)
        _wait_ready(f"{base}/c", replicas=1)
        yield {"a": f"{base}/a", "b": f"{base}/b", "c": f"{base}/c", "first_health": first_health,
               "first_generate": first_generate}
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(url, replicas, timeout=120):
    """Until ``replicas`` distinct replicas have answered /health with 200."""
    ready, t0 = set(), time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = requests.get(f"{url}/health", timeout=10)
        if r.status_code == 200:
            ready.add(r.headers["X-Replica"])
            if len(ready) == replicas:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url}: only {len(ready)} of {replicas} replicas became healthy")


def post(url, body, headers=AUTH, **kw):
    return requests.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=60, **kw)


def metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(f"{url}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def decode_png(b):
    from PIL import Image

    img = Image.open(io.BytesIO(b))
    img.load()
    return img


# -- generation ---------------------------------------------------------------------------------

def test_round_trip_png_and_json(server):
    r = post(server["a"], {"prompt": "a red bus on a street", "seed": 3},
             headers={**AUTH, "Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = decode_png(r.content)
    assert img.size == (256, 256) and img.mode == "RGB"

    r = post(server["a"], {"prompt": "a red bus on a street", "seed": 3, "n": 2, "return_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [3, 4]
    imgs = [decode_png(base64.b64decode(d["b64_json"])) for d in body["data"]]
    assert all(i.size == (256, 256) for i in imgs)
    assert all(len(d["ids"]) == 64 and all(0 <= c < 97 for c in d["ids"]) for d in body["data"])
    # image 0 of the n=2 request is the n=1 request's image (same prompt, same seed), up to the
    # float rounding of batched convolutions (one level of 255 here and there); image 1 is not
    import numpy as np

    a, b, c = (np.asarray(i, dtype=np.int16) for i in (img, imgs[0], imgs[1]))
    assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.01
    assert np.abs(a - c).mean() > 2


def _expected_ids(prompt, seed, steps, strategy):
    """What the engine computes for the request alone, in this process (same model spec)."""
    model, tok = ModelSpec.from_dict(TINY).build()
    ids, mask = tok([prompt])
    return xlx_fast.generate(model, ids, mask, steps=steps, strategy=strategy, seed=seed).ids[0].tolist()


def test_determinism_alone_vs_under_concurrent_load(server):
    """On /b (two replicas, a long queue): a request alone, then among others that join at
    different steps, on either replica: the same ids, and the ids the engine computes in-process."""
    url = server["b"]
    probes = [{"prompt": "two dogs playing in the snow", "seed": 7, "steps": 6},
              {"prompt": "a kitchen with a window", "seed": 11, "steps": 10, "strategy": "confidence"}]
    alone = []
    for p in probes:
        r = post(url, {**p, "return_ids": True}, headers={})
        assert r.status_code == 200, r.text
        alone.append(r.json()["data"][0]["ids"])
    assert alone[0] == _expected_ids(probes[0]["prompt"], 7, 6, "mask_predict")
    assert alone[1] == _expected_ids(probes[1]["prompt"], 11, 10, "confidence")

    others = [{"prompt": f"crowd {i}", "seed": 100 + i, "steps": 3 + 2 * i, "temperature": 0.5 * (i % 2),
               "strategy": ["mask_predict", "tlbr", "random", "confidence"][i % 4]} for i in range(6)]
    for attempt in range(3):
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(post, url, o, {}) for o in others]
            time.sleep(0.03 * attempt)  # join at different steps of the neighbours
            mine = [pool.submit(post, url, {**p, "return_ids": True}, {}) for p in probes]
            loaded = [f.result() for f in mine]
            assert all(f.result().status_code == 200 for f in futs)
        assert [r.status_code for r in loaded] == [200, 200], [r.text for r in loaded]
        assert [r.json()["data"][0]["ids"] for r in loaded] == alone


# -- captions and answers -------------------------------------------------------------------

def _post_until_queued(url, route, body, headers=AUTH, tries=50):
    """POST, again after a 429 (/a's queue holds 2 requests of every task together)."""
    for _ in range(tries):
        r = requests.post(f"{url}{route}", json=body, headers=headers, timeout=60)
        if r.status_code != 429:
            return r
        time.sleep(0.2)
    return r


def test_captions_and_answers_beside_images(server):
    """One app, three routes at once: a caption of the ids an image request returned, an answer
    about them, and the image itself; each equals what this process computes on the same model
    spec (ids and words exactly; probabilities and scores to float rounding, the replica's
    thread count may differ)."""
    import torch

    url = server["a"]
    r = post(url, {"prompt": "a red bus on a street", "seed": 3, "steps": 4, "return_ids": True})
    assert r.status_code == 200, r.text
    ids = r.json()["data"][0]["ids"]
    caption = {"cluster_ids": ids, "length": 7, "seed": 5}
    answer = {"question": "what color is the bus?", "cluster_ids": ids, "top_k": 3}
    image = {"prompt": "two dogs in the snow", "seed": 8, "steps": 5, "return_ids": True}
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(_post_until_queued, url, route, body) for route, body in (
            ("/v1/captions", caption), ("/v1/answers", answer), ("/v1/images/generations", image))]
        rc, ra, ri = (f.result() for f in futs)
    assert [x.status_code for x in (rc, ra, ri)] == [200, 200, 200], [x.text for x in (rc, ra, ri)]

    spec = ModelSpec.from_dict(TASKS)
    model, tok = spec.build()
    want = xlx_fast.caption(model, cluster_ids=torch.tensor([ids]), length=7, seed=5)
    (got,) = rc.json()["data"]
    assert got["ids"] == want.ids[0].tolist() and got["text"] == tok.decode(got["ids"])
    assert got["probs"] == pytest.approx(want.probs[0].tolist(), rel=1e-4, abs=1e-6)
    q, m = tok([answer["question"]])
    want = xlx_fast.answer(spec.build_answer_model(model.centroids), q, m,
                           cluster_ids=torch.tensor([ids]), top_k=3)
    assert [d["answer"] for d in ra.json()["data"]] == want.answers[0]
    assert [d["score"] for d in ra.json()["data"]] == pytest.approx(want.top_scores[0].tolist(), rel=1e-4)
    x, mask = tok([image["prompt"]])
    assert ri.json()["data"][0]["ids"] == xlx_fast.generate(model, x, mask, steps=5, seed=8).ids[0].tolist()

    m = metrics(url)
    assert m["xlx_task_requests_total[outcome=ok][task=captions]"] >= 1
    assert m["xlx_task_requests_total[outcome=ok][task=answers]"] >= 1
    assert m["xlx_caption_steps_total"] >= 4 and m["xlx_answer_batch_rows_count"] >= 1


def test_caption_and_answer_errors_over_http(server):
    url, ids = server["a"], list(range(64))
    for route, body in (("/v1/captions", {"cluster_ids": ids}),
                        ("/v1/answers", {"question": "q", "cluster_ids": ids})):
        assert requests.post(f"{url}{route}", json=body, timeout=60).status_code == 401
    r = _post_until_queued(url, "/v1/captions", {"cluster_ids": ids, "length": 19})
    assert r.status_code == 422 and r.json()["error"]["param"] == "length", r.text
    r = _post_until_queued(url, "/v1/answers", {"question": "q", "cluster_ids": ids, "top_k": 0})
    assert r.status_code == 422 and r.json()["error"]["param"] == "top_k", r.text
    paths = requests.get(f"{url}/openapi.json", headers=AUTH, timeout=10).json()["paths"]
    assert {"/v1/captions", "/v1/answers"} <= set(paths)
    # /b paints only: the other routes say which option turns them on
    r = requests.post(f"{server['b']}/v1/captions", json={"cluster_ids": ids}, timeout=60)
    assert r.status_code == 404 and "--captions" in r.json()["error"]["message"]
    r = requests.post(f"{server['b']}/v1/answers", json={"question": "q", "cluster_ids": ids}, timeout=60)
    assert r.status_code == 404 and "--answer-task" in r.json()["error"]["message"]


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,field", [
    ({"n": 9}, "n"), ({"n": 0}, "n"), ({"size": "512x512"}, "size"), ({"steps": 0}, "steps"),
    ({"steps": MAX_STEPS + 1}, "steps"), ({"strategy": "tlbr", "steps": 65}, "steps"),
    ({"strategy": "zigzag"}, "strategy"), ({"temperature": -1}, "temperature"),
    ({"seed": -3}, "seed"), ({"timeout_ms": 0}, "timeout_ms"), ({"response_format": "url"}, "response_format"),
    ({"prompt": ""}, "prompt"), ({"prompt": None}, "prompt"), ({"colour": "red"}, "colour"),
    # strict types: nothing is coerced
    ({"n": "2"}, "n"), ({"n": True}, "n"), ({"return_ids": "yes"}, "return_ids"), ({"seed": "5"}, "seed"),
    ({"steps": 2.0}, "steps"), ({"timeout_ms": "100"}, "timeout_ms"),
])
def test_422_names_the_field(server, body, field):
    r = post(server["a"], {"prompt": "a cat", **body})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}:"), err


def test_422_for_a_missing_prompt_and_broken_json(server):
    r = post(server["a"], {"n": 1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    r = requests.post(f"{server['a']}/v1/images/generations", data=b'{"prompt": "x",',
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["param"] == "body"


def test_413_body_over_the_limit(server):
    r = post(server["a"], {"prompt": "x" * 5000})
    assert r.status_code == 413, r.text
    assert "4096 bytes" in r.json()["error"]["message"]


def test_401_without_the_key_on_every_route_but_health(server):
    url = server["a"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        r = post(url, {"prompt": "a cat"}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert requests.get(f"{url}/metrics", headers=headers, timeout=10).status_code == 401
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert post(url, {"prompt": "a cat", "steps": 1}, headers={"X-API-Key": KEY}).status_code == 200


def test_docs_and_openapi_need_the_key(server):
    url = server["a"]  # has a key: the schema needs it, the key-less pages are not served
    for path in ("openapi.json", "docs", "redoc"):
        r = requests.get(f"{url}/{path}", timeout=10)
        assert r.status_code in (401, 404), (path, r.status_code, r.text[:200])
    r = requests.get(f"{url}/openapi.json", headers=AUTH, timeout=10)
    assert r.status_code == 200 and "/v1/images/generations" in r.json()["paths"]
    assert requests.get(f"{url}/docs", headers=AUTH, timeout=10).status_code == 404
    url = server["b"]  # no key: everything answers
    assert requests.get(f"{url}/openapi.json", timeout=10).status_code == 200
    r = requests.get(f"{url}/docs", timeout=10)
    assert r.status_code == 200 and "openapi.json" in r.text


def _raw_request(url, head_only=False, sent=b'{"prompt":'):
    """A raw connection that sends the headers of a 1000-byte body and then 10 bytes of it (or,
    with ``head_only``, half of its headers), and nothing more."""
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = socket.create_connection((u.hostname, u.port), timeout=10)
    head = (f"POST {u.path}/v1/images/generations HTTP/1.1\r\nHost: {u.netloc}\r\n"
            "Content-Type: application/json\r\n")
    if head_only:
        conn.sendall(head.encode())
    else:
        conn.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + sent)
    return conn


def _read_to_close(conn, timeout):
    """The server's whole answer, read until it closes the connection (AssertionError if it
    keeps it open past ``timeout``)."""
    conn.settimeout(timeout)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except socket.timeout:
        raise AssertionError(f"the server kept a slow connection open; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data


def test_slow_clients_cannot_starve_the_server(server):
    """30 connections that promise a 1000-byte body and send 10 bytes, and 30 that never finish
    their headers: /health and a generation still answer, and the server answers every slow body
    itself (429 past MAX_SLOW of them from one address, else 408 at BODY_TIMEOUT_S; or Ray's
    bounded queue refuses the surplus, 503) and closes its connection. Bounded: 60 sockets, each closed in the end."""
    url = server["c"]
    conns = []
    try:
        bodies = [_raw_request(url) for _ in range(30)]
        conns += bodies
        conns += [_raw_request(url, head_only=True) for _ in range(30)]
        r = requests.get(f"{url}/health", timeout=120)
        assert r.status_code == 200, r.text
        r = post(url, {"prompt": "still served", "steps": 2}, headers={})
        assert r.status_code == 200, r.text
        answers = [_read_to_close(c, timeout=120) for c in bodies]
        codes = [int(a.split(b" ", 2)[1]) if a.startswith(b"HTTP/1.1 ") else None for a in answers]
        # 503: Ray's own bounded queue (max_queued_requests) refused the surplus outright
        assert set(codes) <= {408, 429, 503}, [(c, a[:300]) for c, a in zip(codes, answers)
                                                if c not in (408, 429, 503)]
        assert all(b"backpressure" in a for a, c in zip(answers, codes) if c == 503)
        assert 429 in codes and 408 in codes, codes
        for a, code in zip(answers, codes):
            if code == 503:
                continue
            err = json.loads(a.split(b"\r\n\r\n", 1)[1])["error"]
            assert err["param"] == "body", err
            assert (f"within {BODY_TIMEOUT_S:g} s" if code == 408 else "arriving slowly") in err["message"]
        m = metrics(url)
        assert m["xlx_rejections_total[reason=body_timeout]"] == codes.count(408)
        assert m["xlx_rejections_total[reason=slow_body]"] == codes.count(429)
    finally:
        for c in conns:
            c.close()


def test_429_when_the_queue_is_full(server):
    url = server["a"]
    before = metrics(url)["xlx_rejections_total[reason=queue_full]"]
    with ThreadPoolExecutor(10) as pool:
        rs = list(pool.map(lambda i: post(url, {"prompt": f"q {i}", "steps": 150}), range(10)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in rs if r.status_code == 429]
    assert refused, codes  # 2 slots + a queue of 2 cannot take 10 at once
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["error"]["message"]
    assert metrics(url)["xlx_rejections_total[reason=queue_full]"] - before == len(refused)


def test_504_past_timeout_ms_and_the_slot_is_freed(server):
    url = server["a"]
    before = metrics(url)
    r = post(url, {"prompt": "slow", "steps": MAX_STEPS, "timeout_ms": 150})
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["param"] == "timeout_ms" and "150 ms" in err["message"]
    after = _settle(url)
    assert after["xlx_requests_total[outcome=timeout]"] - before["xlx_requests_total[outcome=timeout]"] == 1
    assert after["xlx_active_rows"] == 0
    assert post(url, {"prompt": "next", "steps": 2}).status_code == 200


def _settle(url, timeout=30):
    t0 = time.monotonic()
    while True:
        m = metrics(url)
        if (m["xlx_active_rows"] == 0 and m["xlx_queue_depth"] == 0) or time.monotonic() - t0 > timeout:
            return m
        time.sleep(0.1)


def test_client_disconnect_cancels_and_frees_the_slot(server):
    url = server["a"]
    _settle(url)
    before = metrics(url)
    # a raw connection, closed once the request holds a slot: a client timeout alone could
    # expire before a loaded machine routed the request to the replica, and then nothing ran
    import json
    from urllib.parse import urlparse

    host = urlparse(url)
    body = json.dumps({"prompt": "abandoned", "steps": MAX_STEPS, "strategy": "random"}).encode()
    conn = socket.create_connection((host.hostname, host.port), timeout=10)
    conn.sendall((f"POST {host.path}/v1/images/generations HTTP/1.1\r\nHost: {host.netloc}\r\n"
                  f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    t0 = time.monotonic()
    while metrics(url)["xlx_active_rows"] < 1:
        assert time.monotonic() - t0 < HANG_GUARD_S, "the request never reached a slot (a hang guard, not a timing)"
        time.sleep(0.05)
    conn.close()  # the client goes away mid-generation
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        m = metrics(url)
        if m["xlx_requests_total[outcome=cancelled]"] > before["xlx_requests_total[outcome=cancelled]"]:
            break
        time.sleep(0.1)
    m = _settle(url)
    assert m["xlx_requests_total[outcome=cancelled]"] - before["xlx_requests_total[outcome=cancelled]"] == 1
    assert m["xlx_requests_total[outcome=ok]"] == before["xlx_requests_total[outcome=ok]"]
    assert m["xlx_active_rows"] == 0
    # it left before its last step: fewer engine steps ran than it asked for
    ran = m["xlx_engine_steps_total"] - before["xlx_engine_steps_total"]
    assert ran < MAX_STEPS, ran


def test_metrics_parse_as_prometheus_text(server):
    url = server["a"]
    assert post(url, {"prompt": "count me", "steps": 2}).status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {"xlx_queue_depth": "gauge", "xlx_active_rows": "gauge", "xlx_batch_occupancy": "histogram",
             "xlx_step_seconds": "histogram", "xlx_e2e_seconds": "histogram",
             "xlx_queue_wait_seconds": "histogram", "xlx_rejections": "counter", "xlx_requests": "counter"}
    for name, kind in kinds.items():
        assert fams[name].type == kind, name
    m = metrics(url)
    assert m["xlx_e2e_seconds_count"] == m["xlx_requests_total[outcome=ok]"] >= 1
    assert m["xlx_batch_occupancy_count"] == m["xlx_step_seconds_count"] >= 1
    assert 0 < m["xlx_batch_occupancy_sum"] <= m["xlx_batch_occupancy_count"]
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
    assert metrics(url)["xlx_rejections_total[reason=unauthorized]"] - m["xlx_rejections_total[reason=unauthorized]"] == 1
    assert {"queue_full", "too_large", "invalid", "unauthorized"} <= {
        s.labels["reason"] for s in fams["xlx_rejections"].samples}


# -- replicas -----------------------------------------------------------------------------------

def test_health_only_after_warm_up(server):
    first = server["first_health"]
    assert first.status_code == 503 and first.json()["status"] == "warming up", first.text
    assert int(first.headers["Retry-After"]) >= 1
    assert server["first_generate"].status_code == 503
    r = requests.get(f"{server['b']}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_two_replicas_share_traffic(server):
    url = server["b"]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: post(url, {"prompt": f"r {i}", "steps": 8}, headers={}), range(16)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    assert len({r.headers["X-Replica"] for r in rs}) == 2


# -- deployment config --------------------------------------------------------------------------

def test_sample_multi_gpu_config_loads_and_builds():
    import yaml
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve", "multi_gpu.yaml")
    with open(path) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    app_cfg = config.applications[0]
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path), app_cfg.args)
    dep = app._bound_deployment
    assert dep.name == app_cfg.deployments[0].name  # the config's overrides reach the deployment
    assert dep.ray_actor_options["num_gpus"] == 1
    options = dep.init_args[0]
    assert options["model"]["device"] == "cuda" and options["slots"] == 64
    auto = app_cfg.deployments[0].autoscaling_config
    assert auto["min_replicas"] == 1 and auto["max_replicas"] >= 2
    assert app_cfg.deployments[0].ray_actor_options.num_gpus == 1
