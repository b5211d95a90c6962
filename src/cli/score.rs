//! `loracast score` and `loracast score-bench`: CLIP-I, CLIP-T and DINO with real models
//! (src/eval/metrics.rs), as the DreamBooth evaluation computes them with transformers.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::parse_device;
use crate::eval::metrics::{cosine, ClipScorer, DinoScorer};
use crate::io::preprocess::RgbImage;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Hugging Face `CLIPModel` folder (config.json, model.safetensors, tokenizer files,
    /// optional preprocessor_config.json), e.g. openai/clip-vit-base-patch32.
    #[arg(long)]
    pub clip: PathBuf,
    /// Hugging Face `ViTModel` folder for DINO (config.json, model.safetensors), e.g. facebook/dino-vits16.
    #[arg(long)]
    pub dino: PathBuf,
    /// Reference image of the subject (PNG).
    #[arg(long)]
    pub reference: PathBuf,
    /// Generated image (PNG).
    #[arg(long)]
    pub image: PathBuf,
    /// The prompt the image was generated from.
    #[arg(long)]
    pub prompt: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Prints `{"clip_i": …, "clip_t": …, "dino": …}`.
pub fn run(args: ScoreArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    // Inputs first: a bad image should not wait for the models.
    let reference = RgbImage::open(&args.reference).context("--reference")?;
    let image = RgbImage::open(&args.image).context("--image")?;
    let clip = ClipScorer::load(&args.clip, device).context("--clip")?;
    let dino = DinoScorer::load(&args.dino, device).context("--dino")?;
    let s = crate::eval::metrics::score(&clip, &dino, &reference, &image, &args.prompt)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}

#[derive(Args, Debug)]
#[command(after_help = "Layout of --data (DreamBench-style):\n  \
    DATA/<subject>/reference/*.{png,jpg,jpeg}           reference images of the subject\n  \
    DATA/<subject>/generated/<prompt>/*.{png,jpg,jpeg}  images generated from <prompt> (the folder name is the prompt)\n\n\
    Per image: CLIP-I and DINO = mean cosine to every reference image of its subject; CLIP-T =\n\
    cosine to its prompt. Per subject: the mean over its images; overall: the mean over subjects.")]
pub struct ScoreBenchArgs {
    /// Hugging Face `CLIPModel` folder.
    #[arg(long)]
    pub clip: PathBuf,
    /// Hugging Face `ViTModel` folder for DINO.
    #[arg(long)]
    pub dino: PathBuf,
    /// DreamBench-style folder (see below).
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSON file.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One subject's images: references and (prompt, generated images).
type Subject = (Vec<PathBuf>, Vec<(String, Vec<PathBuf>)>);

fn scan(data: &Path) -> Result<BTreeMap<String, Subject>> {
    if !data.is_dir() {
        bail!("--data {}: no such folder", data.display());
    }
    let mut subjects = BTreeMap::new();
    for s in crate::io::folder::list_subdirs(data)? {
        let refs = crate::io::folder::list_images(&s.join("reference"))
            .with_context(|| format!("subject {}", name(&s)))?;
        if refs.is_empty() {
            bail!("{}: no reference/*.png|jpg images", s.display());
        }
        let mut prompts = Vec::new();
        for p in crate::io::folder::list_subdirs(&s.join("generated"))
            .with_context(|| format!("subject {}", name(&s)))?
        {
            let imgs = crate::io::folder::list_images(&p)?;
            if !imgs.is_empty() {
                prompts.push((name(&p), imgs));
            }
        }
        if prompts.is_empty() {
            bail!("{}: no generated/<prompt>/*.png|jpg images", s.display());
        }
        subjects.insert(name(&s), (refs, prompts));
    }
    if subjects.is_empty() {
        bail!("--data {}: no subject folders", data.display());
    }
    Ok(subjects)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Writes per-subject and mean scores to `--out`.
pub fn run_bench(args: ScoreBenchArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let out = super::check_output(&args.out, "json", args.force)?;
    let subjects = scan(&args.data)?;
    let clip = ClipScorer::load(&args.clip, device).context("--clip")?;
    let dino = DinoScorer::load(&args.dino, device).context("--dino")?;
    let open = |ps: &[PathBuf]| {
        ps.iter()
            .map(|p| RgbImage::open(p))
            .collect::<Result<Vec<_>>>()
    };
    let mut per_subject = serde_json::Map::new();
    let (mut all_i, mut all_t, mut all_d) = (vec![], vec![], vec![]);
    for (subject, (refs, prompts)) in &subjects {
        let refs = open(refs)?;
        let (ref_emb, ref_feat) = (clip.image_embeds(&refs)?, dino.features(&refs)?);
        let (mut si, mut st, mut sd) = (vec![], vec![], vec![]);
        let mut n_images = 0;
        for (prompt, paths) in prompts {
            let text = clip.text_embeds(&[prompt.as_str()])?;
            for img in open(paths)? {
                let emb = clip.image_embeds(std::slice::from_ref(&img))?;
                let feat = dino.features(std::slice::from_ref(&img))?;
                si.push(
                    cosine(&ref_emb, &emb)
                        .mean(tch::Kind::Double)
                        .double_value(&[]),
                );
                sd.push(
                    cosine(&ref_feat, &feat)
                        .mean(tch::Kind::Double)
                        .double_value(&[]),
                );
                st.push(cosine(&emb, &text).double_value(&[0]));
                n_images += 1;
            }
        }
        let (mi, mt, md) = (mean(&si), mean(&st), mean(&sd));
        per_subject.insert(
            subject.clone(),
            serde_json::json!({"clip_i": mi, "clip_t": mt, "dino": md, "images": n_images}),
        );
        all_i.push(mi);
        all_t.push(mt);
        all_d.push(md);
    }
    let report = serde_json::json!({
        "mean": {"clip_i": mean(&all_i), "clip_t": mean(&all_t), "dino": mean(&all_d)},
        "subjects": per_subject,
    });
    crate::util::write_atomic(&out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("{}", serde_json::to_string(&report["mean"])?);
    Ok(())
}
