"""Peak memory and time of `loracast generate` vs diffusers' StableDiffusionXLPipeline on a
random-weight pipeline of the real SDXL architecture (stabilityai/stable-diffusion-xl-base-1.0's
configs: UNet 2.57 B parameters, CLIP ViT-L + OpenCLIP bigG text encoders, the SDXL VAE; 14 GB of
f32 safetensors), same prompt/seed/steps/size, each in its own process, peak RSS from
/usr/bin/time (VmHWM). Weights are random (timing and memory do not depend on values).

The folder is built once under --folder (default /tmp/loracast-sdxl-real; ~14 GB of disk).
Run: .venv/bin/python scripts/bench_sdxl_memory.py [--size 512] [--steps 1] [--threads 2]
(needs scripts/setup.sh --dev and `cargo build --release`).
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "target", "release", "loracast")
sys.path.insert(0, os.path.join(ROOT, "scripts", "fixtures"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def build(folder):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import make_pipelines as mp
    import bench_unet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**bench_unet.SDXL)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     bos_token_id=0, eos_token_id=2, pad_token_id=1))
    tok_dir = os.path.join(folder, "_tok")
    mp.write_vocab(tok_dir, 49152 - 256 - 2)
    tok1 = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), model_max_length=77)
    tok2 = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), pad_token="!",
                         model_max_length=77)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(folder)
    open(os.path.join(folder, ".ok"), "w").close()


def weight_bytes(folder):
    total = 0
    for d, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files if f.endswith(".safetensors"))
    return total


def timed(cmd, env):
    out = subprocess.run(["/usr/bin/time", "-v"] + cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", out.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return rss_kb / 1024 ** 2, secs, out.stdout


DIFFUSERS = r"""
import sys, time, torch
from diffusers import StableDiffusionXLPipeline
torch.set_num_threads(int(sys.argv[5]))
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], dtype=torch.float32, add_watermarker=False)
size, steps = int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
img = pipe("a photo of an astronaut", num_inference_steps=steps, height=size, width=size,
           generator=torch.Generator("cpu").manual_seed(0)).images[0]
print("denoise+decode_s", time.perf_counter() - t0)
img.save(sys.argv[4])
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/loracast-sdxl-real")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.folder, ".ok")):
        print(f"building the random real-config SDXL pipeline in {args.folder} …", flush=True)
        build(args.folder)
    gb = weight_bytes(args.folder) / 1024 ** 3
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    ours = timed([BIN, "generate", "--base", args.folder, "--prompt", "a photo of an astronaut", "--steps",
                  str(args.steps), "--height", str(args.size), "--width", str(args.size), "--seed", "0",
                  "--out", "/tmp/loracast-sdxl-real.png", "--force"], env)
    ref = timed([sys.executable, "-c", DIFFUSERS, args.folder, str(args.size), str(args.steps),
                 "/tmp/diffusers-sdxl-real.png", str(args.threads)], env)
    print(json.dumps({"weights_gib": round(gb, 2), "size": args.size, "steps": args.steps, "threads": args.threads,
                      "loracast": {"peak_rss_gib": round(ours[0], 2), "wall_s": round(ours[1], 1),
                                   "rss_over_weights": round(ours[0] / gb, 2)},
                      "diffusers": {"peak_rss_gib": round(ref[0], 2), "wall_s": round(ref[1], 1),
                                    "rss_over_weights": round(ref[0] / gb, 2)}}))


if __name__ == "__main__":
    main()
