"""``lmuasr bench prep``: feature-prep throughput per core, ours against the naive approaches, on one corpus.

All approaches run in this process (one core each, side by side, on the same segments):

* ``lmuasr prep``: decode each recording once, fbank once, cut every segment (``featurize_recording``);
* ``naive (decode per segment)``: decode the whole file again for every segment, then fbank of the segment: what
  an on-the-fly loader does per utterance;
* ``lhotse per-cut``: ``cut.trim_to_supervisions()`` then ``cut.compute_features(Fbank())`` per segment, lhotse's
  own loading of each supervision's audio.

It also compares the fbank extractors (lhotse ``Fbank`` against kaldi-native-fbank when installed) and measures
the zstd trade-off on the real fbank: size ratio and decode speed against plain ``.npy``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lmu_asr.bench.report import environment, markdown_table, write_report
from lmu_asr.prep.features import compute_fbank, load_audio
from lmu_asr.prep.plan import RecordingJob, recordings_from_cuts
from lmu_asr.prep.shards import decode_fbank, npy_bytes
from lmu_asr.prep.worker import featurize_recording


def _seconds(jobs: list[RecordingJob]) -> float:
    return sum(s.duration for j in jobs for s in j.segments)


def run_ours(jobs: list[RecordingJob]) -> tuple[float, dict[str, np.ndarray]]:
    t = time.perf_counter()
    feats: dict[str, np.ndarray] = {}
    for job in jobs:
        feats.update(featurize_recording(job).features)
    return time.perf_counter() - t, feats


def run_naive(jobs: list[RecordingJob]) -> float:
    t = time.perf_counter()
    for job in jobs:
        for seg in job.segments:
            samples, _ = load_audio(job.path)  # the whole file, again, for this one segment
            a = round(seg.start * 16000)
            compute_fbank(samples[a:a + round(seg.duration * 16000)])
    return time.perf_counter() - t


def run_lhotse_per_cut(cuts: Any) -> float:
    from lhotse import Fbank

    extractor = Fbank()
    t = time.perf_counter()
    for cut in cuts.trim_to_supervisions(keep_overlapping=False):
        extractor.extract(cut.load_audio(), cut.sampling_rate)
    return time.perf_counter() - t


def extractor_speed(samples: np.ndarray) -> list[dict[str, Any]]:
    """x real time per core of lhotse Fbank and (if installed) kaldi-native-fbank on the same audio."""
    from lhotse import Fbank

    seconds = samples.size / 16000
    rows = []
    fb = Fbank()
    fb.extract(samples[:16000], 16000)
    t = time.perf_counter()
    fb.extract(samples, 16000)
    rows.append({"extractor": "lhotse Fbank", "x_real_time": seconds / (time.perf_counter() - t)})
    try:
        import kaldi_native_fbank as knf
    except ImportError:
        rows.append({"extractor": "kaldi-native-fbank", "x_real_time": None, "note": "not installed"})
        return rows
    opts = knf.FbankOptions()
    opts.frame_opts.dither, opts.frame_opts.snip_edges, opts.mel_opts.num_bins = 0.0, False, 80
    opts.mel_opts.high_freq = -400
    t = time.perf_counter()
    f = knf.OnlineFbank(opts)
    f.accept_waveform(16000, samples)
    f.input_finished()
    np.stack([f.get_frame(i) for i in range(f.num_frames_ready)])
    rows.append({"extractor": "kaldi-native-fbank", "x_real_time": seconds / (time.perf_counter() - t)})
    return rows


def zstd_tradeoff(feats: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    import zstandard

    payloads = [npy_bytes(x) for x in feats.values()]
    raw = sum(len(p) for p in payloads)
    t = time.perf_counter()
    for p in payloads:
        decode_fbank(p)
    plain_s = time.perf_counter() - t
    rows = [{"encoding": "npy (float16)", "bytes": raw, "ratio": 1.0, "decode_utt_per_s": len(payloads) / plain_s,
             "decode_mb_per_s": raw / plain_s / 1e6}]
    for level in (1, 3, 9):
        packed = [zstandard.ZstdCompressor(level=level).compress(p) for p in payloads]
        t = time.perf_counter()
        for p in packed:
            decode_fbank(p, compressed=True)
        dt = time.perf_counter() - t
        size = sum(len(p) for p in packed)
        rows.append({"encoding": f"npy + zstd level {level}", "bytes": size, "ratio": size / raw,
                     "decode_utt_per_s": len(packed) / dt, "decode_mb_per_s": raw / dt / 1e6})
    return rows


def build_bench_corpus(speech_dir: Path, out: Path, seed: int = 0) -> Path:
    """Long recordings (60-120 utterances each) from a transcripts.tsv folder, as GigaSpeech recordings are long."""
    from lmu_asr.prep.minicorpus import build_gigaspeech_corpus, speech_dir_utterances

    if not (out / "GigaSpeech.json").is_file():
        build_gigaspeech_corpus(speech_dir_utterances(speech_dir, lambda row: "XS"), out, per_recording=(60, 120),
                                seed=seed, garbage_prob=0.0)
    return out


def bench_prep(corpus_dir: Path, subset: str, out_dir: Path, max_recordings: int = 4) -> dict[str, Any]:
    from lmu_asr.prep.corpus import load_gigaspeech

    cuts, _, _, _ = load_gigaspeech(corpus_dir, subset.upper(), out_dir / "work" / "manifests", 1)
    jobs, _ = recordings_from_cuts(cuts)
    jobs = sorted(jobs, key=lambda j: j.recording_id)[:max_recordings]
    keep = {j.recording_id for j in jobs}
    from lhotse import CutSet

    sub_cuts = CutSet.from_cuts(c for c in cuts if c.recording_id in keep)
    seconds = _seconds(jobs)
    n_segments = sum(len(j.segments) for j in jobs)
    run_ours(jobs[:1])  # warm caches (extractor, resampler) for everyone
    ours_s, feats = run_ours(jobs)
    naive_s = run_naive(jobs)
    lhotse_s = run_lhotse_per_cut(sub_cuts)
    rows = [
        {"approach": "lmuasr prep (decode once per recording)", "seconds": ours_s,
         "audio_s_per_s": seconds / ours_s, "utt_per_s": n_segments / ours_s, "speedup": 1.0},
        {"approach": "naive (decode the file per segment)", "seconds": naive_s,
         "audio_s_per_s": seconds / naive_s, "utt_per_s": n_segments / naive_s, "speedup": ours_s / naive_s},
        {"approach": "lhotse per-cut compute_features", "seconds": lhotse_s,
         "audio_s_per_s": seconds / lhotse_s, "utt_per_s": n_segments / lhotse_s, "speedup": ours_s / lhotse_s},
    ]
    rec_minutes = [j.duration / 60 for j in jobs]
    samples = np.concatenate([load_audio(j.path)[0] for j in jobs[:3]])
    extractors = extractor_speed(samples)
    zstd = zstd_tradeoff(feats)
    data = {"env": environment(), "corpus": str(corpus_dir), "subset": subset, "recordings": len(jobs),
            "segments": n_segments, "segment_audio_seconds": seconds,
            "recording_minutes": {"mean": float(np.mean(rec_minutes)), "max": float(np.max(rec_minutes))},
            "approaches": rows, "extractors": extractors, "zstd": zstd,
            "ratio_vs_naive": naive_s / ours_s, "ratio_vs_lhotse_per_cut": lhotse_s / ours_s}
    body = (f"{len(jobs)} recordings (mean {np.mean(rec_minutes):.1f} min), {n_segments} segments, "
            f"{seconds:.0f} s of segment audio; one process, all approaches in the same run.\n\n"
            + markdown_table([{**r, "ratio": f"{r['audio_s_per_s'] / rows[0]['audio_s_per_s']:.3f}x"}
                              for r in rows],
                             [("approach", "approach"), ("audio_s_per_s", "audio-s/s per core"),
                              ("utt_per_s", "utt/s"), ("ratio", "relative to ours")])
            + "\n\nThe gap grows with recording length: GigaSpeech recordings run for tens of minutes to hours, "
              "so the naive approach decodes each file hundreds of times.\n\n## Fbank extractors\n\n"
            + markdown_table(extractors, [("extractor", "extractor"), ("x_real_time", "x real time per core")])
            + "\n\n## zstd on real fbank (float16 .npy members)\n\n"
            + markdown_table(zstd, [("encoding", "encoding"), ("ratio", "size vs npy"),
                                    ("decode_utt_per_s", "decode utt/s"), ("decode_mb_per_s", "decode MB/s")]))

    def plot(fig: Any) -> None:
        ax = fig.subplots()
        ax.barh([r["approach"] for r in rows][::-1], [r["audio_s_per_s"] for r in rows][::-1], color="tab:blue")
        ax.set_xlabel("audio seconds per second, one core")
        ax.set_xscale("log")
        ax.set_title("Feature prep throughput (same segments)")

    data["files"] = [str(p) for p in write_report(out_dir, "prep", "Prep throughput", data, body, plot,
                                                  figsize=(7, 3))]
    return data
