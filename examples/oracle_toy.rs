//! Diagnostic: how much subject fidelity can a per-subject LoRA on attn2 reach on the shipped
//! toy base when it is finetuned on many captioned views of each held-out subject? This is the
//! cross-view oracle the hypernetwork amortises (issue 5): if it cannot reach a fidelity, the
//! hypernetwork cannot either.
//!
//! ```text
//! cargo run --release --example oracle_toy -- [subjects 8] [views 16] [rank 4] [steps 100,200,400]
//!     [lr 1e-3] [prior images 0] [prior weight 1] [null weight 0]
//! ```
//! Prints subject/prompt fidelity with CFG and HM-CFG (κ = 1) per step count (demo's sampling:
//! DDIM 25, g = 7.5, HM-CFG at g/2; subjects of `demo --seed 1`).
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context as _, Result};
use loracast::data::{subject_prompt, World, DEFAULT_TOKEN};
use loracast::eval::fidelity::Evaluators;
use loracast::eval::toy::{heldout_subjects, run_method, Conditioning, Guide, Sampling};
use loracast::lora::LoraSet;
use loracast::pipeline::StableDiffusion;
use loracast::train::finetune::{finetune_lora, toy_prior, Examples, FinetuneConfig};
use tch::Device;

fn arg<T: FromStr>(args: &[String], i: usize, default: T) -> Result<T> {
    match args.get(i) {
        Some(s) => s
            .parse()
            .ok()
            .with_context(|| format!("argument {i}: {s:?}")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = arg(&args, 1, 8)?;
    let views: usize = arg(&args, 2, 16)?;
    let rank: i64 = arg(&args, 3, 4)?;
    let mut steps: Vec<u64> = match args.get(4) {
        Some(s) => s
            .split(',')
            .map(|x| x.parse().ok().context("steps: comma-separated integers"))
            .collect::<Result<_>>()?,
        None => vec![100, 200, 400],
    };
    let lr: f64 = arg(&args, 5, 1e-3)?;
    let prior_n: usize = arg(&args, 6, 0)?;
    let prior_weight: f64 = arg(&args, 7, 1.0)?;
    let null_weight: f64 = arg(&args, 8, 0.0)?;
    steps.sort_unstable();
    steps.dedup();
    let last = *steps.iter().max().context("no step counts")?;

    let sd = StableDiffusion::load(Path::new("assets/toy/base"), Device::Cpu)?;
    let ev = Evaluators::load(Path::new("assets/toy/evaluators"), Device::Cpu)?;
    let subjects = heldout_subjects(1, n, 4);
    let mut sets: Vec<Vec<LoraSet>> = vec![Vec::new(); steps.len()];
    let start = std::time::Instant::now();
    for (i, s) in subjects.iter().enumerate() {
        let mut world = World::new(1000 + i as u64);
        let (mut images, mut prompts) = (Vec::new(), Vec::new());
        for _ in 0..views {
            let v = world.view(s.identity);
            images.push(v.render().to_tensor());
            prompts.push(subject_prompt(&v.context, DEFAULT_TOKEN));
        }
        let cfg = FinetuneConfig {
            rank,
            lr,
            seed: i as u64,
            prior_weight,
            null_weight,
            ..FinetuneConfig::toy(last)
        };
        let prior = toy_prior(77 + i as u64, prior_n);
        let prior = (prior_n > 0).then_some(&prior);
        let done = finetune_lora(
            &sd,
            &cfg,
            &Examples { images, prompts },
            prior,
            None,
            &steps,
            false,
        )?;
        for (k, (_, lora, _)) in done.snapshots.into_iter().enumerate() {
            sets[k].push(lora);
        }
        eprintln!("subject {i}: {:.0} s", start.elapsed().as_secs_f64());
    }
    let sampling = Sampling {
        guidance_scale: 7.5,
        hm_guidance_scale: 3.75,
        lora_scale: 1.0,
        steps: 25,
        seed: 1,
    };
    for (k, st) in steps.iter().enumerate() {
        for guide in [Guide::Cfg, Guide::HmCfg { kappa: 1.0 }] {
            let cond = Conditioning {
                lora: Some(&sets[k]),
                ip: None,
                guide,
            };
            let m = run_method(&sd, &ev, &subjects, cond, sampling, || {})?;
            println!(
                "steps {st} {guide:?}: subject {:.3} prompt {:.3} {:?}",
                m.subject_fidelity, m.prompt_fidelity, m.subject_attributes
            );
        }
    }
    Ok(())
}
