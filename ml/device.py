"""Which torch device this process should use."""

from __future__ import annotations

import platform

import torch


def best_device() -> torch.device:
    """CUDA when a GPU is visible to this process, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device() -> dict[str, object]:
    """What torch sees here: for operators checking GPU workers."""
    cuda = torch.cuda.is_available()
    return {
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": cuda,
        "device": str(best_device()),
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
    }
