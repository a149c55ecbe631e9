"""Randomly drawn bad inputs to the public ops and to ``generate``: each call must either raise a
TypeError/ValueError whose message names the argument, or return what the reference returns
on the same inputs. Never garbage, never another exception, never a crash.

Each draw starts from valid inputs and changes one argument at random: a wrong dtype, rank,
size or device ('meta'), an empty tensor, NaN or inf in one element, a value out of range, a
non-tensor, or a change that keeps the input valid (a strided copy, another accepted dtype), in
which case the result is compared. Draws are seeded, so a failure names a reproducible case.
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

import xlx_fast
from xlx_fast import reference
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.ops import sampler_step as S
from xlx_fast.ops.attention import attention
from xlx_fast.ops.codebook_head import codebook_head
from xlx_fast.ops.nearest import nearest
from xlx_fast.text import CaptionTokenizer

FP32_MIN = torch.finfo(torch.float32).min
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.uint8, torch.bool, torch.complex64]


class Accepted(Exception):
    """The op returned: compare with the reference."""


def names(message: str, argument: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])", message) is not None


def expect_error_or(call, argument, compare, case, partners=()):
    """Run ``call``; a TypeError/ValueError must name ``argument`` (or, when the change was to
    its size, rank or dtype, one of the ``partners`` that must agree with it: a mismatch is
    between two arguments); a result goes to ``compare``. Any other exception propagates and
    fails the test."""
    try:
        result = call()
    except (TypeError, ValueError) as e:
        allowed = [argument]
        if any(word in case for word in ("size", "rank", "empty", "dtype")):
            allowed += list(partners)
        assert any(names(str(e), a) for a in allowed), \
            f"{case}: the message does not name {' or '.join(allowed)}: {e}"
        return "raised"
    compare(result)
    return "accepted"


# -- mutations ---------------------------------------------------------------------------------------

def strided(t):
    """The same values with a non-unit last stride (a valid input for most ops)."""
    base = torch.empty(*t.shape, 2, dtype=t.dtype)
    base[..., 0] = t
    return base[..., 0]


def poke(t, value, rng):
    t = t.clone()
    flat = t.view(-1)
    flat[int(rng.integers(flat.numel()))] = value
    return t


def mutate_tensor(rng, t, kinds):
    """(kind, new value) for a tensor argument."""
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "dtype":
        choices = [d for d in ALL_DTYPES if d != t.dtype]
        dtype = choices[int(rng.integers(len(choices)))]
        return f"dtype {dtype}", t.to(dtype)
    if kind == "rank_up":
        return kind, t.unsqueeze(0)
    if kind == "rank_down":
        return kind, t.reshape(-1) if t.dim() > 1 else t[0]
    if kind == "size":
        dim = int(rng.integers(t.dim()))
        if rng.random() < 0.5 and t.shape[dim] > 1:
            return f"size-1 on dim {dim}", t.narrow(dim, 0, t.shape[dim] - 1)
        return f"size+1 on dim {dim}", torch.cat([t, t.narrow(dim, 0, 1)], dim)
    if kind == "empty":
        return kind, t[:0]
    if kind == "nan":
        return kind, poke(t, float("nan"), rng)
    if kind == "inf":
        return kind, poke(t, float("inf") if rng.random() < 0.5 else float("-inf"), rng)
    if kind == "meta":
        return kind, t.to("meta")
    if kind == "strided":
        return kind, strided(t)
    if kind == "list":
        return kind, t.tolist()
    if kind == "none":
        return kind, None
    if kind == "string":
        return kind, "tensor"
    raise AssertionError(kind)


# -- attention ---------------------------------------------------------------------------------------

def attention_reference(q, k, v, mask, num_heads):
    """softmax(q·kᵀ/√d + bias)·v per head in float64, the module docstring's mask semantics."""
    b, lq, w = q.shape
    d = w // num_heads
    qh = q.double().view(b, lq, num_heads, d).transpose(1, 2)
    kh = k.double().view(b, -1, num_heads, d).transpose(1, 2)
    vh = v.double().view(b, -1, num_heads, d).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        if mask.dtype.is_floating_point:
            s = s + mask.double().clamp_min(FP32_MIN)
        else:
            s = s + torch.where(mask != 0, 0.0, FP32_MIN).double().view(b, 1, 1, -1)
    return (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(b, lq, w)


def assert_matches(out, ref, dtype, case, *, all_minus_inf_rows_may_be_zero=False):
    assert out.shape == ref.shape, case
    nan_out, nan_ref = torch.isnan(out.double()), torch.isnan(ref)
    if all_minus_inf_rows_may_be_zero:
        # inf in q or k can make every score of a row -inf; torch's CPU kernel then writes 0 where
        # the formula's softmax is NaN (documented in xlx_fast.ops.attention): only that deviation
        # is allowed, and only where the reference is NaN
        nan_out = nan_out | (nan_ref & (out.double() == 0))
    assert torch.equal(nan_out, nan_ref), f"{case}: NaN pattern differs"
    ok = ~nan_ref
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double()[ok], ref[ok], rtol=tol, atol=tol, msg=case)


@pytest.mark.parametrize("draw", range(8))
def test_attention_bad_inputs(draw):
    rng = np.random.default_rng(100 + draw)
    outcomes = []
    for trial in range(12):
        b, lq, lk, heads = int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9)), 2
        dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
        g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        args = {"q": torch.randn(b, lq, 64, generator=g).to(dtype),
                "k": torch.randn(b, lk, 64, generator=g).to(dtype),
                "v": torch.randn(b, lk, 64, generator=g).to(dtype),
                "key_padding_mask": torch.rand(b, lk, generator=g) < 0.7, "num_heads": heads}
        style = rng.random()
        if style < 0.3:  # HF's additive extended mask instead
            args["key_padding_mask"] = (~args["key_padding_mask"]).float().view(b, 1, 1, lk) * FP32_MIN
        elif style < 0.6:
            args["key_padding_mask"] = None
        name = ["q", "k", "v", "key_padding_mask", "num_heads"][int(rng.integers(5))]
        if name == "num_heads":
            kind = [0, -1, 3, 4, 1, 2.0, True, "2"][int(rng.integers(8))]
            args[name] = kind
        else:
            kinds = ["dtype", "rank_up", "rank_down", "size", "empty", "nan", "inf", "meta",
                     "strided", "list", "string"] + (["none"] if name == "key_padding_mask" else [])
            if args[name] is None:
                kind, args[name] = "a bool mask", torch.rand(b, lk) < 0.5
            else:
                kind, args[name] = mutate_tensor(rng, args[name], kinds)
        case = f"draw {draw}.{trial}: {name} <- {kind} ({dtype}, B={b}, Lq={lq}, Lk={lk})"

        def compare(out, args=args, case=case):
            ref = attention_reference(args["q"], args["k"], args["v"], args["key_padding_mask"],
                                      args["num_heads"])
            assert out.dtype == args["q"].dtype, case
            assert_matches(out, ref, args["q"].dtype, case,
                           all_minus_inf_rows_may_be_zero=case.split(" <- ")[0].endswith((" q", " k"))
                           and "<- inf" in case)

        outcomes.append(expect_error_or(
            lambda: attention(args["q"], args["k"], args["v"], args["key_padding_mask"],
                              num_heads=args["num_heads"]), name, compare, case,
            partners=("q", "k", "v")))
    assert "raised" in outcomes


# -- nearest -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("draw", range(6))
def test_nearest_bad_inputs(draw):
    rng = np.random.default_rng(200 + draw)
    for trial in range(12):
        n, k, d = int(rng.integers(1, 40)), int(rng.integers(1, 20)), int(rng.integers(1, 24))
        cb = torch.from_numpy((rng.normal(size=(k, d)) * 3).astype(np.float32))
        x = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
        args = {"x": x, "codebook": cb, "chunk": None, "precision": "ieee"}
        name = ["x", "codebook", "chunk", "precision"][int(rng.integers(4))]
        if name == "chunk":
            kind = [0, -5, 1.5, True, 1, 7][int(rng.integers(6))]
            args[name] = kind
        elif name == "precision":
            kind = ["fp64", None, "tf32"][int(rng.integers(3))]
            args[name] = kind
        else:
            kind, args[name] = mutate_tensor(rng, args[name], ["dtype", "rank_up", "rank_down", "size",
                                                               "empty", "nan", "inf", "meta", "strided",
                                                               "list", "none"])
            if name == "x" and rng.random() < 0.2 and isinstance(args[name], torch.Tensor) \
                    and args[name].dtype in (torch.float32, torch.float16) and args[name].device.type == "cpu":
                args[name], kind = args[name].numpy(), kind + " as numpy"
        case = f"draw {draw}.{trial}: {name} <- {kind} (N={n}, K={k}, D={d})"

        def compare(result, args=args, case=case):
            ids, dist = result
            xs = torch.as_tensor(args["x"]).double().reshape(-1, args["codebook"].shape[1])
            d2 = ((xs[:, None, :] - torch.as_tensor(args["codebook"]).double()[None]) ** 2).sum(-1)
            ids = torch.as_tensor(ids).reshape(-1)
            best = d2.min(1).values
            # the chosen centroid is the nearest up to fp32 rounding (random data: no near-ties)
            chosen = d2.gather(1, ids.view(-1, 1)).view(-1)
            assert torch.all(chosen <= best + 1e-4 * (1 + best)), case
            torch.testing.assert_close(torch.as_tensor(dist).double().reshape(-1), best,
                                       rtol=1e-3, atol=1e-3, msg=case)

        expect_error_or(lambda: nearest(args["x"], args["codebook"], return_distance=True,
                                        chunk=args["chunk"], precision=args["precision"]),
                        name, compare, case, partners=("x", "codebook"))


# -- codebook_head -----------------------------------------------------------------------------------

@pytest.mark.parametrize("draw", range(6))
def test_codebook_head_bad_inputs(draw):
    rng = np.random.default_rng(300 + draw)
    for trial in range(12):
        m, hdim, k = int(rng.integers(1, 30)), int(rng.integers(1, 24)), int(rng.integers(1, 40))
        dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
        g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        args = {"h": torch.randn(m, hdim, generator=g).to(dtype),
                "weight": torch.randn(k, hdim, generator=g).to(dtype),
                "bias": torch.randn(k, generator=g), "temperature": 0.0, "step": 0}
        name = ["h", "weight", "bias", "temperature", "step"][int(rng.integers(5))]
        if name == "temperature":
            kind = [-1.0, float("nan"), float("inf"), 0.5][int(rng.integers(4))]
            args[name], name = kind, ("seeds" if kind == 0.5 else name)  # 0.5 without seeds
        elif name == "step":
            kind = [-1, 2 ** 31, 1.5, True, "0", 5][int(rng.integers(6))]
            args[name] = kind
        else:
            kinds = ["dtype", "rank_up", "size", "empty", "nan", "inf", "meta", "strided", "list"]
            kinds += ["none"] if name == "bias" else ["rank_down"]
            kind, args[name] = mutate_tensor(rng, args[name], kinds)
        case = f"draw {draw}.{trial}: {name} <- {kind} ({dtype}, M={m}, H={hdim}, K={k})"

        def compare(result, args=args, case=case):
            prob, ids = result
            h, w, b = args["h"].double(), args["weight"].double(), args["bias"]
            logits = h @ w.T + (0 if b is None else b.double())
            p = torch.softmax(logits, -1)
            assert prob.shape == ids.shape == h.shape[:-1], case
            top = logits.max(-1).values
            chosen = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            tol = 1e-4 if args["h"].dtype == torch.float32 else 5e-2
            assert torch.all(chosen >= top - tol * (1 + top.abs())), case
            torch.testing.assert_close(prob.double(), p.max(-1).values, rtol=tol, atol=tol, msg=case)

        expect_error_or(lambda: codebook_head(args["h"], args["weight"], args["bias"],
                                              temperature=args["temperature"], step=args["step"]),
                        name, compare, case, partners=("h", "weight", "bias"))


# -- sampler_step ------------------------------------------------------------------------------------

@pytest.mark.parametrize("draw", range(6))
def test_sampler_step_bad_inputs(draw):
    from test_sampler_step import oracle_step, random_state, strategy_args

    rng = np.random.default_rng(400 + draw)
    for trial in range(12):
        b, n, d = int(rng.integers(1, 5)), int(rng.integers(1, 30)), int(rng.integers(1, 9))
        strategy = list(S.STRATEGIES)[int(rng.integers(4))]
        dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
        table = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32)).to(dtype)
        mask_row = torch.linspace(-1, 1, d).to(dtype)
        st = random_state(rng, b, n, d, dtype)
        args = {"pred_prob": torch.from_numpy(rng.random((b, 64), dtype=np.float32)),
                "pred_id": torch.from_numpy(rng.integers(0, n, (b, 64))),
                "table": table, "mask_row": mask_row, **strategy_args(rng, strategy, b)}
        names_ = ["pred_prob", "pred_id", "table", "mask_row", "strategy", "mask", "ids", "out",
                  *[k for k in ("count", "cell", "next_cell") if k in args]]
        name = names_[int(rng.integers(len(names_)))]
        if name == "strategy":
            kind = ["greedy", 7, None, True][int(rng.integers(4))]
            strategy_arg = kind
        else:
            strategy_arg = strategy
            target = getattr(st, name) if name in ("mask", "ids", "out") else args[name]
            kinds = ["dtype", "rank_up", "size", "meta", "strided", "list"]
            if name in ("count", "cell", "next_cell", "pred_id", "ids"):
                kinds += ["range", "in_range", "in_range"]
            if name == "pred_prob":
                kinds += ["nan", "in_range", "in_range"]
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind == "range":
                high = {"count": 65, "cell": 64, "next_cell": 64}.get(name, n)
                new = poke(target, [high, -2][int(rng.integers(2))], rng)
            elif kind == "in_range":  # another valid value: the result must follow it
                low, high = {"count": (0, 65), "cell": (-1, 64), "next_cell": (-1, 64),
                             "pred_prob": (0, 1)}.get(name, (0, n))
                new = poke(target, float(rng.random()) if name == "pred_prob"
                           else int(rng.integers(low, high)), rng)
            else:
                kind, new = mutate_tensor(rng, target, [kind])
            if name in ("mask", "ids", "out"):
                setattr(st, name, new)
            else:
                args[name] = new
        case = f"draw {draw}.{trial}: {name} <- {kind} ({strategy}, {dtype}, B={b}, N={n}, D={d})"
        before = copy.deepcopy(st)
        extra = {k: args[k] for k in ("count", "cell", "next_cell") if k in args}

        def compare(result, args=args, before=before, extra=extra, case=case):
            # the oracle gathers every cell before masking: pad the table with NaN rows so that
            # an id past its end, fine in a cell that stays masked, is NaN (a mismatch) elsewhere
            table = args["table"]
            top = int(max(args["pred_id"].max(), before.ids.max())) + 1
            if top > table.shape[0]:
                pad = torch.full((top - table.shape[0], table.shape[1]), float("nan"), dtype=table.dtype)
                table = torch.cat([table, pad])
            ref = oracle_step(args["pred_prob"], args["pred_id"], before.mask, before.visited,
                              before.ids, table, args["mask_row"], strategy,
                              **{k: v.numpy() for k, v in extra.items()})
            for got, want in zip((result.mask, result.visited, result.ids, result.out), ref):
                assert torch.equal(got, want), case

        def call(args=args, st=st, strategy_arg=strategy_arg, extra=extra):
            return S.sampler_step(args["pred_prob"], args["pred_id"], st, args["table"],
                                  args["mask_row"], strategy_arg, **extra)

        expect_error_or(call, name, compare, case, partners=names_)


# -- text encoding -----------------------------------------------------------------------------------

WORDS = ["a", "red", "bus", "on", "the", "street", "two", "dogs", "play", "##ing", "##s", "café",
         "under", "blue", "sky"]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    # [PAD] deliberately not at id 0
    tokens = ["zebra", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", *WORDS, ",", ".", "!", "'"]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def random_caption(rng):
    pieces = WORDS[:8] + ["Café", "CAFÉ", "buses", "zebra", "playing", "unknownword", ",", ".", "!",
                          "  ", "\t", "Street's"]
    return " ".join(pieces[int(i)] for i in rng.integers(0, len(pieces), int(rng.integers(0, 30))))


def test_text_encode_bad_inputs(vocab_path):
    from transformers import BertTokenizer

    ours = CaptionTokenizer.from_vocab(vocab_path)
    ref_tok = BertTokenizer(str(vocab_path), do_lower_case=True)
    rng = np.random.default_rng(500)
    outcomes = []
    for trial in range(60):
        captions = [random_caption(rng) for _ in range(int(rng.integers(1, 4)))]
        max_length = int(rng.integers(2, 25))
        name = ["captions", "max_length", None][int(rng.integers(3))]
        kind = "none"
        if name == "captions":
            kind = ["int", "None", "bytes", "mixed", "empty", "surrogate", "str"][int(rng.integers(7))]
            captions = {"int": 3, "None": None, "bytes": b"a bus", "mixed": [captions[0], 7],
                        "empty": [], "surrogate": [captions[0] + " \udcff\udcfe bus"],
                        "str": captions[0]}[kind]
        elif name == "max_length":
            kind = [0, 1, -3, 1.5, True, "20"][int(rng.integers(6))]
            max_length = kind
        case = f"trial {trial}: {name} <- {kind!r}"

        def compare(result, captions=captions, max_length=max_length, case=case):
            ids, mask = result
            batch = [captions] if isinstance(captions, str) else captions
            ref = ref_tok(batch, padding="max_length", truncation=True, max_length=max_length)
            assert ids.tolist() == ref["input_ids"], case
            assert mask.tolist() == [[bool(v) for v in row] for row in ref["attention_mask"]], case

        outcomes.append(expect_error_or(lambda: ours(captions, max_length), name or "captions",
                                        compare, case))
    assert outcomes.count("raised") >= 10 and outcomes.count("accepted") >= 10


# -- generate on a tiny model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair():
    model = XLxmertForImageGeneration.from_default(seed=1, size="tiny")
    with torch.no_grad():  # sharpen the head: ids insensitive to rounding (as tests/test_generation.py)
        model.obj_predict_head.linear_feat.weight.mul_(3.0)
        model.obj_predict_head.linear_feat.bias.mul_(3.0)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("draw", range(3))
def test_generate_bad_inputs(tiny_pair, draw):
    ref_model, fast_model = tiny_pair
    rng = np.random.default_rng(600 + draw)
    for trial in range(8):
        b, length = int(rng.integers(1, 3)), int(rng.integers(2, 12))
        ids = torch.from_numpy(rng.integers(1000, 30000, (b, length)))
        ids[:, 0] = 101
        mask = torch.ones(b, length, dtype=torch.bool)
        if length > 4:
            mask[0, length - 2:] = False
            ids[0, length - 2:] = 0
        args = {"input_ids": ids, "attention_mask": mask, "steps": int(rng.integers(1, 4)),
                "strategy": ["mask_predict", "confidence", "tlbr", "random"][int(rng.integers(4))],
                "temperature": 0.0}
        name = ["input_ids", "attention_mask", "steps", "strategy", "temperature"][int(rng.integers(5))]
        if name == "input_ids":
            kind = ["float", "int32", "negative", "too_big", "rank_down", "rank_up", "empty", "meta",
                    "list"][int(rng.integers(9))]
            new = {"float": lambda: ids.float(), "int32": lambda: ids.int(),
                   "negative": lambda: poke(ids, -1, rng), "too_big": lambda: poke(ids, 10 ** 6, rng),
                   "rank_down": lambda: ids[0], "rank_up": lambda: ids[None], "empty": lambda: ids[:0],
                   "meta": lambda: ids.to("meta"), "list": lambda: ids.tolist()}[kind]()
            args[name] = new
        elif name == "attention_mask":
            kind = ["seven", "half", "int01", "float01", "shape", "meta", "none", "list"][int(rng.integers(8))]
            new = {"seven": lambda: poke(mask.long(), 7, rng), "half": lambda: poke(mask.float(), 0.5, rng),
                   "int01": lambda: mask.long(), "float01": lambda: mask.float(),
                   "shape": lambda: mask[:, :-1], "meta": lambda: mask.to("meta"), "none": lambda: None,
                   "list": lambda: mask.tolist()}[kind]()
            args[name] = new
        elif name == "steps":
            kind = [0, -1, 65, 1.5, True, "2"][int(rng.integers(6))]
            if kind == 65:
                args["strategy"] = "tlbr"
            args[name] = kind
        elif name == "strategy":
            kind = ["greedy", None, 3, "MASK_PREDICT"][int(rng.integers(4))]
            args[name] = kind
        else:
            kind = [-1.0, float("nan"), float("inf")][int(rng.integers(3))]
            args[name] = kind
        case = f"draw {draw}.{trial}: {name} <- {kind!r} (B={b}, L={length}, {args['strategy']})"

        def compare(result, args=args, case=case):
            want = reference.sample(ref_model, args["input_ids"], args["attention_mask"],
                                    steps=args["steps"], strategy=args["strategy"], seed=3)
            assert torch.equal(result.ids, want.ids), case
            torch.testing.assert_close(result.probs, want.probs, rtol=1e-3, atol=1e-6, msg=case)

        expect_error_or(lambda: xlx_fast.generate(fast_model, args["input_ids"], args["attention_mask"],
                                                  steps=args["steps"], strategy=args["strategy"],
                                                  temperature=args["temperature"], seed=3),
                        name, compare, case)


def test_checkpoint_with_nan_names_the_tensor(tmp_path):
    from xlx_fast.models.checkpoint import CheckpointError, save_authors_format

    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny")
    with torch.no_grad():
        model.obj_predict_head.transform.dense.bias[4] = float("inf")
    save_authors_format(model, tmp_path / "m.pth", tmp_path / "c.npy", tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match=r"obj_predict_head\.transform\.dense\.bias"):
        XLxmertForImageGeneration.from_checkpoint(tmp_path / "m.pth", tmp_path / "c.npy",
                                                  tmp_path / "g.pth", size="tiny")
