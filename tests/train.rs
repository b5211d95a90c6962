//! The shared training loop: loss decreases, a crashed run resumed from its checkpoint ends with
//! exactly the weights of an uninterrupted run, the NaN guard stops and keeps the last good
//! checkpoint, and resuming with another config is refused.
use std::path::Path;

use anyhow::{bail, Result};
use loracast::nn::Linear;
use loracast::train::{self, checkpoint_path, LoopConfig, StepOutput};
use tch::{nn::VarStore, Device, Kind, Tensor};

struct Mlp {
    l1: Linear,
    l2: Linear,
}

fn model(vs: &VarStore) -> Mlp {
    let _rng = loracast::util::rng_lock();
    tch::manual_seed(42);
    Mlp {
        l1: Linear::new(vs.root() / "l1", 4, 16, true),
        l2: Linear::new(vs.root() / "l2", 16, 1, true),
    }
}

/// Regression of y = sin(x·w*) on fresh random data each step (drawn from the step's RNG).
fn step(m: &Mlp, _step: u64) -> Result<StepOutput> {
    let x = Tensor::randn([32, 4], (Kind::Float, Device::Cpu));
    let target = x.sum_dim_intlist(1, true, Kind::Float).sin();
    let y = m.l2.forward(&m.l1.forward(&x).relu());
    Ok(StepOutput {
        loss: (y - target).square().mean(Kind::Float),
        metrics: vec![],
    })
}

fn weights(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn run(dir: &Path, cfg: &LoopConfig, resume: bool, fail_at: Option<u64>) -> Result<VarStore> {
    let mut vs = VarStore::new(Device::Cpu);
    let m = model(&vs);
    let config = serde_json::to_value(cfg)?;
    train::train(dir, cfg, &config, &mut vs, resume, "test", |k| {
        if Some(k) == fail_at {
            bail!("simulated crash at step {k}");
        }
        step(&m, k)
    })?;
    Ok(vs)
}

#[test]
fn loss_decreases() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LoopConfig {
        steps: 200,
        lr: 1e-2,
        log_every: 20,
        checkpoint_every: 200,
        ..LoopConfig::tiny()
    };
    let mut vs = VarStore::new(Device::Cpu);
    let m = model(&vs);
    let s = train::train(
        dir.path(),
        &cfg,
        &serde_json::json!({}),
        &mut vs,
        false,
        "t",
        |k| step(&m, k),
    )
    .unwrap();
    let (first, last) = (s.losses[0].1, s.losses.last().unwrap().1);
    assert!(last < 0.5 * first, "loss {first} → {last}");
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 10);
}

#[test]
fn resume_after_a_crash_is_exact() {
    let cfg = LoopConfig {
        steps: 12,
        checkpoint_every: 4,
        ..LoopConfig::tiny()
    };
    let a = tempfile::tempdir().unwrap();
    let straight = run(a.path(), &cfg, false, None).unwrap();

    let b = tempfile::tempdir().unwrap();
    // Crash after the step-8 checkpoint: steps 8..10 are lost.
    assert!(run(b.path(), &cfg, false, Some(10)).is_err());
    // Without --resume an existing checkpoint is refused.
    let err = run(b.path(), &cfg, false, None).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let resumed = run(b.path(), &cfg, true, None).unwrap();
    for ((n1, t1), (n2, t2)) in weights(&straight).iter().zip(weights(&resumed).iter()) {
        assert_eq!(n1, n2);
        assert!(t1.equal(t2), "{n1} differs after resume");
    }
    // The metrics log has no duplicated steps.
    let log = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![2, 4, 6, 8, 10, 12]);

    // Another config cannot resume this run.
    let other = LoopConfig {
        lr: 5e-4,
        steps: 16,
        ..cfg
    };
    let err = run(b.path(), &other, true, None).unwrap_err().to_string();
    assert!(err.contains("different config"), "{err}");
}

#[test]
fn nan_guard_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LoopConfig {
        steps: 12,
        checkpoint_every: 4,
        ..LoopConfig::tiny()
    };
    let mut vs = VarStore::new(Device::Cpu);
    let m = model(&vs);
    let err = train::train(
        dir.path(),
        &cfg,
        &serde_json::json!({}),
        &mut vs,
        false,
        "t",
        |k| {
            let mut out = step(&m, k)?;
            if k == 6 {
                out.loss *= f64::NAN;
            }
            Ok(out)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("step 6") && err.contains("step 4"), "{err}");
    let file =
        loracast::io::safetensors::SafeTensorsFile::open(&checkpoint_path(dir.path())).unwrap();
    let meta = file.metadata().unwrap().unwrap();
    assert_eq!(meta["step"], "4");
}

#[test]
fn a_finished_run_extends_with_more_steps_like_a_longer_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let long = LoopConfig {
        steps: 12,
        ..LoopConfig::tiny()
    };
    let short = LoopConfig {
        steps: 8,
        ..long.clone()
    };
    let straight = run(a.path(), &long, false, None).unwrap();
    run(b.path(), &short, false, None).unwrap();
    // Only `steps` differs: resuming continues the shorter run to 12 steps.
    let extended = run(b.path(), &long, true, None).unwrap();
    for ((n1, t1), (_, t2)) in weights(&straight).iter().zip(weights(&extended).iter()) {
        assert!(t1.equal(t2), "{n1} differs after extending");
    }
}

#[test]
fn a_cooldown_branches_from_the_constant_phase_only() {
    let cooled = LoopConfig {
        steps: 12,
        cooldown: 4,
        ..LoopConfig::tiny()
    };
    // Warm-up 2, constant, then linear to lr/4 at the last step.
    let lrs: Vec<f64> = (0..12).map(|k| cooled.lr_at(k) / cooled.lr).collect();
    assert_eq!(&lrs[..2], &[0.5, 1.0]);
    assert_eq!(&lrs[7..], &[1.0, 1.0, 0.75, 0.5, 0.25]);
    let constant = LoopConfig {
        steps: 8,
        ..cooled.clone()
    };
    let constant = LoopConfig {
        cooldown: 0,
        ..constant
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let straight = run(a.path(), &cooled, false, None).unwrap();
    run(b.path(), &constant, false, None).unwrap();
    let branched = run(b.path(), &cooled, true, None).unwrap();
    for ((n1, t1), (_, t2)) in weights(&straight).iter().zip(weights(&branched).iter()) {
        assert!(
            t1.equal(t2),
            "{n1} differs after branching into the cooldown"
        );
    }
    // A run that has decayed cannot be extended as if it had not.
    let longer = LoopConfig {
        steps: 16,
        ..cooled
    };
    let err = run(a.path(), &longer, true, None).unwrap_err().to_string();
    assert!(err.contains("cooldown"), "{err}");
}
