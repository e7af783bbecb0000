"""Checkpoints: atomic writes, everything needed for an exact resume, and loading for inference.

``RUN/checkpoints/last.pt`` (every ``--save-every`` steps and on preemption) holds the model, optimiser,
scheduler, grad scaler, RNG states, the step counter and the loader position (epoch, batch within the epoch).
``checkpoint_epoch_{e}.pt`` is written after each epoch and ``checkpoint_epoch_{e}_best.pt`` when the dev WER
improves (the previous best is removed, so there is one). Every file is written to a temporary name, synced, and
renamed: a kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmu_asr import UserError, __version__
from lmu_asr.config import Config, config_from_dict
from lmu_asr.fileio import atomic_write_with


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill or a full disk never leaves half a checkpoint.

    The checkpoint is serialised in memory first: torch's zip writer turns a failed write (disk full, file too
    large) into an opaque RuntimeError, while a plain write of the bytes raises the OSError that says what failed.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_with(path, lambda f: f.write(buf.getbuffer()))


def rng_state() -> dict[str, Any]:
    """RNG states as plain types and tensors only (what ``torch.load(weights_only=True)`` accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_globals() -> list[Any]:
    """What checkpoints of earlier versions of this project hold besides tensors: a numpy RNG state (an array)."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    out: list[Any] = [np.ndarray, np.dtype, (reconstruct, "numpy.core.multiarray._reconstruct"),
                      (reconstruct, "numpy._core.multiarray._reconstruct")]
    uint32 = getattr(getattr(np, "dtypes", None), "UInt32DType", None)
    if uint32 is not None:
        out.append(uint32)
    return out


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain types only (``weights_only``), never arbitrary objects.

    A file that needs anything else (a pickled class, a function call: how a crafted checkpoint runs code) is
    refused with a one-line error; the numpy array of an older checkpoint's RNG state is the one exception.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserError(f"refusing to load {path}: it would call {found.group(1)} (only tensors and plain data "
                            "are loaded; this file was not written by lmu-asr or was altered)") from None
        detail = str(err).strip().splitlines()[-1][:120] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or damaged ({detail})") from None
    except Exception as err:  # a truncated, damaged or foreign file
        raise UserError(f"cannot read checkpoint {path}: not a complete PyTorch checkpoint "
                        f"({type(err).__name__}: {str(err).strip()[:120]})") from None


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


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint_epoch_{e}.pt`` of a run (not the best copy), in epoch order."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("checkpoint_epoch_*.pt")
             if (m := re.fullmatch(r"checkpoint_epoch_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def average(paths: list[Path]) -> dict[str, Any]:
    """The element-wise mean of the weights of checkpoints of one model (the same config and tensors).

    Averaging the last few epochs' weights smooths the noise of the final steps; it needs no data and gives a
    checkpoint ``eval``, ``transcribe`` and ``export`` take like any other. Float tensors are averaged in float64;
    integer buffers are taken from the last checkpoint.
    """
    if len(paths) < 2:
        raise UserError("averaging needs at least two checkpoints")
    states = [load(p) for p in paths]
    for p, st in zip(paths, states, strict=True):
        if "model" not in st or "config" not in st:
            raise UserError(f"{p} is not an lmu-asr checkpoint")
        if st["config"]["model"] != states[-1]["config"]["model"]:
            raise UserError(f"{p} is a different model (model config differs from {paths[-1]})")
        if st["model"].keys() != states[-1]["model"].keys():
            raise UserError(f"{p} holds other tensors than {paths[-1]}")
    model = {}
    for name, last in states[-1]["model"].items():
        if last.is_floating_point():
            total = sum(st["model"][name].double() for st in states)
            model[name] = (total / len(states)).to(last.dtype)
        else:
            model[name] = last
    return {"version": __version__, "config": states[-1]["config"], "model": model,
            "averaged_from": [str(p) for p in paths], "step": states[-1].get("step"),
            "epoch": states[-1].get("epoch")}
