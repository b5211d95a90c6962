//! The Stable Diffusion text-to-image pipeline for SD1.x/SD2.x and SDXL: the one explicit
//! denoising loop.
//!
//! Mirrors diffusers' `StableDiffusionPipeline.__call__` and `StableDiffusionXLPipeline.__call__`
//! step for step so that a seed gives the same image (SPEC §5): prompt → CLIP ids → text states
//! (prompt and negative encoded separately), initial latents `randn(seed) · init_noise_sigma`
//! from the CPU generator, then per timestep `scale_model_input → UNet on [uncond; cond] →
//! ε_u + g·(ε_c − ε_u) (→ guidance_rescale) → scheduler.step`, and `VAE.decode(latents /
//! scaling_factor)`.
//!
//! The families differ only in how a prompt becomes conditioning ([`Family`]): SD1.x uses the
//! text encoder's last hidden state; SDXL (`pipeline_stable_diffusion_xl.py::encode_prompt`)
//! concatenates `hidden_states[-2]` of `text_encoder` and `text_encoder_2`, adds the pooled
//! `text_embeds` of `text_encoder_2` and the time ids `[orig_h, orig_w, crop_y, crop_x, tgt_h,
//! tgt_w]` (`_get_add_time_ids`), and with `force_zeros_for_empty_prompt` and no negative prompt
//! its unconditional row is all zeros. It decodes `latents · std / sf + mean` when the VAE
//! config has `latents_mean`/`latents_std`.
//!
//! With a LoRA, every row carries its own LoRA (per-sample, [`LoraSet::batch`]): plain CFG applies
//! it to both rows as diffusers' `load_lora_weights` does; Hybrid-Model CFG (paper §4.2, appendix
//! A.2, SPEC §2) runs the rows (∅, base), (c_G, base), (c_S, LoRA) in ONE UNet call and combines
//! ε̃ = ε₀(x,∅) + g·(κ·ε_θ(x,c_S) + (2−κ)·ε₀(x,c_G) − 2·ε₀(x,∅)).
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::diffusion::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::io::DiffusersFolder;
use crate::lora::LoraSet;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{
    AddedCond, ImageTokens, IpWeights, UNet2DConditionModel, UNetCond, UNetConfig,
};
use crate::models::vae::AutoencoderKL;

/// Which pipeline a folder is, from its `model_index.json` and UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline` (SD1.x/SD2.x).
    Sd,
    /// `StableDiffusionXLPipeline`: two text encoders, pooled embeds and time ids.
    Sdxl {
        /// `model_index.json`'s `force_zeros_for_empty_prompt` (default true): no negative
        /// prompt → zero unconditional embeddings.
        force_zeros_for_empty_prompt: bool,
    },
}

/// SDXL's second tokenizer and text encoder (`tokenizer_2`, `text_encoder_2`).
pub struct SecondTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModelWithProjection,
}

/// The conditioning of one or more UNet rows.
#[derive(Debug)]
pub struct TextCond {
    /// Cross-attention states `[B, 77, cross_attention_dim]`.
    pub hidden: Tensor,
    /// SDXL: pooled `text_embeds` `[B, P]`.
    pub pooled: Option<Tensor>,
}

impl TextCond {
    /// Rows stacked in order: `[ΣB, …]`.
    pub fn cat(rows: &[TextCond]) -> Result<TextCond> {
        let hidden: Vec<&Tensor> = rows.iter().map(|r| &r.hidden).collect();
        let pooled: Option<Vec<&Tensor>> = rows.iter().map(|r| r.pooled.as_ref()).collect();
        if pooled.is_none() && rows.iter().any(|r| r.pooled.is_some()) {
            bail!("internal error: rows mix SD1.x and SDXL conditioning");
        }
        Ok(TextCond {
            hidden: Tensor::cat(&hidden, 0),
            pooled: pooled.map(|p| Tensor::cat(&p, 0)),
        })
    }

    /// Every row repeated `n` times in place (diffusers' `num_images_per_prompt`).
    pub fn repeat(&self, n: i64) -> TextCond {
        TextCond {
            hidden: self.hidden.repeat_interleave_self_int(n, 0, None),
            pooled: self
                .pooled
                .as_ref()
                .map(|p| p.repeat_interleave_self_int(n, 0, None)),
        }
    }

    /// The same shapes, all zeros (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> TextCond {
        TextCond {
            hidden: self.hidden.zeros_like(),
            pooled: self.pooled.as_ref().map(Tensor::zeros_like),
        }
    }
}

/// A loaded SD1.x or SDXL pipeline. The VarStores own the (frozen) weights.
pub struct StableDiffusion {
    pub family: Family,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL only.
    pub text_encoder_2: Option<SecondTextEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json` as read, and the class it names.
    pub scheduler_json: serde_json::Value,
    pub scheduler_kind: SchedulerKind,
    pub device: Device,
    /// Compute dtype of the text encoders and the UNet (`--dtype`); latents and the scheduler
    /// stay float32.
    pub dtype: Kind,
    /// The VAE's dtype: `dtype`, or float32 for fp16 with `force_upcast`.
    pub vae_dtype: Kind,
    _stores: Vec<VarStore>,
}

/// How [`StableDiffusion::load_with`] reads a folder.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// diffusers' `variant` (`fp16`): `*.fp16.safetensors` where a component has them.
    pub variant: Option<String>,
    /// Compute dtype (`--dtype f32|f16|bf16`), diffusers' `torch_dtype`.
    pub dtype: Kind,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            variant: None,
            dtype: Kind::Float,
        }
    }
}

/// `f32` | `f16` | `bf16` → the tch kind.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "f16" | "float16" | "fp16" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => bail!("--dtype must be f32, f16 or bf16, got {other:?}"),
    }
}

/// One text-to-image request (defaults follow diffusers' StableDiffusionPipeline).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// SDXL's `prompt_2` / `negative_prompt_2` for `text_encoder_2` (default: the first).
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
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
    /// diffusers' `clip_skip`: layers skipped from the end of the text encoder(s) for the
    /// prompt (not the negative, as in diffusers).
    pub clip_skip: Option<usize>,
    /// diffusers' `guidance_rescale` (φ of "Common Diffusion Noise Schedules…", §3.4); 0 = off.
    pub guidance_rescale: f64,
    /// SDXL micro-conditioning `(h, w)`; `None` = the image size.
    pub original_size: Option<(i64, i64)>,
    /// SDXL micro-conditioning `(y, x)`.
    pub crops_coords_top_left: (i64, i64),
    /// SDXL micro-conditioning `(h, w)`; `None` = the image size.
    pub target_size: Option<(i64, i64)>,
    /// diffusers' `num_images_per_prompt` (≥ 1; [`StableDiffusion::generate_batch`]).
    pub num_images: usize,
    /// IP-Adapter image conditioning.
    pub ip_adapter: Option<IpAdapterInput>,
}

/// IP-Adapter conditioning of a request: the image tokens of the reference image(s) (several
/// images concatenated: `[1, n·T, cross]`), those of the unconditional image (Plus: zeros after
/// normalisation; plain: zero embeds), the scale and the adapter's attn2 weights.
///
/// Rows: CFG's ∅ row gets `uncond_tokens`, the prompt row `tokens` (diffusers). HM-CFG: ∅ gets
/// `uncond_tokens`, c_G and c_S get `tokens`, so with κ = 1 and a zero LoRA it is CFG (at 2g)
/// with the image on the conditional side, as diffusers'.
#[derive(Debug)]
pub struct IpAdapterInput {
    pub tokens: Tensor,
    pub uncond_tokens: Tensor,
    pub scale: f64,
    pub weights: IpWeights,
}

impl IpAdapterInput {
    /// The conditioning of reference `images` through `adapter` and its image `encoder`, for the
    /// UNet `unet` (several images concatenate their tokens: `[1, n·T, cross]`).
    pub fn new(
        adapter: &crate::models::ip_adapter::IpAdapter,
        encoder: &crate::models::ip_adapter::ImageEncoder,
        unet: &crate::models::unet::UNetConfig,
        images: &[crate::io::preprocess::RgbImage],
        scale: f64,
    ) -> Result<Self> {
        if images.is_empty() {
            bail!("IP-Adapter conditioning needs at least one image");
        }
        if !scale.is_finite() {
            bail!("the IP-Adapter scale must be a finite number, got {scale}");
        }
        let weights = adapter.attn_weights(unet)?;
        let (cond, uncond) = encoder.image_tokens(adapter, images)?;
        // [n, T, cross] → [1, n·T, cross]
        let flat = |t: Tensor| t.reshape([1, -1, t.size()[2]]);
        Ok(Self {
            tokens: flat(cond),
            uncond_tokens: flat(uncond),
            scale,
            weights: std::rc::Rc::new(weights),
        })
    }
}

impl Clone for IpAdapterInput {
    fn clone(&self) -> Self {
        Self {
            tokens: self.tokens.shallow_clone(),
            uncond_tokens: self.uncond_tokens.shallow_clone(),
            scale: self.scale,
            weights: self.weights.clone(),
        }
    }
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
            prompt_2: None,
            negative_prompt_2: None,
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
            clip_skip: None,
            guidance_rescale: 0.0,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            num_images: 1,
            ip_adapter: None,
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
        Self::load_with(dir, &LoadOptions::default(), device)
    }

    /// [`Self::load`] with a weight variant and a compute dtype.
    pub fn load_with(dir: &Path, opts: &LoadOptions, device: Device) -> Result<Self> {
        let folder = DiffusersFolder::open_variant(dir, opts.variant.as_deref())?;
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
        // Configs first: a folder whose parts do not fit together fails before any weights load.
        let unet_cfg = UNetConfig::from_json(folder.config("unet", "config.json")?)?;
        let te_cfg = ClipTextConfig::from_json(folder.config("text_encoder", "config.json")?)?;
        let sdxl = folder
            .model_index
            .get("text_encoder_2")
            .is_some_and(|v| !v.is_null())
            || unet_cfg.addition_embed_type.is_some();
        let te2_cfg = match sdxl {
            true => Some(
                ClipTextConfig::from_json(folder.config("text_encoder_2", "config.json")?)
                    .context("text_encoder_2")?,
            ),
            false => None,
        };
        check_text_widths(&unet_cfg, &te_cfg, te2_cfg.as_ref())?;
        let tokenizer_2 = match sdxl {
            true => Some(
                ClipTokenizer::from_dir(&folder.component("tokenizer_2")?)
                    .context("tokenizer_2")?,
            ),
            false => None,
        };
        let force_zeros = match folder.model_index.get("force_zeros_for_empty_prompt") {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(v) => bail!(
                "model_index.json: force_zeros_for_empty_prompt must be true or false, got {v}"
            ),
        };

        let tokenizer = ClipTokenizer::from_dir(&folder.component("tokenizer")?)?;
        let (text_encoder, mut te_vs) = ClipTextModel::load(&folder, device)?;
        let (unet, mut unet_vs) = UNet2DConditionModel::load(&folder, device)?;
        let (vae, mut vae_vs) = AutoencoderKL::load(&folder, device)?;
        let dtype = opts.dtype;
        te_vs.set_kind(dtype);
        unet_vs.set_kind(dtype);
        // diffusers decodes in f32 when the VAE is fp16 and its config says force_upcast.
        let vae_dtype = match dtype == Kind::Half && vae.config().force_upcast {
            true => Kind::Float,
            false => dtype,
        };
        vae_vs.set_kind(vae_dtype);
        let mut stores = vec![te_vs, unet_vs, vae_vs];
        let (family, text_encoder_2) = match tokenizer_2 {
            Some(tokenizer) => {
                let (text_encoder, mut vs) =
                    ClipTextModelWithProjection::load(&folder, "text_encoder_2", device)?;
                vs.set_kind(dtype);
                stores.push(vs);
                let family = Family::Sdxl {
                    force_zeros_for_empty_prompt: force_zeros,
                };
                (
                    family,
                    Some(SecondTextEncoder {
                        tokenizer,
                        text_encoder,
                    }),
                )
            }
            None => (Family::Sd, None),
        };
        Ok(Self {
            family,
            tokenizer,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler_json,
            scheduler_kind,
            device,
            dtype,
            vae_dtype,
            _stores: stores,
        })
    }

    /// diffusers' default `guidance_scale`: 7.5 for StableDiffusionPipeline, 5.0 for SDXL.
    pub fn default_guidance_scale(&self) -> f64 {
        match self.family {
            Family::Sd => 7.5,
            Family::Sdxl { .. } => 5.0,
        }
    }

    /// Default image size: UNet `sample_size` × VAE scale factor.
    pub fn default_size(&self) -> i64 {
        self.unet.config.sample_size * self.vae.config().scale_factor()
    }

    /// The cross-attention states of one prompt: `[1, 77, D]` (SD1.x: CLIP's last hidden
    /// state; SDXL: both encoders' penultimate states, concatenated).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        Ok(self.encode_text(prompt, None, None)?.hidden)
    }

    /// The conditioning of one prompt, as diffusers' `encode_prompt` for the positive prompt.
    /// `clip_skip`: SD1.x taps `hidden_states[-(k+1)]` and applies `final_layer_norm`; SDXL taps
    /// `hidden_states[-(k+2)]` of both encoders (no final norm; `[-2]` without it).
    /// `prompt_2` is SDXL's text for `text_encoder_2` (`None` or "" = `prompt`, as diffusers'
    /// `prompt_2 or prompt`).
    pub fn encode_text(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        clip_skip: Option<usize>,
    ) -> Result<TextCond> {
        let ids = |t: &ClipTokenizer, text: &str| {
            Tensor::from_slice(&t.encode(text))
                .unsqueeze(0)
                .to_device(self.device)
        };
        let prompt_2 = prompt_2.filter(|p| !p.is_empty()).unwrap_or(prompt);
        match &self.text_encoder_2 {
            None => {
                let hidden = match clip_skip {
                    None => self.text_encoder.forward(&ids(&self.tokenizer, prompt))?,
                    Some(k) => {
                        let out = self
                            .text_encoder
                            .encode(&ids(&self.tokenizer, prompt), k + 1)?;
                        self.text_encoder.final_layer_norm(&out.hidden)
                    }
                };
                Ok(TextCond {
                    hidden,
                    pooled: None,
                })
            }
            Some(te2) => {
                let from_end = clip_skip.map_or(2, |k| k + 2);
                let one = self
                    .text_encoder
                    .encode(&ids(&self.tokenizer, prompt), from_end)?;
                let two = te2
                    .text_encoder
                    .encode(&ids(&te2.tokenizer, prompt_2), from_end)?;
                // [1, 77, D1] ++ [1, 77, D2] → [1, 77, D1 + D2]
                Ok(TextCond {
                    hidden: Tensor::cat(&[one.hidden, two.hidden], -1),
                    pooled: Some(two.pooled),
                })
            }
        }
    }

    /// The conditioning of a training batch of prompts `[B, 77, D]` (SD1.x: one batched text
    /// encoder call; SDXL: each prompt as [`Self::encode_text`], with its pooled embeds).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<TextCond> {
        match self.family {
            Family::Sd => {
                let ids = self.tokenizer.encode_batch(prompts).to_device(self.device);
                Ok(TextCond {
                    hidden: self.text_encoder.forward(&ids)?,
                    pooled: None,
                })
            }
            Family::Sdxl { .. } => {
                let rows = prompts
                    .iter()
                    .map(|p| self.encode_text(p, None, None))
                    .collect::<Result<Vec<_>>>()?;
                TextCond::cat(&rows)
            }
        }
    }

    /// SDXL's time ids `[1, 6]` of an uncropped `size × size` training image (`None` for SD1.x).
    pub fn training_time_ids(&self, size: i64) -> Option<Tensor> {
        match self.family {
            Family::Sd => None,
            Family::Sdxl { .. } => Some(self.time_ids(&GenerateRequest::new(""), size, size)),
        }
    }

    /// The unconditional row for CFG: SDXL with `force_zeros_for_empty_prompt` and no negative
    /// prompt → zeros shaped like `cond`; otherwise the negative prompt (or "") encoded
    /// without `clip_skip`, as diffusers does (`negative_2`: SDXL's `negative_prompt_2`).
    pub fn encode_uncond(
        &self,
        negative: Option<&str>,
        negative_2: Option<&str>,
        cond: &TextCond,
    ) -> Result<TextCond> {
        match (self.family, negative) {
            (
                Family::Sdxl {
                    force_zeros_for_empty_prompt: true,
                },
                None,
            ) => Ok(cond.zeros_like()),
            _ => self.encode_text(negative.unwrap_or(""), negative_2, None),
        }
    }

    /// SDXL's `add_time_ids` `[1, 6]` for an image of `h × w`.
    pub fn time_ids(&self, req: &GenerateRequest, h: i64, w: i64) -> Tensor {
        let (oh, ow) = req.original_size.unwrap_or((h, w));
        let (cy, cx) = req.crops_coords_top_left;
        let (th, tw) = req.target_size.unwrap_or((h, w));
        let ids = [oh, ow, cy, cx, th, tw].map(|v| v as f32);
        Tensor::from_slice(&ids).unsqueeze(0).to_device(self.device)
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
        if req.num_images == 0 {
            bail!("--num-images must be at least 1");
        }
        if let Some(ip) = &req.ip_adapter {
            if !ip.scale.is_finite() {
                bail!(
                    "--ip-adapter-scale must be a finite number, got {}",
                    ip.scale
                );
            }
            if ip.tokens.size() != ip.uncond_tokens.size() || ip.tokens.dim() != 3 {
                bail!(
                    "IP-Adapter tokens {:?} and unconditional tokens {:?} must be [1, T, cross]",
                    ip.tokens.size(),
                    ip.uncond_tokens.size()
                );
            }
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
        if !req.guidance_rescale.is_finite() || req.guidance_rescale < 0.0 {
            bail!(
                "--guidance-rescale must be a finite number ≥ 0, got {}",
                req.guidance_rescale
            );
        }
        if req.guidance_rescale > 0.0 && !matches!(req.guidance(), Guidance::Cfg { .. }) {
            bail!(
                "--guidance-rescale rescales plain CFG (guidance scale > 1, no --generic-prompt)"
            );
        }
        if self.family == Family::Sd {
            let sdxl_only = [
                ("--prompt-2", req.prompt_2.is_some()),
                ("--negative-prompt-2", req.negative_prompt_2.is_some()),
                ("--original-size", req.original_size.is_some()),
                (
                    "--crops-coords-top-left",
                    req.crops_coords_top_left != (0, 0),
                ),
                ("--target-size", req.target_size.is_some()),
            ];
            if let Some((flag, _)) = sdxl_only.iter().find(|(_, set)| *set) {
                bail!("{flag} is SDXL micro-conditioning; this base is an SD1.x/SD2.x pipeline");
            }
        }
        for (flag, v) in [
            ("--original-size", req.original_size),
            ("--target-size", req.target_size),
        ] {
            if let Some((a, b)) = v {
                if a <= 0 || b <= 0 {
                    bail!("{flag} must be two positive numbers H,W, got {a},{b}");
                }
            }
        }
        if let Some(k) = req.clip_skip {
            let n = self.text_encoder.config.num_hidden_layers as usize;
            let n2 = self.text_encoder_2.as_ref().map_or(n, |t| {
                t.text_encoder.text_model.config.num_hidden_layers as usize
            });
            // SD1.x taps hidden_states[-(k+1)], SDXL [-(k+2)], of N+1 states.
            let most = match self.family {
                Family::Sd => n,
                Family::Sdxl { .. } => n.min(n2).saturating_sub(1),
            };
            if k > most {
                bail!("--clip-skip {k} is larger than the text encoder allows ({most})");
            }
        }
        Ok((h, w))
    }

    /// Runs the denoising loop for one image (`num_images == 1`); returns it `[3, H, W]` in
    /// [-1, 1]. `progress(i, n)` is called after each step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        if req.num_images != 1 {
            bail!("generate makes one image; use generate_batch for num_images > 1");
        }
        Ok(self.generate_batch(req, progress)?.squeeze_dim(0))
    }

    /// Runs the denoising loop for `req.num_images` images of one prompt (diffusers'
    /// `num_images_per_prompt`: one `randn([N, C, h, w])` draw, every conditioning row repeated
    /// N times); returns `[N, 3, H, W]` in [-1, 1]. `progress(i, n)` is called after each step.
    pub fn generate_batch(
        &self,
        req: &GenerateRequest,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let images = self.generate_batch_with(req, |i, n| {
            progress(i, n);
            ControlFlow::Continue(())
        })?;
        images.context("internal error: the denoising loop stopped without being asked to")
    }

    /// [`Self::generate_batch`] with a step callback that may stop the loop: `step(i, n)` is
    /// called after each step, and `ControlFlow::Break` ends the loop there (before the next
    /// UNet call, nothing decoded) and returns `Ok(None)`. With a callback that always
    /// continues, this is `generate_batch` exactly (the same loop, the same image).
    pub fn generate_batch_with(
        &self,
        req: &GenerateRequest,
        mut step: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>> {
        let (h, w) = self.validate(req)?;
        let mut scheduler = self.scheduler(req.scheduler, req.steps)?;
        let guidance = req.guidance();
        let n = req.num_images as i64;
        // The latents (and Euler-a's noise) come from the seeded global generator.
        let _rng = crate::util::rng_lock();
        let lora = req.lora.as_ref().map(|l| l.to_device(self.device));
        tch::no_grad(|| {
            // 1. Conditioning and the LoRA of each group of N rows (diffusers encodes each
            // prompt on its own).
            let cond = self.encode_text(&req.prompt, req.prompt_2.as_deref(), req.clip_skip)?;
            let uncond = || {
                let (neg, neg_2) = (&req.negative_prompt, &req.negative_prompt_2);
                self.encode_uncond(neg.as_deref(), neg_2.as_deref(), &cond)
            };
            let personal = lora.as_ref().map(|l| (l, req.lora_scale));
            // Whether each group's rows see the image (true) or the unconditional image.
            let (groups, group_lora, group_image) = match guidance {
                Guidance::None => (vec![cond], vec![personal], vec![true]),
                // [∅; c]
                Guidance::Cfg { .. } => (
                    vec![uncond()?, cond],
                    vec![personal, personal],
                    vec![false, true],
                ),
                // [∅; c_G; c_S]
                Guidance::HmCfg { .. } => {
                    let generic = req.generic_prompt.as_deref().unwrap_or_default();
                    let generic = self.encode_text(generic, None, req.clip_skip)?;
                    let rows = vec![uncond()?, generic, cond];
                    (rows, vec![None, None, personal], vec![false, true, true])
                }
            };
            // Each group [1, …] → [N, …]; rows [groups·N, 77, D].
            let groups: Vec<TextCond> = groups.iter().map(|g| g.repeat(n)).collect();
            let text = TextCond::cat(&groups)?;
            let rows: Vec<_> = group_lora
                .iter()
                .flat_map(|l| std::iter::repeat_n(*l, req.num_images))
                .collect();
            let lora_batch = lora.is_some().then(|| LoraSet::batch(&rows));
            let n_groups = group_lora.len() as i64;
            // SDXL: every row has its pooled embeds and the same time ids ([rows, 6]).
            let time_ids = text
                .pooled
                .as_ref()
                .map(|_| self.time_ids(req, h, w).repeat([n_groups * n, 1]));
            // IP-Adapter: per group its tokens [1, T, cross] → [groups·N, T, cross].
            let image = req.ip_adapter.as_ref().map(|ip| {
                let rows: Vec<Tensor> = group_image
                    .iter()
                    .map(|&img| {
                        let t = if img { &ip.tokens } else { &ip.uncond_tokens };
                        t.to_device(self.device).repeat([n, 1, 1])
                    })
                    .collect();
                let tokens = Tensor::cat(&rows, 0);
                let scale = Tensor::full([n_groups * n], ip.scale, (Kind::Float, self.device));
                ImageTokens {
                    tokens,
                    scale,
                    weights: ip.weights.clone(),
                }
            });
            let unet_cond = UNetCond {
                image: image.as_ref(),
                text: &text.hidden,
                added: text.pooled.as_ref().zip(time_ids.as_ref()).map(
                    |(text_embeds, time_ids)| AddedCond {
                        text_embeds,
                        time_ids,
                    },
                ),
            };

            // 2. Initial latents from the seeded CPU generator (diffusers' randn_tensor).
            let f = self.vae.config().scale_factor();
            let shape = [n, self.unet.config.in_channels, h / f, w / f];
            tch::manual_seed(req.seed as i64);
            let mut latents = Tensor::randn(shape, (Kind::Float, Device::Cpu))
                .to_device(self.device)
                * scheduler.init_noise_sigma();

            // 3. Denoising loop.
            let timesteps = scheduler.timesteps().to_vec();
            for (i, &t) in timesteps.iter().enumerate() {
                let x = scheduler.scale_model_input(&latents, i);
                // [N, C, h, w] → [groups·N, C, h, w] (diffusers' `cat([latents] * groups)`)
                let x = x.repeat([n_groups, 1, 1, 1]).to_kind(self.dtype);
                let t = Tensor::from(t as f32).to_device(self.device);
                let eps = self
                    .unet
                    .forward_cond(&x, &t, &unet_cond, lora_batch.as_ref())?
                    .to_kind(Kind::Float);
                let mut guided = guidance.combine(&eps);
                if req.guidance_rescale > 0.0 {
                    // CFG rows are [∅; c]: rescale towards the text rows' std.
                    guided = rescale_noise_cfg(&guided, &eps.chunk(2, 0)[1], req.guidance_rescale);
                }
                latents = scheduler.step(&guided, i, &latents)?;
                if step(i + 1, timesteps.len()).is_break() {
                    return Ok(None);
                }
            }

            // 4. Decode.
            let z = match self.family {
                Family::Sd => latents / self.vae.config().scaling_factor,
                Family::Sdxl { .. } => self.vae.config().unscale_latents_sdxl(&latents),
            };
            Ok(Some(
                self.vae
                    .decode(&z.to_kind(self.vae_dtype))?
                    .to_kind(Kind::Float),
            ))
        })
    }
}

/// diffusers' `rescale_noise_cfg`: `φ·ε·(std(ε_c)/std(ε)) + (1−φ)·ε`, std over all but the
/// batch dimension (unbiased, as torch's default).
pub fn rescale_noise_cfg(eps: &Tensor, eps_text: &Tensor, phi: f64) -> Tensor {
    let std = |t: &Tensor| {
        let dims: Vec<i64> = (1..t.dim() as i64).collect();
        // [B, C, h, w] → [B, 1, 1, 1]
        t.std_dim(dims.as_slice(), true, true)
    };
    let rescaled = eps * (std(eps_text) / std(eps));
    rescaled * phi + eps * (1.0 - phi)
}

/// The UNet's cross-attention and added-embedding widths must match the text encoders':
/// one line naming both numbers otherwise.
fn check_text_widths(
    unet: &UNetConfig,
    te: &ClipTextConfig,
    te2: Option<&ClipTextConfig>,
) -> Result<()> {
    let h1 = te.hidden_size;
    let (width, what) = match te2 {
        None => (h1, format!("text_encoder hidden_size {h1}")),
        Some(t) => (
            h1 + t.hidden_size,
            format!(
                "text_encoder + text_encoder_2 hidden sizes {h1} + {}",
                t.hidden_size
            ),
        ),
    };
    let layout = unet.validate()?;
    if let Some(&cross) = layout.cross_dims.iter().find(|&&d| d != width) {
        bail!("unet config: cross_attention_dim {cross} does not match the {what} = {width}");
    }
    match (layout.added, te2) {
        (Some(a), Some(t)) => {
            if a.pooled_dim() != t.projection_dim {
                bail!(
                    "unet config: projection_class_embeddings_input_dim {} = 6 × addition_time_embed_dim {} + a pooled width of {}, but text_encoder_2's projection_dim is {}",
                    a.in_dim,
                    a.time_dim,
                    a.pooled_dim(),
                    t.projection_dim
                );
            }
        }
        (Some(_), None) => bail!(
            "unet config: addition_embed_type \"text_time\" (SDXL) needs text_encoder_2/ and tokenizer_2/"
        ),
        (None, Some(_)) => bail!(
            "model_index.json has text_encoder_2 (SDXL), but unet/config.json has no addition_embed_type \"text_time\""
        ),
        (None, None) => {}
    }
    Ok(())
}
