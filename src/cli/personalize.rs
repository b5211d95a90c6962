//! `loracast personalize --hypernet H --image I [--image I …] --out L`: a subject's images →
//! the hypernetwork's LoRA (outputs averaged over the images, paper §4.1), written in the
//! diffusers-PEFT (default) or kohya format that `generate`, `lora convert` and diffusers load.
//! Open category (`--ip-adapter FILE --base DIR`): the hypernetwork reads the IP-Adapter's image
//! encoder, and refuses an adapter other than the one it was trained with (SHA-256).
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
    /// The base model the LoRA is for (folder or `toy`): checked against the hypernetwork
    /// (required with --ip-adapter: its feature_extractor/ preprocesses the images).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Open category: the IP-Adapter-Plus file the hypernetwork was trained on top of (or
    /// `toy`); with `--hypernet toy` this selects the shipped open-category hypernetwork.
    #[arg(long)]
    pub ip_adapter: Option<PathBuf>,
    /// The IP-Adapter's CLIP image encoder folder (default: image_encoder/ beside --ip-adapter).
    #[arg(long)]
    pub image_encoder: Option<PathBuf>,
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
    if args.image_encoder.is_some() && args.ip_adapter.is_none() {
        anyhow::bail!("--image-encoder needs --ip-adapter");
    }
    let path = match &args.ip_adapter {
        Some(_) => crate::toy::resolve_hypernet_open(&args.hypernet)?,
        None => crate::toy::resolve_hypernet(&args.hypernet)?,
    };
    let (hyper, _vs) = Hypernetwork::load(&path, device)?;
    let base = args
        .base
        .as_deref()
        .map(crate::toy::resolve_base)
        .transpose()?;
    if let Some(base) = &base {
        let folder = crate::io::DiffusersFolder::open(base)?;
        let (unet, _uvs) = crate::models::unet::UNet2DConditionModel::load(&folder, device)?;
        hyper.check_base(&unet.lora_fingerprint())?;
    }
    let encoder = match (&args.ip_adapter, &base) {
        (None, _) => None,
        (Some(_), None) => {
            anyhow::bail!("--ip-adapter needs --base (the base model θ0 is made of)")
        }
        (Some(file), Some(base)) => Some(super::open_category_encoder(
            &hyper,
            file,
            args.image_encoder.as_deref(),
            base,
            device,
        )?),
    };
    let start = Instant::now();
    let set = match &encoder {
        Some(enc) => hyper.personalize_shared(enc, &images)?,
        None => hyper.personalize(&images)?,
    };
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
