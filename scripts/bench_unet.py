"""UNet forward benchmark: loracast vs diffusers on the same config, same thread count.

Prints one line per config with the median seconds of each and the ratio loracast / diffusers
(goal ≤ 1.0). Random weights (timing does not depend on values).
SDXL cases pass the added conditioning (pooled text embeds + time ids) as StableDiffusionXLPipeline
does; batch 2 = one CFG denoising step's UNet call. The real SDXL UNet (2.6 B parameters, 10.4 GB
in f32) runs loracast first, then diffusers, in separate processes (both at once would not fit in
24 GB); peak RSS of each is printed.
Run: .venv/bin/python scripts/bench_unet.py [--iters N] [--threads T] [--cases a,b]
(needs scripts/setup.sh --dev and `cargo build --release`).
"""
import argparse
import json
import os
import subprocess
import sys
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
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
SDXL = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
# A medium SDXL-architecture UNet (same layout and head width 64, 2/5 of the channels, 1/2/4
# transformer layers).
SDXL_MEDIUM = dict(SDXL, block_out_channels=(128, 256, 512), transformer_layers_per_block=(1, 2, 4),
                   attention_head_dim=(2, 4, 8), cross_attention_dim=512,
                   projection_class_embeddings_input_dim=6 * 256 + 256)
# "+ip": IP-Adapter-Plus on every attn2 (16 image tokens; diffusers runs its Resampler on the
# 257 ViT-H tokens inside every UNet call, loracast once per image before the loop).
CASES = {"small": ("(32,64,64) b8 32x32", SMALL, 8, 32), "sd15": ("SD1.5 b1 64x64", SD15, 1, 64),
         "sd15-cfg": ("SD1.5 b2 64x64", SD15, 2, 64), "sd15-cfg+ip": ("SD1.5 b2 64x64 +IP-Plus", dict(SD15, ip=16), 2, 64),
         "sdxl-medium": ("SDXL-medium b2 64x64", SDXL_MEDIUM, 2, 64),
         "sdxl": ("SDXL b1 128x128", SDXL, 1, 128)}


def peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def add_ip_adapter_plus(unet, cfg, tokens):
    """IP-Adapter-Plus modules as diffusers' load_ip_adapter installs them (random weights)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
    cross, ch = cfg["cross_attention_dim"], list(cfg["block_out_channels"])
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        if name.startswith("mid_block"):
            hidden = ch[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(ch))[int(name[len("up_blocks.")])]
        else:
            hidden = ch[int(name[len("down_blocks.")])]
        procs[name] = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=cross, num_tokens=(tokens,))
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [IPAdapterPlusImageProjection(embed_dims=1280, output_dims=cross, hidden_dims=cross, heads=cross // 64,
                                      num_queries=tokens)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def time_diffusers(cfg, batch, size, iters, warmup):
    torch.manual_seed(0)
    cfg = dict(cfg)
    ip = cfg.pop("ip", 0)
    unet = UNet2DConditionModel(**cfg).eval()
    if ip:
        add_ip_adapter_plus(unet, cfg, ip)
    x = torch.randn(batch, 4, size, size)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, 77, cfg["cross_attention_dim"])
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled),
                 "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(batch, 1)}
    if ip:
        added = dict(added or {}, image_embeds=[torch.randn(batch, 1, 257, 1280)])
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.sum().item()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    del unet
    return sorted(times)[len(times) // 2]


def time_loracast(cfg, batch, size, iters, warmup, threads):
    cfg = dict(cfg)
    ip = cfg.pop("ip", 0)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.check_output([BIN, "bench", "unet", "--config", f.name, "--batch", str(batch),
                                   "--size", str(size), "--iters", str(iters), "--warmup", str(warmup),
                                   "--ip-tokens", str(ip)],
                                  env=env, text=True)
    os.unlink(f.name)
    r = json.loads(out.strip().splitlines()[-1])
    return r["median_s"], r.get("peak_rss_mb")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", default="small,sd15,sdxl-medium")
    ap.add_argument("--diffusers-only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.diffusers_only:
        label, cfg, batch, size = CASES[args.diffusers_only]
        print(json.dumps({"median_s": time_diffusers(cfg, batch, size, args.iters, args.warmup),
                          "peak_rss_mb": peak_rss_mb()}))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.iters}")
    for name in args.cases.split(","):
        label, cfg, batch, size = CASES[name]
        ours, ours_rss = time_loracast(cfg, batch, size, args.iters, args.warmup, args.threads)
        # diffusers in its own process, after ours has exited (the real SDXL UNet is 10.4 GB).
        out = subprocess.check_output([sys.executable, __file__, "--diffusers-only", name, "--iters",
                                       str(args.iters), "--warmup", str(args.warmup), "--threads",
                                       str(args.threads)], text=True)
        r = json.loads(out.strip().splitlines()[-1])
        ref, ref_rss = r["median_s"], r["peak_rss_mb"]
        print(f"{label:24s} diffusers {ref * 1e3:9.1f} ms   loracast {ours * 1e3:9.1f} ms   ratio {ours / ref:.3f}"
              f"   peak RSS diffusers {ref_rss:.0f} MiB, loracast {ours_rss:.0f} MiB")


if __name__ == "__main__":
    main()
