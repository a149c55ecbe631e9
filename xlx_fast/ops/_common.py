"""What every op module shares: the one Triton import, the dtypes the kernels take, and the
argument checks that turn bad input into a ``TypeError``/``ValueError`` naming the argument.

Triton is optional (a CPU-only install runs the torch paths): ``HAS_TRITON`` says whether it
imported, and ``triton``/``tl`` are None without it. Kernels are defined under
``if HAS_TRITON:`` in their own modules. ``interpreting()`` is true under ``TRITON_INTERPRET=1``
(set before triton's first import), where kernels run on CPU tensors, slowly: tests only.

The checks read metadata only (type, dtype, rank, shape, device, strides): none of them looks
at values, so none syncs with a GPU, and they trace under ``torch.compile`` without a break.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch paths work without it
    triton = None
    tl = None

__all__ = ["inference_op", "triton", "tl", "HAS_TRITON", "interpreting", "native_bf16_dot", "FLOAT_DTYPES",
           "INDEX_DTYPES", "DEVICE_TYPES", "dtype_names", "check_tensor", "check_dtype", "check_device",
           "check_same_dtype", "check_choice", "check_int"]

HAS_TRITON = triton is not None

# what the kernels take as data (fp32 accumulation for all three) and as indices
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
# where some backend of every op runs (the registry says which); anything else is refused
# before an op is called, since a custom op on meta tensors would run its fake implementation
DEVICE_TYPES = ("cpu", "cuda")


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and bool(triton.knobs.runtime.interpret)


def native_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16), as the CPU
    paths that run bfloat16 GEMMs for speed need."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """(float32, float16, bfloat16) -> 'float32, float16 or bfloat16'."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 dim: int | None = None, layout: str | None = None,
                 shape: Sequence[int | None] | None = None, device: torch.device | None = None,
                 device_of: str | None = None, contiguous: bool = False) -> torch.Tensor:
    """Check one tensor argument; returns it. Raises ``TypeError`` (not a tensor, wrong dtype)
    or ``ValueError`` (rank, shape, device, contiguity), the message starting with ``name``.

    ``dtypes``: the accepted dtypes. ``dim``: the rank; ``layout`` (e.g. ``"(B, L, H·d)"``)
    words the rank error as "must have shape <layout>". ``shape``: the exact shape, None
    entries free. ``device``: where it must be, named ``device_of`` (another argument) in the
    message. ``contiguous``: a dense row-major layout is required.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        check_dtype(name, t.dtype, dtypes)
    if dim is not None and t.dim() != dim:
        if layout is not None:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None and (t.dim() != len(shape)
                              or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        where = f"{device_of} is on {device}" if device_of else f"expected {device}"
        raise ValueError(f"{name} is on {t.device} but {where}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return t


def check_dtype(name: str, dtype: torch.dtype, dtypes: Sequence[torch.dtype]) -> None:
    """``TypeError`` unless ``dtype`` (of argument ``name``) is one of ``dtypes``."""
    if dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {dtype}")


def check_device(name: str, t: torch.Tensor) -> None:
    """``ValueError`` unless ``t`` is on a device type the ops run on (CPU or CUDA)."""
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {t.device} for {name}")


def check_same_dtype(name: str, t, ref_name: str, ref) -> None:
    """``TypeError`` unless ``t`` has the dtype of ``ref`` (tensors or dtypes)."""
    a, b = getattr(t, "dtype", t), getattr(ref, "dtype", ref)
    if a != b:
        raise TypeError(f"{name} dtype {a} differs from {ref_name} dtype {b}")


def check_choice(name: str, value, choices: Sequence) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_int(name: str, value, lo: int, hi: int, *, hi_text: str | None = None) -> int:
    """``value`` as an int in [lo, hi); ``TypeError`` for a non-integer (bool included),
    ``ValueError`` out of range. ``hi_text`` words the bound (e.g. ``"2^31"``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not lo <= value < hi:
        raise ValueError(f"{name} must be in [{lo}, {hi_text or hi}), got {value}")
    return value


# The custom ops of inference (no autograd formula) are declared with torch.library's schema API
# rather than ``custom_op``: the same custom ops to the dispatcher, torch.compile and torch.export
# (a schema, a CPU and a CUDA kernel, a fake), without custom_op's Python autograd layer, which
# cost ~17 µs a call on a CPU -- a sampling step calls them about 60 times.
_LIB = torch.library.Library("xlx_fast", "FRAGMENT")


def inference_op(schema: str, kernel, fake) -> None:
    """Declare ``xlx_fast::<schema>`` (e.g. ``"f(Tensor x, int n) -> Tensor"``) with ``kernel``
    for CPU and CUDA tensors and ``fake`` for tracing. The op returns new tensors and mutates
    nothing."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    torch.library.register_fake(f"xlx_fast::{name}", fake, lib=_LIB)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, kernel, key)


# A float32 GEMM of 5 to 15 rows runs slower on x86 CPUs (MKL) than one of 16: measured on the
# 2-core Xeon of the committed CPU results, [M, 768] x [768, 3072] took 0.69 ms at M = 12,
# 0.85 ms at 14 and 0.47 ms at 16, and x [768, 30522] 7.4, 9.2 and 4.7 ms. At batch 1 a
# caption's or a question's text is such a GEMM in every layer; the front ends that may pad it
# (with masked positions, which change no result) pad it to 16 rows on a CPU. Not against
# packed weights (``ops.frozen_weights``): there fewer rows cost less (0.27 ms at 10 rows, 0.33
# at 16), so a frozen model's question runs at its own length. Captions keep 16 rows even
# frozen: a text of 16 or more rows gives the same bits as the server's 18-word caption engine
# (measured: 16 and 18 agree, 12 does not: the attention over fewer padded keys rounds
# otherwise), and the server's captions are held equal to the library's.
CPU_GEMM_MIN_ROWS = 16


def cpu_gemm_rows(rows: int, device, packed: bool = False) -> int:
    """The rows worth running a CPU GEMM at for ``rows`` real ones (see above); ``rows`` on
    other devices, against packed weights, and below 5 rows (a matrix-vector product, faster
    still)."""
    if not packed and torch.device(device).type == "cpu" and 4 < rows < CPU_GEMM_MIN_ROWS:
        return CPU_GEMM_MIN_ROWS
    return rows
