"""``lmuasr bench prep-plan``: how prep's own bookkeeping grows with corpus size, without audio.

For each size a synthetic ``GigaSpeech.json`` of XL's shape (100 segments per recording, no audio files) goes
through the real prep up to the point where audio would be decoded (``run_prep`` with ``plan_only``): validating
and hashing the JSON, lhotse's recipe writing its manifests, reading the cuts back into recordings, planning
groups and shard assignments. The shard-writing stage is then replaced by its bookkeeping alone: every group's
index rows (with the byte spans computed, not written) go to the group's row file as prep writes them, and the
real ``_finalize`` assembles ``index.parquet``, ``meta.json`` and the index cache. Each size runs in a fresh
process (peak resident memory is per size). The growth exponent of each stage (time ~ size^k between the
smallest and largest size) says whether anything grows faster than linearly.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmu_asr.bench.report import environment, markdown_table, write_report

STAGES = ["validate_input_s", "lhotse_manifests_s", "read_cuts_s", "plan_groups_s", "group_rows_s", "finalize_s"]


def simulate(corpus: Path, out: Path) -> dict[str, Any]:
    """Plan-only prep of ``corpus`` into ``out``, then the index bookkeeping of every group; timings."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmu_asr.fileio import atomic_write_with
    from lmu_asr.prep import pipeline
    from lmu_asr.prep.shards import BLOCK, NPY_HEADER, shard_name

    opts = pipeline.PrepOptions(out=out, corpus_dir=corpus, subset="XL", progress=False, plan_only=True,
                                jobs=2)
    plan = pipeline.run_prep(opts)
    timings = dict(plan["timings"])
    t = time.time()
    markers = {}
    for g in plan["groups_planned"]:
        segs = {s.key: s for job in g.recordings for s in job.segments}
        keys = sorted(g.assignment, key=lambda k: g.assignment[k])
        rows, offsets = [], {}
        for key in keys:
            shard, pos = g.assignment[key]
            seg, start = segs[key], offsets.get(shard, 0)
            fbank = NPY_HEADER + seg.num_frames * 160
            jo = start + 2 * BLOCK + -(-fbank // BLOCK) * BLOCK
            rows.append({"key": key, "shard": shard_name(shard), "position": pos, "offset": start,
                         "fbank_offset": start + BLOCK, "fbank_size": fbank, "json_offset": jo, "json_size": 150,
                         "num_frames": seg.num_frames, "duration": seg.num_frames / 100, "text_len": len(seg.text),
                         "text": seg.text, "speaker": seg.speaker, "recording": seg.recording_id})
            offsets[shard] = jo + 512
        table = pa.Table.from_pylist(rows, schema=pipeline.INDEX_SCHEMA)
        atomic_write_with(pipeline._rows_file(out / ".prep", g.index), lambda f, tb=table: pq.write_table(tb, f))
        markers[g.index] = {"group": g.index, "utterances": len(rows), "rejected": [], "audio": {},
                            "shards": [{"name": shard_name(s), "utterances": 0, "frames": 0, "bytes": offsets[s]}
                                       for s in sorted(offsets)],
                            "stats": {"sum": np.zeros(80).tolist(), "sum_sq": np.zeros(80).tolist(),
                                      "frames": sum(r["num_frames"] for r in rows)}}
    timings["group_rows_s"] = time.time() - t
    t = time.time()
    meta = pipeline._finalize(opts, plan["groups_planned"], markers, [], [], {}, 0.0, 0)
    timings["finalize_s"] = time.time() - t
    return {"segments": plan["segments"], "groups": plan["groups"], "shards": plan["shards"],
            "index_rows": meta["counts"]["utterances"], "timings": timings,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def bench_prep_plan(out_dir: Path, sizes: list[int], keep: bool = False) -> dict[str, Any]:
    import shutil

    from lmu_asr.bench.synthetic import write_synthetic_gigaspeech

    rows = []
    for n in sizes:
        work = Path(out_dir) / "work" / f"prep_plan_{n}"
        shutil.rmtree(work, ignore_errors=True)
        corpus = write_synthetic_gigaspeech(work / "corpus", n)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.run([sys.executable, "-m", "lmu_asr.bench.prep_scale", str(corpus), str(work / "out")],
                              capture_output=True, text=True, env=env, timeout=7200)
        if proc.returncode:
            raise RuntimeError(f"prep-plan probe failed at {n}: {proc.stderr.strip()[-500:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"segments": n, **res["timings"], "total_s": sum(res["timings"].values()),
                     "peak_rss_gb": res["peak_rss_gb"], "groups": res["groups"], "shards": res["shards"],
                     "us_per_segment": 1e6 * sum(res["timings"].values()) / n})
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    growth = {}
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        for k in STAGES + ["total_s"]:
            if a[k] > 0.05 and b[k] > 0:
                growth[k] = math.log(b[k] / a[k]) / math.log(b["segments"] / a["segments"])
    xl = 8_280_000
    data = {"env": environment(), "rows": rows, "growth_exponent": growth,
            "xl_estimate_s": {k: rows[-1][k] * xl / rows[-1]["segments"] for k in STAGES + ["total_s"]}}
    body = ("Prep up to decoding, on synthetic GigaSpeech.json files of XL's shape without audio (each size in a "
            "fresh process); the shard-writing stage replaced by its index bookkeeping.\n\n"
            + markdown_table(rows, [("segments", "segments"), *[(k, k[:-2].replace("_", " ") + " s") for k in STAGES],
                                    ("peak_rss_gb", "peak GB"), ("us_per_segment", "µs / segment")])
            + "\n\nGrowth exponent (time ~ segments^k, smallest to largest size): "
            + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f}" for k, v in growth.items())
            + f"\n\nLinear extrapolation to XL ({xl:,} segments): "
            + ", ".join(f"{k[:-2].replace('_', ' ')} {v / 60:.1f} min" for k, v in data["xl_estimate_s"].items()))
    data["files"] = [str(p) for p in write_report(out_dir, "prep_plan", "Prep bookkeeping at scale", data, body)]
    return data


if __name__ == "__main__":
    result = simulate(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(result))
