//! Per-subject finetuning (issue 6): DreamBooth-LoRA on a random-weight SD1.x folder (the fitted
//! loss really goes down, same seed → same bytes), fast finetuning from an initial LoRA (kept
//! frozen, the sum exported as one LoRA), the CLI end to end, and bad inputs.
mod common;

use common::{assert_fails, fixtures, loracast, pipeline, stderr};
use loracast::diffusion::{NoiseSchedule, SchedulerConfig};
use loracast::lora::LoraSet;
use loracast::pipeline::StableDiffusion;
use loracast::train::finetune::{finetune_lora, Examples, FinetuneConfig};
use tch::{Device, Kind, Tensor};

fn config(steps: u64) -> FinetuneConfig {
    FinetuneConfig {
        rank: 2,
        lr: 1e-2,
        batch: 2,
        ..FinetuneConfig::toy(steps)
    }
}

fn subject(sd: &StableDiffusion) -> Examples {
    let s = sd.default_size();
    tch::manual_seed(5);
    let img = (Tensor::rand([3, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0).clamp(-1.0, 1.0);
    Examples::with_prompt(vec![img], "a sks creature")
}

/// ε-MSE of the model with `lora` on the subject over a fixed set of 16 (t, noise) draws.
fn fixed_loss(sd: &StableDiffusion, ex: &Examples, lora: Option<&LoraSet>) -> f64 {
    tch::no_grad(|| {
        let x = Tensor::stack(&ex.images, 0);
        let z = sd.vae.encode(&x).unwrap().mean * sd.vae.config().scaling_factor;
        let z = z.repeat([16, 1, 1, 1]);
        let ids = sd.tokenizer.encode_batch(&["a sks creature"; 16]);
        let ctx = sd.text_encoder.forward(&ids).unwrap();
        let cfg = SchedulerConfig::for_training(&sd.scheduler_json).unwrap();
        let sched = NoiseSchedule::new(&cfg).unwrap();
        tch::manual_seed(99);
        let t = Tensor::randint(
            sched.num_train_timesteps() as i64,
            [16],
            (Kind::Int64, Device::Cpu),
        );
        let noise = z.randn_like();
        let noisy = sched.add_noise(&z, &noise, &t).unwrap();
        let target = sched.target(&z, &noise, &t).unwrap();
        let batch = lora.map(|l| LoraSet::batch(&vec![Some((l, 1.0)); 16]));
        let pred = sd.unet.forward(&noisy, &t, &ctx, batch.as_ref()).unwrap();
        (pred - target).square().mean(Kind::Float).double_value(&[])
    })
}

#[test]
fn dreambooth_lora_fits_the_subject_deterministically() {
    let sd = StableDiffusion::load(&pipeline("tiny-a"), Device::Cpu).unwrap();
    let ex = subject(&sd);
    let done = finetune_lora(&sd, &config(40), &ex, None, None, &[10, 40], false).unwrap();
    assert_eq!(done.losses.len(), 40);
    assert_eq!(done.snapshots.len(), 2);
    let before = fixed_loss(&sd, &ex, None);
    let after = fixed_loss(&sd, &ex, Some(&done.lora));
    eprintln!("fixed-draw loss: base {before:.4} → finetuned {after:.4}");
    assert!(
        after < 0.95 * before,
        "finetuning did not fit: {before} → {after}"
    );
    // The last snapshot is the final LoRA; an earlier one differs (copies, not views).
    for (site, w) in &done.lora.weights {
        let s40 = &done.snapshots[1].1.weights[site];
        let s10 = &done.snapshots[0].1.weights[site];
        assert!(w.b.equal(&s40.b) && w.a.equal(&s40.a), "{site}");
        assert!(!w.b.equal(&s10.b), "{site}: snapshot at 10 equals step 40");
        assert_eq!(w.rank(), 2);
    }
    // Same seed → same bytes.
    let again = finetune_lora(&sd, &config(40), &ex, None, None, &[], false).unwrap();
    for (site, w) in &done.lora.weights {
        assert!(
            w.b.equal(&again.lora.weights[site].b),
            "{site}: not deterministic"
        );
    }
    // Prior preservation runs and keeps the subject loss logged.
    let prior = Examples::with_prompt(vec![ex.images[0].flip([2])], "a creature");
    let p = finetune_lora(&sd, &config(5), &ex, Some(&prior), None, &[], false).unwrap();
    assert_eq!(p.losses.len(), 5);
}

/// Mean |ε_LoRA − ε_base| on the empty prompt over fixed noisy subject latents.
fn null_shift(sd: &StableDiffusion, ex: &Examples, lora: &LoraSet) -> f64 {
    tch::no_grad(|| {
        let x = Tensor::stack(&ex.images, 0);
        let z = sd.vae.encode(&x).unwrap().mean * sd.vae.config().scaling_factor;
        let z = z.repeat([8, 1, 1, 1]);
        let ctx = sd.encode_prompt("").unwrap().repeat([8, 1, 1]);
        tch::manual_seed(7);
        let t = Tensor::randint(1000, [8], (Kind::Int64, Device::Cpu));
        let noisy = &z + z.randn_like();
        let batch = LoraSet::batch(&[Some((lora, 1.0)); 8]);
        let with = sd.unet.forward(&noisy, &t, &ctx, Some(&batch)).unwrap();
        let without = sd.unet.forward(&noisy, &t, &ctx, None).unwrap();
        (with - without).abs().mean(Kind::Float).double_value(&[])
    })
}

#[test]
fn unconditional_preservation_keeps_the_empty_prompt() {
    let sd = StableDiffusion::load(&pipeline("tiny-a"), Device::Cpu).unwrap();
    let ex = subject(&sd);
    let plain = finetune_lora(&sd, &config(40), &ex, None, None, &[], false).unwrap();
    let cfg = FinetuneConfig {
        null_weight: 10.0,
        ..config(40)
    };
    let kept = finetune_lora(&sd, &cfg, &ex, None, None, &[], false).unwrap();
    let (a, b) = (
        null_shift(&sd, &ex, &plain.lora),
        null_shift(&sd, &ex, &kept.lora),
    );
    eprintln!("ε(∅) shift: plain {a:.5}, with unconditional preservation {b:.5}");
    assert!(
        b < 0.5 * a,
        "the empty prompt's ε moved as much: {a} vs {b}"
    );
    // The subject is still fitted.
    let before = fixed_loss(&sd, &ex, None);
    assert!(fixed_loss(&sd, &ex, Some(&kept.lora)) < before);
    let bad = FinetuneConfig {
        null_weight: f64::NAN,
        ..config(1)
    };
    assert!(finetune_lora(&sd, &bad, &ex, None, None, &[], false).is_err());
}

#[test]
fn fast_finetuning_keeps_the_initial_lora_and_exports_the_sum() {
    let sd = StableDiffusion::load(&pipeline("tiny-a"), Device::Cpu).unwrap();
    let ex = subject(&sd);
    let init = finetune_lora(&sd, &config(10), &ex, None, None, &[], false)
        .unwrap()
        .lora;
    let cfg = FinetuneConfig {
        rank: 3,
        ..config(10)
    };
    let done = finetune_lora(&sd, &cfg, &ex, None, Some(&init), &[], false).unwrap();
    for (site, w) in &done.lora.weights {
        let w0 = &init.weights[site];
        assert_eq!(w.rank(), 5, "{site}: rank r0 + r1");
        assert_eq!(w.scale(), 1.0);
        // The initial factors are frozen: the first r0 rows/columns are the initial LoRA.
        assert!(w.a.narrow(0, 0, 2).equal(&w0.a), "{site}: A0 changed");
        let b0 = &w0.b * w0.scale();
        assert!(
            w.b.narrow(1, 0, 2).allclose(&b0, 0.0, 0.0, false),
            "{site}: B0 changed"
        );
        // ΔW = ΔW0 + ΔW1 with ΔW1 ≠ 0.
        let dw1 = w.delta_w() - w0.delta_w();
        assert!(
            dw1.abs().max().double_value(&[]) > 0.0,
            "{site}: nothing trained"
        );
    }
    let before = fixed_loss(&sd, &ex, Some(&init));
    let after = fixed_loss(&sd, &ex, Some(&done.lora));
    eprintln!("fixed-draw loss: init {before:.4} → fast-finetuned {after:.4}");
    assert!(
        after < before,
        "fast finetuning did not improve: {before} → {after}"
    );
}

/// `generate` with a LoRA file succeeds and writes `png`.
fn generate_with(base: &str, lora: &str, png: &std::path::Path) {
    let o = loracast(&[
        "generate",
        "--base",
        base,
        "--prompt",
        "a sks creature",
        "--lora",
        lora,
        "--steps",
        "2",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success() && png.is_file(), "{}", stderr(&o));
}

#[test]
fn cli_finetune_then_generate_and_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let base = pipeline("tiny-a");
    let (base, img) = (
        base.to_str().unwrap(),
        fixtures().join("image_inputs/rgba.png"),
    );
    let img = img.to_str().unwrap();
    let lora = tmp.path().join("db.safetensors");
    let l = lora.to_str().unwrap();
    let o = loracast(&[
        "finetune", "--base", base, "--image", img, "--out", l, "--steps", "6", "--rank", "2",
        "--format", "kohya",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("6 steps"), "{}", stderr(&o));
    // Fast finetuning from it, and generation with the result.
    let fast = tmp.path().join("fast.safetensors");
    let f = fast.to_str().unwrap();
    let o = loracast(&[
        "finetune",
        "--base",
        base,
        "--image",
        img,
        "--out",
        f,
        "--steps",
        "3",
        "--rank",
        "4",
        "--init-lora",
        l,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    generate_with(base, f, &tmp.path().join("x.png"));
    let o = loracast(&["lora", "info", f]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains('6'),
        "{}",
        stderr(&o)
    );

    // Bad inputs: one line, non-zero exit, nothing written.
    let out = tmp.path().join("bad.safetensors");
    let b = out.to_str().unwrap();
    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let other = tmp.path().join("other.safetensors");
    let o = loracast(&[
        "finetune",
        "--base",
        pipeline("tiny-b").to_str().unwrap(),
        "--image",
        img,
        "--out",
        other.to_str().unwrap(),
        "--steps",
        "2",
        "--rank",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // LiDB with unconditional preservation: a LoRA `generate` loads.
    let lidb = tmp.path().join("lidb.safetensors");
    let o = loracast(&[
        "finetune",
        "--base",
        base,
        "--image",
        img,
        "--out",
        lidb.to_str().unwrap(),
        "--steps",
        "2",
        "--rank",
        "1",
        "--lidb",
        "8,4",
        "--null-weight",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    generate_with(base, lidb.to_str().unwrap(), &tmp.path().join("lidb.png"));
    for (args, needle) in [
        (vec!["--image", junk.to_str().unwrap()], "junk.png"),
        (vec!["--image", img, "--rank", "0"], "--rank"),
        (vec!["--image", img, "--lr", "nan"], "--lr"),
        (vec!["--image", img, "--lidb", "8"], "--lidb"),
        (vec!["--image", img, "--lidb", "8,0"], "--lidb"),
        (vec!["--image", img, "--null-weight=-1"], "--null-weight"),
        (
            vec!["--image", img, "--init-lora", other.to_str().unwrap()],
            "--init-lora",
        ),
        (
            vec![
                "--image",
                img,
                "--prior-preservation",
                tmp.path().join("none").to_str().unwrap(),
            ],
            "none",
        ),
    ] {
        let mut a = vec!["finetune", "--base", base, "--out", b, "--steps", "2"];
        a.extend(args);
        assert_fails(&a, Some(&out), needle);
    }
    // An existing output is not clobbered without --force.
    assert_fails(
        &[
            "finetune", "--base", base, "--image", img, "--out", l, "--steps", "2",
        ],
        None,
        "exists",
    );
}
