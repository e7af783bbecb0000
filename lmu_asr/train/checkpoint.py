"""Checkpoints: atomic writes, everything needed for an exact resume, and loading for inference.

``RUN/checkpoints/last.pt`` (every ``--save-every`` steps and on preemption) holds the model, optimiser,
scheduler, grad scaler, RNG states, the step counter and the loader position (epoch, batch within the epoch).
``checkpoint_epoch_{e}.pt`` is written after each epoch and ``checkpoint_epoch_{e}_best.pt`` when the dev WER
improves (the previous best is removed, so there is one). Every file is written to a temporary name, synced, and
renamed: a kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmu_asr import UserError, __version__
from lmu_asr.config import Config, config_from_dict


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a damaged or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu"):  # noqa: ANN201
    """(model in eval mode, config) from any checkpoint this project writes."""
    from lmu_asr.model.asr import LMUASR

    ckpt = load(path, map_location="cpu")
    if "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not an lmu-asr checkpoint")
    cfg: Config = config_from_dict(ckpt["config"])
    model = LMUASR(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def checkpoint_payload(model: torch.nn.Module, cfg: Config, **state: Any) -> dict[str, Any]:
    return {"version": __version__, "config": cfg.to_dict(), "model": model.state_dict(), "rng": rng_state(),
            **state}


def save_best(payload: dict[str, Any], ckpt_dir: Path, epoch: int) -> Path:
    path = ckpt_dir / f"checkpoint_epoch_{epoch}_best.pt"
    atomic_save(payload, path)
    for old in ckpt_dir.glob("checkpoint_epoch_*_best.pt"):
        if old != path:
            old.unlink()
    return path
