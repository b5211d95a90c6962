#!/usr/bin/env python3
"""Writes the fixture-derived seed inputs of the fuzz targets into fuzz/seeds/<target>/.

Each target's input layout is documented in src/fuzzing.rs (a selector byte first where one
target covers several parsers). The tiny generated models' seeds (tiny_*) are written by
`cargo test --release --test mutation -- --ignored write_fuzz_seeds`. Only the standard library.
"""
import json
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
SEEDS = ROOT / "fuzz" / "seeds"


def put(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


loras = sorted(FIX.glob("lora_tiny-*.safetensors"))
for p in loras:
    if p.name.startswith("lora_tiny-a"):
        put("lora_file", p.name, p.read_bytes())
put("safetensors", "peft_as_unet", b"\x00" + loras[0].read_bytes())

keys = sorted({k for p in loras for k in header(p) if k != "__metadata__"})
keys = keys[:: max(1, len(keys) // 64)]  # every family and role, ~64 keys
for i, k in enumerate(keys):
    put("lora_keys", f"key_{i:03}", b"\x01" + k.encode())

CONFIGS = [(0, "unet/config.json"), (1, "vae/config.json"), (2, "text_encoder/config.json"),
           (5, "scheduler/scheduler_config.json"), (6, "model_index.json")]
for pipe in ["tiny-a", "tiny-b"]:
    for sel, rel in CONFIGS:
        name = f"{pipe}_{rel.replace('/', '_')}"
        put("configs", name, bytes([sel]) + (FIX / "pipelines" / pipe / rel).read_bytes())
put("configs", "clip_config.json", b"\x03" + (FIX / "metrics/clip/config.json").read_bytes())
put("configs", "dino_config.json", b"\x04" + (FIX / "metrics/dino/config.json").read_bytes())
for m in ["clip", "dino"]:
    p = FIX / "metrics" / m / "preprocessor_config.json"
    if p.exists():
        put("configs", f"{m}_preprocessor_config.json", b"\x07" + p.read_bytes())
meta = header(ROOT / "assets/toy/hypernet.safetensors")["__metadata__"]
put("configs", "toy_hypernet_config.json", b"\x08" + meta["config"].encode())

tb = FIX / "pipelines/tiny-b/tokenizer"
put("tokenizer", "tiny-b_json", b"\x00" + (tb / "tokenizer.json").read_bytes() + b"\x00"
    + (tb / "tokenizer_config.json").read_bytes())
mc = FIX / "metrics/clip"
put("tokenizer", "metrics_clip_json", b"\x00" + (mc / "tokenizer.json").read_bytes() + b"\x00"
    + (mc / "tokenizer_config.json").read_bytes())
model = json.loads((tb / "tokenizer.json").read_text())["model"]
merges = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
ta = FIX / "pipelines/tiny-a/tokenizer"
put("tokenizer", "tiny-b_vocab_merges", b"\x01" + json.dumps(model["vocab"]).encode() + b"\x00"
    + "\n".join(merges).encode() + b"\x00" + (ta / "tokenizer_config.json").read_bytes()
    + b"\x00" + (ta / "special_tokens_map.json").read_bytes())

for p in sorted((FIX / "image_inputs").iterdir()) + sorted((FIX / "metrics/images").iterdir()):
    if p.is_file() and 0 < p.stat().st_size <= 64 * 1024:
        put("image", f"{p.parent.name}_{p.name}", p.read_bytes())
for t in sorted(SEEDS.iterdir()):
    print(t.name, len(list(t.iterdir())), "seeds")
