//! Hybrid-Model CFG invariants on a fixture pipeline (the image-level comparison against a
//! hand-written diffusers loop lives in tests/lora.rs):
//! - with c_S = c_G the formula is CFG at scale 2g when the LoRA is zero, or when κ = 0;
//! - the LoRA changes the image for κ > 0 and not for κ = 0;
//! - base rows of a per-sample batch are untouched by the personalized row.
mod common;

use loracast::lora::{LoraSet, LoraWeights};
use loracast::pipeline::{GenerateRequest, StableDiffusion};
use tch::{Device, Kind, Tensor};

fn random_lora(pipe: &StableDiffusion, rank: i64, std: f64, seed: i64) -> LoraSet {
    let _rng = loracast::util::rng_lock();
    tch::manual_seed(seed);
    let mut set = LoraSet::default();
    for site in pipe.unet.lora_sites() {
        let (i, o) = (site.in_features as i64, site.out_features as i64);
        let opts = (Kind::Float, Device::Cpu);
        set.weights.insert(
            *site,
            LoraWeights {
                a: Tensor::randn([rank, i], opts) * std,
                b: Tensor::randn([o, rank], opts) * std,
                alpha: rank as f64,
            },
        );
    }
    set
}

fn image(pipe: &StableDiffusion, req: &GenerateRequest) -> Tensor {
    pipe.generate(req, |_, _| {}).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn hm_cfg_reduces_to_cfg() {
    let pipe = StableDiffusion::load(&common::pipeline("tiny-b"), Device::Cpu).unwrap();
    let prompt = "a dog on the beach";
    let base = GenerateRequest {
        steps: 4,
        guidance_scale: 3.0,
        seed: 5,
        ..GenerateRequest::new(prompt)
    };
    let cfg_2g = image(
        &pipe,
        &GenerateRequest {
            guidance_scale: 6.0,
            ..base.clone()
        },
    );
    let lora = random_lora(&pipe, 3, 0.5, 1);
    let hm = |lora: LoraSet, kappa: f64| GenerateRequest {
        lora: Some(lora),
        generic_prompt: Some(prompt.to_string()),
        kappa,
        ..base.clone()
    };
    // κ = 0: the personalized row has zero weight.
    let k0 = image(&pipe, &hm(lora.clone(), 0.0));
    assert!(
        max_diff(&k0, &cfg_2g) < 1e-4,
        "κ=0 ≠ CFG(2g): {}",
        max_diff(&k0, &cfg_2g)
    );
    // A zero LoRA: ε_θ = ε₀.
    let mut zero = lora.clone();
    for w in zero.weights.values_mut() {
        w.b = w.b.zeros_like();
    }
    let z = image(&pipe, &hm(zero, 1.3));
    assert!(max_diff(&z, &cfg_2g) < 1e-4, "zero LoRA ≠ CFG(2g)");
    // A real LoRA with κ > 0 changes the image, more with larger κ.
    let k1 = image(&pipe, &hm(lora.clone(), 1.0));
    let k2 = image(&pipe, &hm(lora, 2.0));
    let (d1, d2) = (max_diff(&k1, &cfg_2g), max_diff(&k2, &cfg_2g));
    assert!(d1 > 1e-2 && d2 > d1, "LoRA effect κ=1 {d1}, κ=2 {d2}");
}

#[test]
fn lora_scale_zero_is_the_base_model() {
    let pipe = StableDiffusion::load(&common::pipeline("tiny-a"), Device::Cpu).unwrap();
    let req = GenerateRequest {
        steps: 3,
        ..GenerateRequest::new("a cat")
    };
    let plain = image(&pipe, &req);
    let lora = random_lora(&pipe, 2, 0.5, 2);
    let scaled0 = image(
        &pipe,
        &GenerateRequest {
            lora: Some(lora.clone()),
            lora_scale: 0.0,
            ..req.clone()
        },
    );
    assert!(max_diff(&plain, &scaled0) < 1e-5);
    let scaled1 = image(
        &pipe,
        &GenerateRequest {
            lora: Some(lora),
            ..req
        },
    );
    assert!(max_diff(&plain, &scaled1) > 1e-2);
}

#[test]
fn bad_hm_cfg_requests_are_errors() {
    let pipe = StableDiffusion::load(&common::pipeline("tiny-b"), Device::Cpu).unwrap();
    let no_lora = GenerateRequest {
        generic_prompt: Some("a dog".into()),
        ..GenerateRequest::new("a sks dog")
    };
    let err = pipe.validate(&no_lora).unwrap_err().to_string();
    assert!(err.contains("--lora"), "{err}");
    for kappa in [-0.1, 2.01, f64::NAN] {
        let req = GenerateRequest {
            lora: Some(random_lora(&pipe, 1, 0.1, 3)),
            kappa,
            ..no_lora.clone()
        };
        let err = pipe.validate(&req).unwrap_err().to_string();
        assert!(err.contains("kappa"), "{err}");
    }
    // A LoRA for another UNet (tiny-a's sites do not fit tiny-b).
    let other = StableDiffusion::load(&common::pipeline("tiny-a"), Device::Cpu).unwrap();
    let req = GenerateRequest {
        lora: Some(random_lora(&other, 1, 0.1, 4)),
        ..GenerateRequest::new("x")
    };
    assert!(pipe.validate(&req).is_err());
    // NaN weights.
    let mut nan = random_lora(&pipe, 1, 0.1, 5);
    if let Some(w) = nan.weights.values_mut().next() {
        w.a = w.a.fill(f64::NAN);
    }
    let req = GenerateRequest {
        lora: Some(nan),
        ..GenerateRequest::new("x")
    };
    let err = pipe.validate(&req).unwrap_err().to_string();
    assert!(err.contains("NaN"), "{err}");
}
