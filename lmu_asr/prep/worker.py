"""The per-recording prep job: decode the audio once, compute fbank once, cut every segment out of it.

GigaSpeech recordings run for up to hours with hundreds of segments; decoding the opus file once per segment is
the classic slow path (``lmuasr bench prep`` measures the difference). Segment frames are taken from the
recording's feature matrix the way lhotse cuts precomputed recording features: first frame
``round(start / 10 ms)``, ``num_frames(duration)`` frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from lmu_asr.prep.features import SAMPLE_RATE, AudioError, compute_fbank, load_audio, resample
from lmu_asr.prep.plan import RecordingJob, reject

MIN_SAMPLE_RATE = 8_000
END_SLACK_FRAMES = 5  # a segment may end this many frames past the decoded audio (codec padding); it is clipped


@dataclass
class RecordingResult:
    recording_id: str
    features: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (frames, 80) float16
    rejected: list[dict] = field(default_factory=list)
    decoded_seconds: float = 0.0
    decoded_rate: int = 0


def decode_recording(job: RecordingJob) -> tuple[np.ndarray, int]:
    """Mono float32 samples at 16 kHz and the rate the source decoded at; AudioError with a reason otherwise."""
    declared = int(job.recording.get("sampling_rate", SAMPLE_RATE))
    if declared < MIN_SAMPLE_RATE:
        raise AudioError(f"manifest sample rate {declared} Hz is below {MIN_SAMPLE_RATE} Hz")
    if job.path is not None:
        if not os.path.isfile(job.path):
            raise AudioError(f"audio file not found: {job.path}")
        samples, rate = load_audio(job.path, expected_rate=declared)
    else:  # URLs, commands, in-memory sources: lhotse knows how to load them
        from lhotse import Recording

        try:
            audio = Recording.from_dict(job.recording).load_audio()
        except Exception as err:  # lhotse raises many types for unreadable sources
            raise AudioError(f"lhotse cannot load {job.recording_id}: {str(err).splitlines()[0]}") from None
        rate = declared
        samples = resample(np.asarray(audio, dtype=np.float32).mean(axis=0), rate)
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(f"audio decodes at {rate} Hz, below {MIN_SAMPLE_RATE} Hz")
    return samples, rate


def featurize_recording(job: RecordingJob) -> RecordingResult:
    """Features of every planned segment of one recording (never raises for bad audio: rejects instead)."""
    result = RecordingResult(job.recording_id)
    try:
        samples, result.decoded_rate = decode_recording(job)
        feats = compute_fbank(samples)
    except AudioError as err:
        result.rejected = [reject(s.key, job.recording_id, "unreadable_audio", str(err)) for s in job.segments]
        return result
    result.decoded_seconds = samples.size / SAMPLE_RATE
    total = feats.shape[0]
    for seg in job.segments:
        first = round(seg.start * 100)
        n = seg.num_frames
        if first >= total or first + n > total + END_SLACK_FRAMES:
            result.rejected.append(reject(seg.key, job.recording_id, "segment_past_audio_end",
                                          f"{seg.start:.2f}+{seg.duration:.2f}s but the audio decodes to "
                                          f"{result.decoded_seconds:.2f}s"))
            continue
        result.features[seg.key] = feats[first:first + min(n, total - first)].astype(np.float16)
    return result


def init_worker() -> None:
    """Process-pool initializer: one thread per process (parallelism comes from --jobs)."""
    import torch

    torch.set_num_threads(1)
