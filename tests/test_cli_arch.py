"""The architecture is a choice wherever a model is picked: ``xlx_fast.models.from_default(arch=)``,
``xlx-fast generate --arch`` (single captions, ``--impl reference``, bulk), ``xlx-fast serve
--arch`` (``ModelSpec.arch``), and the benchmark's X-UNITER ``generate`` rows.

X-UNITER has no checkpoint loader and no caption engine: asking for either with it is one
``error:`` line, exit 2, before the model code is imported (``serve``: before torch). The tiny
X-UNITER default's head is not sharpened here, so the CLI's fast ids are compared with
``xlx_fast.generate`` (the same arithmetic) and its reference ids with
``reference.xuniter.sample``; fast against reference is tests/test_xuniter.py's, under a
sharpened head (SPEC §4).
"""
import asyncio
import json

import numpy as np
import pytest
import torch
from PIL import Image

import xlx_fast
from xlx_fast import archs
from xlx_fast.cli import main
from xlx_fast.engine import Request
from xlx_fast.models import (XLxmertForImageGeneration, XUniterForImageGeneration, from_default,
                             model_class)
from xlx_fast.reference import xuniter as ref_xuniter
from xlx_fast.serving.model_spec import ModelSpec
from xlx_fast.serving.scheduler import Scheduler
from xlx_fast.text import MAX_LENGTH, CaptionTokenizer
from xlx_fast.xuniter_engine import XUniterEngine, engine_class

from test_cli_errors import assert_user_error, run_cli

TINY = ["--size", "tiny"]
CAPTIONS = ["a red bus", "two dogs"]
HANG_GUARD_S = 120  # only stops a wait that would never end: nothing here is timed


def test_from_default_builds_the_archs_class_and_refuses_another():
    m = from_default(arch="xuniter", seed=0, size="tiny", with_generator=False)
    assert type(m) is XUniterForImageGeneration and m.generator is None
    assert type(from_default(size="tiny", with_generator=False)) is XLxmertForImageGeneration
    assert model_class("xlxmert") is XLxmertForImageGeneration
    assert xlx_fast.models.from_default is from_default
    # the same weights as the class's own from_default
    again = XUniterForImageGeneration.from_default(seed=0, size="tiny", with_generator=False)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
    for bad in ("bert", None, 3):
        with pytest.raises(ValueError, match="arch must be one of xlxmert, xuniter"):
            from_default(arch=bad, size="tiny")


def test_one_table_of_architectures():
    from xlx_fast.cli import train

    assert list(archs.ARCHS) == ["xlxmert", "xuniter"] and archs.DEFAULT_ARCH == "xlxmert"
    assert train.ARCHS == tuple(archs.ARCHS)
    for arch in archs.ARCHS.values():
        assert model_class(arch.name).__name__ == arch.class_name and arch.description


def _tokens():
    return CaptionTokenizer.fallback()(CAPTIONS, MAX_LENGTH)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_generate_xuniter_paints_and_samples_the_xuniter_ids(impl, tmp_path, capsys):
    ids_path = tmp_path / "ids.npy"
    assert main(["generate", *CAPTIONS, "--arch", "xuniter", *TINY, "--steps", "3", "--seed", "5",
                 "--impl", impl, "-o", str(tmp_path / "x.png"), "--save-ids", str(ids_path)]) == 0
    assert "embedded default xuniter, tiny" in capsys.readouterr().err
    for i in range(2):
        img = np.asarray(Image.open(tmp_path / f"x_{i}.png"))
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    saved = torch.from_numpy(np.load(ids_path))
    assert saved.shape == (2, 64)
    model = from_default("xuniter", seed=0, size="tiny")
    input_ids, mask = _tokens()
    if impl == "reference":
        want = ref_xuniter.sample(model, input_ids, mask, steps=3, seed=5).ids
    else:
        want = xlx_fast.generate(model, input_ids, mask, steps=3, seed=5).ids
    assert torch.equal(saved, want)
    # and not X-LXMERT's: the architecture reached the model
    other = XLxmertForImageGeneration.from_default(seed=0, size="tiny", with_generator=False)
    assert not torch.equal(saved, xlx_fast.generate(other, input_ids, mask, steps=3, seed=5).ids)


ARCH_ERRORS = [
    (["generate", "x", "--arch", "xuniter", "--checkpoint", "x.pth"], "no xuniter checkpoint loader"),
    (["generate", "x", "--arch", "xuniter", "--caption-back"], "--caption-back reads pictures back"),
    (["generate", "--captions-file", "caps.txt", "--out-dir", "o", "--arch", "xuniter",
      "--checkpoint", "x.pth"], "no xuniter checkpoint loader"),
    (["serve", "--arch", "xuniter", "--checkpoint", "x.pth"], "no xuniter checkpoint loader"),
    (["serve", "--arch", "xuniter", "--captions"], "--captions reads pictures back"),
]


@pytest.mark.parametrize("args,match", ARCH_ERRORS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_what_xuniter_lacks_is_one_error_line_before_torch(args, match, tmp_path):
    (tmp_path / "caps.txt").write_text("a red bus\n")
    result = run_cli([*args, *TINY], tmp_path)
    assert_user_error(result, match)  # before the model code (transformers) is imported
    if args[0] == "serve":  # serve imports no torch for its argument checks (generate does)
        assert "torch" not in result[3], "refused before torch is imported"


def test_an_unknown_arch_is_an_argparse_error(capsys):
    for command in ("generate", "serve", "train"):
        with pytest.raises(SystemExit) as e:
            main([command, "x", "--arch", "bert"] if command == "generate" else [command, "--arch", "bert"])
        assert e.value.code == 2 and "--arch" in capsys.readouterr().err


def _bulk(tmp_path, *extra):
    return main(["generate", "--captions-file", str(tmp_path / "caps.txt"), "--out-dir",
                 str(tmp_path / "out"), *TINY, "--steps", "2", "--batch-size", "2", *extra])


def test_bulk_runs_the_xuniter_engine_and_a_resume_with_another_arch_is_refused(tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("a red bus\ntwo dogs\n")
    assert _bulk(tmp_path, "--arch", "xuniter") == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["arch"] == "xuniter"
    entries = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    model = from_default("xuniter", seed=0, size="tiny")
    input_ids, mask = _tokens()
    for e, row in zip(entries, range(2)):  # line n's seed is --seed + n
        want = xlx_fast.generate(model, input_ids[row:row + 1], mask[row:row + 1], steps=2,
                                 seed=e["line"]).ids
        assert e["seed"] == e["line"] and e["ids"] == want[0].tolist()
        assert (tmp_path / "out" / e["file"]).exists()
    capsys.readouterr()
    assert _bulk(tmp_path) == 2  # X-LXMERT, the default, into the X-UNITER run's directory
    err = capsys.readouterr().err
    assert "error:" in err and "--arch xlxmert (there: xuniter)" in err
    assert _bulk(tmp_path, "--arch", "xuniter") == 0  # the same arch resumes: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    # a settings file from before architectures were recorded means X-LXMERT
    del settings["arch"]
    (tmp_path / "out" / "settings.json").write_text(json.dumps(settings))
    assert _bulk(tmp_path, "--arch", "xuniter") == 2
    assert "--arch xuniter (there: xlxmert)" in capsys.readouterr().err


# -- serving -------------------------------------------------------------------------------------

SPEC = {"size": "tiny", "arch": "xuniter", "seed": 3, "head_scale": 3.0}


def test_model_spec_arch_is_checked_and_kept():
    assert ModelSpec.from_dict(SPEC).to_dict()["arch"] == "xuniter"
    assert ModelSpec().arch == "xlxmert"
    for bad, match in (({"arch": "bert"}, "arch must be one of xlxmert, xuniter"),
                       ({"arch": "xuniter", "checkpoint": "a.pth", "centroids": "c.npy",
                         "generator": "g.pth"}, "no xuniter checkpoint loader"),
                       ({"arch": "xuniter", "captions": True}, "captions read pictures back")):
        with pytest.raises(ValueError, match=match):
            ModelSpec.from_dict({"size": "tiny", **bad})


def test_serve_options_carry_the_arch():
    import argparse

    from xlx_fast.cli import serve as serve_cli

    p = argparse.ArgumentParser()
    serve_cli.add_parser(p)
    model = serve_cli.app_args(p.parse_args(["--arch", "xuniter", "--size", "tiny"]))["model"]
    assert model["arch"] == "xuniter"
    assert serve_cli.app_args(p.parse_args([]))["model"]["arch"] == "xlxmert"


def test_the_scheduler_paints_with_the_xuniter_engine():
    from xlx_fast.freezing import is_frozen

    model, tok = ModelSpec.from_dict(SPEC).build()
    assert type(model) is XUniterForImageGeneration and not model.training
    assert is_frozen(model)  # ModelSpec.build freezes what it builds, whatever the arch
    engine = engine_class(model)(model, slots=2)
    assert type(engine) is XUniterEngine
    items = [("a red bus", 1, 4, "mask_predict"), ("two dogs", 2, 5, "confidence"),
             ("a kitchen", 3, 3, "tlbr")]

    async def go():
        sched = Scheduler(engine, model, paint_images=True)
        sched.start()
        try:
            jobs = []
            for prompt, seed, steps, strategy in items:
                ids, mask = tok([prompt])
                jobs.append(sched.submit([Request(input_ids=ids[0], attention_mask=mask[0], seed=seed,
                                                  steps=steps, strategy=strategy)]))
            return [(await sched.result(j))[0] for j in jobs]
        finally:
            await sched.stop()

    results = asyncio.run(asyncio.wait_for(go(), HANG_GUARD_S))
    for r, (prompt, seed, steps, strategy) in zip(results, items):
        ids, mask = tok([prompt])
        want = xlx_fast.generate(model, ids, mask, steps=steps, strategy=strategy, seed=seed).ids
        assert r.ids == want[0].tolist()
        size = model.generator.config.target_size
        assert tuple(r.image.shape) == (size, size, 3) and r.image.dtype == torch.uint8


def test_the_image_service_paints_and_answers_with_xuniter():
    from xlx_fast.serving.service import ImageService

    # answers work beside it: the answer model (X-LXMERT's) reads the served model's codebook
    svc = ImageService({"model": {**SPEC, "image_size": 256, "answer_task": "vqa"}, "slots": 2,
                        "api_key": "k"})
    assert svc.wait_built(HANG_GUARD_S) and svc.load_error is None, svc.load_error
    assert type(svc.engine) is XUniterEngine and svc.tasks == ["images", "answers (vqa)"]

    def body(obj):
        async def chunks():
            yield json.dumps(obj).encode()
        return chunks()

    async def go():
        auth = {"authorization": "Bearer k"}
        try:
            image = await svc.generate(auth, body({"prompt": "a red bus", "seed": 1, "steps": 4,
                                                   "return_ids": True}))
            ids = json.loads(image.body)["data"][0]["ids"] if image.status == 200 else []
            answer = await svc.answer(auth, body({"question": "what is red?", "cluster_ids": ids}))
            return image, answer
        finally:
            await svc.close()

    image, answer = asyncio.run(asyncio.wait_for(go(), HANG_GUARD_S))
    assert image.status == 200, image.body
    ids, mask = svc.tokenizer(["a red bus"])
    got = json.loads(image.body)["data"][0]["ids"]
    assert got == xlx_fast.generate(svc.model, ids, mask, steps=4, seed=1).ids[0].tolist()
    assert answer.status == 200, answer.body


# -- the benchmark's rows ------------------------------------------------------------------------

def _dry_run(capsys, *argv):
    assert main(["bench", "--dry-run", "--device", "cpu", "--dtype", "fp32", "--ops", "generation",
                 *argv]) == 0
    return capsys.readouterr().out.strip().splitlines()[1:]


def test_bench_lists_the_xuniter_rows_in_the_full_sweep_only(capsys):
    full = _dry_run(capsys)
    assert "generate[B=1 MP-4 xuniter|fp32|cpu]" in full and "generate[B=8 MP-4 xuniter|fp32|cpu]" in full
    assert "generate[B=1 MP-4|fp32|cpu]" in full
    assert not [c for c in _dry_run(capsys, "--quick") if "xuniter" in c]
    only = _dry_run(capsys, "--arch", "xuniter")
    assert only == ["generate[B=1 MP-4 xuniter|fp32|cpu]", "generate[B=8 MP-4 xuniter|fp32|cpu]"]
    assert not [c for c in _dry_run(capsys, "--arch", "xlxmert") if "xuniter" in c]


def test_the_xuniter_row_agrees_with_its_reference_at_tiny_size():
    # prepared and run once each (the agreement check that comes before any timing), not timed
    from xlx_fast.bench import harness
    from xlx_fast.bench.cases import generation

    spec = harness.Spec(device="cpu", dtypes=(torch.float32,), quick=False, size="tiny", arch="xuniter")
    try:
        (case,) = generation.cases(spec)
        assert case.shape == "B=1 MP-4 xuniter"
        prepared = case.prepare()
        ref = prepared.reference()
        fast = prepared.backends["xlx_fast.generate"]()
        assert prepared.compare(ref, fast, "xlx_fast.generate").ok
        model = generation.model("tiny", torch.float32, torch.device("cpu"), "reference", arch="xuniter")
        assert type(model) is XUniterForImageGeneration
    finally:
        generation.release()
    with pytest.raises(ValueError, match="arch must be 'all' or one of"):
        harness.Spec(device="cpu", dtypes=(torch.float32,), arch="bert")
