//! The `loracast` command line (SPEC §7). Every command validates its inputs before heavy
//! work, exits non-zero with one clear line on bad input, and writes outputs atomically.
mod bench;
mod demo;
mod experiment;
mod finetune;
mod generate;
mod lora;
mod personalize;
mod score;
mod serve;
mod train;
mod world;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "loracast",
    version,
    about = "Finetuning-free personalization of Stable Diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the larger argument structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// The toy world end to end with the shipped weights: report.html + metrics.json.
    Demo(demo::DemoArgs),
    /// Text-to-image with a diffusers-format SD1.x or SDXL folder (optionally an IP-Adapter).
    Generate(generate::GenerateArgs),
    /// Benchmarks (compare with scripts/bench_unet.py).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Training recipes (toy world).
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// LoRA files: convert between diffusers-PEFT and kohya, describe.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
    /// The toy world: render subjects in contexts with captions and metadata.
    #[command(subcommand)]
    World(world::WorldCommand),
    /// DreamBooth-LoRA finetuning on a subject's images (or fast finetuning from --init-lora).
    Finetune(finetune::FinetuneArgs),
    /// The papers' experiments on the toy world (results.json + report.html).
    #[command(subcommand)]
    Experiment(experiment::ExperimentCommand),
    /// A subject's images → LoRA with a trained hypernetwork (no finetuning).
    Personalize(personalize::PersonalizeArgs),
    /// CLIP-I, CLIP-T and DINO of one generated image (prints JSON).
    Score(score::ScoreArgs),
    /// CLIP-I, CLIP-T and DINO over a DreamBench-style folder (per subject and mean).
    ScoreBench(score::ScoreBenchArgs),
    /// Personalization as a local service: HTTP API, event stream and a web page.
    Serve(serve::ServeArgs),
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help/--version print in full; usage errors print their first line only.
        Err(e) if !e.use_stderr() => {
            e.print().ok();
            return 0;
        }
        Err(e) => {
            // Some clap errors name the argument on the following indented lines.
            let text = e.to_string();
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let mut msg = lines
                .next()
                .unwrap_or("error: invalid arguments")
                .to_string();
            for l in lines.take_while(|l| l.starts_with(' ')) {
                msg.push(' ');
                msg.push_str(l.trim());
            }
            eprintln!("{msg} (see --help)");
            return 2;
        }
    };
    crate::util::init_threads();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Train(cmd) => train::run(cmd),
        Command::Lora(cmd) => lora::run(cmd),
        Command::World(cmd) => world::run(cmd),
        Command::Personalize(args) => personalize::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Experiment(cmd) => experiment::run(cmd),
        Command::Score(args) => score::run(args),
        Command::ScoreBench(args) => score::run_bench(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            // One line: a libtorch error carries its C++ stack trace on the following lines.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
            1
        }
    }
}

/// A panic (a bug, or libtorch rejecting something we failed to validate) prints one line
/// instead of a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        let first = msg.lines().next().unwrap_or(msg);
        eprintln!("error: internal error: {first}");
    }));
}

/// An output path must have the given extension, a writable parent folder, and must not
/// exist unless `force` (existing outputs are never clobbered silently).
pub(crate) fn check_output(path: &Path, ext: &str, force: bool) -> Result<PathBuf> {
    if path.extension().and_then(|e| e.to_str()) != Some(ext) {
        bail!("--out {}: expected a .{ext} file", path.display());
    }
    check_out_parent(path)?;
    if path.exists() && !force {
        bail!(
            "--out {} already exists (pass --force to overwrite)",
            path.display()
        );
    }
    Ok(path.to_path_buf())
}

/// The folder an `--out` path would be written into must exist.
pub(crate) fn check_out_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--out {}: folder {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// `--device cpu|cuda`.
/// A report folder `--out`: refused if it exists without `--force`; its parents are created
/// (it is a folder of outputs, like `train --out`).
pub(crate) fn prepare_report_dir(out: &Path, force: bool) -> Result<()> {
    crate::eval::report::prepare_dir(out, force)
}

/// Decodes every `--image` and checks its size, before any model loads.
pub(crate) fn read_subject_images(
    paths: &[PathBuf],
) -> Result<Vec<crate::io::preprocess::RgbImage>> {
    let images = paths
        .iter()
        .map(|p| crate::io::preprocess::RgbImage::open(p))
        .collect::<Result<Vec<_>>>()?;
    for (img, path) in images.iter().zip(paths) {
        crate::hypernet::check_image_size(img)
            .map_err(|e| anyhow::anyhow!("image {}: {e}", path.display()))?;
    }
    Ok(images)
}

pub(crate) fn parse_device(name: &str) -> Result<tch::Device> {
    crate::util::parse_device(name)
}

/// An IP-Adapter's image encoder folder when none is given: `image_encoder/` beside the file
/// (h94's layout).
pub(crate) fn default_image_encoder(ip_adapter: &std::path::Path) -> PathBuf {
    ip_adapter
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("image_encoder")
}

/// The open category's image encoder for `hyper`: the IP-Adapter `file` (or `toy`) is checked
/// against the one the hypernetwork was trained with (SHA-256), and its image encoder is loaded
/// with the base's preprocessing.
pub(crate) fn open_category_encoder(
    hyper: &crate::hypernet::Hypernetwork,
    file: &Path,
    image_encoder: Option<&Path>,
    base: &Path,
    device: tch::Device,
) -> Result<crate::models::ip_adapter::ImageEncoder> {
    let file = crate::toy::resolve_ip_adapter(file)?;
    if !file.is_file() {
        bail!("IP-Adapter {}: no such file", file.display());
    }
    let sha = crate::io::sha256_file(&file)?;
    hyper.check_ip_adapter(&sha, &file.display().to_string())?;
    let dir = image_encoder.map_or_else(|| default_image_encoder(&file), Path::to_path_buf);
    crate::models::ip_adapter::ImageEncoder::for_base(&dir, base, device)
}
