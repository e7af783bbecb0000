"""``lmuasr transcribe``: audio files -> text with a trained checkpoint, whole-utterance or streaming.

Features are computed exactly as prep computes them (``lmu_asr.prep.features``), from any format soundfile reads
and any sample rate (resampled to 16 kHz). ``--streaming`` feeds the model fixed-size chunks through the LMU's
step form and the attention KV cache (``Encoder.stream``): with a causal/window-attention model it prints the same
text as whole-utterance decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmu_asr.model.asr import LMUASR
from lmu_asr.model.decode import decode_texts
from lmu_asr.prep.features import AudioError, compute_fbank, load_audio


def features_of(path: str | Path) -> torch.Tensor:
    samples, _ = load_audio(path)
    return torch.from_numpy(compute_fbank(samples))


@torch.no_grad()
def transcribe_features(model: LMUASR, feats: torch.Tensor, beam: int = 0, words: Any = None) -> str:
    device = next(model.parameters()).device
    x = feats[None].to(device)
    logits, out_lengths = model(x, torch.tensor([feats.shape[0]], device=device))
    if words is not None:  # a WordDecoder: beam search with the word LM
        return words.decode(logits[0].float().log_softmax(-1).cpu().numpy())
    return decode_texts(logits.float(), out_lengths, beam)[0]


@torch.no_grad()
def stream_chunks(model: LMUASR, feats: torch.Tensor, chunk_frames: int = 32) -> Iterator[torch.Tensor]:
    """Logits of a stream chunk by chunk, as a live microphone would deliver the audio."""
    device = next(model.parameters()).device
    state = model.encoder.stream_init()
    for start in range(0, feats.shape[0], chunk_frames):
        chunk = feats[start:start + chunk_frames][None].to(device)
        yield model.stream(chunk, state, final=start + chunk_frames >= feats.shape[0])


def stream_logits(model: LMUASR, feats: torch.Tensor, chunk_frames: int = 32) -> torch.Tensor:
    """Logits of a whole stream computed chunk by chunk."""
    return torch.cat(list(stream_chunks(model, feats, chunk_frames)), dim=1)


def transcribe_files(model: LMUASR, paths: list[Path], beam: int = 0, streaming: bool = False,
                     chunk_frames: int = 32, words: Any = None) -> Iterator[tuple[Path, str | None, str | None]]:
    """(path, text, error) per file; an unreadable file yields its one-line error instead of stopping."""
    for path in paths:
        try:
            feats = features_of(path)
            if streaming and words is not None:  # the LM decoder takes each chunk as it comes
                words.begin()
                for logits in stream_chunks(model, feats, chunk_frames):
                    words.step(logits[0].float().log_softmax(-1).cpu().numpy())
                text = words.end()
            elif streaming:
                logits = stream_logits(model, feats, chunk_frames)
                text = decode_texts(logits.float(), torch.tensor([logits.shape[1]]), beam)[0]
            else:
                text = transcribe_features(model, feats, beam, words)
        except (AudioError, OSError) as err:
            yield path, None, f"{path}: {err}" if str(path) not in str(err) else str(err)
            continue
        except Exception as err:  # one file must never stop the others; its error is reported in one line
            yield path, None, f"{path}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
            continue
        yield path, text, None
