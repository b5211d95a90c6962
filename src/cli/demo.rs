//! `loracast demo [--seed S] [--subjects N] [--out DIR]`: the whole method on the toy world
//! with the shipped weights. Draws held-out subjects (a new seed draws new ones), personalizes
//! each from one reference render with the hypernetwork (no finetuning), generates them in
//! several context prompts with the base model, the hypernetwork + CFG and the hypernetwork +
//! HM-CFG (κ = 1), scores every image with the shipped evaluators, and writes
//! `DIR/metrics.json`, `DIR/report.html` and the images under `DIR/images/`.
//! `--category open`: the open category instead (θ0 = base + the toy IP-Adapter-Plus, the
//! hypernetwork on top of it): [`crate::eval::experiment::open`] with the demo's subjects,
//! prompts and sampling, κ ∈ {0.4, 1.0, 1.6} and adapter scales {0.55, 1.0}.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{Context, Identity};
use crate::eval::fidelity::Evaluators;
use crate::eval::toy::{
    ceiling, heldout_subjects, personalize_all, run_method, Conditioning, Guide, Row, Sampling,
    Subject,
};
use crate::hypernet::Hypernetwork;
use crate::pipeline::StableDiffusion;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seed of the held-out subjects, their contexts and the sampling noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of held-out subjects.
    #[arg(long, default_value_t = 8)]
    pub subjects: usize,
    /// Context prompts per subject.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Output folder (report.html, metrics.json, images/).
    #[arg(long, default_value = "loracast-demo")]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// CFG scale (the paper's 7.5).
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// HM-CFG's g (default: half of --guidance-scale, the same total guidance as CFG: HM-CFG's
    /// formula weighs κ·ε_θ + (2−κ)·ε₀, i.e. twice the conditional term of CFG).
    #[arg(long)]
    pub hm_guidance_scale: Option<f64>,
    /// Scale on the predicted LoRA.
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f64,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Base model (folder or `toy`).
    #[arg(long, default_value = "toy")]
    pub base: PathBuf,
    /// Hypernetwork (file or `toy`).
    #[arg(long, default_value = "toy")]
    pub hypernet: PathBuf,
    /// Evaluators folder (or `toy`).
    #[arg(long, default_value = "toy")]
    pub evaluators: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Only the base model's row (measures the base model alone; no hypernetwork needed).
    #[arg(long)]
    pub base_only: bool,
    /// `closed` (the base + hypernetwork, the paper's SD1.5 system) or `open` (θ0 = base +
    /// IP-Adapter-Plus with the open-category hypernetwork on top; `--hypernet`,
    /// `--ip-adapter` default to the shipped toy ones).
    #[arg(long, default_value = "closed")]
    pub category: String,
    /// The IP-Adapter-Plus of `--category open` (file or `toy`).
    #[arg(long, default_value = "toy")]
    pub ip_adapter: PathBuf,
}

/// Everything the demo measured.
pub struct DemoOutcome {
    pub subjects: Vec<Subject>,
    pub rows: Vec<Row>,
    pub images: Vec<Vec<Vec<tch::Tensor>>>,
    pub chance: (f64, f64),
    pub ceiling: (f64, f64),
}

pub fn run(args: DemoArgs) -> Result<()> {
    if args.subjects == 0 || args.prompts == 0 {
        bail!("--subjects and --prompts must be at least 1");
    }
    match args.category.as_str() {
        "closed" => {}
        "open" => {
            if args.base_only || args.lora_scale != 1.0 {
                bail!("--base-only and --lora-scale are for --category closed");
            }
            let opts = crate::eval::experiment::OpenOptions {
                seed: args.seed,
                subjects: args.subjects,
                prompts: args.prompts,
                out: args.out,
                force: args.force,
                guidance_scale: args.guidance_scale,
                hm_guidance_scale: args.hm_guidance_scale,
                kappas: vec![0.4, 1.0, 1.6],
                ip_scales: vec![0.55, 1.0],
                ip_adapter_scale: None,
                steps: args.steps,
                base: args.base,
                ip_adapter: args.ip_adapter,
                image_encoder: None,
                hypernet: args.hypernet,
                evaluators: args.evaluators,
                device: args.device,
            };
            return crate::eval::experiment::open(opts);
        }
        other => bail!("--category {other:?}: expected closed or open"),
    }
    if args.steps == 0
        || !args.guidance_scale.is_finite()
        || !args.lora_scale.is_finite()
        || args.hm_guidance_scale.is_some_and(|g| !g.is_finite())
    {
        bail!("--steps must be ≥ 1 and the guidance and LoRA scales finite");
    }
    super::prepare_report_dir(&args.out, args.force)?;
    let device = super::parse_device(&args.device)?;
    let start = Instant::now();
    let base = crate::toy::resolve_base(&args.base)?;
    let sd = StableDiffusion::load(&base, device)?;
    let hyper = match args.base_only {
        true => None,
        false => {
            let (h, vs) =
                Hypernetwork::load(&crate::toy::resolve_hypernet(&args.hypernet)?, device)?;
            h.check_base(&sd.unet.lora_fingerprint())?;
            Some((h, vs))
        }
    };
    let evaluators = Evaluators::load(&crate::toy::resolve_evaluators(&args.evaluators)?, device)?;

    let subjects = heldout_subjects(args.seed, args.subjects, args.prompts);
    let sampling = Sampling {
        guidance_scale: args.guidance_scale,
        hm_guidance_scale: args.hm_guidance_scale.unwrap_or(args.guidance_scale / 2.0),
        lora_scale: args.lora_scale,
        steps: args.steps,
        seed: args.seed,
    };
    let methods = if hyper.is_some() { 3 } else { 1 };
    let n_images = (subjects.len() * args.prompts * methods) as u64;
    let bar = ProgressBar::new(n_images).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("generating");
    let (sets, seconds, lambda) = match &hyper {
        Some((h, _)) => {
            let (sets, seconds) = personalize_all(h, &subjects)?;
            (sets, seconds, h.config.lambda)
        }
        None => (Vec::new(), 0.0, None),
    };
    let mut rows = Vec::new();
    let mut images = Vec::new();
    for (method, guide, lora) in [
        ("base", Guide::Cfg, None),
        ("hypernet", Guide::Cfg, Some(sets.as_slice())),
        (
            "hypernet",
            Guide::HmCfg { kappa: 1.0 },
            Some(sets.as_slice()),
        ),
    ]
    .into_iter()
    .take(methods)
    {
        let cond = Conditioning {
            lora,
            ip: None,
            guide,
        };
        let m = run_method(&sd, &evaluators, &subjects, cond, sampling, || bar.inc(1))?;
        let (guidance, kappa) = match guide {
            Guide::Cfg => ("cfg", None),
            Guide::HmCfg { kappa } => ("hm-cfg", Some(kappa)),
        };
        rows.push(Row {
            method: method.to_string(),
            guidance: guidance.to_string(),
            kappa,
            lambda: lora.and(lambda),
            subject_fidelity: m.subject_fidelity,
            prompt_fidelity: m.prompt_fidelity,
            seconds_per_subject: if lora.is_some() { seconds } else { 0.0 },
            finetune_steps: None,
            ip_adapter_scale: None,
            subject_attributes: m.subject_attributes,
            prompt_attributes: m.prompt_attributes,
        });
        images.push(m.images);
    }
    bar.finish_and_clear();
    let outcome = DemoOutcome {
        chance: (
            Identity::chance_level_between(crate::data::Split::Train, crate::data::Split::Heldout),
            Context::chance_level(),
        ),
        ceiling: ceiling(&sd, &evaluators, &subjects)?,
        subjects,
        rows,
        images,
    };
    let settings = serde_json::json!({"seed": args.seed, "subjects": outcome.subjects.len(),
        "prompts": args.prompts, "guidance_scale": args.guidance_scale, "steps": args.steps,
        "hm_guidance_scale": sampling.hm_guidance_scale, "lora_scale": args.lora_scale});
    let grid: Vec<usize> = (0..outcome.rows.len()).collect();
    crate::eval::report::write(
        &args.out,
        &crate::eval::report::Report {
            title: "loracast demo: toy world, held-out subjects",
            json_name: "metrics.json",
            subjects: &outcome.subjects,
            rows: &outcome.rows,
            images: &outcome.images,
            grid_rows: &grid,
            chance: outcome.chance,
            ceiling: outcome.ceiling,
            settings,
            extra_html: String::new(),
            extra_files: Vec::new(),
        },
    )?;
    let attrs = |m: &std::collections::BTreeMap<String, f64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in &outcome.rows {
        eprintln!(
            "{:<9} {:<7} subject {:.3}  prompt {:.3}  {:.4} s/subject\n    subject: {}\n    prompt: {}",
            r.method,
            r.guidance,
            r.subject_fidelity,
            r.prompt_fidelity,
            r.seconds_per_subject,
            attrs(&r.subject_attributes),
            attrs(&r.prompt_attributes)
        );
    }
    eprintln!(
        "chance: subject {:.3} prompt {:.3}; ceiling (renders through the VAE): subject {:.3} prompt {:.3}",
        outcome.chance.0, outcome.chance.1, outcome.ceiling.0, outcome.ceiling.1
    );
    eprintln!(
        "wrote {}/report.html and metrics.json in {:.1} s",
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
