"""What ran the benchmark: CPU and GPU names, library versions, xlx_fast's build and commit.

Recorded in every results JSON so that a number can always be traced to a machine and a tree.
Nothing here raises: a missing piece is reported as such ("not built", "not installed").
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Either gives the CPU bf16 arithmetic that torch's CPU GEMMs use (oneDNN); without them torch
# widens bf16 to fp32 element by element, 5x to 300x slower than its fp32 GEMM (ENV.md).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether this CPU has native bf16 arithmetic, why), from its flags (``cpu_flags()`` when
    ``flags`` is None). Unknown flags (not Linux) count as no native bf16."""
    flags = cpu_flags() if flags is None else set(flags)
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU has {' and '.join(found)}"
    if not flags:
        return False, "CPU flags unknown (no /proc/cpuinfo), so bf16 is taken to be emulated"
    return False, f"CPU has neither {' nor '.join(NATIVE_BF16_FLAGS)}: bf16 arithmetic is emulated"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def native_build() -> dict | str:
    """``xlx_fast.native.build_info()`` when the native module was built, else "not built"."""
    try:
        from xlx_fast import native
    except ImportError:
        return "not built"
    if native.load() is None:
        return f"not built ({native.load_error()})"
    return native.build_info()


def git_commit() -> str | None:
    """The source tree's commit (with ``-dirty`` if it has local changes), when run from a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    """A file-name-safe form (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "unknown"


def info(device) -> dict:
    """Everything the results JSON says about the machine."""
    import xlx_fast

    device = torch.device(device)
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
               "sm_count": props.multi_processor_count,
               "capability": f"{props.major}.{props.minor}"}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": native_bf16()[1],
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "xlx_fast": xlx_fast.__version__,
        "xlx_fast_commit": git_commit(),
        "xlx_fast_native": native_build(),
    }


# --------------------------------------------------------------------------------------------
# Load: was the machine quiet while timing?
# --------------------------------------------------------------------------------------------

def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS does not keep them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class LoadMeter:
    """What the machine's load was over a run: load averages at start and end, and the CPU time
    this process got against the wall time that passed (``cores_used``: the CPUs it had on
    average). ``getloadavg`` and the clocks are parameters so that a test can fake a busy machine."""

    def __init__(self, device_type: str = "cpu", threads: int | None = None, cpu_count: int | None = None,
                 getloadavg=None, clock=time.perf_counter, cpu_clock=time.process_time):
        self.device_type = device_type
        self.threads = torch.get_num_threads() if threads is None else threads
        self.cpu_count = (os.cpu_count() or 1) if cpu_count is None else cpu_count
        self._loadavg = getloadavg or load_average
        self._clock, self._cpu_clock = clock, cpu_clock
        self.load_start = self._loadavg()
        self._t0, self._c0 = clock(), cpu_clock()

    def record(self) -> dict:
        """The load so far (called after every case, and at the end), for the JSON's machine."""
        wall = max(self._clock() - self._t0, 1e-9)
        cpu = self._cpu_clock() - self._c0
        rec = {"loadavg_start": self.load_start, "loadavg_end": self._loadavg(),
               "cpu_count": self.cpu_count, "threads": self.threads,
               "process_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "cores_used": round(cpu / wall, 3)}
        rec["busy"] = busy_reasons(rec, self.device_type)
        return rec


# A process that asked for N threads and got under this share of min(N, cores) on average was
# starved (a quiet 2-core run of the sweep gets 1 to 2 cores; a loaded one far less).
MIN_CORE_SHARE = 0.4


def busy_reasons(rec: dict, device_type: str = "cpu") -> list[str]:
    """Why the timings of a run with load record ``rec`` (:meth:`LoadMeter.record`) are not to be
    trusted; empty for a quiet machine.

    Others' load is the 1-minute load average at the start, or at the end less what this process
    itself used; above the number of cores, others were waiting for the CPUs. On the CPU the
    process's own share is checked too (on a GPU it mostly waits for the device)."""
    reasons = []
    cores, used = rec["cpu_count"], rec["cores_used"]
    start, end = rec.get("loadavg_start"), rec.get("loadavg_end")
    others = ([start[0]] if start else []) + ([end[0] - used] if end else [])
    if others and max(others) > cores:
        reasons.append(f"1-min load average of other work {max(others):.1f} on {cores} cores")
    wanted = min(rec["threads"], cores)
    if device_type == "cpu" and rec["wall_s"] >= 1.0 and used < MIN_CORE_SHARE * wanted:
        reasons.append(f"this process got {used:.2f} CPUs on average for the {rec['threads']} threads it asked for")
    return reasons


def busy_warning(rec: dict) -> str | None:
    """One line for stderr when the run's timings are unreliable, else None."""
    if not rec.get("busy"):
        return None
    return (f"warning: the machine was busy while timing ({'; '.join(rec['busy'])}): speed-ups may be "
            f"far off; rerun on a quiet machine (load recorded in the JSON's machine.load)")
