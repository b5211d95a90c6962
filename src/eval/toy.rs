//! Measuring personalization on the toy world (issue 5's `demo`, issue 6's experiments):
//! held-out subjects, one reference render each, several context prompts, images generated
//! per method, scored by the shipped evaluators (subject and prompt fidelity, SPEC §6), with
//! the exact chance levels and the ceiling of ground-truth renders through the VAE.
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::fidelity::Evaluators;
use crate::data::{
    caption, subject_prompt, Context, Identity, Sample, Split, World, DEFAULT_TOKEN,
};
use crate::io::preprocess::RgbImage;
use crate::lora::LoraSet;
use crate::pipeline::{GenerateRequest, IpAdapterInput, StableDiffusion};

/// One held-out subject: its identity, the reference render the method sees, and the contexts
/// it is generated in.
#[derive(Debug, Clone)]
pub struct Subject {
    pub identity: Identity,
    pub reference: Sample,
    pub contexts: Vec<Context>,
}

/// `n` distinct held-out subjects from `seed` (a new seed draws new ones), each with
/// `prompts` random contexts.
pub fn heldout_subjects(seed: u64, n: usize, prompts: usize) -> Vec<Subject> {
    let mut world = World::new(seed ^ 0xDE30);
    let mut out: Vec<Subject> = Vec::new();
    while out.len() < n && out.len() < Split::Heldout.identities().len() {
        let identity = world.identity(Split::Heldout);
        if out.iter().any(|s| s.identity == identity) {
            continue;
        }
        let reference = world.view(identity);
        let contexts = (0..prompts).map(|_| world.context()).collect();
        out.push(Subject {
            identity,
            reference,
            contexts,
        });
    }
    out
}

/// How a method generates: plain CFG with a prompt, or HM-CFG with κ.
/// What a method adds to the frozen base for subject i: its LoRA `lora[i]` (prompts then carry
/// the subject token), IP-Adapter conditioning `ip[i]` (its reference's image tokens), and how
/// the rows are guided.
#[derive(Debug, Clone, Copy)]
pub struct Conditioning<'a> {
    pub lora: Option<&'a [LoraSet]>,
    pub ip: Option<&'a [IpAdapterInput]>,
    pub guide: Guide,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guide {
    Cfg,
    HmCfg { kappa: f64 },
}

/// One row of `metrics.json` (the schema shared by `demo` and `experiment paper`).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub method: String,
    pub guidance: String,
    pub kappa: Option<f64>,
    pub lambda: Option<f64>,
    pub subject_fidelity: f64,
    pub prompt_fidelity: f64,
    pub seconds_per_subject: f64,
    /// Optimisation steps per subject (finetuning methods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetune_steps: Option<u64>,
    /// The IP-Adapter scale of the row (`null` without an IP-Adapter).
    pub ip_adapter_scale: Option<f64>,
    /// Per identity attribute: fraction of images where the reference's value was recovered.
    pub subject_attributes: BTreeMap<String, f64>,
    /// Per context attribute: fraction of images showing the prompt's value.
    pub prompt_attributes: BTreeMap<String, f64>,
}

/// What [`run_method`] measured.
pub struct MethodScores {
    /// `images[subject][prompt]`: `[3, H, W]` in [-1, 1].
    pub images: Vec<Vec<Tensor>>,
    /// Subject fidelity of each subject (over its prompts), for paired comparisons.
    pub per_subject: Vec<f64>,
    pub subject_fidelity: f64,
    pub prompt_fidelity: f64,
    pub subject_attributes: BTreeMap<String, f64>,
    pub prompt_attributes: BTreeMap<String, f64>,
}

/// Sampling settings shared by every method of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// CFG scale g; HM-CFG uses `hm_guidance_scale` (its formula weighs the conditional terms
    /// twice: with a zero LoRA and κ = 0 it equals CFG at 2g).
    pub guidance_scale: f64,
    pub hm_guidance_scale: f64,
    /// User scale on the predicted LoRA (diffusers' `cross_attention_kwargs={"scale": s}`).
    pub lora_scale: f64,
    pub steps: usize,
    pub seed: u64,
}

/// Generates every (subject, context) image for one method and scores it. `lora[i]` is subject
/// i's LoRA (`None`: the base model, prompted with the plain caption).
pub fn run_method(
    sd: &StableDiffusion,
    evaluators: &Evaluators,
    subjects: &[Subject],
    method: Conditioning<'_>,
    sampling: Sampling,
    mut progress: impl FnMut(),
) -> Result<MethodScores> {
    let Conditioning { lora, ip, guide } = method;
    let mut images = Vec::new();
    let mut per_subject = Vec::new();
    let mut id_hits = [0usize; 5];
    let mut ctx_hits = [0usize; 4];
    let mut n = 0usize;
    for (i, subject) in subjects.iter().enumerate() {
        let mut row = Vec::new();
        let id_before: usize = id_hits.iter().sum();
        for (j, ctx) in subject.contexts.iter().enumerate() {
            let mut req = GenerateRequest::new(&caption(ctx));
            req.guidance_scale = sampling.guidance_scale;
            req.steps = sampling.steps;
            // The same initial noise for every method: differences come from the method.
            req.seed = crate::data::rng::mix64(sampling.seed ^ ((i as u64) << 20) ^ j as u64);
            if let Some(sets) = lora {
                req.prompt = subject_prompt(ctx, DEFAULT_TOKEN);
                req.lora = Some(sets[i].clone());
                req.lora_scale = sampling.lora_scale;
                if let Guide::HmCfg { kappa } = guide {
                    req.generic_prompt = Some(caption(ctx));
                    req.kappa = kappa;
                    req.guidance_scale = sampling.hm_guidance_scale;
                }
            }
            if let Some(ip) = ip {
                req.ip_adapter = Some(ip[i].clone());
            }
            let image = sd.generate(&req, |_, _| {})?;
            let hits = evaluators.hits(&image.unsqueeze(0), &[subject.identity], &[*ctx])?;
            for (k, &h) in hits[0].0.iter().enumerate() {
                id_hits[k] += h as usize;
            }
            for (k, &h) in hits[0].1.iter().enumerate() {
                ctx_hits[k] += h as usize;
            }
            n += 1;
            row.push(image);
            progress();
        }
        let hits = id_hits.iter().sum::<usize>() - id_before;
        let cells = (subject.contexts.len() * id_hits.len()).max(1);
        per_subject.push(hits as f64 / cells as f64);
        images.push(row);
    }
    let n = n.max(1) as f64;
    let per = |names: &[(&str, usize)], hits: &[usize]| -> BTreeMap<String, f64> {
        names
            .iter()
            .zip(hits)
            .map(|((name, _), &h)| (name.to_string(), h as f64 / n))
            .collect()
    };
    let mean = |hits: &[usize]| hits.iter().sum::<usize>() as f64 / (n * hits.len() as f64);
    Ok(MethodScores {
        images,
        per_subject,
        subject_fidelity: mean(&id_hits),
        prompt_fidelity: mean(&ctx_hits),
        subject_attributes: per(&Identity::ATTRIBUTES, &id_hits),
        prompt_attributes: per(&Context::ATTRIBUTES, &ctx_hits),
    })
}

/// Subject and prompt fidelity of the ground-truth renders of every (subject, context) through
/// the base model's VAE: what a perfect generator could score.
pub fn ceiling(
    sd: &StableDiffusion,
    evaluators: &Evaluators,
    subjects: &[Subject],
) -> Result<(f64, f64)> {
    let mut world = World::new(0xCE11);
    let (mut samples, mut ids, mut ctxs) = (Vec::new(), Vec::new(), Vec::new());
    for s in subjects {
        for ctx in &s.contexts {
            let (jitter_seed, jitter) = world.jitter();
            samples.push(
                Sample {
                    identity: s.identity,
                    context: *ctx,
                    jitter_seed,
                    jitter,
                }
                .render(),
            );
            ids.push(s.identity);
            ctxs.push(*ctx);
        }
    }
    let x = crate::data::images_to_tensor(&samples).to_device(sd.device);
    let rt = crate::train::evaluators::round_trip(&sd.vae, &x)?;
    let scores = evaluators.score(&rt, &ids, &ctxs)?;
    let n = scores.len().max(1) as f64;
    Ok((
        scores.iter().map(|s| s.0).sum::<f64>() / n,
        scores.iter().map(|s| s.1).sum::<f64>() / n,
    ))
}

/// Personalizes every subject from its reference render; returns the LoRAs and the mean
/// seconds per subject (preprocessing + hypernetwork).
pub fn personalize_all(
    hyper: &crate::hypernet::Hypernetwork,
    subjects: &[Subject],
) -> Result<(Vec<LoraSet>, f64)> {
    let mut sets = Vec::new();
    let start = Instant::now();
    for s in subjects {
        let img = s.reference.render();
        let rgb = RgbImage::new(img.width as u32, img.height as u32, img.rgb)?;
        sets.push(hyper.personalize(&[rgb])?);
    }
    Ok((
        sets,
        start.elapsed().as_secs_f64() / subjects.len().max(1) as f64,
    ))
}

/// `[3, H, W]` in [-1, 1] → RGB8 pixels for the report.
/// The open-category hypernetwork's LoRA of every subject from its reference render, through
/// the shared IP-Adapter image encoder, and the mean seconds per subject.
pub fn personalize_all_shared(
    hyper: &crate::hypernet::Hypernetwork,
    encoder: &crate::models::ip_adapter::ImageEncoder,
    subjects: &[Subject],
) -> Result<(Vec<LoraSet>, f64)> {
    let mut sets = Vec::new();
    let start = Instant::now();
    for s in subjects {
        sets.push(hyper.personalize_shared(encoder, &[reference_rgb(s)?])?);
    }
    Ok((
        sets,
        start.elapsed().as_secs_f64() / subjects.len().max(1) as f64,
    ))
}

/// A subject's reference render as an RGB image.
pub fn reference_rgb(s: &Subject) -> Result<RgbImage> {
    let img = s.reference.render();
    RgbImage::new(img.width as u32, img.height as u32, img.rgb)
}

pub fn to_png_bytes(image: &Tensor) -> Result<Vec<u8>> {
    let (w, h, rgb) = crate::io::image::to_rgb8(&image.to_kind(Kind::Float))?;
    crate::data::Image {
        width: w as usize,
        height: h as usize,
        rgb,
    }
    .png_bytes()
}

/// DreamBooth-LoRA per subject on its reference render (prompt "a sks creature", the paper's
/// one-image setting); returns, for every step count in `snapshots`, the LoRAs and the mean
/// seconds per subject to reach it. `init[i]` (fast finetuning) starts subject i from a LoRA.
pub fn finetune_all(
    sd: &StableDiffusion,
    subjects: &[Subject],
    cfg: &crate::train::finetune::FinetuneConfig,
    init: Option<&[LoraSet]>,
    snapshots: &[u64],
    mut progress: impl FnMut(),
) -> Result<Vec<(u64, Vec<LoraSet>, f64)>> {
    use crate::train::finetune::{finetune_lora, Examples};
    let size = sd.default_size();
    let prompt = format!("a {DEFAULT_TOKEN} creature");
    let mut snapshots = snapshots.to_vec();
    snapshots.sort_unstable();
    snapshots.dedup();
    let mut out: Vec<(u64, Vec<LoraSet>, f64)> =
        snapshots.iter().map(|&n| (n, Vec::new(), 0.0)).collect();
    let steps = snapshots.last().copied().unwrap_or(0);
    for (i, s) in subjects.iter().enumerate() {
        let img = s.reference.render();
        let rgb = RgbImage::new(img.width as u32, img.height as u32, img.rgb)?;
        let subject =
            Examples::with_prompt(vec![crate::train::target_tensor(&rgb, size)?], &prompt);
        let cfg = crate::train::finetune::FinetuneConfig {
            steps,
            seed: cfg.seed ^ crate::data::rng::mix64(i as u64),
            ..cfg.clone()
        };
        let init = init.map(|sets| &sets[i]);
        let done = finetune_lora(sd, &cfg, &subject, None, init, &snapshots, false)?;
        for ((_, sets, secs), (_, lora, t)) in out.iter_mut().zip(done.snapshots) {
            sets.push(lora);
            *secs += t / subjects.len() as f64;
        }
        progress();
    }
    Ok(out)
}
