"""Every Triton kernel of the package, in every tuning config it can run with, compiles for sm_80
and sm_90 without register spills, without a stack frame, and within the shared memory of a block.

No GPU is needed: Triton's own compiler (front end, LLVM, and the ``ptxas`` shipped in its wheel)
runs on the CPU for a ``GPUTarget``; ``ptxas -v`` reports registers, stack frame and spill bytes,
Triton's metadata the shared memory. The compiles run in a subprocess because conftest sets
``TRITON_INTERPRET`` (under which ``triton.jit`` builds interpreter functions, not kernels), with
a fresh Triton cache so that ``ptxas`` really runs; the reports are kept by a hash of everything
that determines the binary, so a rerun compiles only the kernels that changed.

The variants come from the modules themselves: the attention autotuner's configs as its own
pruning function keeps them for the largest shapes (small shapes only remove configs) and for each
dtype, and the fixed block sizes the launchers of ``nearest``, ``codebook_head`` and the fused
cross-entropy's row sweep choose. The codebook kernels are compiled at K = 10,000 and 65,536 and
at the feature widths they meet (D, H = 768, 1024, 2048 and an odd 777): the block sizes do not
depend on K or D, but Triton specialises integer arguments divisible by 16 (the slice count S,
D, the row strides), and those compile to different code (S = 32 at K = 65,536, 27 at 10,000;
an odd width loses the vectorised loads, and its tiles spilled: ``nearest`` takes 64-row tiles
there, ``codebook_head`` pads H to a multiple of 16 and so compiles as at an aligned width).
Arguments are laid out as the launchers pass them (contiguous last dimension, so that stride is
specialised to 1; 16-byte aligned pointers and row strides), since that is what the GPU compiles.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Shared memory per block (opt-in maximum): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
# ptxas reports of earlier runs, keyed by everything that determines the binary: an unchanged
# kernel is not compiled twice (Triton's own cache would skip ptxas and so lose the report)
_REPORTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xlx_fast" / "ptxas-reports"
# (K, D) of nearest and (K, H) of codebook_head compiled: the paper's sizes, K = 65,536, and the
# other feature widths (1024 and 768 compile like 2048: only divisibility by 16 is specialised)
CODEBOOKS = ((10_000, 2048), (65_536, 2048), (65_536, 1024), (65_536, 768), (65_536, 777))
HEADS = ((10_000, 768), (65_536, 768), (65_536, 1024), (65_536, 2048), (65_536, 777))
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                    r".*?Used (\d+) registers", re.S)


# --------------------------------------------------------------------------------------------
# the variants (built in the worker; they need the compiling, not the interpreting, triton)
# --------------------------------------------------------------------------------------------

def _variants():
    """(label, jit kernel, positional args, keyword args incl. constexprs and num_warps/stages)."""
    import torch

    from xlx_fast.ops import attention as attn
    from xlx_fast.ops import codebook_head as head
    from xlx_fast.ops import fused_linear as linear
    from xlx_fast.ops import fused_linear_cross_entropy as flce
    from xlx_fast.ops import nearest as near

    out = []
    t = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype)  # noqa: E731
    # (dtype, precision): fp32 IEEE, tf32 and tf32x3 differ (FMA loop, tensor cores, three
    # products with the operand split in registers). fp16 stands for both 16-bit types: same
    # tiles, same MMA shapes; 196 pairs of variants compiled with each gave identical registers,
    # stack, spills and shared memory, pair by pair.
    modes = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"),
             (torch.float16, "tf32")]

    # -- attention: every config the autotuner may pick for each head dim and dtype ------------
    B, L, H = 4, 4096, 2  # large shapes: the size rules prune nothing
    for hd in attn.SUPPORTED_HEAD_DIMS:
        for dtype, prec in modes:
            if prec == "tf32x3":  # attention takes ieee or tf32 only (torch's matmul switch)
                continue
            w = H * hd
            q = t(B, L, 3 * w, dtype=dtype)  # fused QKV layout, row stride 3·H·d
            configs = attn._prune(attn._CONFIGS, {"Q": q, "Lq": L, "Lk": L, "BH": 4096},
                                  HEAD_DIM=hd, INPUT_PRECISION=prec)
            for mask_kind, mask in ((attn._NO_MASK, q), (attn._KEEP_MASK, t(B, L, dtype=torch.uint8)),
                                    (attn._ADDITIVE_MASK, t(B, 1, 1, L))):
                for cfg in configs:
                    args = (q, q, q, mask, t(B, L, w, dtype=dtype),
                            L * 3 * w, 3 * w, 1, L * 3 * w, 3 * w, 1, L * 3 * w, 3 * w, 1,
                            L, 1, L * w, w, 1,
                            B * H, H, L, L, 0.18, 4096)
                    kw = dict(MASK_KIND=mask_kind, HEAD_DIM=hd, INPUT_PRECISION=prec, UPCAST_DOT=False,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
                    label = (f"attention d={hd} {str(dtype)[6:]}/{prec} mask={mask_kind} "
                             f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}")
                    out.append((label, attn._attn_fwd, args, kw))

    # -- nearest: the launcher's fixed configs ---------------------------------------------------
    # (K, D): the X-LXMERT codebook, 65,536 entries, and the other widths (labels that compile to
    # the same binary as another are compiled once: see _compile_all)
    for dtype, prec in modes:
        for n in (8, 200):  # block_n 16 (few rows) and 128
            for k, d in CODEBOOKS:
                for label, kernel, args, kw in near.compile_variants(t(n, d, dtype=dtype),
                                                                     t(k, d, dtype=dtype), prec):
                    out.append((f"nearest {str(dtype)[6:]}/{prec} N={n} K={k} D={d} {label}",
                                kernel, args, kw))

    # -- codebook head: partial (greedy, sampling) and merge ---------------------------------------
    for dtype, prec in modes:
        for m in (1, 20, 64, 4096):  # block_m 16, 32, 64
            for sample in (False, True):
                for k, hd in HEADS:
                    for label, kernel, args, kw in head.compile_variants(
                            t(m, hd, dtype=dtype), t(k, hd, dtype=dtype), sample=sample,
                            precision=prec, sms=132):
                        out.append((f"head {str(dtype)[6:]}/{prec} M={m} K={k} H={hd} sample={sample} "
                                    f"{label}", kernel, args, kw))

    # -- fused cross-entropy: the row sweep at the vocabularies it meets ---------------------------
    for vocab in (97, 1000, 10_000, 30_522, 65_536):  # BLOCK 128 / 1024 (4 warps), 4096 (8 warps)
        for label, kernel, args, kw in flce.compile_variants(vocab):
            out.append((f"flce V={vocab} {label}", kernel, args, kw))

    # -- fused linear: a step's linears (QKV-sized, FFN up and down, head) at batch 1 and 64 ----
    for dtype in (torch.float32, torch.float16):  # fp32 (tf32x3) and 16-bit (bf16 compiles alike)
        for m in (64, 4096):
            for k, n in ((768, 768), (768, 3072), (3072, 768)):
                for label, kernel, args, kw in linear.compile_variants(m, k, n, dtype):
                    out.append((f"fused_linear {str(dtype)[6:]} M={m} K={k} N={n} {label}",
                                kernel, args, kw))
    return out


def _compile_all(archs):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
    results, seen = [], set()
    only = os.environ.get("XLX_FAST_COMPILE_ONLY", "")  # debugging: a substring of the labels
    for label, kernel, args, kw in _variants():
        if only not in label:
            continue
        for cap in archs:
            target = GPUTarget("cuda", cap, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, spec, opts = binder(*args, **kw)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
            src = ASTSource(kernel, signature, constexprs, attrs)
            # the kernel source (with everything it calls), constants, specialisation, target,
            # options and compiler version determine the binary
            key = hashlib.sha256(repr((src.hash(), cap, sorted(options.__dict__.items(), key=str),
                                       triton.__version__)).encode()).hexdigest()
            if key in seen:  # two labels that compile to the same kernel
                continue
            seen.add(key)
            report = _REPORTS / f"{key}.json"
            if report.exists():
                r = json.loads(report.read_text())
            else:
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(src, target=target, options=options.__dict__)
                m = _PTXAS.search(log.getvalue())
                if m is None:
                    raise RuntimeError(f"no ptxas report for {label} sm_{cap}:\n{log.getvalue()}")
                stack, spill_st, spill_ld, regs = map(int, m.groups())
                r = dict(regs=regs, stack=stack, spill_stores=spill_st, spill_loads=spill_ld,
                         shared=compiled.metadata.shared)
                try:  # only a speed-up for the next run
                    report.parent.mkdir(parents=True, exist_ok=True)
                    report.write_text(json.dumps(r))
                except OSError:
                    pass
            results.append(dict(label=label, arch=cap, **r))
    return results


def _step_specialisations():
    """How many distinct kernels codebook_head's sampling kernel would compile for step = 1, 5,
    16 and 32 (per-call values; 1 when step is not specialised)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from xlx_fast.ops import codebook_head as head

    backend = make_backend(GPUTarget("cuda", 90, 32))
    hashes = set()
    for step in (1, 5, 16, 32):
        h, w = torch.empty(64, 768, dtype=torch.float16), torch.empty(10000, 768, dtype=torch.float16)
        bias, seeds = torch.empty(10000), torch.empty(64, dtype=torch.int64)
        prob, ids = torch.empty(64), torch.empty(64, dtype=torch.int64)
        kernel, _, args, kw = head._launches(h, w, bias, seeds, prob, ids, 1.0, step, "tf32",
                                             sms=132, cuda=True)[0]
        kw["WIDEN"] = False
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*args, **kw)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
        hashes.add(ASTSource(kernel, signature, constexprs, attrs).hash())
    return len(hashes)


def _run_worker(archs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, __file__, *map(str, archs)], env=env,
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"compile worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def worker_output():
    return _run_worker(ARCHS)


@pytest.fixture(scope="module")
def compiled(worker_output):
    return worker_output["variants"]


def test_ptxas_ships_with_triton():
    from triton.backends.nvidia.compiler import get_ptxas
    path = get_ptxas(90).path
    assert os.access(path, os.X_OK), path
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    assert "Cuda compilation tools" in out


def test_every_variant_compiled(compiled):
    labels = {r["label"].split()[0] for r in compiled}
    assert labels == {"attention", "nearest", "head", "fused_linear", "flce"}, labels
    assert {r["arch"] for r in compiled} == set(ARCHS)


def test_no_spills_no_stack_frame(compiled):
    bad = [r for r in compiled if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    report = "\n".join(f"sm_{r['arch']} {r['label']}: {r['regs']} regs, stack {r['stack']} B, "
                       f"spill st/ld {r['spill_stores']}/{r['spill_loads']} B" for r in bad)
    assert not bad, f"{len(bad)} of {len(compiled)} variants spill:\n{report}"


def test_sampling_step_is_not_specialised(worker_output):
    """step changes every sampling step: were it specialised (== 1, multiple of 16), the sampling
    kernel would compile up to three times, some of them in the middle of a generation loop."""
    assert worker_output["step_specialisations"] == 1


def test_shared_memory_within_block_limit(compiled):
    bad = [r for r in compiled if r["shared"] > SMEM_LIMIT[r["arch"]]]
    report = "\n".join(f"sm_{r['arch']} {r['label']}: {r['shared']} B shared" for r in bad)
    assert not bad, report


if __name__ == "__main__":  # the worker: compile and print one JSON line
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    archs = [int(a) for a in sys.argv[1:]] or list(ARCHS)
    res = _compile_all(archs)
    if os.environ.get("XLX_FAST_COMPILE_REPORT"):
        for r in res:
            print(f"sm_{r['arch']} regs={r['regs']:3d} stack={r['stack']:6d} spill={r['spill_stores']}/"
                  f"{r['spill_loads']} shared={r['shared']:6d} {r['label']}", file=sys.stderr)
    print(json.dumps({"variants": res, "step_specialisations": _step_specialisations()}))
