//! UNet parity with diffusers (fixtures from scripts/fixtures/unet.py), the per-sample LoRA
//! seam, and strict loading errors.
mod common;

use loracast::io::safetensors::SafeTensorsFile;
use loracast::io::DiffusersFolder;
use loracast::lora::{LoraBatch, LoraDelta};
use loracast::models::unet::{UNet2DConditionModel, UNetConfig};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn unet_matches_diffusers() {
    for name in common::PIPELINES {
        let folder = DiffusersFolder::open(&common::pipeline(name)).unwrap();
        let (unet, _vs) = UNet2DConditionModel::load(&folder, Device::Cpu).unwrap();
        let fx =
            SafeTensorsFile::open(&common::fixtures().join(format!("unet_{name}.safetensors")))
                .unwrap();
        for case in ["square", "odd"] {
            let get = |k: &str| fx.tensor(&format!("{case}.{k}"), Kind::Float).unwrap();
            let eps =
                tch::no_grad(|| unet.forward(&get("x"), &get("t"), &get("ctx"), None)).unwrap();
            common::assert_close(&eps, &get("eps"), 1e-4, &format!("{name} {case} ε"));
        }
    }
}

#[test]
fn lora_sites_follow_the_config() {
    // SD1.5: 16 transformer blocks; rank-3 LoRA on attn2 q/k/v = 223,488 weights (paper's 223.5k).
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &UNetConfig::sd15()).unwrap();
    let sites = unet.lora_sites();
    assert_eq!(sites.len(), 16 * 3);
    let weights: usize = sites
        .iter()
        .map(|s| 3 * (s.in_features + s.out_features))
        .sum();
    assert_eq!(weights, 223_488);
    assert_eq!(
        sites[0].module_path(),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    );
    assert_eq!(
        sites.last().unwrap().module_path(),
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"
    );
    assert!(sites
        .iter()
        .any(|s| s.module_path().starts_with("mid_block.attentions.0")));
}

/// Per-sample LoRA: a row with scale 0 is the base model; a row with a delta equals the model
/// with ΔW = s·B·A merged into its weights.
#[test]
fn per_sample_lora_equals_merged_weights() {
    let _rng = loracast::util::rng_lock();
    tch::manual_seed(0);
    let cfg = UNetConfig::tiny();
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &cfg).unwrap();
    let mut merged_vs = nn::VarStore::new(Device::Cpu);
    let merged = UNet2DConditionModel::new(merged_vs.root(), &cfg).unwrap();
    merged_vs.copy(&vs).unwrap();

    let (b, r) = (2i64, 3i64);
    let scale = 0.7;
    let mut lora = LoraBatch::new();
    let vars = merged_vs.variables();
    for site in unet.lora_sites() {
        let (i, o) = (site.in_features as i64, site.out_features as i64);
        let a = Tensor::randn([1, r, i], (Kind::Float, Device::Cpu)) * 0.3;
        let bm = Tensor::randn([1, o, r], (Kind::Float, Device::Cpu)) * 0.3;
        // Merge ΔW = s·B·A into the copy.
        let w = &vars[&format!("{}.weight", site.module_path())];
        tch::no_grad(|| {
            let mut w = w.shallow_clone();
            let _ = w.g_add_(&(bm.squeeze_dim(0).matmul(&a.squeeze_dim(0)) * scale));
        });
        // Row 0: base (scale 0); row 1: LoRA.
        let delta = LoraDelta {
            a: a.expand([b, r, i], false),
            b: bm.expand([b, o, r], false),
            scale: Tensor::from_slice(&[0.0f32, scale as f32]),
        };
        lora.insert(*site, delta);
    }
    let x = Tensor::randn([b, 4, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[10.0f32, 700.0]);
    let ctx = Tensor::randn([b, 5, 32], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        let ours = unet.forward(&x, &t, &ctx, Some(&lora)).unwrap();
        let base = unet.forward(&x, &t, &ctx, None).unwrap();
        let full = merged.forward(&x, &t, &ctx, None).unwrap();
        common::assert_close(&ours.get(0), &base.get(0), 1e-6, "scale-0 row = base");
        common::assert_close(&ours.get(1), &full.get(1), 1e-4, "LoRA row = merged");
        assert!(
            common::rel_err(&base.get(1), &full.get(1)) > 1e-3,
            "LoRA had no effect"
        );
    });
}

#[test]
fn lora_for_a_missing_site_or_wrong_shape_is_an_error() {
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &UNetConfig::tiny()).unwrap();
    let site = unet.lora_sites()[0];
    let mut lora = LoraBatch::new();
    lora.insert(
        site,
        LoraDelta {
            a: Tensor::zeros(
                [1, 2, site.in_features as i64 + 1],
                (Kind::Float, Device::Cpu),
            ),
            b: Tensor::zeros([1, site.out_features as i64, 2], (Kind::Float, Device::Cpu)),
            scale: Tensor::ones([1], (Kind::Float, Device::Cpu)),
        },
    );
    let x = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let ctx = Tensor::zeros([1, 5, 32], (Kind::Float, Device::Cpu));
    let err = unet
        .forward(&x, &Tensor::from(1.0f32), &ctx, Some(&lora))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&site.module_path()), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &UNetConfig::tiny()).unwrap();
    let t = Tensor::from(1.0f32);
    let x = Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let ctx = Tensor::zeros([1, 5, 32], (Kind::Float, Device::Cpu));
    assert!(unet.forward(&x, &t, &ctx, None).is_err(), "wrong channels");
    let x = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let bad_ctx = Tensor::zeros([1, 5, 31], (Kind::Float, Device::Cpu));
    assert!(
        unet.forward(&x, &t, &bad_ctx, None).is_err(),
        "wrong context width"
    );
    let bad_t = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    assert!(
        unet.forward(&x, &bad_t, &ctx, None).is_err(),
        "wrong timestep count"
    );
}

#[test]
fn strict_loading_names_the_key_and_shapes() {
    // A config that disagrees with the weights: the error names the tensor and both shapes.
    let dir = common::copy_pipeline("tiny-b");
    common::edit_json(&dir.path().join("unet/config.json"), |v| {
        v["cross_attention_dim"] = 16.into();
    });
    let folder = DiffusersFolder::open(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("attn2.to_k.weight"), "{err}");
    assert!(
        err.contains("[48, 24]") && err.contains("[48, 16]"),
        "{err}"
    );

    // Unsupported options are named.
    let dir = common::copy_pipeline("tiny-b");
    common::edit_json(&dir.path().join("unet/config.json"), |v| {
        v["class_embed_type"] = "timestep".into();
    });
    let folder = DiffusersFolder::open(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("class_embed_type"), "{err}");

    // Unreadable config.
    let dir = common::copy_pipeline("tiny-b");
    std::fs::write(dir.path().join("unet/config.json"), "{ not json").unwrap();
    let folder = DiffusersFolder::open(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn truncated_missing_and_foreign_weights_are_errors() {
    let dir = common::copy_pipeline("tiny-b");
    let w = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let folder = DiffusersFolder::open(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("truncated or corrupted"), "{err}");

    // Only .bin weights.
    std::fs::rename(&w, dir.path().join("unet/diffusion_pytorch_model.bin")).unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains(".bin"), "{err}");

    // Only an fp16 variant.
    std::fs::rename(
        dir.path().join("unet/diffusion_pytorch_model.bin"),
        dir.path()
            .join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("fp16"), "{err}");

    // Weights of another model: missing/unexpected keys are named.
    let dir = common::copy_pipeline("tiny-b");
    std::fs::copy(
        common::pipeline("tiny-b").join("vae/diffusion_pytorch_model.safetensors"),
        dir.path().join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let folder = DiffusersFolder::open(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        UNet2DConditionModel::load(&folder, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("missing tensor"), "{err}");
}
