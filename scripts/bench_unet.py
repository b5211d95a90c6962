"""UNet forward benchmark: loracast vs diffusers on the same config, same thread count.

Prints one line per config with the median seconds of each and the ratio loracast / diffusers
(goal ≤ 1.0). Random weights (timing does not depend on values).
Run: .venv/bin/python scripts/bench_unet.py [--iters N] [--threads T]
(needs scripts/setup.sh --dev and `cargo build --release`).
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "target", "release", "loracast")

SMALL = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(32, 64, 64),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)
# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers' defaults + these values).
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32)
CASES = [("(32,64,64) b8 32x32", SMALL, 8, 32), ("SD1.5 b1 64x64", SD15, 1, 64)]


def time_diffusers(cfg, batch, size, iters, warmup):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    x = torch.randn(batch, 4, size, size)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, 77, cfg["cross_attention_dim"])
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx).sample.sum().item()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    del unet
    return sorted(times)[len(times) // 2]


def time_loracast(cfg, batch, size, iters, warmup, threads):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.check_output([BIN, "bench", "unet", "--config", f.name, "--batch", str(batch),
                                   "--size", str(size), "--iters", str(iters), "--warmup", str(warmup)],
                                  env=env, text=True)
    os.unlink(f.name)
    return json.loads(out.strip().splitlines()[-1])["median_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.iters}")
    for label, cfg, batch, size in CASES:
        ref = time_diffusers(cfg, batch, size, args.iters, args.warmup)
        ours = time_loracast(cfg, batch, size, args.iters, args.warmup, args.threads)
        print(f"{label:24s} diffusers {ref * 1e3:9.1f} ms   loracast {ours * 1e3:9.1f} ms   ratio {ours / ref:.3f}")


if __name__ == "__main__":
    main()
