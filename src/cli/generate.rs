//! `loracast generate`: text-to-image with a diffusers-format SD1.x or SDXL folder, defaults as
//! diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (folder's scheduler, 50 steps,
//! guidance 7.5 / 5.0, size = UNet sample_size × VAE scale factor).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::diffusion::SchedulerKind;
use crate::io::image::{to_rgb8, write_png};
use crate::io::preprocess::RgbImage;
use crate::lora::format::{layers_per_block, read_lora};
use crate::models::ip_adapter::{ImageEncoder, IpAdapter};
use crate::models::unet::UNetConfig;
use crate::pipeline::{parse_dtype, GenerateRequest, IpAdapterInput, LoadOptions, StableDiffusion};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or `toy`.
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// SDXL: the prompt for text_encoder_2 (default: --prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// SDXL: the negative prompt for text_encoder_2 (default: --negative-prompt).
    #[arg(long)]
    pub negative_prompt_2: Option<String>,
    /// Images for the prompt (diffusers' num_images_per_prompt); N > 1 writes OUT-0.png … OUT-(N-1).png.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Weight-file variant (diffusers' variant="fp16": reads *.fp16.safetensors where present).
    #[arg(long)]
    pub variant: Option<String>,
    /// IP-Adapter file as h94/IP-Adapter ships it (Plus or plain; flat image_proj.* / ip_adapter.*
    /// keys). Rows: CFG's unconditional row gets the negative image embedding, the prompt row the
    /// image; HM-CFG: ∅ gets the negative image, c_G and c_S the image (κ = 1 with a zero LoRA is
    /// then diffusers' CFG with the image).
    #[arg(long)]
    pub ip_adapter: Option<PathBuf>,
    /// The adapter's CLIP image encoder folder (default: image_encoder/ beside --ip-adapter).
    #[arg(long)]
    pub image_encoder: Option<PathBuf>,
    /// Reference image for the IP-Adapter; several concatenate their image tokens.
    #[arg(long)]
    pub ip_image: Vec<PathBuf>,
    /// IP-Adapter scale (diffusers' set_ip_adapter_scale); default 1.0.
    #[arg(long, allow_hyphen_values = true)]
    pub ip_adapter_scale: Option<f64>,
    /// Compute dtype of the text encoders, UNet and VAE: f32 (default), f16 or bf16 (diffusers'
    /// torch_dtype; an fp16 VAE with force_upcast decodes in f32; latents stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Classifier-free guidance scale (diffusers' guidance_scale; ≤ 1 disables CFG); default 7.5
    /// for SD1.x, 5.0 for SDXL.
    #[arg(long, allow_hyphen_values = true)]
    pub guidance_scale: Option<f64>,
    /// diffusers' guidance_rescale (CFG only); default 0.
    #[arg(long, allow_hyphen_values = true)]
    pub guidance_rescale: Option<f64>,
    /// Text-encoder layers to skip from the end for the prompt (diffusers' clip_skip).
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// SDXL micro-conditioning H,W (default: the image size).
    #[arg(long, value_parser = parse_pair)]
    pub original_size: Option<(i64, i64)>,
    /// SDXL micro-conditioning Y,X (default 0,0).
    #[arg(long, value_parser = parse_pair)]
    pub crops_coords_top_left: Option<(i64, i64)>,
    /// SDXL micro-conditioning H,W (default: the image size).
    #[arg(long, value_parser = parse_pair)]
    pub target_size: Option<(i64, i64)>,
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

/// `A,B` → `(A, B)` (SDXL's size and crop flags).
fn parse_pair(s: &str) -> std::result::Result<(i64, i64), String> {
    let bad = || format!("expected two integers A,B, got {s:?}");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let n = |x: &str| x.trim().parse::<i64>().map_err(|_| bad());
    Ok((n(a)?, n(b)?))
}

/// Reads the IP-Adapter, its image encoder and the reference images, checks them against the
/// base's UNet config, and returns the request's image conditioning (before the pipeline loads).
fn ip_adapter_input(
    args: &GenerateArgs,
    base: &std::path::Path,
    device: tch::Device,
) -> Result<Option<IpAdapterInput>> {
    let Some(file) = &args.ip_adapter else {
        for (flag, set) in [
            ("--ip-image", !args.ip_image.is_empty()),
            ("--image-encoder", args.image_encoder.is_some()),
            ("--ip-adapter-scale", args.ip_adapter_scale.is_some()),
        ] {
            if set {
                bail!("{flag} needs --ip-adapter");
            }
        }
        return Ok(None);
    };
    if args.ip_image.is_empty() {
        bail!("--ip-adapter needs at least one --ip-image");
    }
    let scale = args.ip_adapter_scale.unwrap_or(1.0);
    if !scale.is_finite() {
        bail!("--ip-adapter-scale must be a finite number, got {scale}");
    }
    let images = args
        .ip_image
        .iter()
        .map(|p| RgbImage::open(p))
        .collect::<Result<Vec<_>>>()?;
    let file = &crate::toy::resolve_ip_adapter(file)?;
    let adapter = IpAdapter::load(file, device)?;
    let folder = crate::io::DiffusersFolder::open(base)?;
    let unet = UNetConfig::from_json(folder.config("unet", "config.json")?)?;
    let encoder_dir = match &args.image_encoder {
        Some(d) => d.clone(),
        None => super::default_image_encoder(file),
    };
    // Preprocessing as diffusers' pipeline gives it (ImageEncoder::for_base).
    let encoder = ImageEncoder::for_base(&encoder_dir, base, device)?;
    Ok(Some(IpAdapterInput::new(
        &adapter, &encoder, &unet, &images, scale,
    )?))
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
    // N > 1: OUT-0.png … OUT-(N−1).png, each checked like --out.
    let outs: Vec<PathBuf> = match args.num_images {
        1 => vec![out],
        n => {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            (0..n)
                .map(|i| {
                    let p = out.with_file_name(format!("{stem}-{i}.png"));
                    super::check_output(&p, "png", args.force)
                })
                .collect::<Result<_>>()?
        }
    };
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
    let ip_adapter = ip_adapter_input(&args, &base, device)?;
    let mut req = GenerateRequest {
        ip_adapter,
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        prompt_2: args.prompt_2,
        negative_prompt_2: args.negative_prompt_2,
        num_images: args.num_images,
        guidance_scale: args.guidance_scale.unwrap_or(f64::NAN),
        guidance_rescale: args.guidance_rescale.unwrap_or(0.0),
        clip_skip: args.clip_skip,
        original_size: args.original_size,
        crops_coords_top_left: args.crops_coords_top_left.unwrap_or((0, 0)),
        target_size: args.target_size,
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
    let opts = LoadOptions {
        variant: args.variant.clone(),
        dtype: parse_dtype(&args.dtype)?,
    };
    let pipe = StableDiffusion::load_with(&base, &opts, device)?;
    req.guidance_scale = args
        .guidance_scale
        .unwrap_or_else(|| pipe.default_guidance_scale());
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
    let images = pipe.generate_batch(&req, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    for (i, out) in outs.iter().enumerate() {
        let (w, h, rgb) = to_rgb8(&images.get(i as i64))?;
        write_png(out, w, h, &rgb)?;
        eprintln!(
            "wrote {} ({w}×{h}) in {:.1}s",
            out.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
