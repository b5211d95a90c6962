//! `loracast lora convert|info`: LoRA files between diffusers-PEFT and kohya (SPEC §5, §7).
//! `convert` validates the whole input before writing and keeps ΔW; `info` describes a file.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::io::DiffusersFolder;
use crate::lora::format::{
    layers_per_block, read_lora, resolve_lora_path, write_lora_with, LoraFileInfo, LoraFormat,
};
use crate::lora::LoraSet;
use crate::models::unet::UNetConfig;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Convert a LoRA (PEFT, old diffusers, kohya, kohya LDM names) to peft or kohya, keeping ΔW.
    Convert(ConvertArgs),
    /// Describe a LoRA file: format, ranks, alphas, sites, number of weights.
    Info(InfoArgs),
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input LoRA file, or a folder holding pytorch_lora_weights.safetensors.
    pub input: PathBuf,
    /// Output format: peft (diffusers), kohya (A1111/ComfyUI, diffusers module names) or kohya-ldm
    /// (the LDM/SGM block names kohya sd-scripts writes, e.g. for SDXL; layout from --base).
    #[arg(long = "to")]
    pub to: String,
    /// Output .safetensors file, or an existing folder (→ DIR/pytorch_lora_weights.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// The pipeline folder the LoRA is for: its unet/config.json gives layers_per_block for
    /// LDM-layout names (default 2, SD1.x).
    #[arg(long)]
    pub base: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// LoRA file, or a folder holding pytorch_lora_weights.safetensors.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The pipeline folder the LoRA is for (layers_per_block for LDM-layout names).
    #[arg(long)]
    pub base: Option<PathBuf>,
}

/// layers_per_block from `--base DIR/unet/config.json` (reads the config only, no weights).
fn base_layers_per_block(base: Option<&PathBuf>) -> Result<Option<i64>> {
    base.map(|b| unet_layers_per_block(b))
        .transpose()
        .map(Option::flatten)
}

/// layers_per_block of a pipeline folder's UNet config (`None` when it differs per block), for
/// LDM-layout LoRA names. Reads `unet/config.json` only.
pub(crate) fn unet_layers_per_block(base: &Path) -> Result<Option<i64>> {
    let folder = DiffusersFolder::open(base)?;
    let config = UNetConfig::from_json(folder.config("unet", "config.json")?)?;
    Ok(layers_per_block(&config))
}

pub fn run(cmd: LoraCommand) -> Result<()> {
    match cmd {
        LoraCommand::Convert(args) => convert(args),
        LoraCommand::Info(args) => info(args),
    }
}

fn convert(args: ConvertArgs) -> Result<()> {
    let format = LoraFormat::from_cli_name(&args.to)
        .map_err(|_| anyhow::anyhow!("--to {:?}: expected peft, kohya or kohya-ldm", args.to))?;
    let out = super::check_output(&resolve_lora_path(&args.out), "safetensors", args.force)?;
    let lpb = base_layers_per_block(args.base.as_ref())?;
    let (set, info) = read_lora(&args.input, None, lpb)?;
    write_lora_with(&set, format, lpb, &out)?;
    eprintln!(
        "wrote {} ({format}, {} sites, from {})",
        out.display(),
        set.weights.len(),
        info.format
    );
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    let lpb = base_layers_per_block(args.base.as_ref())?;
    let (set, info) = read_lora(&args.file, None, lpb)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info_json(&set, &info))?);
    } else {
        print!("{}", info_text(&set, &info));
    }
    Ok(())
}

/// `value (count sites), …`, most frequent first.
fn histogram<T: ToString>(values: impl Iterator<Item = T>) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v.to_string()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .map(|(v, n)| format!("{v} ({n} site{})", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human-readable `lora info` report.
pub fn info_text(set: &LoraSet, info: &LoraFileInfo) -> String {
    let mut s = String::new();
    let blocks = {
        let mut t: Vec<_> = set.weights.keys().map(|s| s.transformer).collect();
        t.dedup();
        t.len()
    };
    s += &format!("file:     {}\n", info.path.display());
    s += &format!(
        "format:   {} ({} tensors, {})\n",
        info.format, info.num_tensors, info.dtype
    );
    s += &format!(
        "rank:     {}\n",
        histogram(set.weights.values().map(|w| w.rank()))
    );
    s += &format!(
        "alpha:    {} — {}\n",
        histogram(set.weights.values().map(|w| w.alpha)),
        info.alpha_source.describe()
    );
    s += &format!(
        "sites:    {} (attn2 q/k/v of {blocks} transformer blocks)\n",
        set.weights.len()
    );
    s += &format!("weights:  {}\n", set.num_weights());
    for (site, w) in &set.weights {
        s += &format!(
            "  {site}  rank {} alpha {} scale {} [{} → {}]\n",
            w.rank(),
            w.alpha,
            w.scale(),
            site.in_features,
            site.out_features
        );
    }
    s
}

/// The `lora info --json` report.
pub fn info_json(set: &LoraSet, info: &LoraFileInfo) -> serde_json::Value {
    let sites: Vec<_> = set
        .weights
        .iter()
        .map(|(site, w)| {
            serde_json::json!({
                "module": site.module_path(),
                "rank": w.rank(),
                "alpha": w.alpha,
                "scale": w.scale(),
                "in_features": site.in_features,
                "out_features": site.out_features,
            })
        })
        .collect();
    let mut ranks: Vec<i64> = set.weights.values().map(|w| w.rank()).collect();
    ranks.sort();
    ranks.dedup();
    let mut alphas: Vec<f64> = set.weights.values().map(|w| w.alpha).collect();
    alphas.sort_by(f64::total_cmp);
    alphas.dedup();
    serde_json::json!({
        "file": info.path.display().to_string(),
        "format": info.format.name(),
        "dtype": info.dtype,
        "alpha_source": format!("{:?}", info.alpha_source).to_lowercase(),
        "num_tensors": info.num_tensors,
        "num_sites": set.weights.len(),
        "num_weights": set.num_weights(),
        "ranks": ranks,
        "alphas": alphas,
        "sites": sites,
    })
}
