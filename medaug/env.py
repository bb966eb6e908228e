"""What `medaug env` prints: library versions and accelerator support, for bug reports and run logs."""

from __future__ import annotations

import importlib.util
import platform
from importlib import metadata

REPORTED_PACKAGES = (
    "medaug", "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "monai",
    "segmentation-models-pytorch", "opencv-python-headless", "pydicom", "nibabel",
)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_report() -> dict:
    """Versions, CUDA devices and attention backends, without importing optional packages like xformers."""
    import torch

    cuda = torch.cuda.is_available()
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in REPORTED_PACKAGES},
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "sdpa_available": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "xformers_installed": importlib.util.find_spec("xformers") is not None,
        "xformers_version": package_version("xformers"),
        "cpu_threads": torch.get_num_threads(),
    }
    report.update(speed_report())
    return report


def speed_report() -> dict:
    """What medaug's heavy commands would choose now (medaug.speed): threads from the idle cores, precision, and the
    attention training would use on the CPU."""
    from medaug.speed import (cpu_flags, native_bf16, resolve_precision, thread_choice, training_precision,
                              usable_cores)
    from medaug.training.base_model import training_attention

    threads, reason = thread_choice()
    return {"usable_cores": usable_cores(), "medaug_threads": threads, "medaug_threads_reason": reason,
            "cpu_bf16_native": native_bf16("cpu"), "cpu_bf16_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
            "generate_precision_cpu": resolve_precision("auto", "cpu"),
            "train_attention_cpu": training_attention(False, training_precision("auto", "cpu"), "cpu")}
