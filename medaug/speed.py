"""Run-time speed choices shared by generation and training: torch threads from the cores actually free, the
precision a device runs fast at, and the default sampler. Each choice is measured in benchmarks/RESULTS.md ("Speed").

- Threads: on a shared machine, torch's default (one thread per core) oversubscribes the cores another job holds,
  and every step then waits on a descheduled thread (measured: ~10x slower). `choose_threads()` counts the cores
  idle over a short sample of /proc/stat and uses that many; `MEDAUG_NUM_THREADS` or `OMP_NUM_THREADS` set by the
  user win.
- Batch size: "auto" for sampling takes the largest power of two up to a cap (on a CPU, 8: images/s stop rising
  there) whose estimated memory fits the memory free now (`auto_batch_size`).
- Precision: "auto" means bf16 autocast where the hardware computes bf16 natively (a CUDA GPU that supports it,
  or a CPU with AVX512-BF16 or AMX-BF16), fp32 elsewhere. Emulated bf16 on an older CPU is slower than fp32, so
  it is never chosen there.
"""

from __future__ import annotations

import contextlib
import os
import time
from functools import lru_cache

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The default sampler of `medaug generate`: DPM-Solver++ at this many steps matched 20 DDIM steps' quality in
# benchmarks/RESULTS.md ("Speed"), by Fréchet distance against the real set and by distance to the converged sampler.
DEFAULT_SCHEDULER = "dpm++"
DEFAULT_STEPS = 10
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
THREAD_VARIABLES = ("MEDAUG_NUM_THREADS", "OMP_NUM_THREADS")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 natively, so that bf16 autocast is faster than fp32 there."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)
    return False


def resolve_precision(precision: str, device) -> str:
    """"fp32", "bf16" or "fp16" for `precision` (one of PRECISIONS) on `device`; refuses what cannot run."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"--precision: unknown precision '{precision}'; expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16: CPUs have no fast fp16 arithmetic; use bf16 or fp32")
    return precision


def autocast(precision: str, device):
    """A context that runs `device`'s work at `precision` ("fp32": plain fp32, nothing changes)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)


def training_precision(requested: str | None, device) -> str:
    """accelerate's mixed_precision for a training script's --mixed_precision: given, set by `accelerate launch`
    (its config), or for "auto" bf16 where the device computes it natively, "no" elsewhere."""
    if requested not in (None, "auto"):
        return requested
    configured = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if configured:
        return configured
    return "bf16" if native_bf16(device) else "no"


def frozen_weight_dtype(mixed_precision: str, device, takes_fp32_inputs: bool = False):
    """The dtype training stores frozen weights (and their inputs) in: the mixed precision's. Measured on the CPU
    (a LoRA step of the small UNet at 128 px): 295 ms fp32, 248 ms bf16 autocast over fp32 weights, 213 ms over
    bf16 weights. Except on a CPU for a module that takes fp32 tensors it cannot cast (`takes_fp32_inputs`: the
    UNet in a stock ControlNet pipeline, fed the fp32 residuals of accelerate's prepared ControlNet): CPU autocast,
    unlike CUDA's, does not lift group norms to fp32, so their weights must stay fp32 there."""
    import torch

    if takes_fp32_inputs and torch.device(device).type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def idle_cores(sample_seconds: float = 0.25) -> float | None:
    """How many cores were idle over a short sample (/proc/stat), or None where it cannot be read."""
    def totals():
        with open("/proc/stat", encoding="utf-8") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time (counted in user)

    try:
        idle_before, total_before = totals()
        time.sleep(sample_seconds)
        idle_after, total_after = totals()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    if elapsed <= 0:
        return None
    return len(os.sched_getaffinity(0)) * (idle_after - idle_before) / elapsed


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_choice() -> tuple[int, str]:
    """(torch threads, why): the user's MEDAUG_NUM_THREADS or OMP_NUM_THREADS, else the cores now idle."""
    for variable in THREAD_VARIABLES:
        value = os.environ.get(variable)
        if value:
            try:
                threads = int(value)
            except ValueError:
                raise ValueError(f"{variable}={value!r}: expected a whole number of threads") from None
            if threads < 1:
                raise ValueError(f"{variable}={value!r}: at least 1 thread")
            return threads, f"{variable}={threads}"
    cores = usable_cores()
    idle = idle_cores()
    if idle is None:
        return cores, f"{cores} cores (idle time unreadable)"
    threads = max(1, min(cores, round(idle)))
    return threads, f"{threads} of {cores} cores idle"


_chosen: tuple[int, str] | None = None


def choose_threads() -> tuple[int, str]:
    """Set torch's thread count from `thread_choice()` and return it with the reason. A process chooses once, at
    its first heavy step; later calls keep that choice, so a long process does not shrink mid-run."""
    import torch

    global _chosen
    if _chosen is None:
        _chosen = thread_choice()
        torch.set_num_threads(_chosen[0])
    return _chosen


# Sampling memory an image costs, in bytes per latent pixel per channel of the UNet's widest block, with guidance and
# at 16 bits: ~60-95 for the small preset on a CPU (UNet only; ru_maxrss over batches 4-32) and ~115 for SD 1.5 with a
# ControlNet on an H200 (peak at batch 4 less the weights, VAE decode included); rounded up. fp32 doubles it.
SAMPLING_BYTES_PER_CHANNEL_PIXEL = 128
# Batch caps: on a CPU, `medaug generate`'s images/s for the small preset rose up to batch 4-8 and not measurably
# beyond (benchmarks/generate_options.py: 0.52x, 0.68x, 1.00x, 1.06x, 1.19x of batch 4 at 1, 2, 4, 8, 16, with a
# host noise of ~15%; RESULTS.md). On CUDA the cap is a memory guard only: bigger batches' speed there is unmeasured.
AUTO_BATCH_CAP = {"cpu": 8, "cuda": 16}
MEMORY_FRACTION = {"cpu": 0.5, "cuda": 0.8}  # of the memory free now that one batch may take


def free_memory_bytes(device) -> int | None:
    """Memory free now for `device`: CUDA's free device memory, a CPU's MemAvailable; None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def sampling_bytes_per_image(latent_pixels: int, widest_channels: int, precision: str) -> int:
    return SAMPLING_BYTES_PER_CHANNEL_PIXEL * latent_pixels * widest_channels * (2 if precision == "fp32" else 1)


def auto_batch_size(per_image_bytes: int, device, free_bytes: int | None = None) -> tuple[int, str]:
    """(batch size, why): the largest power of two up to the device's cap whose `per_image_bytes` fit its share of
    the free memory (`free_bytes`, read now when not given); at least 1."""
    import torch

    kind = torch.device(device).type
    cap = AUTO_BATCH_CAP.get(kind, 1)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    if free is None:
        return cap, f"auto: {cap}, the {kind} cap (free memory unknown)"
    batch = cap
    while batch > 1 and batch * per_image_bytes > MEMORY_FRACTION.get(kind, 0.5) * free:
        batch //= 2
    return batch, (f"auto: {batch} (about {per_image_bytes / 2**20:.0f} MiB an image, {free / 2**30:.1f} GiB free, "
                   f"at most {cap} on a {kind})")
