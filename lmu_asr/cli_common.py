"""What every ``lmuasr`` subcommand shares: one-line user errors (exit 2), value types, LM options, --device.

Kept apart from ``lmu_asr.cli`` (which assembles the command group) so the command modules (``cli``,
``cli_tools``, ``bench.cli``) import it without importing each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from lmu_asr import UserError

EXIT_USER_ERROR = 2
POS = click.IntRange(min=1)  # click names the valid range in its message and exits 2
NONNEG = click.IntRange(min=0)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a subcommand, mapping expected failures to a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, OSError) as err:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get("debug"):
                raise
            if isinstance(err, OSError) and not isinstance(err, UserError):
                # permission denied, disk full, file too large, read-only filesystem...: what failed, and where
                from lmu_asr.fileio import os_error_message

                msg = os_error_message(err)
            else:
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def lm_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--lm, --lm-weight, --word-score, --lexicon/--no-lexicon: word-level decoding with an n-gram LM."""
    fn = click.option("--lexicon/--no-lexicon", default=None,
                      help="Spell only the lexicon's words (default; flashlight-text's decoder) or any letters.")(fn)
    fn = click.option("--word-score", type=float, help="Added per word (default: LM_DIR/tuned.json, else 0).")(fn)
    fn = click.option("--lm-weight", type=click.FloatRange(min=0), help="LM weight (default: tuned.json, else 0.5).")(fn)
    return click.option("--lm", "lm_dir", type=click.Path(path_type=Path),
                        help="An `lmuasr lm build` folder: beam search with its word LM and lexicon.")(fn)


def word_decoder(lm_dir: Path | None, beam: int, lm_weight: float | None, word_score: float | None,
                 lexicon: bool | None):  # noqa: ANN201 (WordDecoder | None)
    if lm_dir is None:
        if lm_weight is not None or word_score is not None or lexicon is not None:
            raise UserError("--lm-weight, --word-score and --lexicon go with --lm")
        return None
    from lmu_asr.lm.decode import WordDecoder, load_options

    if not lm_dir.is_dir():
        raise UserError(f"LM folder not found: {lm_dir}")
    return WordDecoder(lm_dir, load_options(lm_dir, lm_weight=lm_weight, word_score=word_score,
                                            beam=beam if beam > 1 else None, lexicon=lexicon))


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``"100,300,1000"`` -> [100, 300, 1000], or a one-line error naming the flag and the valid range."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise UserError(f"{flag}: every value must be an integer >= {minimum}, got {text!r}")
    return values


def _overrides(pairs: tuple[str, ...], **flags: object) -> dict[str, object]:
    """``--set section.field=value`` pairs plus the explicitly given flags (None = not given)."""
    out: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects section.field=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def resolve_device(device: str):  # noqa: ANN201 (torch.device)
    """auto -> cuda when available; shared by the subcommands that take --device."""
    import torch

    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def eval_vtln(model: Any, cfg: Any, device: Any, shard_set: Any, remote: Any, warps_text: str | None,
              band_edge_hz: float | None, words: Any, beam: int, label: str) -> dict[str, Any]:
    """``eval --vtln``: the set scored with one warp per speaker, by the decoder the other flags chose."""
    from lmu_asr.model.vtln import DEFAULT_WARPS, parse_warps
    from lmu_asr.train.evaluate import evaluate_vtln

    if remote is not None:
        raise UserError("--vtln needs a shard folder (it decodes the set once per warp), not URLs")
    if not shard_set.speakers():
        raise UserError(f"--vtln: the index of {shard_set.directory} names no speakers to choose warps for")
    try:
        warps = parse_warps(warps_text) if warps_text is not None else DEFAULT_WARPS
    except ValueError as err:
        raise UserError(f"--warps: {err}") from None
    decoders = {label: words.decode if words else None}
    return evaluate_vtln(model, shard_set, cfg, device, warps, decoders, band_edge_hz, beam)[label + "+vtln"]
