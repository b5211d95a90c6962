//! Whole-image parity with diffusers' StableDiffusionPipeline (fixtures from
//! scripts/fixtures/images.py): every sampler, several seeds, with and without negative
//! prompt, without CFG, and a non-default size. Tolerance (issue 2): max per-channel
//! difference ≤ 3 levels, mean ≤ 0.25 levels.
mod common;

use loracast::diffusion::SchedulerKind;
use loracast::io::image::to_rgb8;
use loracast::io::safetensors::SafeTensorsFile;
use loracast::pipeline::{GenerateRequest, StableDiffusion};
use serde::Deserialize;
use tch::{Device, Kind};

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: Option<String>,
    scheduler: Option<String>,
    seed: u64,
    steps: usize,
    guidance_scale: f64,
    #[serde(default)]
    height: Option<i64>,
    #[serde(default)]
    width: Option<i64>,
}

#[test]
fn images_match_diffusers() {
    for name in common::PIPELINES {
        let pipe = StableDiffusion::load(&common::pipeline(name), Device::Cpu).unwrap();
        let json = std::fs::read_to_string(common::fixtures().join(format!("images_{name}.json")))
            .unwrap();
        let cases: Vec<Case> = serde_json::from_str(&json).unwrap();
        let fx =
            SafeTensorsFile::open(&common::fixtures().join(format!("images_{name}.safetensors")))
                .unwrap();
        let mut worst = (0u8, 0f64);
        for (i, case) in cases.iter().enumerate() {
            let req = GenerateRequest {
                prompt: case.prompt.clone(),
                negative_prompt: case.negative_prompt.clone(),
                guidance_scale: case.guidance_scale,
                steps: case.steps,
                scheduler: case
                    .scheduler
                    .as_deref()
                    .map(|s| SchedulerKind::from_cli_name(s).unwrap()),
                seed: case.seed,
                height: case.height,
                width: case.width,
                ..GenerateRequest::new("")
            };
            let image = pipe.generate(&req, |_, _| {}).unwrap();
            let (_, _, ours) = to_rgb8(&image).unwrap();
            let reference = fx.tensor(&format!("image{i}"), Kind::Uint8).unwrap();
            let mut theirs = vec![0u8; ours.len()];
            assert_eq!(reference.numel(), ours.len(), "{name} case {i}: image size");
            reference.copy_data_u8(&mut theirs, ours.len());
            let max = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let mean = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| a.abs_diff(*b) as f64)
                .sum::<f64>()
                / ours.len() as f64;
            let label = format!(
                "{name} case {i} ({:?}, seed {}, negative {})",
                case.scheduler,
                case.seed,
                case.negative_prompt.is_some()
            );
            assert!(
                max <= 3 && mean <= 0.25,
                "{label}: max {max}, mean {mean:.3}"
            );
            worst = (worst.0.max(max), worst.1.max(mean));
        }
        eprintln!(
            "{name}: {} images, worst max diff {} levels, worst mean {:.4}",
            cases.len(),
            worst.0,
            worst.1
        );
    }
}
