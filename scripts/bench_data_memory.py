"""Peak memory of a training job against the size of its data set (issue 11, item 2).

Writes an image folder of N and of 4N random 64x64 PNGs, prepares each with `cm prepare-data`
(one image at a time), trains the teacher of the embedded default's network on it for a few
steps with `cm train`, and prints the peak resident memory (ru_maxrss) of each process, as
JSON lines. Training reads its rows from disk (cmcore.training.batches), so the two peaks of
`cm train` should agree within noise; a loader that held the data set would add about
4 x 12 KB (float32) per image.

    python scripts/bench_data_memory.py --n 4000 [--workers 2] [--out DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def image_folder(root, n, size, seed=0):
    """n random RGB PNGs in 10 class subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def peak_rss_mb(command):
    """Run ``command`` in a child of a fresh interpreter; that child's peak RSS in MB."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True,
                         text=True, check=True).stdout.split()
    if out[-1] != "0":
        sys.exit(f"{' '.join(command)} failed")
    return int(out[-2]) / 1024  # Linux: kilobytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="images of the smaller data set")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="cm-data-memory-"))
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cm = [sys.executable, "-m", "cmcore"]
    for n in (args.n, 4 * args.n):
        folder, data = work / f"images{n}", work / f"data{n}.npz"
        if not folder.exists():
            image_folder(folder, n, args.size)
        cfg["dataset"] = {"name": "image_folder", "path": str(folder),
                          "resolution": args.size, "xflip": True}
        cfg["network"]["attn_resolutions"] = [args.size // 4]  # the default's lowest level
        weights = work / "inception.pth"  # validation only: training extracts no features
        weights.touch()
        cfg["evaluation"] = {"feature_extractor": "inception", "inception_weights": str(weights)}
        cfg["teacher"].update(iters=args.iters, batch=32, log_every=args.iters, warmup=0)
        cfg["resources"] = {"train": {"data_workers": args.workers}}
        config = work / f"config{n}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        prepare = peak_rss_mb([*cm, "prepare-data", "--config", str(config), "--out",
                               str(data)])
        out = work / f"teacher{n}" / "checkpoint.pt"
        train = peak_rss_mb([*cm, "train", "--method", "teacher", "--config", str(config),
                             "--data", str(data), "--out", str(out), "--threads", "1"])
        print(json.dumps({"images": n, "data_mb": round(os.path.getsize(data) / 2**20, 1),
                          "prepare_peak_rss_mb": round(prepare, 1),
                          "train_peak_rss_mb": round(train, 1), "workers": args.workers,
                          "iters": args.iters, "batch": 32}), flush=True)


if __name__ == "__main__":
    main()
