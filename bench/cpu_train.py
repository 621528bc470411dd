"""CPU training throughput of configs/tiny.toml on the embedded sample (tokens/s).

.venv/bin/python bench/cpu_train.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    import torch

    from azgpt.config import load_config
    from azgpt.prepare import run_prepare
    from azgpt.tokenizer import save_tokenizer, train_tokenizer
    from azgpt.train import train

    work = Path(tempfile.mkdtemp(prefix="azgpt-cpu-"))
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/sample").glob("*.txt"))]
    save_tokenizer(train_tokenizer(texts, vocab_size=2048), work / "tok")
    run_prepare(
        [str(ROOT / "data/sample")], str(work / "tok"), str(work / "data"), val_fraction=0.05
    )
    cfg = load_config(
        ROOT / "configs/tiny.toml",
        [
            f"--data.dir={work / 'data'}",
            f"--data.tokenizer={work / 'tok'}",
            f"--train.out_dir={work / 'run'}",
            f"--train.max_iters={a.steps}",
            f"--train.eval_interval={a.steps}",
            "--train.sample_tokens=0",
        ],
    )
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (work / "run/metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in rows if "event" not in r and r["step"] > a.steps // 4]
    print(
        json.dumps(
            {
                "config": "configs/tiny.toml",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
                "date": time.strftime("%Y-%m-%d"),
                "steps": a.steps,
                "tokens_per_s_median": round(statistics.median(tps)),
                "wall_s_including_eval_and_checkpoint": round(wall, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
