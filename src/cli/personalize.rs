//! `loracast personalize --hypernet H --image I [--image I …] --out L`: a subject's images →
//! the hypernetwork's LoRA (outputs averaged over the images, paper §4.1), written in the
//! diffusers-PEFT (default) or kohya format that `generate`, `lora convert` and diffusers load.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use crate::hypernet::Hypernetwork;
use crate::lora::format::{write_lora, LoraFormat};

#[derive(Args, Debug)]
pub struct PersonalizeArgs {
    /// Hypernetwork file (from `train hypernet`), or `toy` for the shipped toy-world one.
    #[arg(long)]
    pub hypernet: PathBuf,
    /// An image of the subject (PNG or JPEG); repeat for several (outputs are averaged).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Output LoRA file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// peft (diffusers) or kohya.
    #[arg(long, default_value = "peft")]
    pub format: String,
    /// The base model the LoRA is for (folder or `toy`): checked against the hypernetwork.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: PersonalizeArgs) -> Result<()> {
    let out = super::check_output(&args.out, "safetensors", args.force)?;
    let format = LoraFormat::from_cli_name(&args.format)?;
    let device = super::parse_device(&args.device)?;
    // Every image is decoded and checked before the model loads.
    let images = super::read_subject_images(&args.images)?;
    let path = crate::toy::resolve_hypernet(&args.hypernet)?;
    let (hyper, _vs) = Hypernetwork::load(&path, device)?;
    if let Some(base) = &args.base {
        let base = crate::toy::resolve_base(base)?;
        let folder = crate::io::DiffusersFolder::open(&base)?;
        let (unet, _uvs) = crate::models::unet::UNet2DConditionModel::load(&folder, device)?;
        hyper.check_base(&unet.lora_fingerprint())?;
    }
    let start = Instant::now();
    let set = hyper.personalize(&images)?;
    let seconds = start.elapsed().as_secs_f64();
    write_lora(&set, format, &out)?;
    eprintln!(
        "wrote {} ({} sites, rank {}, {} images) — hypernetwork took {:.0} ms",
        out.display(),
        set.weights.len(),
        hyper.config.decoder.rank,
        images.len(),
        seconds * 1000.0
    );
    Ok(())
}
