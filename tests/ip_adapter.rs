//! IP-Adapter's standalone parts against diffusers 0.42.1 / transformers 5.23
//! (scripts/fixtures/ip_adapter.py): preprocessing (diffusers' fallback CLIPImageProcessor and a
//! folder's preprocessor_config.json), the CLIPVisionModelWithProjection encoder
//! (`hidden_states[-2]`, `image_embeds`, the uncond zeros), the Plus Resampler and the plain
//! ImageProjection, the `ip_adapter.N` → attn2 numbering (fixture pipelines and the real SD1.5
//! and SDXL configs), and bad files (one clear error each).
mod common;

use std::path::{Path, PathBuf};

use loracast::io::preprocess::RgbImage;
use loracast::io::safetensors::SafeTensorsFile;
use loracast::models::ip_adapter::{attn2_slots, diffusers_preprocess, ImageEncoder, IpAdapter};
use loracast::models::unet::UNetConfig;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    common::fixtures().join("ip_adapter")
}

fn refs() -> SafeTensorsFile {
    SafeTensorsFile::open(&common::fixtures().join("ip_adapter.safetensors")).unwrap()
}

fn doc() -> serde_json::Value {
    let s = std::fs::read_to_string(common::fixtures().join("ip_adapter.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn r(refs: &SafeTensorsFile, key: &str) -> Tensor {
    refs.tensor(key, Kind::Float)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// PIL's decoded RGB bytes of fixture image `k` (so preprocessing is compared from the same u8).
fn decoded(refs: &SafeTensorsFile, k: &str) -> RgbImage {
    let t = refs.tensor(&format!("decoded.{k}"), Kind::Uint8).unwrap();
    let (h, w) = (t.size()[0], t.size()[1]);
    let mut data = vec![0u8; (h * w * 3) as usize];
    let n = data.len();
    t.copy_data_u8(&mut data, n);
    RgbImage::new(w as u32, h as u32, data).unwrap()
}

fn file(name: &str) -> PathBuf {
    match name {
        "a" => dir().join("images/a.png"),
        "b" => dir().join("images/b.png"),
        _ => dir().join("images/c.jpg"),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn unet_config(pipeline: &str) -> UNetConfig {
    let p = common::pipeline(pipeline).join("unet/config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn pixel_values_match_diffusers() {
    let refs = refs();
    let fallback = diffusers_preprocess(56);
    let enc = ImageEncoder::load(&dir().join("image_encoder"), Device::Cpu).unwrap();
    assert_eq!(
        enc.preprocess, fallback,
        "no preprocessor_config.json ⇒ the fallback"
    );
    let pp = ImageEncoder::load(&dir().join("image_encoder_pp"), Device::Cpu).unwrap();
    assert_ne!(pp.preprocess, fallback);
    for k in ["a", "b", "c"] {
        let img = decoded(&refs, k);
        let ours = fallback.batch(std::slice::from_ref(&img)).unwrap();
        let d = max_abs(&ours, &r(&refs, &format!("pixel.fallback.{k}")));
        eprintln!("pixel.fallback.{k}: max abs {d:.2e}");
        assert!(d <= 1e-6, "pixel.fallback.{k}: {d}");
        let ours = pp.pixel_values(std::slice::from_ref(&img)).unwrap();
        let d = max_abs(&ours, &r(&refs, &format!("pixel.pp.{k}")));
        eprintln!("pixel.pp.{k}: max abs {d:.2e}");
        assert!(d <= 1e-6, "pixel.pp.{k}: {d}");
    }
    // The PNGs decode to PIL's bytes exactly, so from the files too.
    let ab: Vec<RgbImage> = ["a", "b"]
        .iter()
        .map(|k| RgbImage::open(&file(k)).unwrap())
        .collect();
    for (k, img) in ["a", "b"].iter().zip(&ab) {
        assert_eq!(*img, decoded(&refs, k), "{k}: PNG decode");
    }
    let d = max_abs(
        &enc.pixel_values(&ab).unwrap(),
        &r(&refs, "pixel.fallback.ab"),
    );
    assert!(d <= 1e-6, "pixel.fallback.ab: {d}");
    // The JPEG: two decoders (libjpeg-turbo in PIL, zune-jpeg here) differ by a few levels.
    let c = RgbImage::open(&file("c")).unwrap();
    let d = max_abs(
        &enc.pixel_values(&[c]).unwrap(),
        &r(&refs, "pixel.fallback.c"),
    );
    eprintln!("pixel.fallback.c from our JPEG decode: max abs {d:.3}");
    assert!(d <= 0.15, "c.jpg: {d}");
    // diffusers' pipeline uses the fallback whatever the folder holds.
    let forced = ImageEncoder::load(&dir().join("image_encoder_pp"), Device::Cpu)
        .unwrap()
        .use_diffusers_preprocess();
    assert_eq!(forced.preprocess, fallback);
}

#[test]
fn encoder_matches_transformers() {
    let refs = refs();
    let enc = ImageEncoder::load(&dir().join("image_encoder"), Device::Cpu).unwrap();
    for k in ["a", "b", "c", "ab"] {
        let px = r(&refs, &format!("pixel.fallback.{k}"));
        let h = enc.penultimate(&px).unwrap();
        common::assert_close(
            &h,
            &r(&refs, &format!("encoder.hidden.{k}")),
            TOL,
            &format!("encoder.hidden.{k}"),
        );
        common::assert_close(
            &enc.image_embeds(&px).unwrap(),
            &r(&refs, &format!("encoder.image_embeds.{k}")),
            TOL,
            &format!("encoder.image_embeds.{k}"),
        );
        if k != "ab" {
            let last = enc.model.vision_model.hidden_state(&px, 3).unwrap();
            common::assert_close(
                &last,
                &r(&refs, &format!("encoder.last.{k}")),
                TOL,
                &format!("encoder.last.{k}"),
            );
        }
    }
    let zeros = r(&refs, "pixel.fallback.a").zeros_like();
    common::assert_close(
        &enc.penultimate(&zeros).unwrap(),
        &r(&refs, "encoder.hidden_uncond"),
        TOL,
        "encoder.hidden_uncond",
    );
}

#[test]
fn projections_match_diffusers() {
    let refs = refs();
    let enc = ImageEncoder::load(&dir().join("image_encoder"), Device::Cpu).unwrap();
    for (file, kind, pipe) in [
        ("ip-adapter-plus_tiny-a.safetensors", "plus", "tiny-a"),
        ("ip-adapter-plus_sdxl-a.safetensors", "plus", "sdxl-a"),
        ("ip-adapter_tiny-a.safetensors", "plain", "tiny-a"),
    ] {
        let a = IpAdapter::load(&dir().join(file), Device::Cpu).unwrap();
        eprintln!("{file}: {}", a.describe());
        a.check_encoder(&enc).unwrap();
        let input = |k: &str| match kind {
            "plus" => r(&refs, &format!("encoder.hidden.{k}")),
            _ => r(&refs, &format!("encoder.image_embeds.{k}")),
        };
        for k in ["a", "b", "c", "ab"] {
            let key = format!("{kind}.{pipe}.tokens.{k}");
            common::assert_close(&a.project(&input(k)).unwrap(), &r(&refs, &key), TOL, &key);
        }
        let uncond_in = match kind {
            "plus" => r(&refs, "encoder.hidden_uncond"),
            _ => r(&refs, "encoder.image_embeds.a").zeros_like(),
        };
        let key = format!("{kind}.{pipe}.uncond");
        common::assert_close(&a.project(&uncond_in).unwrap(), &r(&refs, &key), TOL, &key);
        // End to end from the files (PNGs: PIL's bytes exactly).
        let imgs: Vec<RgbImage> = ["a", "b"]
            .iter()
            .map(|k| RgbImage::open(&dir().join(format!("images/{k}.png"))).unwrap())
            .collect();
        let (cond, uncond) = enc.image_tokens(&a, &imgs).unwrap();
        let key = format!("{kind}.{pipe}.tokens.ab");
        common::assert_close(&cond, &r(&refs, &key), TOL, &format!("{key} (files)"));
        let u = r(&refs, &format!("{kind}.{pipe}.uncond"));
        common::assert_close(&uncond, &Tensor::cat(&[&u, &u], 0), TOL, "uncond (files)");
    }
}

#[test]
fn numbering_matches_diffusers() {
    let doc = doc();
    for (file, meta) in doc["adapters"].as_object().unwrap() {
        let pipe = meta["pipeline"].as_str().unwrap();
        let cfg = unet_config(pipe);
        let slots = attn2_slots(&cfg).unwrap();
        let want: Vec<(String, usize, i64)> = meta["attn2"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_u64().unwrap() as usize,
                    v[2].as_i64().unwrap(),
                )
            })
            .collect();
        let ours: Vec<(String, usize, i64)> = slots
            .iter()
            .map(|s| (s.module_path(), s.key_id, s.hidden))
            .collect();
        assert_eq!(ours, want, "{file}");
        let a = IpAdapter::load(&dir().join(file), Device::Cpu).unwrap();
        let w = a.attn_weights(&cfg).unwrap();
        assert_eq!(w.len(), slots.len());
        let f = SafeTensorsFile::open(&dir().join(file)).unwrap();
        for s in &slots {
            let (k, v) = &w[&s.site];
            let fk = f
                .tensor(
                    &format!("ip_adapter.{}.to_k_ip.weight", s.key_id),
                    Kind::Float,
                )
                .unwrap();
            let fv = f
                .tensor(
                    &format!("ip_adapter.{}.to_v_ip.weight", s.key_id),
                    Kind::Float,
                )
                .unwrap();
            assert!(k.equal(&fk) && v.equal(&fv), "{file}: {}", s.module_path());
        }
    }
    // The real configs: SD1.5 16 attn2 → 1..31, SDXL 70 → 1..139, names as diffusers'.
    let sdxl_doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("sdxl_sdxl-a.json")).unwrap(),
    )
    .unwrap();
    let sdxl: UNetConfig =
        serde_json::from_value(sdxl_doc["real_sdxl"]["unet_config"].clone()).unwrap();
    for (name, cfg, count) in [("sd15", UNetConfig::sd15(), 16), ("sdxl", sdxl, 70)] {
        let slots = attn2_slots(&cfg).unwrap();
        assert_eq!(slots.len(), count, "{name}");
        let want: Vec<(String, usize)> = doc["real"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let ours: Vec<(String, usize)> =
            slots.iter().map(|s| (s.module_path(), s.key_id)).collect();
        assert_eq!(ours, want, "{name}");
        assert_eq!(ours.last().unwrap().1, 2 * count - 1);
    }
    // The same site set as the UNet's own LoRA sites (the model's module order differs: down, mid, up).
    let sd = loracast::pipeline::StableDiffusion::load(&common::pipeline("tiny-a"), Device::Cpu)
        .unwrap();
    let mut from_unet: Vec<_> = sd.unet.lora_sites().iter().map(|s| s.transformer).collect();
    from_unet.dedup();
    from_unet.sort();
    let mut ours: Vec<_> = attn2_slots(&unet_config("tiny-a"))
        .unwrap()
        .iter()
        .map(|s| s.site)
        .collect();
    ours.sort();
    assert_eq!(ours, from_unet);
}

/// Writes `tensors` as a safetensors file in a temp dir.
fn write(dir: &Path, name: &str, tensors: Vec<(String, Tensor)>) -> PathBuf {
    let p = dir.join(name);
    loracast::io::safetensors::save(&tensors, Kind::Float, None, &p).unwrap();
    p
}

fn file_tensors(name: &str) -> Vec<(String, Tensor)> {
    let f = SafeTensorsFile::open(&dir().join(name)).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.tensor(&n, Kind::Float).unwrap();
            (n, t)
        })
        .collect()
}

fn one_line_err(e: anyhow::Error, needles: &[&str], what: &str) {
    let msg = format!("{e:#}");
    eprintln!("{what}: {msg}");
    assert!(!msg.contains('\n'), "{what}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{what}: {msg:?} lacks {n:?}");
    }
}

#[test]
fn bad_files_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let plus = "ip-adapter-plus_tiny-a.safetensors";
    // Another base: the SDXL-shaped adapter on tiny-a, and tiny-a's on sdxl-a.
    let a = IpAdapter::load(
        &dir().join("ip-adapter-plus_sdxl-a.safetensors"),
        Device::Cpu,
    )
    .unwrap();
    one_line_err(
        a.attn_weights(&unet_config("tiny-a")).unwrap_err(),
        &[
            "image_proj.proj_out.weight",
            "[20, 24]",
            "cross_attention_dim is 32",
        ],
        "sdxl adapter on tiny-a",
    );
    let a = IpAdapter::load(&dir().join(plus), Device::Cpu).unwrap();
    one_line_err(
        a.attn_weights(&unet_config("sdxl-a")).unwrap_err(),
        &[
            "image_proj.proj_out.weight",
            "[32, 40]",
            "cross_attention_dim is 20",
        ],
        "tiny-a adapter on sdxl-a",
    );
    // Same cross dim, another layer count: drop the last two attn2 (mid) pairs.
    let mut ts = file_tensors(plus);
    ts.retain(|(n, _)| !n.starts_with("ip_adapter.21."));
    let p = write(t, "fewer.safetensors", ts);
    let a = IpAdapter::load(&p, Device::Cpu).unwrap();
    one_line_err(
        a.attn_weights(&unet_config("tiny-a")).unwrap_err(),
        &[
            "ip_adapter.21.to_k_ip.weight",
            "[64, 32]",
            "11 cross-attention layers",
        ],
        "missing layer",
    );
    // Extra layer.
    let mut ts = file_tensors(plus);
    ts.push((
        "ip_adapter.23.to_k_ip.weight".into(),
        Tensor::zeros([64, 32], tch::kind::FLOAT_CPU),
    ));
    ts.push((
        "ip_adapter.23.to_v_ip.weight".into(),
        Tensor::zeros([64, 32], tch::kind::FLOAT_CPU),
    ));
    let p = write(t, "more.safetensors", ts);
    let a = IpAdapter::load(&p, Device::Cpu).unwrap();
    one_line_err(
        a.attn_weights(&unet_config("tiny-a")).unwrap_err(),
        &["unexpected tensor ip_adapter.23.to_k_ip.weight", "[64, 32]"],
        "extra layer",
    );
    // A wrong to_k_ip shape.
    let mut ts = file_tensors(plus);
    for (n, v) in ts.iter_mut() {
        if n == "ip_adapter.5.to_v_ip.weight" {
            *v = Tensor::zeros([32, 32], tch::kind::FLOAT_CPU);
        }
    }
    let p = write(t, "shape.safetensors", ts);
    let a = IpAdapter::load(&p, Device::Cpu).unwrap();
    one_line_err(
        a.attn_weights(&unet_config("tiny-a")).unwrap_err(),
        &[
            "ip_adapter.5.to_v_ip.weight",
            "[32, 32]",
            "[64, 32]",
            "down_blocks.1.attentions.0",
        ],
        "wrong shape",
    );
    // A vision tower whose width doesn't match proj_in: the tiny-a Plus adapter with proj_in
    // for 64-wide features.
    let mut ts = file_tensors(plus);
    for (n, v) in ts.iter_mut() {
        if n == "image_proj.proj_in.weight" {
            *v = Tensor::zeros([40, 64], tch::kind::FLOAT_CPU);
        }
    }
    let p = write(t, "vision.safetensors", ts);
    let a = IpAdapter::load(&p, Device::Cpu).unwrap();
    let enc = ImageEncoder::load(&dir().join("image_encoder"), Device::Cpu).unwrap();
    one_line_err(
        a.check_encoder(&enc).unwrap_err(),
        &["image_proj.proj_in.weight", "[40, 64]", "hidden_size 48"],
        "vision width",
    );
    let img = RgbImage::open(&file("a")).unwrap();
    assert!(enc.image_tokens(&a, &[img]).is_err());
    // Resampler shapes inconsistent with each other: named key, both shapes.
    let mut ts = file_tensors(plus);
    for (n, v) in ts.iter_mut() {
        if n == "image_proj.layers.2.0.to_kv.weight" {
            *v = Tensor::zeros([128, 40], tch::kind::FLOAT_CPU);
        }
    }
    let p = write(t, "kv.safetensors", ts);
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &[
            "image_proj.layers.2.0.to_kv.weight",
            "[128, 40]",
            "[256, 40]",
        ],
        "to_kv shape",
    );
    // Missing and unknown keys.
    let mut ts = file_tensors(plus);
    ts.retain(|(n, _)| n != "image_proj.norm_out.bias");
    let p = write(t, "missing.safetensors", ts);
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &["missing tensor image_proj.norm_out.bias"],
        "missing key",
    );
    let mut ts = file_tensors(plus);
    ts.push((
        "image_proj.extra.weight".into(),
        Tensor::zeros([2], tch::kind::FLOAT_CPU),
    ));
    let p = write(t, "unknown.safetensors", ts);
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &["unexpected tensor image_proj.extra.weight"],
        "unknown key",
    );
    let mut ts = file_tensors(plus);
    ts.push((
        "unet.conv_in.weight".into(),
        Tensor::zeros([2], tch::kind::FLOAT_CPU),
    ));
    let p = write(t, "prefix.safetensors", ts);
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &["unexpected tensor unet.conv_in.weight"],
        "foreign prefix",
    );
    let mut ts = file_tensors(plus);
    ts.push((
        "ip_adapter.1.to_k_lora.down.weight".into(),
        Tensor::zeros([2], tch::kind::FLOAT_CPU),
    ));
    let p = write(t, "lora.safetensors", ts);
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &["unexpected tensor ip_adapter.1.to_k_lora.down.weight"],
        "ip lora key",
    );
    // Variants by name.
    let z = |s: &[i64]| Tensor::zeros(s, tch::kind::FLOAT_CPU);
    let ip = || {
        vec![
            ("ip_adapter.1.to_k_ip.weight".to_string(), z(&[32, 32])),
            ("ip_adapter.1.to_v_ip.weight".to_string(), z(&[32, 32])),
        ]
    };
    for (name, keys, needle) in [
        (
            "faceid",
            vec![
                "image_proj.proj.0.weight",
                "image_proj.proj.2.weight",
                "image_proj.norm.weight",
            ],
            "FaceID",
        ),
        (
            "faceid_plus",
            vec![
                "image_proj.proj.0.weight",
                "image_proj.perceiver_resampler.proj_in.weight",
            ],
            "FaceID-Plus",
        ),
        (
            "full",
            vec!["image_proj.proj.0.weight", "image_proj.proj.3.weight"],
            "Full-Face",
        ),
        (
            "diffusers_layout",
            vec!["image_proj.latents", "image_proj.layers.0.attn.to_q.weight"],
            "diffusers' internal layout",
        ),
    ] {
        let mut ts = ip();
        for k in keys {
            ts.push((k.to_string(), z(&[4, 4])));
        }
        let p = write(t, &format!("{name}.safetensors"), ts);
        one_line_err(
            IpAdapter::load(&p, Device::Cpu).unwrap_err(),
            &[needle, "not supported"],
            name,
        );
    }
    // .bin: how to convert.
    let p = t.join("ip-adapter-plus_sd15.bin");
    std::fs::write(&p, b"PK\x03\x04").unwrap();
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &[".bin", "safetensors.torch.save_file", "image_proj"],
        ".bin",
    );
    // Truncated.
    let bytes = std::fs::read(dir().join(plus)).unwrap();
    let p = t.join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &["truncated"],
        "truncated",
    );
    // Not an IP-Adapter at all: a LoRA file.
    one_line_err(
        IpAdapter::load(
            &common::fixtures().join("lora_tiny-a_peft.safetensors"),
            Device::Cpu,
        )
        .unwrap_err(),
        &["unexpected tensor"],
        "a LoRA file",
    );
    // Image encoder folder missing / a CLIPModel folder / config and weights that disagree.
    one_line_err(
        ImageEncoder::load(&t.join("image_encoder"), Device::Cpu).unwrap_err(),
        &["no such folder"],
        "missing encoder",
    );
    let enc_dir = t.join("clip_model");
    std::fs::create_dir_all(&enc_dir).unwrap();
    std::fs::copy(
        dir().join("image_encoder/model.safetensors"),
        enc_dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        enc_dir.join("config.json"),
        r#"{"model_type": "clip", "vision_config": {"hidden_size": 48}, "text_config": {}}"#,
    )
    .unwrap();
    one_line_err(
        ImageEncoder::load(&enc_dir, Device::Cpu).unwrap_err(),
        &["CLIPModel config", "CLIPVisionModelWithProjection"],
        "CLIPModel folder",
    );
    std::fs::write(
        enc_dir.join("config.json"),
        r#"{"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "image_size": 56, "patch_size": 14, "projection_dim": 24, "hidden_act": "gelu"}"#,
    )
    .unwrap();
    one_line_err(
        ImageEncoder::load(&enc_dir, Device::Cpu).unwrap_err(),
        &["missing tensor vision_model.encoder.layers.3."],
        "encoder layer count",
    );
    // A preprocessor_config.json whose crop is not the encoder's image size.
    let pp_dir = t.join("pp");
    std::fs::create_dir_all(&pp_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir().join("image_encoder").join(f), pp_dir.join(f)).unwrap();
    }
    std::fs::write(
        pp_dir.join("preprocessor_config.json"),
        r#"{"crop_size": {"height": 64, "width": 64}}"#,
    )
    .unwrap();
    one_line_err(
        ImageEncoder::load(&pp_dir, Device::Cpu).unwrap_err(),
        &["crop_size (64, 64)", "image_size 56"],
        "crop size",
    );
}

#[test]
fn depth_is_what_the_file_has() {
    // diffusers hard-codes depth 4 (a depth-3 file fails there); loracast takes the file's.
    let tmp = tempfile::tempdir().unwrap();
    let mut ts = file_tensors("ip-adapter-plus_tiny-a.safetensors");
    ts.retain(|(n, _)| !n.starts_with("image_proj.layers.3."));
    let p = write(tmp.path(), "depth3.safetensors", ts);
    let a = IpAdapter::load(&p, Device::Cpu).unwrap();
    let d = a.describe();
    assert!(
        d.contains("depth 3") && d.contains("diffusers only loads depth 4"),
        "{d}"
    );
    let refs = refs();
    let y = a.project(&r(&refs, "encoder.hidden.a")).unwrap();
    assert_eq!(y.size(), [1, 16, 32]);
    // A gap in the layers is an unexpected key.
    let mut ts = file_tensors("ip-adapter-plus_tiny-a.safetensors");
    ts.retain(|(n, _)| !n.starts_with("image_proj.layers.2."));
    let p = write(tmp.path(), "gap.safetensors", ts);
    one_line_err(
        IpAdapter::load(&p, Device::Cpu).unwrap_err(),
        &["unexpected tensor image_proj.layers.3."],
        "layer gap",
    );
}

#[test]
fn image_requests_are_complete() {
    // The whole-image fixtures (for the UNet/pipeline integration): every request names files
    // that exist and an image that is in the safetensors file.
    let (doc, refs) = (doc(), refs());
    let images = doc["images"].as_array().unwrap();
    assert_eq!(images.len(), 16);
    for req in images {
        let key = req["image"].as_str().unwrap();
        let t = refs.tensor(key, Kind::Uint8).unwrap();
        assert_eq!(t.size(), [1, 32, 32, 3], "{key}");
        let adapter = req["adapter"].as_str().unwrap();
        assert!(dir().join(adapter).is_file(), "{key}: {adapter}");
        assert!(doc["adapters"][adapter].is_object(), "{key}");
        if let Some(lora) = req["lora"].as_str() {
            assert!(common::fixtures().join(lora).is_file(), "{key}: {lora}");
        }
        for imgs in req["ip_images"].as_array().unwrap() {
            for k in imgs.as_array().unwrap() {
                assert!(file(k.as_str().unwrap()).is_file(), "{key}");
            }
        }
        let pipe = req["pipeline"].as_str().unwrap();
        assert!(common::pipeline(pipe).is_dir(), "{key}: {pipe}");
    }
}

#[test]
fn images_match_diffusers_through_the_cli() {
    // Every fixture request (SD1.x and SDXL, Plus and plain, scales 0.5/1, negative prompt, two
    // images, a JPEG, a LoRA on top) through `loracast generate --ip-adapter …`, against
    // diffusers' load_ip_adapter + set_ip_adapter_scale + pipe(ip_adapter_image=…) (issue 16:
    // max ≤ 3 levels, mean ≤ 0.25).
    let (doc, refs) = (doc(), refs());
    let tmp = tempfile::tempdir().unwrap();
    let mut worst = (0u8, 0f64);
    for case in doc["images"].as_array().unwrap() {
        let key = case["image"].as_str().unwrap();
        let out = tmp.path().join(format!("{key}.png"));
        let base = common::pipeline(case["pipeline"].as_str().unwrap());
        let adapter = dir().join(case["adapter"].as_str().unwrap());
        let mut args: Vec<String> = vec![
            "generate".into(),
            "--base".into(),
            base.display().to_string(),
            "--prompt".into(),
            case["prompt"].as_str().unwrap().into(),
            "--steps".into(),
            case["steps"].to_string(),
            "--seed".into(),
            case["seed"].to_string(),
            "--guidance-scale".into(),
            case["guidance_scale"].to_string(),
            "--ip-adapter".into(),
            adapter.display().to_string(),
            "--ip-adapter-scale".into(),
            case["ip_adapter_scale"].to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        let images = &case["ip_images"].as_array().unwrap()[0];
        for im in images.as_array().unwrap() {
            args.extend([
                "--ip-image".into(),
                file(im.as_str().unwrap()).display().to_string(),
            ]);
        }
        if let Some(n) = case["negative_prompt"].as_str() {
            args.extend(["--negative-prompt".into(), n.into()]);
        }
        if let Some(l) = case["lora"].as_str() {
            args.extend([
                "--lora".into(),
                common::fixtures().join(l).display().to_string(),
            ]);
        }
        if let Some(s) = case["lora_scale"].as_f64() {
            args.extend(["--lora-scale".into(), s.to_string()]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = common::loracast(&a);
        assert!(o.status.success(), "{key}: {}", common::stderr(&o));
        let (_, _, ours) = loracast::io::image::read_png_rgb8(&out).unwrap();
        let t = refs.tensor(key, Kind::Uint8).unwrap().get(0);
        let mut theirs = vec![0u8; t.numel()];
        t.copy_data_u8(&mut theirs, t.numel());
        let (max, mean) = common::image_diff(&ours, &theirs);
        assert!(
            max <= 3 && mean <= 0.25,
            "{key} ({case}): max {max}, mean {mean:.3}"
        );
        worst = (worst.0.max(max), worst.1.max(mean));
    }
    eprintln!(
        "IP-Adapter images match diffusers: worst max {}, mean {:.3}",
        worst.0, worst.1
    );
}

#[test]
fn cli_ip_adapter_bad_inputs_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let o = out.to_str().unwrap();
    let tiny = common::pipeline("tiny-a");
    let sdxl_adapter = dir().join("ip-adapter-plus_sdxl-a.safetensors");
    let adapter = dir().join("ip-adapter-plus_tiny-a.safetensors");
    let img = file("a");
    let base = [
        "generate",
        "--base",
        tiny.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--out",
        o,
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    // --ip-image without --ip-adapter; an adapter for another base; a missing encoder folder;
    // an unreadable image.
    common::assert_fails(
        &with(&base, &["--ip-image", img.to_str().unwrap()]),
        Some(&out),
        "--ip-adapter",
    );
    common::assert_fails(
        &with(
            &base,
            &[
                "--ip-adapter",
                sdxl_adapter.to_str().unwrap(),
                "--ip-image",
                img.to_str().unwrap(),
            ],
        ),
        Some(&out),
        "another base",
    );
    let nowhere = tmp.path().join("none");
    common::assert_fails(
        &with(
            &base,
            &[
                "--ip-adapter",
                adapter.to_str().unwrap(),
                "--image-encoder",
                nowhere.to_str().unwrap(),
                "--ip-image",
                img.to_str().unwrap(),
            ],
        ),
        Some(&out),
        "image encoder",
    );
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    common::assert_fails(
        &with(
            &base,
            &[
                "--ip-adapter",
                adapter.to_str().unwrap(),
                "--ip-image",
                bad.to_str().unwrap(),
            ],
        ),
        Some(&out),
        "bad.png",
    );
}

#[test]
fn hm_cfg_with_an_ip_adapter_reduces_to_cfg() {
    // HM-CFG's rows with an IP-Adapter: ∅ gets the negative image embedding, c_G and c_S the
    // image. With κ = 1, a zero LoRA and c_G = c_S = c, ε̃ = ε(∅) + g·(2ε(c) − 2ε(∅)): CFG at
    // guidance 2g with the image on the conditional side, as diffusers' pipe(ip_adapter_image).
    use loracast::lora::format::{write_lora, LoraFormat};
    use loracast::lora::{LoraSet, LoraWeights};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = unet_config("tiny-a");
    let mut zero = LoraSet::default();
    for site in cfg.lora_sites().unwrap() {
        let (i, o) = (site.in_features as i64, site.out_features as i64);
        let opts = (Kind::Float, Device::Cpu);
        let w = LoraWeights {
            a: Tensor::randn([2, i], opts),
            b: Tensor::zeros([o, 2], opts),
            alpha: 2.0,
        };
        zero.weights.insert(site, w);
    }
    let lora = tmp.path().join("zero.safetensors");
    write_lora(&zero, LoraFormat::Peft, &lora).unwrap();
    let base = common::pipeline("tiny-a");
    let adapter = dir().join("ip-adapter-plus_tiny-a.safetensors");
    let run = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let img = file("a");
        let mut args = vec![
            "generate",
            "--base",
            base.to_str().unwrap(),
            "--prompt",
            "a photo of a dog",
            "--steps",
            "4",
            "--seed",
            "3",
            "--ip-adapter",
            adapter.to_str().unwrap(),
            "--ip-image",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = common::loracast(&args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        loracast::io::image::read_png_rgb8(&out).unwrap().2
    };
    let cfg_img = run("cfg.png", &["--guidance-scale", "5"]);
    let hm = run(
        "hm.png",
        &[
            "--guidance-scale",
            "2.5",
            "--lora",
            lora.to_str().unwrap(),
            "--generic-prompt",
            "a photo of a dog",
            "--kappa",
            "1",
        ],
    );
    let (max, mean) = common::image_diff(&hm, &cfg_img);
    assert!(
        max <= 1 && mean <= 0.05,
        "HM-CFG vs CFG: max {max}, mean {mean:.3}"
    );
}
