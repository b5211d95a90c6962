//! HyperDreamBooth (issue 6): LiDB's frozen random bases (orthonormal, seeded), LiDB finetuning
//! (only the subspace factors train; the LoRA stays in the subspace; the fitted loss falls),
//! a LiDB hypernetwork (its LoRA lies in the subspaces, survives save/load), and `train
//! hypernet` with pre-optimised LiDB subjects and the weight-space loss on a random-weight
//! SD1.x folder (the weight loss falls; the subject cache is reused and checked).
mod common;

use std::path::Path;

use common::{fixtures, loracast, pipeline, stderr};
use loracast::hypernet::Hypernetwork;
use loracast::lora::lidb::{LidbBasis, LidbConfig};
use loracast::lora::LoraSet;
use loracast::pipeline::StableDiffusion;
use loracast::train::finetune::{finetune_lora, Examples, FinetuneConfig};
use tch::{Device, Kind, Tensor};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// ‖X − X·PᵀP‖ for the rows of X against P's orthonormal rows: 0 iff X's rows lie in span(P).
fn off_row_space(x: &Tensor, p: &Tensor) -> f64 {
    max_abs(&(x - x.matmul(&p.tr()).matmul(p)))
}

/// Every site's LoRA factors lie in LiDB's subspaces: A's rows in span(P_A), B's columns in
/// span(P_B).
fn assert_in_subspaces(lora: &LoraSet, basis: &LidbBasis) {
    for (i, site) in basis.sites.iter().enumerate() {
        let w = &lora.weights[site];
        let (pa, pb) = &basis.bases[i];
        assert!(
            off_row_space(&w.a, pa) < 1e-4,
            "A of {site:?} leaves the subspace"
        );
        assert!(
            off_row_space(&w.b.tr(), &pb.tr()) < 1e-4,
            "B of {site:?} leaves the subspace"
        );
    }
}

#[test]
fn bases_are_orthonormal_clamped_and_seeded() {
    let sd = StableDiffusion::load(&pipeline("tiny-a"), Device::Cpu).unwrap();
    let sites = sd.unet.lora_sites().to_vec();
    let cfg = LidbConfig {
        a: 20,
        b: 6,
        seed: 3,
    };
    let basis = LidbBasis::new(cfg, &sites, Device::Cpu).unwrap();
    let again = LidbBasis::new(cfg, &sites, Device::Cpu).unwrap();
    let other = LidbBasis::new(LidbConfig { seed: 4, ..cfg }, &sites, Device::Cpu).unwrap();
    for (i, site) in sites.iter().enumerate() {
        let (pa, pb) = &basis.bases[i];
        let a = 20.min(site.in_features as i64);
        let b = 6.min(site.out_features as i64);
        assert_eq!(pa.size(), [a, site.in_features as i64]);
        assert_eq!(pb.size(), [site.out_features as i64, b]);
        // P_A P_Aᵀ = I_a, P_Bᵀ P_B = I_b
        let ia = pa.matmul(&pa.tr()) - Tensor::eye(a, (Kind::Float, Device::Cpu));
        let ib = pb.tr().matmul(pb) - Tensor::eye(b, (Kind::Float, Device::Cpu));
        assert!(
            max_abs(&ia) < 1e-5 && max_abs(&ib) < 1e-5,
            "not orthonormal at {site:?}"
        );
        assert!(pa.equal(&again.bases[i].0) && pb.equal(&again.bases[i].1));
        assert!(
            !pa.equal(&other.bases[i].0),
            "another seed gives other bases"
        );
    }
    assert!(LidbBasis::new(LidbConfig { a: 0, ..cfg }, &sites, Device::Cpu).is_err());
}

#[test]
fn lidb_finetuning_trains_only_the_subspace() {
    let sd = StableDiffusion::load(&pipeline("tiny-a"), Device::Cpu).unwrap();
    let s = sd.default_size();
    tch::manual_seed(5);
    let img = (Tensor::rand([3, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0).clamp(-1.0, 1.0);
    let ex = Examples::with_prompt(vec![img], "a sks creature");
    let lidb = LidbConfig {
        a: 8,
        b: 4,
        seed: 1,
    };
    let cfg = FinetuneConfig {
        rank: 1,
        lr: 3e-2,
        batch: 2,
        lidb: Some(lidb),
        ..FinetuneConfig::toy(60)
    };
    let done = finetune_lora(&sd, &cfg, &ex, None, None, &[], false).unwrap();
    let basis = LidbBasis::new(lidb, sd.unet.lora_sites(), Device::Cpu).unwrap();
    // The trained numbers are T_A [r, a], T_B [b, r]; the LoRA is their expansion.
    for (i, (ta, tb)) in done.factors.iter().enumerate() {
        let (pa, pb) = &basis.bases[i];
        assert_eq!(ta.size(), [1, pa.size()[0]]);
        assert_eq!(tb.size(), [pb.size()[1], 1]);
        let w = &done.lora.weights[&basis.sites[i]];
        assert!(max_abs(&(&w.a - ta.matmul(pa))) < 1e-6);
        assert!(max_abs(&(&w.b - pb.matmul(tb))) < 1e-6);
    }
    assert_in_subspaces(&done.lora, &basis);
    // It learns: the mean loss of the last 20 steps is below the first 20's.
    let first: f64 = done.losses[..20].iter().sum::<f64>() / 20.0;
    let last: f64 = done.losses[40..].iter().sum::<f64>() / 20.0;
    assert!(last < first, "LiDB loss did not fall: {first} → {last}");
    // No initial LoRA with LiDB.
    let init = done.lora.clone();
    assert!(finetune_lora(&sd, &cfg, &ex, None, Some(&init), &[], false).is_err());
}

fn write_config(dir: &Path, steps: u64, subjects: usize) -> std::path::PathBuf {
    let cfg = serde_json::json!({
        "decoder": {"rank": 1, "alpha": 1.0, "width": 32, "layers": 1, "heads": 4,
                    "intermediate": 64, "rounds": 2, "lidb": {"a": 8, "b": 4, "seed": 2}},
        "loop": {"steps": steps, "lr": 3e-3, "warmup": 0, "weight_decay": 0.0, "grad_clip": 1.0,
                 "checkpoint_every": 10, "log_every": 1, "seed": 5},
        "batch": 2, "lambda": 0.0, "mode": "cross_view",
        "lidb_targets": {"subjects": subjects, "views": 2, "steps": 15, "lr": 3e-2, "batch": 2,
                         "weight": 1.0, "seed": 9},
    });
    let path = dir.join(format!("hdb-{subjects}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn metric(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn hyperdreambooth_training_with_preoptimised_subjects() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hdb");
    let base = pipeline("tiny-a");
    let encoder = fixtures().join("metrics/dino");
    let run = |cfg: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "hypernet",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--encoder",
            encoder.to_str().unwrap(),
            "--data",
            "toy",
        ];
        args.extend_from_slice(extra);
        loracast(&args)
    };
    let cfg = write_config(tmp.path(), 30, 3);
    let o = run(&cfg, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cache = out.join("lidb_subjects.safetensors");
    assert!(cache.is_file(), "the pre-optimised subjects are cached");
    // The weight-space loss falls (means of the first and last 10 steps).
    let w = metric(&out, "l_weight");
    assert_eq!(w.len(), 30);
    let (first, last) = (w[..10].iter().sum::<f64>(), w[20..].iter().sum::<f64>());
    assert!(
        last < first,
        "weight-space loss did not fall: {first} → {last}"
    );
    // The hypernetwork's LoRA lies in LiDB's subspaces, after a save/load round trip.
    let (h, _vs) = Hypernetwork::load(&out.join("hypernet.safetensors"), Device::Cpu).unwrap();
    let basis = h.lidb.as_ref().expect("a LiDB hypernetwork");
    let img = loracast::io::preprocess::RgbImage::open(&fixtures().join("image_inputs/photo.jpg"))
        .unwrap();
    let lora = h.personalize(&[img]).unwrap();
    assert_in_subspaces(&lora, basis);
    // Extending the run reuses the cache; other subject settings refuse it in one line.
    let before = std::fs::read(&cache).unwrap();
    let o = run(&write_config(tmp.path(), 35, 3), &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&cache).unwrap(), before);
    let o = run(&write_config(tmp.path(), 40, 4), &["--resume"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("lidb_subjects.safetensors"),
        "{}",
        stderr(&o)
    );
}
