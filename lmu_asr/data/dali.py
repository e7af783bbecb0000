"""NVIDIA DALI loader over the same shards (``--loader dali``); see ``DaliSource`` below."""

from __future__ import annotations

import torch

from lmu_asr import UserError


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """--loader dali needs the nvidia-dali package and a CUDA GPU; say which is missing in one line."""
    if not dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install 'lmu-asr[dali]' (nvidia-dali-cuda120)")
    if not torch.cuda.is_available():
        raise UserError("--loader dali decodes on the GPU and no CUDA device is available; use --loader wds")
