//! The toy world's base model, trained from scratch (issue 4, SPEC §6), in three stages that
//! each resume on their own:
//! 1. `vae/`: an `AutoencoderKL` on renders (MSE of decode(mean) + a small KL), f = 2;
//! 2. the latent scaling factor = 1 / std of the latent means of 512 fixed renders (as SD's
//!    0.18215 was chosen);
//! 3. `unet/`: a CLIP text encoder (real CLIP BPE tokenizer) and an SD1.x UNet, jointly, with the
//!    ε-prediction loss on context captions only (identity is never captioned), with caption
//!    dropout so CFG works.
//!
//! The result is written as a diffusers-format folder `DIR/model` (f16 weights), which
//! `loracast generate --base` and diffusers' `StableDiffusionPipeline` both load.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::{train, LoopConfig, StepOutput};
use crate::data::{images_to_tensor, Split, World};
use crate::io::safetensors::save;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};

/// `configs/toy/base.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseConfig {
    /// Seed of the world stream the renders come from (train split only).
    pub world_seed: u64,
    pub batch: i64,
    pub vae: VaeConfig,
    pub vae_loop: LoopConfig,
    pub vae_kl_weight: f64,
    pub text_encoder: ClipTextConfig,
    pub unet: UNetConfig,
    pub unet_loop: LoopConfig,
    /// Fraction of captions replaced by "" (for classifier-free guidance).
    pub caption_dropout: f64,
    /// The DDPM training schedule and the shipped sampler config (diffusers keys).
    pub scheduler: serde_json::Value,
}

/// Renders a batch of the train split for one step: `([B, 3, 32, 32], captions)`.
pub fn world_batch(seed: u64, batch: i64) -> (Tensor, Vec<String>) {
    let mut world = World::new(seed);
    let samples: Vec<_> = (0..batch).map(|_| world.sample(Split::Train)).collect();
    let images: Vec<_> = samples.iter().map(|s| s.render()).collect();
    let captions = samples.iter().map(|s| s.context.caption()).collect();
    (images_to_tensor(&images), captions)
}

/// Where the shipped assets live (the CLIP vocabulary, the toy-world weights).
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("LORACAST_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"),
    }
}

/// Runs (or resumes) every stage into `dir`, then exports `dir/model`.
pub fn train_base(cfg: &BaseConfig, dir: &Path, resume: bool, device: Device) -> Result<PathBuf> {
    let config = serde_json::to_value(cfg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tokenizer = ClipTokenizer::from_dir(&assets_dir().join("clip-tokenizer"))?;
    if cfg.text_encoder.vocab_size as usize != tokenizer.vocab_size() {
        bail!(
            "text_encoder.vocab_size {} ≠ the CLIP tokenizer's {}",
            cfg.text_encoder.vocab_size,
            tokenizer.vocab_size()
        );
    }

    // Model initialisation draws from the global generator: seed it per stage.
    let _rng = crate::util::rng_lock();

    // 1. VAE.
    tch::manual_seed(cfg.vae_loop.seed as i64);
    let mut vae_vs = nn::VarStore::new(device);
    let vae = AutoencoderKL::new(vae_vs.root(), &cfg.vae)?;
    let vae_cfg = serde_json::json!({"vae": cfg.vae, "loop": cfg.vae_loop, "kl": cfg.vae_kl_weight,
                                     "world_seed": cfg.world_seed, "batch": cfg.batch});
    train(
        &dir.join("vae"),
        &cfg.vae_loop,
        &vae_cfg,
        &mut vae_vs,
        resume,
        "vae",
        |step| {
            let (x, _) = world_batch(super::step_seed(cfg.world_seed, step), cfg.batch);
            let x = x.to_device(device);
            let posterior = vae.encode(&x)?;
            let recon = vae.decode(&posterior.mean)?;
            let mse = (&recon - &x).square().mean(Kind::Float);
            let var = posterior.logvar.exp();
            let kl = ((posterior.mean.square() + &var - 1.0 - &posterior.logvar) * 0.5)
                .mean(Kind::Float);
            let mse_v = mse.double_value(&[]);
            Ok(StepOutput {
                loss: mse + kl * cfg.vae_kl_weight,
                metrics: vec![("psnr_db", 10.0 * (4.0 / mse_v.max(1e-12)).log10())],
            })
        },
    )?;
    vae_vs.freeze();

    // 2. Latent scaling factor.
    let scaling_factor = tch::no_grad(|| -> Result<f64> {
        let (x, _) = world_batch(0x5CA1E, 512);
        let z = vae.encode(&x.to_device(device))?.mean;
        Ok(1.0 / z.std(true).double_value(&[]))
    })?;

    // 3. Text encoder + UNet, jointly.
    tch::manual_seed(cfg.unet_loop.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let text_encoder = ClipTextModel::new(vs.root() / "text_encoder", &cfg.text_encoder)?;
    let unet = UNet2DConditionModel::new(vs.root() / "unet", &cfg.unet)?;
    let noise_cfg = crate::diffusion::SchedulerConfig::for_training(&cfg.scheduler)?;
    let schedule = crate::diffusion::NoiseSchedule::new(&noise_cfg)?;
    let n_train = schedule.num_train_timesteps() as i64;
    let unet_cfg = serde_json::json!({"config": config, "scaling_factor": scaling_factor});
    train(
        &dir.join("unet"),
        &cfg.unet_loop,
        &unet_cfg,
        &mut vs,
        resume,
        "unet",
        |step| {
            let seed = super::step_seed(cfg.world_seed ^ 0xBA5E, step);
            let (x, captions) = world_batch(seed, cfg.batch);
            let latents = tch::no_grad(|| {
                vae.encode(&x.to_device(device))
                    .map(|p| p.mean * scaling_factor)
            })?;
            // Caption dropout from the step's own stream.
            let mut rng = crate::data::Rng::new(seed ^ 0xD20F);
            let texts: Vec<&str> = captions
                .iter()
                .map(|c| {
                    if (rng.unit() as f64) < cfg.caption_dropout {
                        ""
                    } else {
                        c.as_str()
                    }
                })
                .collect();
            let ids = tokenizer.encode_batch(&texts).to_device(device);
            let ctx = text_encoder.forward(&ids)?;
            let b = latents.size()[0];
            let t = Tensor::randint(n_train, [b], (Kind::Int64, device));
            let noise = latents.randn_like();
            let noisy = schedule.add_noise(&latents, &noise, &t)?;
            let target = schedule.target(&latents, &noise, &t)?;
            let pred = unet.forward(&noisy, &t, &ctx, None)?;
            Ok(StepOutput {
                loss: (pred - target).square().mean(Kind::Float),
                metrics: vec![],
            })
        },
    )?;

    export(cfg, dir, &vae_vs, &vs, scaling_factor)
}

/// Writes `dir/model` as a diffusers folder with f16 weights (atomically: `model.tmp` → `model`).
fn export(
    cfg: &BaseConfig,
    dir: &Path,
    vae_vs: &nn::VarStore,
    vs: &nn::VarStore,
    scaling_factor: f64,
) -> Result<PathBuf> {
    let out = dir.join("model");
    let tmp = dir.join("model.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let write_json = |path: PathBuf, v: &serde_json::Value| -> Result<()> {
        std::fs::create_dir_all(path.parent().context("no parent")?)?;
        crate::util::write_atomic(&path, serde_json::to_string_pretty(v)?.as_bytes())
    };
    let tensors = |vs: &nn::VarStore, prefix: &str| -> Vec<(String, Tensor)> {
        crate::io::safetensors::sorted_variables(vs)
            .into_iter()
            .filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n.to_string(), t)))
            .collect()
    };
    let version = "0.42.1";
    write_json(
        tmp.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
            "feature_extractor": [null, null], "image_encoder": [null, null],
            "requires_safety_checker": false, "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    // diffusers tags each component config with its class; weights are stored f16.
    let tagged = |mut v: serde_json::Value, class: &str| {
        v["_class_name"] = class.into();
        v["_diffusers_version"] = version.into();
        v
    };
    let weights = |vs: &nn::VarStore, prefix: &str, file: &str| {
        save(&tensors(vs, prefix), Kind::Half, None, &tmp.join(file))
    };
    write_json(
        tmp.join("scheduler/scheduler_config.json"),
        &tagged(cfg.scheduler.clone(), "DDIMScheduler"),
    )?;
    write_json(
        tmp.join("unet/config.json"),
        &tagged(serde_json::to_value(&cfg.unet)?, "UNet2DConditionModel"),
    )?;
    weights(vs, "unet.", "unet/diffusion_pytorch_model.safetensors")?;
    let vae = VaeConfig {
        scaling_factor,
        ..cfg.vae.clone()
    };
    write_json(
        tmp.join("vae/config.json"),
        &tagged(serde_json::to_value(vae)?, "AutoencoderKL"),
    )?;
    weights(vae_vs, "", "vae/diffusion_pytorch_model.safetensors")?;
    // transformers tags its configs differently.
    let mut te = serde_json::to_value(&cfg.text_encoder)?;
    te["architectures"] = serde_json::json!(["CLIPTextModel"]);
    te["model_type"] = "clip_text_model".into();
    write_json(tmp.join("text_encoder/config.json"), &te)?;
    weights(vs, "text_encoder.", "text_encoder/model.safetensors")?;

    let tok = tmp.join("tokenizer");
    std::fs::create_dir_all(&tok)?;
    for e in std::fs::read_dir(assets_dir().join("clip-tokenizer"))? {
        let e = e?;
        std::fs::copy(e.path(), tok.join(e.file_name()))?;
    }
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}
