"""``lmuasr bench loader``: utterances and audio seconds per second one loader worker delivers, side by side.

All loaders serve the *same utterances* (one corpus, one subset) as padded training batches, in this process with
one thread (= one DataLoader worker):

* ``lmu-asr shards``: our loader (``BatchDataset`` over an epoch plan: one ``pread`` per utterance);
* ``seed (decode + fbank per utterance)``: the seed's approach: each utterance's audio is decoded from its
  recording (seeking into the opus file) and its fbank computed inside the loader, then padded;
* ``lhotse (DynamicBucketingSampler + K2SpeechRecognitionDataset)``: lhotse's own pipeline over features stored
  by lhotse (``compute_and_store_features``, its default lilcom storage), the way lhotse recipes train;
* ``DALI (CPU pipeline, 1 thread)``: when nvidia-dali is installed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from lmu_asr.bench.report import environment, markdown_table, torch_threads, write_report
from lmu_asr.config import DataConfig
from lmu_asr.data.dataset import BatchDataset
from lmu_asr.data.sampler import epoch_plan
from lmu_asr.data.shards import ShardSet
from lmu_asr.prep.features import compute_fbank, resample
from lmu_asr.text import encode


def _rate(name: str, utts: int, frames: int, seconds: float) -> dict[str, Any]:
    return {"loader": name, "utterances": utts, "seconds": seconds, "utt_per_s": utts / seconds,
            "audio_s_per_s": frames / 100 / seconds}


def run_ours(shards: ShardSet, cfg: DataConfig, passes: int = 3) -> dict[str, Any]:
    batches, _ = epoch_plan(shards, cfg, 2, epoch=0, seed=0)
    ds = BatchDataset(shards, batches, 2)
    ds[0]  # open files
    t, utts, frames = time.perf_counter(), 0, 0
    for _ in range(passes):
        for k in range(len(ds)):
            b = ds[k]
            utts += b["real"]
            frames += int(b["lengths"].sum())
    return _rate("lmu-asr shards", utts, frames, time.perf_counter() - t)


def run_seed(segments: list[dict[str, Any]], batch: int = 16) -> dict[str, Any]:
    """Decode each utterance from its recording and compute its fbank, per utterance, then pad a batch."""
    t, frames = time.perf_counter(), 0
    for i in range(0, len(segments), batch):
        feats, labels = [], []
        for seg in segments[i:i + batch]:
            info = sf.info(seg["path"])
            a = int(seg["start"] * info.samplerate)
            audio, rate = sf.read(seg["path"], start=a, stop=a + int(seg["duration"] * info.samplerate),
                                  dtype="float32")
            feats.append(torch.from_numpy(compute_fbank(resample(audio, rate))))
            labels.append(torch.tensor(encode(seg["text"])))
        padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        torch.nn.utils.rnn.pad_sequence(labels, batch_first=True)
        frames += sum(f.shape[0] for f in feats)
        del padded
    return _rate("seed (decode + fbank per utterance)", len(segments), frames, time.perf_counter() - t)


def run_lhotse(cuts, storage: Path, passes: int = 3) -> dict[str, Any]:  # noqa: ANN001 (lhotse CutSet)
    from lhotse import CutSet, Fbank, LilcomChunkyWriter, NumpyFilesWriter
    from lhotse.dataset import DynamicBucketingSampler, K2SpeechRecognitionDataset

    try:  # lhotse's recommended storage; needs the lilcom package (pip install 'lmu-asr[bench]')
        import lilcom  # noqa: F401

        writer, storage_name = LilcomChunkyWriter, "lilcom chunky"
    except ImportError:
        writer, storage_name = NumpyFilesWriter, "numpy files (lilcom not installed)"
    storage.mkdir(parents=True, exist_ok=True)
    manifest = storage / "cuts_with_feats.jsonl.gz"
    if not manifest.is_file():  # not timed: done once, like prep
        cuts.compute_and_store_features(Fbank(), storage, storage_type=writer, progress_bar=False).to_file(manifest)
    stored = CutSet.from_jsonl_lazy(manifest)  # lazy, as lhotse recommends for its dynamic sampler
    dataset = K2SpeechRecognitionDataset()
    t, utts, frames = time.perf_counter(), 0, 0
    for p in range(passes):
        sampler = DynamicBucketingSampler(stored, max_duration=100.0, shuffle=True, seed=p, num_buckets=4)
        for cut_batch in sampler:
            b = dataset[cut_batch]
            utts += b["inputs"].shape[0]
            frames += int(b["supervisions"]["num_frames"].sum())
    row = _rate("lhotse (DynamicBucketingSampler + K2SpeechRecognitionDataset)", utts, frames,
                time.perf_counter() - t)
    row["storage"] = storage_name
    return row


def run_dali(shards: ShardSet, cfg: DataConfig, passes: int = 3) -> dict[str, Any] | None:
    from lmu_asr.data.dali import DaliSource, dali_available

    if not dali_available():
        return None
    source = DaliSource(shards, cfg, 2, seed=0, num_threads=1)
    t, utts, frames = time.perf_counter(), 0, 0
    for _ in range(passes):
        for b in source:
            utts += b["real"]
            frames += int(b["lengths"].sum())
    return _rate("DALI (CPU pipeline, 1 thread)", utts, frames, time.perf_counter() - t)


def segments_of(shards: ShardSet, corpus_dir: Path, limit: int) -> list[dict[str, Any]]:
    """Where each shard utterance came from: recording file, start, duration (from GigaSpeech.json)."""
    import json

    corpus = json.loads((corpus_dir / "GigaSpeech.json").read_text())
    where = {s["sid"]: (corpus_dir / a["path"], s["begin_time"], s["end_time"] - s["begin_time"])
             for a in corpus["audios"] for s in a["segments"]}
    out = []
    for i in range(min(limit, len(shards))):
        key, text = shards.key(i), shards.read(i)[1]
        path, start, dur = where[key]
        out.append({"key": key, "path": str(path), "start": start, "duration": dur, "text": text})
    return out


def bench_loader(corpus_dir: Path, subset: str, shards_dir: Path, out_dir: Path, max_seed: int = 400
                 ) -> dict[str, Any]:
    """Loader throughput per worker (one thread each), ours against the alternatives; writes the report."""
    with torch_threads(1):
        return _bench_loader(corpus_dir, subset, shards_dir, out_dir, max_seed)


def _bench_loader(corpus_dir: Path, subset: str, shards_dir: Path, out_dir: Path, max_seed: int
                  ) -> dict[str, Any]:
    from lhotse import CutSet

    shards = ShardSet.open(shards_dir)
    cfg = DataConfig(batch_frames=20_000, max_frames=3000, shuffle_buffer=500)
    ours = run_ours(shards, cfg)
    segments = segments_of(shards, corpus_dir, max_seed)
    seed = run_seed(segments)
    manifests = shards_dir / ".prep" / "manifests"
    cuts = CutSet.from_file(manifests / f"gigaspeech_cuts_{subset.upper()}.jsonl.gz").trim_to_supervisions(
        keep_overlapping=False)
    keep = set(shards.key_list())
    cuts = CutSet.from_cuts(c for c in cuts if c.supervisions[0].id in keep).to_eager()
    lhotse_row = run_lhotse(cuts, out_dir / "work" / "lhotse_features")
    rows = [ours, seed, lhotse_row]
    dali = run_dali(shards, cfg)
    if dali:
        rows.append(dali)
    for r in rows:
        r["ours_is_x_faster"] = ours["utt_per_s"] / r["utt_per_s"]
    data = {"env": environment(), "corpus": str(corpus_dir), "subset": subset, "utterances": len(shards),
            "mean_seconds": float(np.mean(shards.num_frames) / 100), "rows": rows,
            "ratio_vs_seed": ours["utt_per_s"] / seed["utt_per_s"],
            "ratio_vs_lhotse": ours["utt_per_s"] / lhotse_row["utt_per_s"]}
    body = (f"{len(shards)} utterances (mean {data['mean_seconds']:.1f} s), one worker (one thread) each, same "
            f"utterances; the seed's approach is timed on the first {len(segments)}.\n\n"
            + markdown_table(rows, [("loader", "loader"), ("utt_per_s", "utt/s per worker"),
                                    ("audio_s_per_s", "audio-s/s per worker"),
                                    ("ours_is_x_faster", "ours is x faster")]))

    def plot(fig: Any) -> None:
        ax = fig.subplots()
        ax.barh([r["loader"][:45] for r in rows][::-1], [r["utt_per_s"] for r in rows][::-1], color="tab:purple")
        ax.set(xscale="log", xlabel="utterances / s, one worker", title="Loader throughput (same utterances)")

    data["files"] = [str(p) for p in write_report(out_dir, "loader", "Loader throughput per worker", data, body,
                                                  plot, figsize=(8, 3))]
    return data
