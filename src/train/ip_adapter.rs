//! Training an IP-Adapter-Plus for a frozen base (issue 17's toy IP-Adapter), the way the
//! IP-Adapter paper trains it (Ye et al. 2023, §3.3 and its `tutorial_train_plus.py`):
//!
//!   L = E‖ε − ε_θ(z_t, t, c_text, c_image)‖²,  c_image = Resampler(CLIP hidden_states[-2](x))
//!
//! where the conditioning image x is the training image itself (reconstruction) and its caption
//! is the text. Per row, with probability `drop_text` the caption is dropped (empty prompt), with
//! `drop_image` the image (zero pixel values, so the tokens are those of diffusers' unconditional
//! image), with `drop_both` both — so CFG works on either condition at inference. Only the
//! Resampler and the decoupled `to_k_ip`/`to_v_ip` train (initialised from the UNet's attn2
//! `to_k`/`to_v`, as the paper's script does); the UNet, VAE, text and image encoders are frozen.
//! The IP-Adapter scale is 1 in training.
//!
//! Data: the toy world's train split (a subject in a context, its generic caption); a real data
//! set would be images with captions, as the paper's LAION/COYO pairs.
//! Output: `DIR/ip_adapter.safetensors` in the tencent/h94 flat layout (f16), which
//! `generate --ip-adapter` and diffusers' `load_ip_adapter` read, and `DIR/image_encoder/`, a
//! copy of the frozen encoder folder, where `generate` looks for it by default.
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::{train, LoopConfig, StepOutput};
use crate::data::{Split, World};
use crate::io::preprocess::RgbImage;
use crate::models::ip_adapter::{ImageEncoder, IpAdapter, ResamplerShape, DIM_HEAD};
use crate::models::unet::{ImageTokens, UNetCond};
use crate::pipeline::StableDiffusion;

/// `configs/toy/ip_adapter.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterTrainConfig {
    /// Image tokens per image (h94's Plus adapters: 16).
    pub num_queries: i64,
    /// Resampler width (h94 SD1.5 Plus: 768; SDXL Plus: 1280); heads = hidden / 64.
    pub hidden: i64,
    /// Resampler blocks (diffusers loads only 4).
    pub depth: usize,
    /// FeedForward width multiple (h94: 4).
    pub ff_mult: i64,
    /// Images per step.
    pub batch: i64,
    pub drop_text: f64,
    pub drop_image: f64,
    pub drop_both: f64,
    /// Seed of the toy world's data stream.
    pub world_seed: u64,
    #[serde(rename = "loop")]
    pub loop_cfg: LoopConfig,
}

impl IpAdapterTrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.loop_cfg.validate()?;
        use crate::models::{check_range, MAX_DEPTH, MAX_WIDTH};
        const WHAT: &str = "IP-Adapter training config";
        check_range(WHAT, "num_queries", self.num_queries, 1, 1 << 12)?;
        check_range(WHAT, "hidden", self.hidden, DIM_HEAD, MAX_WIDTH)?;
        check_range(WHAT, "depth", self.depth as i64, 1, MAX_DEPTH)?;
        check_range(WHAT, "ff_mult", self.ff_mult, 1, 16)?;
        check_range(WHAT, "batch", self.batch, 1, 1 << 12)?;
        if self.hidden % DIM_HEAD != 0 {
            bail!(
                "{WHAT}: hidden {} is not a multiple of the head dim {DIM_HEAD}",
                self.hidden
            );
        }
        let p = [self.drop_text, self.drop_image, self.drop_both];
        if p.iter().any(|x| !x.is_finite() || *x < 0.0) || p.iter().sum::<f64>() > 1.0 {
            bail!("{WHAT}: drop_text, drop_image and drop_both must be ≥ 0 and sum to at most 1");
        }
        Ok(())
    }
}

/// What [`train_ip_adapter`] needs besides its config.
pub struct IpAdapterJob<'a> {
    pub base: &'a Path,
    pub image_encoder: &'a Path,
    pub out: &'a Path,
    pub resume: bool,
    pub device: Device,
}

/// Trains an IP-Adapter-Plus for `job.base`: `out/ip_adapter.safetensors` + `out/image_encoder/`.
pub fn train_ip_adapter(cfg: &IpAdapterTrainConfig, job: IpAdapterJob) -> Result<PathBuf> {
    cfg.validate()?;
    let device = job.device;
    let sd = StableDiffusion::load(job.base, device)?;
    let encoder = ImageEncoder::for_base(job.image_encoder, job.base, device)?;
    let embed = encoder.model.config.vision.hidden_size;
    let cross = crate::models::ip_adapter::attn2_slots(&sd.unet.config)?
        .first()
        .map(|s| s.cross)
        .context("the base UNet has no cross-attention")?;
    let shape = ResamplerShape {
        num_queries: cfg.num_queries,
        hidden: cfg.hidden,
        embed,
        output: cross,
        depth: cfg.depth,
        heads: cfg.hidden / DIM_HEAD,
        ff_inner: cfg.ff_mult * cfg.hidden,
    };
    let mut vs = nn::VarStore::new(device);
    let adapter = {
        let _rng = crate::util::rng_lock();
        tch::manual_seed(cfg.loop_cfg.seed as i64);
        IpAdapter::new_plus(&vs.root(), shape, &sd.unet)?
    };
    let weights = Rc::new(adapter.attn_weights(&sd.unet.config)?);
    let size = sd.default_size();
    let scaling = sd.vae.config().scaling_factor;
    let noise_cfg = crate::diffusion::SchedulerConfig::for_training(&sd.scheduler_json)?;
    let schedule = crate::diffusion::NoiseSchedule::new(&noise_cfg)?;
    let n_train = schedule.num_train_timesteps() as i64;
    let run_cfg = serde_json::json!({"train": cfg, "image_encoder": encoder.model.config});
    let b = cfg.batch;
    let _rng = crate::util::rng_lock();
    train(
        &job.out.join("run"),
        &cfg.loop_cfg,
        &run_cfg,
        &mut vs,
        job.resume,
        "ip-adapter",
        |step| {
            let mut world = World::new(super::step_seed(cfg.world_seed, step));
            let (mut images, mut targets, mut prompts, mut keep_image) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..b {
                let s = world.sample(Split::Train);
                let img = s.render();
                images.push(RgbImage::new(img.width as u32, img.height as u32, img.rgb)?);
                targets.push(super::hypernet::toy_target(&s, size)?);
                // text-only drop, image-only drop, both (the paper's 0.05 each)
                let u = world.rng().unit() as f64;
                let (drop_text, drop_image) = if u < cfg.drop_text {
                    (true, false)
                } else if u < cfg.drop_text + cfg.drop_image {
                    (false, true)
                } else if u < cfg.drop_text + cfg.drop_image + cfg.drop_both {
                    (true, true)
                } else {
                    (false, false)
                };
                prompts.push(if drop_text {
                    String::new()
                } else {
                    s.context.caption()
                });
                keep_image.push(!drop_image as i64 as f32);
            }
            let (latents, ctx, features) = tch::no_grad(|| -> Result<_> {
                let z = sd
                    .vae
                    .encode(&Tensor::stack(&targets, 0).to_device(device))?
                    .mean
                    * scaling;
                let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
                let ids = sd.tokenizer.encode_batch(&texts).to_device(device);
                // Dropped images: zero pixel values (diffusers' unconditional image). [B,1,1,1]
                let keep = Tensor::from_slice(&keep_image)
                    .view([b, 1, 1, 1])
                    .to_device(device);
                let px = encoder.pixel_values(&images)?.to_device(device) * keep;
                Ok((z, sd.text_encoder.forward(&ids)?, encoder.penultimate(&px)?))
            })?;
            let t = Tensor::randint(n_train, [b], (Kind::Int64, device));
            let noise = latents.randn_like();
            let noisy = schedule.add_noise(&latents, &noise, &t)?;
            let target = schedule.target(&latents, &noise, &t)?;
            let image = ImageTokens {
                tokens: adapter.forward_proj(&features)?,
                scale: Tensor::ones([b], (Kind::Float, device)),
                weights: weights.clone(),
            };
            let cond = UNetCond {
                text: &ctx,
                added: None,
                image: Some(&image),
            };
            let pred = sd.unet.forward_cond(&noisy, &t, &cond, None)?;
            let loss = (pred - &target).square().mean(Kind::Float);
            Ok(StepOutput {
                loss,
                metrics: vec![],
            })
        },
    )
    .context("training the IP-Adapter")?;
    std::fs::create_dir_all(job.out)?;
    let out = job.out.join("ip_adapter.safetensors");
    adapter.save(&vs, &out, Kind::Half)?;
    copy_dir_atomic(job.image_encoder, &job.out.join("image_encoder"))?;
    Ok(out)
}

/// Copies the files of folder `src` to `dst` (through `dst.tmp`, renamed at the end).
pub(crate) fn copy_dir_atomic(src: &Path, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), tmp.join(entry.file_name()))?;
        }
    }
    if dst.exists() {
        std::fs::remove_dir_all(dst)?;
    }
    std::fs::rename(&tmp, dst)?;
    Ok(())
}
