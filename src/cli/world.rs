//! `loracast world`: the toy world generator (SPEC §6, issue 4).
//! `render` writes DIR/00000.png … and DIR/metadata.jsonl (one JSON object per image) into a
//! temp folder renamed to DIR at the end; `sheet` writes a contact sheet PNG; `info` prints the
//! attributes, split sizes and chance levels as JSON.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::data::{captions, contact_sheet, Context, Identity, Jitter, Sample, Split};

#[derive(Subcommand, Debug)]
pub enum WorldCommand {
    /// Render N samples of a split: DIR/00000.png … + DIR/metadata.jsonl.
    Render(RenderArgs),
    /// Render a contact sheet (a grid of samples, upscaled) to a PNG.
    Sheet(SheetArgs),
    /// Print the attributes, value names, split sizes and chance levels as JSON.
    Info,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// train or heldout (identities of the fixed held-out split are never used for training).
    #[arg(long)]
    pub split: Split,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub count: u64,
    /// Output folder (must not exist, or be empty; --force replaces an earlier render).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
    /// Identifier token of the subject prompts.
    #[arg(long, default_value = captions::DEFAULT_TOKEN)]
    pub token: String,
}

#[derive(Args, Debug)]
pub struct SheetArgs {
    #[arg(long, default_value = "train")]
    pub split: Split,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8)]
    pub rows: usize,
    #[arg(long, default_value_t = 8)]
    pub cols: usize,
    /// Nearest-neighbour upscale factor.
    #[arg(long, default_value_t = 4)]
    pub scale: usize,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: WorldCommand) -> Result<()> {
    match cmd {
        WorldCommand::Render(args) => render(args),
        WorldCommand::Sheet(args) => sheet(args),
        WorldCommand::Info => info(),
    }
}

const MAX_COUNT: u64 = 10_000_000;

/// One metadata.jsonl line (attributes by name; `jitter_seed` reproduces `jitter` via
/// `Jitter::from_seed`, `seed`/`split`/`index` reproduce the whole sample via `Sample::at`).
#[derive(Serialize)]
struct Metadata<'a> {
    file: &'a str,
    index: u64,
    split: Split,
    seed: u64,
    identity: &'a Identity,
    context: &'a Context,
    caption: String,
    subject_prompt: String,
    jitter_seed: u64,
    jitter: &'a Jitter,
}

/// `path` must be absent, an empty folder, or (with --force) an earlier render (a folder with
/// metadata.jsonl): anything else is refused so --force never deletes unrelated files.
fn check_out_dir(path: &Path, force: bool) -> Result<()> {
    super::check_out_parent(path)?;
    if path.file_name().is_none() {
        bail!("--out {}: not a folder name", path.display());
    }
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        bail!("--out {} exists and is not a folder", path.display());
    }
    let empty = std::fs::read_dir(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(());
    }
    if !force {
        bail!(
            "--out {} is not empty (pass --force to replace an earlier render)",
            path.display()
        );
    }
    if !path.join("metadata.jsonl").is_file() {
        bail!(
            "--out {} is not a world render (no metadata.jsonl); refusing to replace it",
            path.display()
        );
    }
    Ok(())
}

/// A sibling of `path` named `.{name}.{tag}{pid}`.
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{tag}{}", std::process::id()))
}

fn render(args: RenderArgs) -> Result<()> {
    if args.count == 0 || args.count > MAX_COUNT {
        bail!("--count must be in 1..={MAX_COUNT}, got {}", args.count);
    }
    if args.token.is_empty() || args.token.contains(char::is_whitespace) {
        bail!("--token must be one word, got {:?}", args.token);
    }
    check_out_dir(&args.out, args.force)?;
    let start = Instant::now();
    let tmp = sibling(&args.out, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = write_render(&args, &tmp).and_then(|()| publish(&tmp, &args.out));
    if result.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    result?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} {} images + metadata.jsonl to {} in {secs:.1}s ({:.0} images/s)",
        args.count,
        args.split,
        args.out.display(),
        args.count as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn write_render(args: &RenderArgs, dir: &Path) -> Result<()> {
    let bar = ProgressBar::new(args.count).with_style(
        ProgressStyle::with_template("rendering [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let meta_path = dir.join("metadata.jsonl");
    let meta = std::fs::File::create(&meta_path)
        .with_context(|| format!("cannot create {}", meta_path.display()))?;
    let mut meta = std::io::BufWriter::new(meta);
    let digits = args.count.saturating_sub(1).to_string().len().max(5);
    for i in 0..args.count {
        let sample = Sample::at(args.seed, args.split, i);
        let file = format!("{i:0digits$}.png");
        let png = sample.render().png_bytes()?;
        std::fs::write(dir.join(&file), png)
            .with_context(|| format!("cannot write {}", dir.join(&file).display()))?;
        let line = Metadata {
            file: &file,
            index: i,
            split: args.split,
            seed: args.seed,
            identity: &sample.identity,
            context: &sample.context,
            caption: captions::caption(&sample.context),
            subject_prompt: captions::subject_prompt(&sample.context, &args.token),
            jitter_seed: sample.jitter_seed,
            jitter: &sample.jitter,
        };
        serde_json::to_writer(&mut meta, &line).context("cannot write metadata.jsonl")?;
        writeln!(meta).context("cannot write metadata.jsonl")?;
        if i % 256 == 0 {
            bar.set_position(i);
        }
    }
    bar.finish_and_clear();
    let file = meta.into_inner().context("cannot write metadata.jsonl")?;
    file.sync_all().ok();
    Ok(())
}

/// Moves the finished temp folder to `out`, replacing an empty folder or an earlier render.
fn publish(tmp: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return std::fs::rename(tmp, out)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()));
    }
    let old = sibling(out, "old");
    std::fs::rename(out, &old).with_context(|| format!("cannot move {} aside", out.display()))?;
    if let Err(e) = std::fs::rename(tmp, out) {
        std::fs::rename(&old, out).ok();
        return Err(e)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()));
    }
    std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))
}

fn sheet(args: SheetArgs) -> Result<()> {
    let out = super::check_output(&args.out, "png", args.force)?;
    let n = args.rows * args.cols;
    if n == 0 || n > 4096 || args.scale == 0 || args.scale > 16 {
        bail!("--rows × --cols must be in 1..=4096 and --scale in 1..=16");
    }
    let images: Vec<_> = (0..n as u64)
        .map(|i| Sample::at(args.seed, args.split, i).render())
        .collect();
    let sheet = contact_sheet(&images, args.cols, args.scale, args.scale)?;
    sheet.write_png(&out)?;
    eprintln!("wrote {} ({}×{})", out.display(), sheet.width, sheet.height);
    Ok(())
}

fn info() -> Result<()> {
    let attrs = |a: &[(&str, usize)], names: &[&[&str]]| -> Vec<serde_json::Value> {
        a.iter()
            .zip(names)
            .map(|((n, c), v)| json!({"name": n, "count": c, "values": v}))
            .collect()
    };
    let heldout: Vec<String> = Split::Heldout
        .identities()
        .iter()
        .map(|id| id.names().join(" "))
        .collect();
    let info = json!({
        "identity_attributes": attrs(&Identity::ATTRIBUTES, &Identity::VALUE_NAMES),
        "context_attributes": attrs(&Context::ATTRIBUTES, &Context::VALUE_NAMES),
        "identities": Identity::COUNT,
        "contexts": Context::COUNT,
        "train_identities": Split::Train.identities().len(),
        "heldout_identities": heldout.len(),
        "subject_chance_level": Identity::chance_level(),
        "subject_chance_level_train_vs_heldout":
            Identity::chance_level_between(Split::Train, Split::Heldout),
        "prompt_chance_level": Context::chance_level(),
        "heldout": heldout,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&info).context("serializing info")?
    );
    Ok(())
}
