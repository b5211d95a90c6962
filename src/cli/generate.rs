//! `loracast generate`: text-to-image with a diffusers-format SD1.x folder, defaults as
//! diffusers' StableDiffusionPipeline (folder's scheduler, 50 steps, guidance 7.5, size =
//! UNet sample_size × VAE scale factor).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::diffusion::SchedulerKind;
use crate::io::image::{to_rgb8, write_png};
use crate::lora::format::{layers_per_block, read_lora};
use crate::pipeline::{GenerateRequest, StableDiffusion};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or `toy`.
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Classifier-free guidance scale (diffusers' guidance_scale; ≤ 1 disables CFG).
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// ddim | pndm | euler | euler-a | dpm++2m (default: the folder's own scheduler class).
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub height: Option<i64>,
    #[arg(long)]
    pub width: Option<i64>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// LoRA file (PEFT, old diffusers, kohya) or a folder with pytorch_lora_weights.safetensors.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// LoRA strength on top of alpha/r (diffusers' cross_attention_kwargs={"scale": S}); default 1.
    #[arg(long, allow_hyphen_values = true)]
    pub lora_scale: Option<f64>,
    /// c_G, the prompt without the subject token: Hybrid-Model CFG (needs --lora).
    #[arg(long)]
    pub generic_prompt: Option<String>,
    /// HM-CFG weight of the personalized model, in [0, 2]; default 1.
    #[arg(long, allow_hyphen_values = true)]
    pub kappa: Option<f64>,
}

/// Checks the LoRA/HM-CFG flags before any heavy work.
fn check_lora_flags(args: &GenerateArgs) -> Result<()> {
    if args.lora.is_none() {
        if args.generic_prompt.is_some() {
            bail!("--generic-prompt (HM-CFG) needs --lora: it mixes the base and the personalized model");
        }
        if args.lora_scale.is_some() {
            bail!("--lora-scale needs --lora");
        }
    }
    if args.kappa.is_some() && args.generic_prompt.is_none() {
        bail!("--kappa needs --generic-prompt (it weights HM-CFG's personalized model)");
    }
    if let Some(s) = args.lora_scale {
        if !s.is_finite() {
            bail!("--lora-scale must be a finite number, got {s}");
        }
    }
    if let Some(k) = args.kappa {
        if !(0.0..=2.0).contains(&k) {
            bail!("--kappa must be in [0, 2], got {k}");
        }
    }
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_lora_flags(&args)?;
    let out = super::check_output(&args.out, "png", args.force)?;
    let base = crate::toy::resolve_base(&args.base)?;
    // Read the LoRA once without the UNet weights (bad keys, NaN/Inf, truncation) before
    // loading the model; the UNet config gives the block layout of LDM-layout names.
    if let Some(lora) = &args.lora {
        let lpb = super::lora::unet_layers_per_block(&base)?;
        read_lora(lora, None, lpb)?;
    }
    let scheduler = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_cli_name)
        .transpose()?;
    let device = super::parse_device(&args.device)?;
    let mut req = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        guidance_scale: args.guidance_scale,
        steps: args.steps,
        scheduler,
        seed: args.seed,
        height: args.height,
        width: args.width,
        generic_prompt: args.generic_prompt,
        kappa: args.kappa.unwrap_or(1.0),
        lora_scale: args.lora_scale.unwrap_or(1.0),
        ..GenerateRequest::new("")
    };
    let start = Instant::now();
    let pipe = StableDiffusion::load(&base, device)?;
    if let Some(lora) = &args.lora {
        // Against this UNet's sites and block layout: errors name the key and both shapes.
        let lpb = layers_per_block(&pipe.unet.config);
        let (set, info) = read_lora(lora, Some(pipe.unet.lora_sites()), lpb)?;
        eprintln!(
            "LoRA {} ({}, {} sites)",
            info.path.display(),
            info.format,
            set.weights.len()
        );
        req.lora = Some(set);
    }
    pipe.validate(&req)?;
    // Build the scheduler once up front so a bad --scheduler/config fails before any work.
    pipe.scheduler(req.scheduler, req.steps)?;
    let bar = ProgressBar::new(req.steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    let image = pipe.generate(&req, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let (w, h, rgb) = to_rgb8(&image)?;
    write_png(&out, w, h, &rgb)?;
    eprintln!(
        "wrote {} ({w}×{h}) in {:.1}s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
