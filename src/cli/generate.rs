//! `loracast generate`: text-to-image with a diffusers-format SD1.x folder, defaults as
//! diffusers' StableDiffusionPipeline (folder's scheduler, 50 steps, guidance 7.5, size =
//! UNet sample_size × VAE scale factor).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tch::Device;

use crate::diffusion::SchedulerKind;
use crate::io::image::{to_rgb8, write_png};
use crate::pipeline::{GenerateRequest, StableDiffusion};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
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
}

pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => anyhow::bail!("--device cuda: no CUDA device is available to libtorch"),
        other => anyhow::bail!("--device {other:?}: expected cpu or cuda"),
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let out = super::check_output(&args.out, "png", args.force)?;
    let scheduler = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_cli_name)
        .transpose()?;
    let device = parse_device(&args.device)?;
    let req = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        guidance_scale: args.guidance_scale,
        steps: args.steps,
        scheduler,
        seed: args.seed,
        height: args.height,
        width: args.width,
        ..GenerateRequest::new("")
    };
    let start = Instant::now();
    let pipe = StableDiffusion::load(&args.base, device)?;
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
