//! The toy world's experiments, shared by `loracast experiment paper|open` and `demo`:
//! held-out subjects, every method's rows in `demo`'s metrics schema, grids, the κ plot and the
//! tables (issues 6 and 17).
//!
//! `paper` — the papers' closed-category experiments on
//! held-out toy subjects (issue 6), every row in `demo`'s metrics schema, written to
//! `DIR/results.json` with `DIR/report.html` (metrics table, κ trade-off plot, image grid),
//! `DIR/results.md` (the table for docs/RESULTS.md) and `DIR/kappa.svg`:
//! - `base` (CFG): the frozen model with the plain caption;
//! - `hypernet` (chosen λ): CFG, and HM-CFG at every κ of `--kappas` (paper Tables 5, 9/10);
//! - `hypernet_regularized`: the same recipe and budget with the other λ of the comparison
//!   (paper Table 3: λ = 0 against λ > 0; each row records its λ);
//! - `dreambooth_lora`: a LoRA finetuned per subject on its reference render, at every step
//!   count of `--dreambooth-steps` (one run per subject, snapshots), timed (paper Tables 2/3);
//! - `hypernet_fastft`: the hypernetwork's LoRA + rank-relaxed fast finetuning
//!   (hyperdreambooth §4.3: the prediction frozen, a fresh rank-`--fastft-rank` LoRA trained for
//!   `--fastft-steps` steps on top, timed including the hypernetwork);
//! - `hyperdreambooth_hyper_only`: HyperDreamBooth's LiDB hypernetwork (trained with the
//!   weight-space loss against pre-optimised LiDB subjects, `configs/toy/hyperdreambooth.json`);
//! - `hyperdreambooth_fastft`: its prediction + the same rank-relaxed fast finetuning.
//!
//!
//! `open` — the open category (issue 17; seed paper §5.2, Tables 4 and 10), θ0 = base +
//! IP-Adapter-Plus:
//! - `base` (CFG): the frozen model with the plain caption;
//! - `ip_adapter_plus` at every scale of `--ip-scales` (CFG, plain caption, the reference's
//!   image tokens; the ∅ row gets the unconditional image, as diffusers);
//! - `hypernet_on_ip_adapter` at the hypernetwork's IP-Adapter scale: CFG and HM-CFG at every κ
//!   of `--kappas` (∅ = θ0 with the unconditional image; c_G = θ0 with the image; c_S = θ0 + LoRA
//!   with the image).
//!
//! Every row records `ip_adapter_scale` (null without one). F6 is judged paired per subject:
//! the mean difference in subject fidelity between `hypernet_on_ip_adapter` (CFG) and
//! `ip_adapter_plus` at the same scale, with its standard error over subjects.
//!
//! Every method sees the same subjects, reference renders, prompts and initial noise.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::fidelity::Evaluators;
use super::report::{write, Report};
use super::toy::{
    ceiling, finetune_all, heldout_subjects, personalize_all, run_method, Conditioning, Guide, Row,
    Sampling,
};
use crate::data::{Context, Identity, Split};
use crate::hypernet::Hypernetwork;
use crate::lora::LoraSet;
use crate::pipeline::StableDiffusion;
use crate::train::finetune::FinetuneConfig;

/// Every method `experiment paper` can run (`--only`).
const METHODS: [&str; 7] = [
    "base",
    "hypernet",
    "hypernet_regularized",
    "dreambooth_lora",
    "hypernet_fastft",
    "hyperdreambooth_hyper_only",
    "hyperdreambooth_fastft",
];

#[derive(Args, Debug)]
pub struct PaperOptions {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub subjects: usize,
    /// Context prompts per subject.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Comma-separated subset of: base, hypernet, hypernet_regularized, dreambooth_lora,
    /// hypernet_fastft, hyperdreambooth_hyper_only, hyperdreambooth_fastft.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// HM-CFG's g (default: half of --guidance-scale, as in `demo`).
    #[arg(long)]
    pub hm_guidance_scale: Option<f64>,
    #[arg(long, value_delimiter = ',', default_value = "0.4,0.6,0.8,1.0,1.2,1.6")]
    pub kappas: Vec<f64>,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// DreamBooth-LoRA step counts (snapshots of one run per subject).
    #[arg(long, value_delimiter = ',', default_value = "50,100,200,400")]
    pub dreambooth_steps: Vec<u64>,
    #[arg(long, default_value_t = 4)]
    pub dreambooth_rank: i64,
    #[arg(long, default_value_t = 1e-3)]
    pub dreambooth_lr: f64,
    #[arg(long, default_value_t = 40)]
    pub fastft_steps: u64,
    #[arg(long, default_value_t = 8)]
    pub fastft_rank: i64,
    #[arg(long, default_value_t = 1e-3)]
    pub fastft_lr: f64,
    #[arg(long, default_value = "toy")]
    pub base: PathBuf,
    #[arg(long, default_value = "toy")]
    pub hypernet: PathBuf,
    /// The λ-comparison twin of `--hypernet`: the same recipe and budget, λ > 0 (file or `toy`).
    #[arg(long, default_value = "toy")]
    pub hypernet_regularized: PathBuf,
    /// HyperDreamBooth's LiDB hypernetwork (file or `toy`).
    #[arg(long, default_value = "toy")]
    pub hyperdreambooth: PathBuf,
    #[arg(long, default_value = "toy")]
    pub evaluators: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// A method's LoRAs (none: the base model), how it is guided, and its row's fields.
struct Plan<'a> {
    method: &'static str,
    guide: Guide,
    lora: Option<&'a [LoraSet]>,
    lambda: Option<f64>,
    seconds: f64,
    finetune_steps: Option<u64>,
}

/// Runs `experiment paper` into `args.out`.
pub fn paper(args: PaperOptions) -> Result<()> {
    if args.subjects == 0 || args.prompts == 0 || args.steps == 0 {
        bail!("--subjects, --prompts and --steps must be at least 1");
    }
    if let Some(bad) = args.only.iter().find(|m| !METHODS.contains(&m.as_str())) {
        bail!("--only {bad:?}: expected some of {}", METHODS.join(", "));
    }
    if args.kappas.iter().any(|k| !(0.0..=2.0).contains(k)) {
        bail!("--kappas must lie in [0, 2]");
    }
    if args.dreambooth_steps.is_empty() || args.dreambooth_steps.contains(&0) {
        bail!("--dreambooth-steps must be positive step counts");
    }
    super::report::prepare_dir(&args.out, args.force)?;
    let wants = |m: &str| args.only.is_empty() || args.only.iter().any(|o| o == m);
    let device = crate::util::parse_device(&args.device)?;
    let start = Instant::now();
    let sd = StableDiffusion::load(&crate::toy::resolve_base(&args.base)?, device)?;
    let fingerprint = sd.unet.lora_fingerprint();
    // The hypernetwork behind `arg` (a file or `toy`), loaded only when a wanted row needs it.
    let load_hyper = |need: bool,
                      arg: &PathBuf,
                      shipped: fn(&std::path::Path) -> Result<PathBuf>|
     -> Result<Option<(Hypernetwork, tch::nn::VarStore)>> {
        if !need {
            return Ok(None);
        }
        let (h, vs) = Hypernetwork::load(&shipped(arg)?, device)?;
        h.check_base(&fingerprint)?;
        Ok(Some((h, vs)))
    };
    let hyper = load_hyper(
        wants("hypernet") || wants("hypernet_fastft"),
        &args.hypernet,
        crate::toy::resolve_hypernet,
    )?;
    let hyper_reg = load_hyper(
        wants("hypernet_regularized"),
        &args.hypernet_regularized,
        crate::toy::resolve_hypernet_regularized,
    )?;
    let hdb = load_hyper(
        wants("hyperdreambooth_hyper_only") || wants("hyperdreambooth_fastft"),
        &args.hyperdreambooth,
        crate::toy::resolve_hyperdreambooth,
    )?;
    let evaluators = Evaluators::load(&crate::toy::resolve_evaluators(&args.evaluators)?, device)?;
    let subjects = heldout_subjects(args.seed, args.subjects, args.prompts);
    let sampling = Sampling {
        guidance_scale: args.guidance_scale,
        hm_guidance_scale: args.hm_guidance_scale.unwrap_or(args.guidance_scale / 2.0),
        lora_scale: 1.0,
        steps: args.steps,
        seed: args.seed,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // 1. Personalize: hypernetworks (≈ 0 s), then the finetuning baselines.
    let personalized = |h: &Option<(Hypernetwork, tch::nn::VarStore)>| -> Result<_> {
        match h {
            Some((h, _)) => Ok(Some((personalize_all(h, &subjects)?, h.config.lambda))),
            None => Ok(None),
        }
    };
    let hyper_sets = personalized(&hyper)?;
    let hyper_reg_sets = personalized(&hyper_reg)?;
    let hdb_sets = personalized(&hdb)?;
    let n = subjects.len() as u64;
    let mut dreambooth = Vec::new();
    if wants("dreambooth_lora") {
        bar.set_message("dreambooth-lora");
        bar.set_length(n);
        let cfg = FinetuneConfig {
            rank: args.dreambooth_rank,
            lr: args.dreambooth_lr,
            seed: args.seed,
            ..FinetuneConfig::toy(1)
        };
        dreambooth = finetune_all(&sd, &subjects, &cfg, None, &args.dreambooth_steps, || {
            bar.inc(1)
        })?;
    }
    // Rank-relaxed fast finetuning from a hypernetwork's predictions (timed including it).
    let fast_finetune = |(sets, secs): &(Vec<LoraSet>, f64), what: &str| -> Result<_> {
        bar.set_message(format!("fast finetuning ({what})"));
        bar.set_position(0);
        bar.set_length(n);
        let cfg = FinetuneConfig {
            rank: args.fastft_rank,
            lr: args.fastft_lr,
            seed: args.seed ^ 0xFA57,
            ..FinetuneConfig::toy(1)
        };
        let mut r = finetune_all(
            &sd,
            &subjects,
            &cfg,
            Some(sets),
            &[args.fastft_steps],
            || bar.inc(1),
        )?;
        let (steps, sets, t) = r.remove(0);
        Ok((steps, sets, t + secs))
    };
    let fastft = match (wants("hypernet_fastft"), &hyper_sets) {
        (true, Some((sets, _))) => Some(fast_finetune(sets, "hypernet")?),
        _ => None,
    };
    let hdb_fastft = match (wants("hyperdreambooth_fastft"), &hdb_sets) {
        (true, Some((sets, _))) => Some(fast_finetune(sets, "hyperdreambooth")?),
        _ => None,
    };

    // 2. The rows.
    let mut plans: Vec<Plan> = Vec::new();
    if wants("base") {
        plans.push(Plan {
            method: "base",
            guide: Guide::Cfg,
            lora: None,
            lambda: None,
            seconds: 0.0,
            finetune_steps: None,
        });
    }
    if let (true, Some(((sets, secs), lambda))) = (wants("hypernet"), &hyper_sets) {
        let guides = std::iter::once(Guide::Cfg)
            .chain(args.kappas.iter().map(|&kappa| Guide::HmCfg { kappa }));
        for guide in guides {
            plans.push(Plan {
                method: "hypernet",
                guide,
                lora: Some(sets),
                lambda: *lambda,
                seconds: *secs,
                finetune_steps: None,
            });
        }
    }
    if let Some(((sets, secs), lambda)) = &hyper_reg_sets {
        for guide in [Guide::Cfg, Guide::HmCfg { kappa: 1.0 }] {
            plans.push(Plan {
                method: "hypernet_regularized",
                guide,
                lora: Some(sets),
                lambda: *lambda,
                seconds: *secs,
                finetune_steps: None,
            });
        }
    }
    for (steps, sets, secs) in &dreambooth {
        plans.push(Plan {
            method: "dreambooth_lora",
            guide: Guide::Cfg,
            lora: Some(sets),
            lambda: None,
            seconds: *secs,
            finetune_steps: Some(*steps),
        });
    }
    if let Some((steps, sets, secs)) = &fastft {
        plans.push(Plan {
            method: "hypernet_fastft",
            guide: Guide::Cfg,
            lora: Some(sets),
            lambda: hyper_sets.as_ref().and_then(|(_, l)| *l),
            seconds: *secs,
            finetune_steps: Some(*steps),
        });
    }
    if let (true, Some(((sets, secs), lambda))) = (wants("hyperdreambooth_hyper_only"), &hdb_sets) {
        plans.push(Plan {
            method: "hyperdreambooth_hyper_only",
            guide: Guide::Cfg,
            lora: Some(sets),
            lambda: *lambda,
            seconds: *secs,
            finetune_steps: None,
        });
    }
    if let Some((steps, sets, secs)) = &hdb_fastft {
        plans.push(Plan {
            method: "hyperdreambooth_fastft",
            guide: Guide::Cfg,
            lora: Some(sets),
            lambda: hdb_sets.as_ref().and_then(|(_, l)| *l),
            seconds: *secs,
            finetune_steps: Some(*steps),
        });
    }

    // 3. Generate and score every row.
    bar.set_message("generating");
    bar.set_position(0);
    bar.set_length((plans.len() * subjects.len() * args.prompts) as u64);
    let (mut rows, mut images) = (Vec::new(), Vec::new());
    for p in &plans {
        let cond = Conditioning {
            lora: p.lora,
            ip: None,
            guide: p.guide,
        };
        let m = run_method(&sd, &evaluators, &subjects, cond, sampling, || bar.inc(1))?;
        let (guidance, kappa) = match p.guide {
            Guide::Cfg => ("cfg", None),
            Guide::HmCfg { kappa } => ("hm-cfg", Some(kappa)),
        };
        rows.push(Row {
            method: p.method.to_string(),
            guidance: guidance.to_string(),
            kappa,
            lambda: p.lambda,
            subject_fidelity: m.subject_fidelity,
            prompt_fidelity: m.prompt_fidelity,
            seconds_per_subject: p.seconds,
            finetune_steps: p.finetune_steps,
            ip_adapter_scale: None,
            subject_attributes: m.subject_attributes,
            prompt_attributes: m.prompt_attributes,
        });
        images.push(m.images);
    }
    bar.finish_and_clear();

    // 4. Report: the grid shows base, hypernet CFG and HM-CFG κ=1, the longest DreamBooth and
    // the fast finetune.
    let longest = rows
        .iter()
        .filter(|r| r.method == "dreambooth_lora")
        .filter_map(|r| r.finetune_steps)
        .max();
    let grid: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| match r.method.as_str() {
            "hypernet" => r.kappa.is_none_or(|k| k == 1.0),
            "dreambooth_lora" => r.finetune_steps == longest,
            "hypernet_regularized" => false,
            _ => true,
        })
        .map(|(i, _)| i)
        .collect();
    let settings = serde_json::json!({"seed": args.seed, "subjects": subjects.len(),
        "prompts": args.prompts, "guidance_scale": args.guidance_scale, "steps": args.steps,
        "hm_guidance_scale": sampling.hm_guidance_scale,
        "dreambooth": {"rank": args.dreambooth_rank, "lr": args.dreambooth_lr, "batch": 4,
                       "prompt": "a sks creature", "images": 1},
        "fastft": {"rank": args.fastft_rank, "lr": args.fastft_lr, "steps": args.fastft_steps},
        "seconds": start.elapsed().as_secs_f64()});
    finish(Finished {
        out: &args.out,
        title: "loracast experiment paper: toy world, held-out subjects",
        subjects: &subjects,
        rows: &rows,
        sd: &sd,
        evaluators: &evaluators,
        images,
        grid: &grid,
        settings,
        kappa_method: "hypernet",
        heading: "κ trade-off (HM-CFG)",
        notes: String::new(),
        start,
    })
}

/// What an experiment writes at its end.
struct Finished<'a> {
    out: &'a std::path::Path,
    title: &'a str,
    subjects: &'a [super::toy::Subject],
    rows: &'a [Row],
    /// Every row's images (`images[row][subject][prompt]`); the grid shows rows `grid`.
    images: Vec<Vec<Vec<tch::Tensor>>>,
    grid: &'a [usize],
    /// For the chance levels and the ceiling (renders through the VAE).
    sd: &'a StableDiffusion,
    evaluators: &'a Evaluators,
    settings: serde_json::Value,
    /// The method whose HM-CFG rows make the κ curve.
    kappa_method: &'a str,
    heading: &'a str,
    /// Lines appended to results.md (findings).
    notes: String,
    start: Instant,
}

/// Writes `results.json`, `results.md`, `kappa.svg` and `report.html` atomically and prints
/// every row.
fn finish(mut f: Finished) -> Result<()> {
    let grid_images: Vec<_> = f
        .grid
        .iter()
        .map(|&i| std::mem::take(&mut f.images[i]))
        .collect();
    let chance = (
        Identity::chance_level_between(Split::Train, Split::Heldout),
        Context::chance_level(),
    );
    let ceiling = ceiling(f.sd, f.evaluators, f.subjects)?;
    let svg = kappa_svg(f.rows, f.kappa_method);
    let md = super::report::markdown_table(f.rows, chance, ceiling) + &f.notes;
    write(
        f.out,
        &Report {
            title: f.title,
            json_name: "results.json",
            subjects: f.subjects,
            rows: f.rows,
            images: &grid_images,
            grid_rows: f.grid,
            chance,
            ceiling,
            settings: f.settings,
            extra_html: format!("<h2>{}</h2>{svg}\n", f.heading),
            extra_files: vec![
                ("results.md".into(), md.into_bytes()),
                ("kappa.svg".into(), svg.clone().into_bytes()),
            ],
        },
    )?;
    for r in f.rows {
        let ip = r
            .ip_adapter_scale
            .map(|s| format!(" ip={s}"))
            .unwrap_or_default();
        eprintln!(
            "{:<48} subject {:.3}  prompt {:.3}  {:.3} s/subject",
            super::report::label(r) + &ip,
            r.subject_fidelity,
            r.prompt_fidelity,
            r.seconds_per_subject
        );
    }
    eprintln!(
        "chance: subject {:.3} prompt {:.3}; ceiling: subject {:.3} prompt {:.3}",
        chance.0, chance.1, ceiling.0, ceiling.1
    );
    if !f.notes.is_empty() {
        eprint!("{}", f.notes.trim_start());
    }
    eprintln!(
        "wrote {}/results.json and report.html in {:.1} min",
        f.out.display(),
        f.start.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// The κ trade-off (paper Tables 9/10) as an SVG: prompt fidelity (x) against subject
/// fidelity (y) for `method`'s HM-CFG rows (labelled by κ), its CFG row and the others.
pub fn kappa_svg(rows: &[Row], method: &str) -> String {
    let (w, h, pad) = (480.0, 360.0, 48.0);
    let pts: Vec<(f64, f64, String, &str)> = rows
        .iter()
        .map(|r| {
            let colour = match (r.method.as_str(), r.kappa) {
                (m, Some(_)) if m == method => "#c0392b",
                (m, None) if m == method => "#2980b9",
                ("base", _) => "#333",
                _ => "#27ae60",
            };
            let label = match r.kappa {
                Some(k) if r.method == method => format!("κ={k}"),
                _ => super::report::label(r),
            };
            (r.prompt_fidelity, r.subject_fidelity, label, colour)
        })
        .collect();
    if pts.is_empty() {
        return String::new();
    }
    let range = |v: Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = ((hi - lo) * 0.1).max(0.01);
        (lo - m, hi + m)
    };
    let (x0, x1) = range(pts.iter().map(|p| p.0).collect());
    let (y0, y1) = range(pts.iter().map(|p| p.1).collect());
    let sx = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let mut svg = format!(
        concat!(
            r#"<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" style="border:1px solid #ccc;background:#fff" font-family="sans-serif">"#,
            r#"<text x="{xm}" y="{xl}" font-size="12" text-anchor="middle">prompt fidelity</text>"#,
            r#"<text x="12" y="{ym}" font-size="12" transform="rotate(-90 12 {ym})" text-anchor="middle">subject fidelity</text>"#,
            r#"<text x="{pad}" y="{xt}" font-size="10">{x0:.2}</text><text x="{xr}" y="{xt}" font-size="10" text-anchor="end">{x1:.2}</text>"#,
            r#"<text x="{yt}" y="{yb}" font-size="10" text-anchor="end">{y0:.2}</text><text x="{yt}" y="{ytop}" font-size="10" text-anchor="end">{y1:.2}</text>"#,
        ),
        w = w,
        h = h,
        xm = w / 2.0,
        xl = h - 8.0,
        ym = h / 2.0,
        pad = pad,
        xt = h - pad + 14.0,
        x0 = x0,
        xr = w - pad,
        x1 = x1,
        yt = pad - 4.0,
        yb = h - pad,
        y0 = y0,
        ytop = pad + 4.0,
        y1 = y1,
    );
    // The κ curve, in κ order.
    let mut curve: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter(|r| r.method == method)
        .filter_map(|r| r.kappa.map(|k| (k, r.prompt_fidelity, r.subject_fidelity)))
        .collect();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    if curve.len() > 1 {
        let path: Vec<String> = curve
            .iter()
            .map(|(_, x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        svg.push_str(&format!(
            r##"<polyline fill="none" stroke="#c0392b" points="{}"/>"##,
            path.join(" ")
        ));
    }
    for (x, y, label, colour) in &pts {
        svg.push_str(&format!(
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"><title>{label}</title></circle><text x="{:.1}" y="{:.1}" font-size="9" fill="{colour}">{label}</text>"#,
            sx(*x),
            sy(*y),
            sx(*x) + 6.0,
            sy(*y) - 4.0
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// `experiment open`'s options.
#[derive(Args, Debug, Clone)]
pub struct OpenOptions {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 32)]
    pub subjects: usize,
    /// Context prompts per subject.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// HM-CFG's g (default: half of --guidance-scale, as in `demo`).
    #[arg(long)]
    pub hm_guidance_scale: Option<f64>,
    #[arg(long, value_delimiter = ',', default_value = "0.4,0.8,1.0,1.2,1.6")]
    pub kappas: Vec<f64>,
    /// IP-Adapter-Plus scales of the adapter-alone rows.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.55,0.8,1.0")]
    pub ip_scales: Vec<f64>,
    /// The hypernetwork rows' IP-Adapter scale (default: the one it was trained with).
    #[arg(long)]
    pub ip_adapter_scale: Option<f64>,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    #[arg(long, default_value = "toy")]
    pub base: PathBuf,
    /// The IP-Adapter-Plus file (or `toy`); its image encoder is image_encoder/ beside it.
    #[arg(long, default_value = "toy")]
    pub ip_adapter: PathBuf,
    #[arg(long)]
    pub image_encoder: Option<PathBuf>,
    /// The open-category hypernetwork trained on top of --ip-adapter (file or `toy`).
    #[arg(long, default_value = "toy")]
    pub hypernet: PathBuf,
    #[arg(long, default_value = "toy")]
    pub evaluators: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Mean and standard error (over subjects) of the paired difference `a − b`.
pub fn paired_difference(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len() as f64;
    if d.len() < 2 {
        return (d.first().copied().unwrap_or(0.0), f64::NAN);
    }
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// What `open` measured (also returned to `demo --category open`).
pub struct OpenOutcome {
    pub rows: Vec<Row>,
    /// F6: (mean, standard error) of hypernet_on_ip_adapter − ip_adapter_plus subject fidelity
    /// at the same scale (CFG), and the prompt-fidelity difference.
    pub f6_subject: (f64, f64),
    pub f6_prompt: f64,
    /// F7: whether subject fidelity rises and prompt fidelity falls monotonically in κ
    /// (non-strictly), over the HM-CFG rows.
    pub f7_monotone: (bool, bool),
}

/// Runs `experiment open` into `args.out`.
pub fn open(args: OpenOptions) -> Result<()> {
    open_with(args).map(|_| ())
}

/// [`open`], returning what it measured.
pub fn open_with(args: OpenOptions) -> Result<OpenOutcome> {
    use crate::models::ip_adapter::{ImageEncoder, IpAdapter};
    use crate::pipeline::IpAdapterInput;
    if args.subjects == 0 || args.prompts == 0 || args.steps == 0 {
        bail!("--subjects, --prompts and --steps must be at least 1");
    }
    if args.kappas.iter().any(|k| !(0.0..=2.0).contains(k)) {
        bail!("--kappas must lie in [0, 2]");
    }
    if args
        .ip_scales
        .iter()
        .chain(&args.ip_adapter_scale)
        .any(|s| !s.is_finite())
    {
        bail!("--ip-scales and --ip-adapter-scale must be finite numbers");
    }
    crate::eval::report::prepare_dir(&args.out, args.force)?;
    let device = crate::util::parse_device(&args.device)?;
    let start = Instant::now();
    let base = crate::toy::resolve_base(&args.base)?;
    let sd = StableDiffusion::load(&base, device)?;
    let (hyper, _hvs) =
        Hypernetwork::load(&crate::toy::resolve_hypernet_open(&args.hypernet)?, device)?;
    hyper.check_base(&sd.unet.lora_fingerprint())?;
    let ip_file = crate::toy::resolve_ip_adapter(&args.ip_adapter)?;
    let adapter = IpAdapter::load(&ip_file, device)?;
    hyper.check_ip_adapter(
        &crate::io::sha256_file(&ip_file)?,
        &ip_file.display().to_string(),
    )?;
    let enc_dir = args.image_encoder.clone().unwrap_or_else(|| {
        ip_file
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("image_encoder")
    });
    let encoder = ImageEncoder::for_base(&enc_dir, &base, device)?;
    let hyper_scale = match (args.ip_adapter_scale, &hyper.config.ip_adapter) {
        (Some(s), _) => s,
        (None, Some(b)) => b.scale,
        (None, None) => {
            bail!("--hypernet is not an open-category hypernetwork (no IP-Adapter in its config)")
        }
    };
    let evaluators = Evaluators::load(&crate::toy::resolve_evaluators(&args.evaluators)?, device)?;
    let subjects = heldout_subjects(args.seed, args.subjects, args.prompts);
    let sampling = Sampling {
        guidance_scale: args.guidance_scale,
        hm_guidance_scale: args.hm_guidance_scale.unwrap_or(args.guidance_scale / 2.0),
        lora_scale: 1.0,
        steps: args.steps,
        seed: args.seed,
    };
    // 1. Personalize (the shared encoder's states → LoRA) and every subject's image tokens.
    let (sets, seconds) = super::toy::personalize_all_shared(&hyper, &encoder, &subjects)?;
    // The image tokens do not depend on the scale: encode each reference once.
    let tokens = subjects
        .iter()
        .map(|s| {
            IpAdapterInput::new(
                &adapter,
                &encoder,
                &sd.unet.config,
                &[super::toy::reference_rgb(s)?],
                1.0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let ip_at = |scale: f64| -> Vec<IpAdapterInput> {
        tokens
            .iter()
            .map(|t| IpAdapterInput { scale, ..t.clone() })
            .collect()
    };
    // 2. The rows: (method, guide, lora, ip scale).
    let mut plans: Vec<(&str, Guide, bool, Option<f64>)> = vec![("base", Guide::Cfg, false, None)];
    for &s in &args.ip_scales {
        plans.push(("ip_adapter_plus", Guide::Cfg, false, Some(s)));
    }
    plans.push((
        "hypernet_on_ip_adapter",
        Guide::Cfg,
        true,
        Some(hyper_scale),
    ));
    for &kappa in &args.kappas {
        plans.push((
            "hypernet_on_ip_adapter",
            Guide::HmCfg { kappa },
            true,
            Some(hyper_scale),
        ));
    }
    let bar = ProgressBar::new((plans.len() * subjects.len() * args.prompts) as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("generating");
    let (mut rows, mut images, mut per_subject) = (Vec::new(), Vec::new(), Vec::new());
    for &(method, guide, with_lora, scale) in &plans {
        let ip = scale.map(ip_at);
        let cond = Conditioning {
            lora: with_lora.then_some(sets.as_slice()),
            ip: ip.as_deref(),
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
            lambda: with_lora.then_some(hyper.config.lambda).flatten(),
            subject_fidelity: m.subject_fidelity,
            prompt_fidelity: m.prompt_fidelity,
            seconds_per_subject: if with_lora { seconds } else { 0.0 },
            finetune_steps: None,
            ip_adapter_scale: scale,
            subject_attributes: m.subject_attributes,
            prompt_attributes: m.prompt_attributes,
        });
        images.push(m.images);
        per_subject.push(m.per_subject);
    }
    bar.finish_and_clear();

    // 3. Findings. F6: the hypernetwork (CFG) against the adapter alone at the same scale.
    let find = |method: &str, guide_cfg: bool, scale: f64| {
        rows.iter().position(|r| {
            r.method == method
                && (r.kappa.is_none() == guide_cfg)
                && r.ip_adapter_scale == Some(scale)
        })
    };
    let hyper_cfg = find("hypernet_on_ip_adapter", true, hyper_scale);
    let alone = find("ip_adapter_plus", true, hyper_scale);
    let (f6_subject, f6_prompt) = match (hyper_cfg, alone) {
        (Some(h), Some(a)) => (
            paired_difference(&per_subject[h], &per_subject[a]),
            rows[h].prompt_fidelity - rows[a].prompt_fidelity,
        ),
        _ => ((f64::NAN, f64::NAN), f64::NAN),
    };
    let mut curve: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter(|r| r.method == "hypernet_on_ip_adapter")
        .filter_map(|r| r.kappa.map(|k| (k, r.subject_fidelity, r.prompt_fidelity)))
        .collect();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let f7_monotone = (
        curve.windows(2).all(|w| w[1].1 >= w[0].1),
        curve.windows(2).all(|w| w[1].2 <= w[0].2),
    );

    // 4. Report: base, the adapter alone at every scale, the hypernetwork CFG and κ = 1.
    let grid: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method != "hypernet_on_ip_adapter" || r.kappa.is_none_or(|k| k == 1.0))
        .map(|(i, _)| i)
        .collect();
    let findings = serde_json::json!({
        "F6": {"subject_fidelity_gain": f6_subject.0, "standard_error": f6_subject.1,
               "prompt_fidelity_change": f6_prompt, "ip_adapter_scale": hyper_scale,
               "holds": f6_subject.0 > f6_subject.1 && f6_prompt >= -0.03},
        "F7": {"subject_rises_with_kappa": f7_monotone.0, "prompt_falls_with_kappa": f7_monotone.1,
               "holds": f7_monotone.0 && f7_monotone.1},
    });
    let settings = serde_json::json!({"seed": args.seed, "subjects": subjects.len(),
        "prompts": args.prompts, "guidance_scale": args.guidance_scale, "steps": args.steps,
        "hm_guidance_scale": sampling.hm_guidance_scale, "ip_adapter": ip_file.display().to_string(),
        "hypernet_ip_adapter_scale": hyper_scale, "findings": findings,
        "seconds": start.elapsed().as_secs_f64()});
    let notes = format!(
        "\nF6: subject fidelity hypernet_on_ip_adapter − ip_adapter_plus (scale {hyper_scale}, CFG) = {:+.3} ± {:.3} (s.e. over {} subjects); prompt fidelity {:+.3}\nF7: over κ, subject fidelity rises monotonically: {}; prompt fidelity falls monotonically: {}\n",
        f6_subject.0, f6_subject.1, subjects.len(), f6_prompt, f7_monotone.0, f7_monotone.1
    );
    finish(Finished {
        out: &args.out,
        title:
            "loracast experiment open: toy world, held-out subjects, θ0 = base + IP-Adapter-Plus",
        subjects: &subjects,
        rows: &rows,
        sd: &sd,
        evaluators: &evaluators,
        images,
        grid: &grid,
        settings,
        kappa_method: "hypernet_on_ip_adapter",
        heading: "κ trade-off (HM-CFG on θ0 = base + IP-Adapter-Plus)",
        notes,
        start,
    })?;
    Ok(OpenOutcome {
        rows,
        f6_subject,
        f6_prompt,
        f7_monotone,
    })
}
