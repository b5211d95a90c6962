//! Pretraining the toy world's image encoder (the hypernetwork's frozen ViT, issue 5).
//!
//! The paper's encoder is an ImageNet-21k ViT-B/16; no such weights exist here, so loracast
//! pretrains a small ViT on renders with a self-supervised, instance-discrimination objective
//! (SimCLR's NT-Xent, Chen et al. 2020): every step draws `batch` distinct train-split subjects
//! and renders each twice, in two independently drawn contexts with independent jitter; the
//! two renders of a subject are the positive pair, all other renders the negatives; the loss is
//! the symmetric InfoNCE over cosine similarities of a projection of the CLS token at
//! temperature τ. No attribute labels are used and the evaluators play no part: the only
//! supervision is "these two renders show the same subject" — what a user's several photos of
//! one subject also say. The projection head is dropped afterwards.
//!
//! Output: `DIR/encoder/` in transformers' ViT layout (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`), the same layout `train hypernet --encoder` reads for
//! `google/vit-base-patch16-224-in21k`.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::{train, LoopConfig, StepOutput};
use crate::data::{images_to_tensor, Split, World, IMAGE_SIZE};
use crate::io::safetensors::save;
use crate::models::vit::{ViTConfig, ViTModel};
use crate::nn::Linear;

/// `configs/toy/encoder.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub world_seed: u64,
    /// Distinct subjects per step (2× as many renders).
    pub batch: i64,
    pub temperature: f64,
    /// Width of the projection head.
    pub projection: i64,
    pub vit: ViTConfig,
    #[serde(rename = "loop")]
    pub loop_cfg: LoopConfig,
}

/// The toy renders' `preprocessor_config.json`: the 32×32 render as is, scaled to [-1, 1]
/// (transformers' ViT processor with mean = std = 0.5), i.e. exactly `images_to_tensor`.
pub fn toy_preprocessor() -> serde_json::Value {
    let s = IMAGE_SIZE;
    serde_json::json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true, "size": {"height": s, "width": s}, "resample": 2,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    })
}

/// `n` distinct train-split subjects, each rendered in two fresh contexts: `[2n, 3, S, S]`
/// ordered (view 1 of every subject, then view 2).
pub fn two_views(world: &mut World, n: i64) -> Tensor {
    let ids = world.distinct_identities(Split::Train, n as usize);
    let images: Vec<_> = (0..2)
        .flat_map(|_| {
            ids.iter()
                .map(|id| world.view(*id).render())
                .collect::<Vec<_>>()
        })
        .collect();
    images_to_tensor(&images)
}

/// Trains the encoder into `dir` and writes `dir/encoder` (f32, transformers layout).
pub fn train_encoder(
    cfg: &EncoderConfig,
    dir: &Path,
    resume: bool,
    device: Device,
) -> Result<PathBuf> {
    let config = serde_json::to_value(cfg)?;
    let _rng = crate::util::rng_lock();
    tch::manual_seed(cfg.loop_cfg.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let vit = ViTModel::new(vs.root(), &cfg.vit, false)?;
    let head = Linear::new(
        vs.root() / "projection_head",
        cfg.vit.hidden_size,
        cfg.projection,
        true,
    );
    let n = cfg.batch;
    train(
        &dir.join("run"),
        &cfg.loop_cfg,
        &config,
        &mut vs,
        resume,
        "encoder",
        |step| {
            let mut world = World::new(super::step_seed(cfg.world_seed, step));
            let x = two_views(&mut world, n).to_device(device);
            // CLS → projection, L2-normalised: [2n, P]
            let z = head.forward(&vit.forward(&x)?.cls());
            let z = &z / z.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-8);
            // Cosine similarities / τ with the self-pairs masked: [2n, 2n]
            let sim = z.matmul(&z.tr()) / cfg.temperature;
            let eye = Tensor::eye(2 * n, (Kind::Bool, device));
            let sim = sim.masked_fill(&eye, -1e9);
            // Row i's positive is i ± n.
            let target = Tensor::arange(2 * n, (Kind::Int64, device)).remainder(n * 2);
            let target = (target + n).remainder(2 * n);
            let loss = sim.cross_entropy_for_logits(&target);
            let acc = sim
                .argmax(1, false)
                .eq_tensor(&target)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            Ok(StepOutput {
                loss,
                metrics: vec![("pair_accuracy", acc)],
            })
        },
    )
    .context("pretraining the toy encoder")?;
    export(cfg, &vs, &dir.join("encoder"))
}

/// Writes the ViT (without the projection head) as a transformers folder, atomically.
fn export(cfg: &EncoderConfig, vs: &nn::VarStore, out: &Path) -> Result<PathBuf> {
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let tensors: Vec<(String, Tensor)> = crate::io::safetensors::sorted_variables(vs)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("projection_head."))
        .collect();
    save(&tensors, Kind::Float, None, &tmp.join("model.safetensors"))?;
    let mut config = serde_json::to_value(&cfg.vit)?;
    config["architectures"] = serde_json::json!(["ViTModel"]);
    config["model_type"] = "vit".into();
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        crate::util::write_atomic(&tmp.join(name), serde_json::to_string_pretty(v)?.as_bytes())
    };
    write("config.json", &config)?;
    write("preprocessor_config.json", &toy_preprocessor())?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(out.to_path_buf())
}
