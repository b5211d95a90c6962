//! The Stable Diffusion 1.x text-to-image pipeline: the one explicit denoising loop.
//!
//! Mirrors diffusers' `StableDiffusionPipeline.__call__` step for step so that a seed gives the
//! same image (SPEC §5): prompt → CLIP ids → text states (prompt and negative encoded
//! separately), initial latents `randn(seed) · init_noise_sigma` from the CPU generator, then per
//! timestep `scale_model_input → UNet on [uncond; cond] → ε_u + g·(ε_c − ε_u) → scheduler.step`,
//! and `VAE.decode(latents / scaling_factor)`.
//!
//! With a LoRA, every row carries its own LoRA (per-sample, [`LoraSet::batch`]): plain CFG applies
//! it to both rows as diffusers' `load_lora_weights` does; Hybrid-Model CFG (paper §4.2, appendix
//! A.2, SPEC §2) runs the rows (∅, base), (c_G, base), (c_S, LoRA) in ONE UNet call and combines
//! ε̃ = ε₀(x,∅) + g·(κ·ε_θ(x,c_S) + (2−κ)·ε₀(x,c_G) − 2·ε₀(x,∅)).
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::diffusion::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::io::DiffusersFolder;
use crate::lora::LoraSet;
use crate::models::clip_text::ClipTextModel;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;

/// A loaded SD1.x pipeline. The VarStores own the (frozen) weights.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json` as read, and the class it names.
    pub scheduler_json: serde_json::Value,
    pub scheduler_kind: SchedulerKind,
    pub device: Device,
    _stores: Vec<VarStore>,
}

/// One text-to-image request (defaults follow diffusers' StableDiffusionPipeline).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub guidance_scale: f64,
    pub steps: usize,
    /// `None` = the folder's own scheduler class.
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    pub height: Option<i64>,
    pub width: Option<i64>,
    /// A LoRA for the UNet's attn2 sites (personalized rows).
    pub lora: Option<LoraSet>,
    /// User scale on top of alpha/r (diffusers' `cross_attention_kwargs={"scale": s}`).
    pub lora_scale: f64,
    /// c_G, the prompt without the subject token: switches to HM-CFG (needs `lora`).
    pub generic_prompt: Option<String>,
    /// HM-CFG's κ ∈ [0, 2]: weight of the personalized model (1 = the paper's default).
    pub kappa: f64,
}

/// How the UNet rows of one step are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    /// One row (guidance_scale ≤ 1).
    None,
    /// Rows [∅, c]: ε_u + g·(ε_c − ε_u).
    Cfg { scale: f64 },
    /// Rows [∅ base, c_G base, c_S LoRA]: ε₀(∅) + g·(κ·ε_θ(c_S) + (2−κ)·ε₀(c_G) − 2·ε₀(∅)).
    HmCfg { scale: f64, kappa: f64 },
}

impl Guidance {
    /// Combines the UNet output `[rows, C, h, w]` into one `[1, C, h, w]` prediction.
    pub fn combine(self, eps: &Tensor) -> Tensor {
        match self {
            Guidance::None => eps.shallow_clone(),
            Guidance::Cfg { scale } => {
                let e = eps.chunk(2, 0);
                &e[0] + (&e[1] - &e[0]) * scale
            }
            Guidance::HmCfg { scale, kappa } => {
                let e = eps.chunk(3, 0);
                let (uncond, generic, subject) = (&e[0], &e[1], &e[2]);
                uncond + (subject * kappa + generic * (2.0 - kappa) - uncond * 2.0) * scale
            }
        }
    }
}

impl GenerateRequest {
    pub fn new(prompt: &str) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: None,
            guidance_scale: 7.5,
            steps: 50,
            scheduler: None,
            seed: 0,
            height: None,
            width: None,
            lora: None,
            lora_scale: 1.0,
            generic_prompt: None,
            kappa: 1.0,
        }
    }

    pub fn guidance(&self) -> Guidance {
        if self.generic_prompt.is_some() {
            Guidance::HmCfg {
                scale: self.guidance_scale,
                kappa: self.kappa,
            }
        } else if self.guidance_scale > 1.0 {
            Guidance::Cfg {
                scale: self.guidance_scale,
            }
        } else {
            Guidance::None
        }
    }
}

impl StableDiffusion {
    /// Loads every component of a diffusers folder, validating all of them before returning.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let folder = DiffusersFolder::open(dir)?;
        let scheduler_json: serde_json::Value =
            folder.config("scheduler", "scheduler_config.json")?;
        let class = scheduler_json
            .get("_class_name")
            .and_then(|c| c.as_str())
            .context("scheduler/scheduler_config.json has no _class_name")?;
        let scheduler_kind = SchedulerKind::from_class_name(class)?;
        // Validate the folder's own scheduler config up front.
        SchedulerConfig::from_json(&scheduler_json, scheduler_kind)
            .context("scheduler/scheduler_config.json")?;
        let tokenizer = ClipTokenizer::from_dir(&folder.component("tokenizer")?)?;
        let (text_encoder, te_vs) = ClipTextModel::load(&folder, device)?;
        let (unet, unet_vs) = UNet2DConditionModel::load(&folder, device)?;
        let (vae, vae_vs) = AutoencoderKL::load(&folder, device)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_json,
            scheduler_kind,
            device,
            _stores: vec![te_vs, unet_vs, vae_vs],
        })
    }

    /// Default image size: UNet `sample_size` × VAE scale factor.
    pub fn default_size(&self) -> i64 {
        self.unet.config.sample_size * self.vae.config().scale_factor()
    }

    /// CLIP last hidden state of one prompt: `[1, 77, D]`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = Tensor::from_slice(&self.tokenizer.encode(prompt))
            .unsqueeze(0)
            .to_device(self.device);
        self.text_encoder.forward(&ids)
    }

    /// The scheduler a request asks for, configured like diffusers' `X.from_config(config)`.
    pub fn scheduler(
        &self,
        kind: Option<SchedulerKind>,
        steps: usize,
    ) -> Result<Box<dyn Scheduler>> {
        let kind = kind.unwrap_or(self.scheduler_kind);
        let cfg = SchedulerConfig::from_pipeline_config(&self.scheduler_json, kind)?;
        diffusion::build(kind, &cfg, steps)
    }

    /// Checks a request without running it.
    pub fn validate(&self, req: &GenerateRequest) -> Result<(i64, i64)> {
        let h = req.height.unwrap_or_else(|| self.default_size());
        let w = req.width.unwrap_or_else(|| self.default_size());
        if h <= 0 || w <= 0 || h % 8 != 0 || w % 8 != 0 {
            bail!("--height and --width must be positive multiples of 8, got {h}×{w}");
        }
        if req.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if !req.guidance_scale.is_finite() {
            bail!("--guidance-scale must be a finite number");
        }
        if !req.lora_scale.is_finite() {
            bail!("--lora-scale must be a finite number");
        }
        if req.generic_prompt.is_some() {
            if req.lora.is_none() {
                bail!("--generic-prompt (HM-CFG) needs --lora: it mixes the base and the personalized model");
            }
            if !(0.0..=2.0).contains(&req.kappa) {
                bail!("--kappa must be in [0, 2], got {}", req.kappa);
            }
        }
        if let Some(lora) = &req.lora {
            lora.validate(self.unet.lora_sites())?;
        }
        Ok((h, w))
    }

    /// Runs the denoising loop; returns the decoded image `[3, H, W]` in [-1, 1].
    /// `progress(i, n)` is called after each step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (h, w) = self.validate(req)?;
        let mut scheduler = self.scheduler(req.scheduler, req.steps)?;
        let guidance = req.guidance();
        // The latents (and Euler-a's noise) come from the seeded global generator.
        let _rng = crate::util::rng_lock();
        let lora = req.lora.as_ref().map(|l| l.to_device(self.device));
        tch::no_grad(|| {
            // 1. Text states and the LoRA of each row (diffusers encodes each prompt on its own).
            let uncond = || self.encode_prompt(req.negative_prompt.as_deref().unwrap_or(""));
            let personal = lora.as_ref().map(|l| (l, req.lora_scale));
            let (ctx, rows) = match guidance {
                Guidance::None => (self.encode_prompt(&req.prompt)?, vec![personal]),
                // [∅; c]: [2, 77, D]
                Guidance::Cfg { .. } => (
                    Tensor::cat(&[uncond()?, self.encode_prompt(&req.prompt)?], 0),
                    vec![personal, personal],
                ),
                // [∅; c_G; c_S]: [3, 77, D]
                Guidance::HmCfg { .. } => {
                    let generic = req.generic_prompt.as_deref().unwrap_or_default();
                    let rows = [
                        uncond()?,
                        self.encode_prompt(generic)?,
                        self.encode_prompt(&req.prompt)?,
                    ];
                    (Tensor::cat(&rows, 0), vec![None, None, personal])
                }
            };
            let lora_batch = lora.is_some().then(|| LoraSet::batch(&rows));
            let n_rows = rows.len() as i64;

            // 2. Initial latents from the seeded CPU generator (diffusers' randn_tensor).
            let f = self.vae.config().scale_factor();
            let shape = [1, self.unet.config.in_channels, h / f, w / f];
            tch::manual_seed(req.seed as i64);
            let mut latents = Tensor::randn(shape, (Kind::Float, Device::Cpu))
                .to_device(self.device)
                * scheduler.init_noise_sigma();

            // 3. Denoising loop.
            let timesteps = scheduler.timesteps().to_vec();
            for (i, &t) in timesteps.iter().enumerate() {
                let x = scheduler.scale_model_input(&latents, i);
                // [1, C, h, w] → [rows, C, h, w]
                let x = x.expand([n_rows, -1, -1, -1], false).contiguous();
                let t = Tensor::from(t as f32).to_device(self.device);
                let eps = self.unet.forward(&x, &t, &ctx, lora_batch.as_ref())?;
                let eps = guidance.combine(&eps);
                latents = scheduler.step(&eps, i, &latents)?;
                progress(i + 1, timesteps.len());
            }

            // 4. Decode.
            let z = latents / self.vae.config().scaling_factor;
            let image = self.vae.decode(&z)?;
            Ok(image.squeeze_dim(0))
        })
    }
}
