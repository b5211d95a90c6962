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
//!
//! With `clip_vision` instead of `vit` in the config, the same objective trains the toy world's
//! CLIP vision tower (issue 17: IP-Adapter-Plus's image encoder, shared by the open-category
//! hypernetwork) in `CLIPVisionModelWithProjection`'s layout: the contrastive embedding is the
//! model's own `image_embeds` (`visual_projection` of the post-LayerNorm CLS state, kept, as
//! CLIP keeps its projection), the renders are preprocessed as diffusers' IP-Adapter pipeline
//! preprocesses them ([`diffusers_preprocess`]: CLIP mean/std), and the output folder is what
//! `generate --image-encoder` and `train ip-adapter --image-encoder` read. No captions, labels or
//! evaluators are involved: only "these two renders show the same subject".
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::{train, LoopConfig, StepOutput};
use crate::data::{images_to_tensor, Split, World, IMAGE_SIZE};
use crate::io::preprocess::RgbImage;
use crate::io::safetensors::save;
use crate::models::clip_vision::{ClipVisionModelWithProjection, ClipVisionWithProjectionConfig};
use crate::models::ip_adapter::diffusers_preprocess;
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
    /// Width of the projection head (ViT only: a CLIP tower's is its `projection_dim`).
    #[serde(default)]
    pub projection: i64,
    /// A transformers ViT (the closed-category hypernetwork's encoder)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vit: Option<ViTConfig>,
    /// … or a `CLIPVisionModelWithProjection` (IP-Adapter's image encoder): exactly one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_vision: Option<ClipVisionWithProjectionConfig>,
    #[serde(rename = "loop")]
    pub loop_cfg: LoopConfig,
}

impl EncoderConfig {
    pub fn validate(&self) -> Result<()> {
        self.loop_cfg.validate()?;
        if self.batch < 2 {
            anyhow::bail!(
                "encoder config: batch must be ≥ 2 (the other subjects are the negatives)"
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            anyhow::bail!("encoder config: temperature must be positive");
        }
        match (&self.vit, &self.clip_vision) {
            (Some(v), None) => {
                v.validate()?;
                if self.projection < 1 {
                    anyhow::bail!("encoder config: projection must be ≥ 1 for a ViT");
                }
            }
            (None, Some(c)) => {
                c.vision.validate()?;
                if c.projection_dim < 1 {
                    anyhow::bail!("encoder config: clip_vision.projection_dim must be ≥ 1");
                }
                if c.vision.image_size != IMAGE_SIZE as i64 || c.vision.num_channels != 3 {
                    anyhow::bail!(
                        "encoder config: clip_vision must take the {IMAGE_SIZE}×{IMAGE_SIZE} RGB renders (image_size {IMAGE_SIZE}, num_channels 3)"
                    );
                }
            }
            _ => anyhow::bail!("encoder config: give exactly one of \"vit\" and \"clip_vision\""),
        }
        Ok(())
    }
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
    images_to_tensor(&two_view_renders(world, n))
}

fn two_view_renders(world: &mut World, n: i64) -> Vec<crate::data::render::Image> {
    let ids = world.distinct_identities(Split::Train, n as usize);
    (0..2)
        .flat_map(|_| {
            ids.iter()
                .map(|id| world.view(*id).render())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The image tower being trained and its contrastive embedding `[2n, P]` of a step's renders.
enum Tower {
    Vit(ViTModel, Linear),
    Clip(ClipVisionModelWithProjection),
}

impl Tower {
    fn embed(&self, world: &mut World, n: i64, device: Device) -> Result<Tensor> {
        let renders = two_view_renders(world, n);
        match self {
            // CLS → projection head
            Tower::Vit(vit, head) => {
                let x = images_to_tensor(&renders).to_device(device);
                Ok(head.forward(&vit.forward(&x)?.cls()))
            }
            // image_embeds, from pixels preprocessed as the IP-Adapter pipeline does
            Tower::Clip(clip) => {
                let pre = diffusers_preprocess(clip.config.vision.image_size);
                let images = renders
                    .into_iter()
                    .map(|im| RgbImage::new(im.width as u32, im.height as u32, im.rgb))
                    .collect::<Result<Vec<_>>>()?;
                clip.image_embeds(&pre.batch(&images)?.to_device(device))
            }
        }
    }
}

/// Trains the encoder into `dir` and writes `dir/encoder` (f32, transformers layout).
pub fn train_encoder(
    cfg: &EncoderConfig,
    dir: &Path,
    resume: bool,
    device: Device,
) -> Result<PathBuf> {
    cfg.validate()?;
    let config = serde_json::to_value(cfg)?;
    let mut vs = nn::VarStore::new(device);
    let tower = {
        let _rng = crate::util::rng_lock();
        tch::manual_seed(cfg.loop_cfg.seed as i64);
        match (&cfg.vit, &cfg.clip_vision) {
            (Some(v), _) => {
                let vit = ViTModel::new(vs.root(), v, false)?;
                let head = Linear::new(
                    vs.root() / "projection_head",
                    v.hidden_size,
                    cfg.projection,
                    true,
                );
                Tower::Vit(vit, head)
            }
            (None, Some(c)) => Tower::Clip(ClipVisionModelWithProjection::new(vs.root(), c)?),
            (None, None) => anyhow::bail!("encoder config: no tower"),
        }
    };
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
            // L2-normalised embeddings: [2n, P]
            let z = tower.embed(&mut world, n, device)?;
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

/// Writes the tower as a transformers folder, atomically (a ViT without its projection head;
/// a CLIP tower whole, as `CLIPVisionModelWithProjection`).
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
    let (config, preprocessor) = match (&cfg.vit, &cfg.clip_vision) {
        (Some(v), _) => {
            let mut config = serde_json::to_value(v)?;
            config["architectures"] = serde_json::json!(["ViTModel"]);
            config["model_type"] = "vit".into();
            (config, toy_preprocessor())
        }
        (None, Some(c)) => {
            let mut config = serde_json::to_value(c)?;
            config["architectures"] = serde_json::json!(["CLIPVisionModelWithProjection"]);
            config["model_type"] = "clip_vision_model".into();
            (config, clip_preprocessor(c.vision.image_size))
        }
        (None, None) => anyhow::bail!("encoder config: no tower"),
    };
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        crate::util::write_atomic(&tmp.join(name), serde_json::to_string_pretty(v)?.as_bytes())
    };
    write("config.json", &config)?;
    write("preprocessor_config.json", &preprocessor)?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(out.to_path_buf())
}

/// A CLIP tower's `preprocessor_config.json`: diffusers' IP-Adapter fallback processor
/// (`CLIPImageProcessor(size=s, crop_size=s)`), which is what the tower was trained on.
fn clip_preprocessor(s: i64) -> serde_json::Value {
    let p = diffusers_preprocess(s);
    serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": s}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": s, "width": s},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": p.image_mean, "image_std": p.image_std,
        "do_convert_rgb": true,
    })
}
