"""Run under torchrun by tests: train, then write this rank's parameter digest and step count to the run dir."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from lmu_asr.config import load_config
from lmu_asr.train.loop import Trainer


def main() -> None:
    shards, out, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = "--resume" in sys.argv
    cfg = load_config("cpu-tiny", overrides={"data.batch_frames": 3000, "train.seed": 5,
                                             "train.max_steps": max_steps, "data.num_workers": 1})
    trainer = Trainer(cfg, shards, out, resume=resume, progress=False)
    result = trainer.run()
    h = hashlib.sha256()
    for name, p in sorted(trainer.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    rank = trainer.info.rank
    (out / f"params_rank{rank}.txt").write_text(h.hexdigest())
    (out / f"steps_rank{rank}.json").write_text(json.dumps(result["step"]))


if __name__ == "__main__":
    main()
