//! Data-parallel training over torch.distributed's c10d (issue #18), Gloo over 127.0.0.1 only:
//! the bridge's collectives, the torchrun environment, 2 processes × batch b = 1 process ×
//! batch 2b (to reduction order, b = 2 and 1), a killed worker fails the others within the timeout, resume
//! after a SIGKILL of the whole job is exact (same world size) or close (another), and the
//! rendezvous faults each give one line.
//!
//! Weight comparisons use the relative L2 distance over all trained tensors,
//! ‖W − W′‖/‖W′‖: Adam divides each gradient element by its own running magnitude, so an
//! element whose per-sample gradients nearly cancel turns reduction-order noise (1e-7) into an
//! update difference of up to lr; a per-element maximum is meaningless at any step count.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fixtures;
use loracast::dist::{Backend, Dist, Shard, Topology};
use loracast::io::safetensors::SafeTensorsFile;
use tch::{Device, Kind, Tensor};

/// The training runs share two cores and time their faults: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn free_port() -> u16 {
    loracast::dist::launch::free_port().unwrap()
}

/// A tiny hypernetwork run on the toy world through the tiny-a pipeline: global batch 4,
/// 2 micro-batches, prior-preservation rows and unconditional rows (every row block sharded).
fn config(dir: &Path, steps: u64, checkpoint_every: u64) -> PathBuf {
    config_batch(dir, steps, checkpoint_every, 4)
}

fn config_batch(dir: &Path, steps: u64, checkpoint_every: u64, batch: usize) -> PathBuf {
    let cfg = serde_json::json!({
        "decoder": {"rank": 2, "alpha": 2.0, "width": 32, "layers": 1, "heads": 4,
                    "intermediate": 64, "rounds": 2},
        "loop": {"steps": steps, "lr": 1e-4, "warmup": 0, "weight_decay": 0.01, "grad_clip": 1.0,
                 "checkpoint_every": checkpoint_every, "log_every": 1, "seed": 3},
        "batch": batch, "accumulate": 2, "lambda": 0.001, "gamma": 0.5, "mode": "single",
        "class_word": "creature", "null_weight": 0.5, "world_seed": 9,
    });
    let path = dir.join(format!("hypernet-{steps}-{batch}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn train_args(cfg: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["train".into(), "hypernet".into(), "--config".into()];
    v.push(cfg.display().to_string());
    for (flag, value) in [
        ("--out", out.to_path_buf()),
        ("--base", common::pipeline("tiny-a")),
        ("--encoder", fixtures().join("metrics/dino")),
        ("--data", PathBuf::from("toy")),
    ] {
        v.push(flag.into());
        v.push(value.display().to_string());
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The built binary with `threads` torch threads, no inherited torchrun variables.
fn command(args: &[String], threads: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loracast"));
    c.args(args).env("OMP_NUM_THREADS", threads.to_string());
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        c.env_remove(k);
    }
    c
}

fn run_ok(args: &[String], threads: usize) -> Output {
    let o = command(args, threads).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One rank of a torchrun-style job started by hand.
fn worker(args: &[String], rank: usize, world: usize, port: u16) -> Command {
    let mut c = command(args, 1);
    c.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    c
}

/// The trained tensors of a run's checkpoint (decoder only: the encoder is frozen).
fn trained(run: &Path) -> Vec<(String, Tensor)> {
    let file = SafeTensorsFile::open(&run.join("run/checkpoint.safetensors")).unwrap();
    let mut names: Vec<String> = file
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("adam_") && !n.starts_with("encoder."))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    names
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n, Kind::Double).unwrap();
            (n, t)
        })
        .collect()
}

fn checkpoint_step(run: &Path) -> Option<u64> {
    let file = SafeTensorsFile::open(&run.join("run/checkpoint.safetensors")).ok()?;
    file.metadata().ok()??.get("step")?.parse().ok()
}

/// ‖a − b‖ / ‖b‖ over all tensors.
fn rel_l2(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0, 0.0);
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        num += (ta - tb).square().sum(Kind::Double).double_value(&[]);
        den += tb.square().sum(Kind::Double).double_value(&[]);
    }
    (num / den).sqrt()
}

fn bitwise_equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((n1, t1), (n2, t2))| n1 == n2 && t1.equal(t2))
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Exactly one non-empty stderr line, an `error:` line mentioning `needle`; no panic, no trace.
fn one_error_line(err: &str, needle: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains(needle),
        "{err:?} does not mention {needle:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("frame #"),
        "{err}"
    );
}

#[test]
fn the_torchrun_environment() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(Topology::from_lookup(env(&[])).unwrap(), None);
    let t = Topology::from_lookup(env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((t.rank, t.world, t.local_rank), (3, 8, 1));
    assert_eq!((t.master_addr.as_str(), t.master_port), ("node0", 29400));
    assert!(t.agent_store);
    for (bad, needle) in [
        (&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")][..], "RANK"),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")][..],
            "below",
        ),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")][..],
            "MASTER_PORT",
        ),
        (&[("WORLD_SIZE", "2"), ("RANK", "0")][..], "MASTER_PORT"),
        (&[("WORLD_SIZE", "two")][..], "WORLD_SIZE"),
    ] {
        let pairs: Vec<(String, String)> = bad
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let err =
            Topology::from_lookup(|k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
                .unwrap_err()
                .to_string();
        assert!(err.contains(needle), "{err}");
    }
    // A batch the world size does not divide is refused; shards tile the batch in order.
    assert!(Shard { rank: 0, world: 3 }.rows(4, "rows").is_err());
    assert_eq!(Shard { rank: 1, world: 2 }.rows(4, "rows").unwrap(), 2..4);
    assert!(Backend::choose("mpi", Device::Cpu).is_err());
    assert_eq!(Backend::choose("auto", Device::Cpu).unwrap(), Backend::Gloo);
}

#[test]
fn collectives_between_two_ranks() {
    let port = free_port();
    let rank = |r: usize| {
        std::thread::spawn(move || -> Vec<f64> {
            let topo = Topology {
                rank: r,
                world: 2,
                local_rank: r,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                agent_store: false,
            };
            let d = Dist::init(&topo, Backend::Gloo, Device::Cpu, Duration::from_secs(20)).unwrap();
            // Two tensors, one collective: the mean of rank 0's and rank 1's values.
            let a = Tensor::from_slice(&[1.0f32 + r as f32, 10.0]);
            let b = Tensor::from_slice(&[r as f32 * 4.0]).reshape([1, 1]);
            d.all_reduce_mean(&[a.shallow_clone(), b.shallow_clone()])
                .unwrap();
            // Rank 1's values everywhere.
            let c = Tensor::from_slice(&[r as f32 + 7.0, -(r as f32)]);
            d.broadcast(std::slice::from_ref(&c), 1).unwrap();
            d.barrier().unwrap();
            // Equal values agree; differing ones fail on every rank.
            d.agree(42, "a constant").unwrap();
            let err = d.agree(r as i64, "the rank").unwrap_err().to_string();
            assert!(err.contains("disagree on the rank"), "{err}");
            d.shutdown().unwrap();
            [a, b.flatten(0, -1), c]
                .iter()
                .flat_map(|t| Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap())
                .collect()
        })
    };
    let (r0, r1) = (rank(0), rank(1));
    let (v0, v1) = (r0.join().unwrap(), r1.join().unwrap());
    assert_eq!(v0, vec![1.5, 10.0, 2.0, 8.0, -1.0]);
    assert_eq!(v0, v1);
}

#[test]
fn two_processes_train_what_one_process_trains_with_the_whole_batch() {
    let _s = serial();
    let tmp = tempfile::tempdir().unwrap();
    // 2 and 1 subjects per rank (the VAE gives 1-row batches another memory layout).
    for batch in [4, 2] {
        let cfg = config_batch(tmp.path(), 3, 3, batch);
        let one = tmp.path().join(format!("one-{batch}"));
        let two = tmp.path().join(format!("two-{batch}"));
        run_ok(&train_args(&cfg, &one, &[]), 1);
        // 2 processes × batch/2 subjects per micro-batch (2 threads split into 1 each).
        let o = run_ok(
            &train_args(&cfg, &two, &["--nproc", "2", "--dist-timeout", "60"]),
            2,
        );
        // Rank 0 alone reports; rank 1 prints nothing.
        assert_eq!(stderr(&o).matches("wrote ").count(), 1, "{}", stderr(&o));
        let d = rel_l2(&trained(&two), &trained(&one));
        eprintln!(
            "2 × {} vs 1 × {batch} after 3 steps: relative L2 difference {d:.2e}",
            batch / 2
        );
        assert!(
            d <= 1e-6,
            "batch {batch}: relative difference {d:.3e} > 1e-6"
        );
        // Same global batch, same scalars (to reduction order); the log says who trained.
        let (m1, m2) = (metrics(&one), metrics(&two));
        assert_eq!(m1.len(), 3);
        assert_eq!(m2.len(), 3);
        for (a, b) in m1.iter().zip(&m2) {
            for key in ["loss", "l_ft", "l_base", "l_prior", "l_null", "grad_norm"] {
                let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
                    "batch {batch}, {key}: {x} vs {y}"
                );
            }
            assert_eq!(b["world_size"], 2);
            assert!(a.get("world_size").is_none());
        }
        assert!(two.join("hypernet.safetensors").is_file());
    }
}

#[test]
fn a_killed_worker_fails_the_others_within_the_timeout() {
    let _s = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 400, 2);
    for victim in [1usize, 0] {
        let out = tmp.path().join(format!("kill{victim}"));
        let args = train_args(&cfg, &out, &["--dist-timeout", "10"]);
        let port = free_port();
        let mut ranks: Vec<Child> = (0..2)
            .map(|r| {
                worker(&args, r, 2, port)
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Training is under way once rank 0 logs a step.
        let begin = Instant::now();
        while !out.join("run/metrics.jsonl").is_file() {
            assert!(begin.elapsed() < Duration::from_secs(60), "no step logged");
            std::thread::sleep(Duration::from_millis(50));
        }
        ranks[victim].kill().unwrap();
        let killed_at = Instant::now();
        let survivor = &mut ranks[1 - victim];
        let status = loop {
            if let Some(s) = survivor.try_wait().unwrap() {
                break s;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(12),
                "rank {} still running 12 s after rank {victim} died",
                1 - victim
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let waited = killed_at.elapsed();
        let mut err = String::new();
        std::io::Read::read_to_string(survivor.stderr.as_mut().unwrap(), &mut err).unwrap();
        ranks[victim].wait().unwrap();
        assert!(!status.success());
        eprintln!("rank {victim} killed: the other exited after {waited:?}");
        one_error_line(&err, &format!("rank {} of 2", 1 - victim));
        // Whatever checkpoint exists is a whole one, from a checkpoint step.
        if let Some(step) = checkpoint_step(&out) {
            assert_eq!(step % 2, 0);
            assert!(!trained(&out).is_empty());
        }
    }
}

#[test]
fn resume_after_sigkill_of_the_whole_job() {
    let _s = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 8, 2);
    let nproc = ["--nproc", "2", "--dist-timeout", "60"];
    let straight = tmp.path().join("straight");
    run_ok(&train_args(&cfg, &straight, &nproc), 2);

    // The launcher and its workers, SIGKILLed after the step-4 checkpoint.
    let killed = tmp.path().join("killed");
    let mut job = command(&train_args(&cfg, &killed, &nproc), 2)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let begin = Instant::now();
    while checkpoint_step(&killed).is_none_or(|s| s < 4) {
        assert!(
            begin.elapsed() < Duration::from_secs(90),
            "no step-4 checkpoint"
        );
        assert!(job.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    job.kill().unwrap();
    job.wait().unwrap();
    // Its workers die with it (PR_SET_PDEATHSIG): the run folder stops changing.
    std::thread::sleep(Duration::from_millis(1500));
    let at_kill = checkpoint_step(&killed).unwrap();
    let log_len = std::fs::metadata(killed.join("run/metrics.jsonl"))
        .unwrap()
        .len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(checkpoint_step(&killed), Some(at_kill));
    assert_eq!(
        std::fs::metadata(killed.join("run/metrics.jsonl"))
            .unwrap()
            .len(),
        log_len,
        "a worker outlived the killed launcher"
    );
    assert!(at_kill < 8, "the job finished before it was killed");
    let copy = tmp.path().join("killed-copy");
    copy_dir(&killed, &copy);

    // Same world size: exactly the uninterrupted run (same machine, same threads).
    let resume = ["--nproc", "2", "--dist-timeout", "60", "--resume"];
    run_ok(&train_args(&cfg, &killed, &resume), 2);
    assert!(
        bitwise_equal(&trained(&killed), &trained(&straight)),
        "2-process resume differs from the uninterrupted run"
    );
    let steps: Vec<u64> = metrics(&killed)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());

    // Another world size: the same global batches, to float tolerance.
    run_ok(&train_args(&cfg, &copy, &["--resume"]), 1);
    let d = rel_l2(&trained(&copy), &trained(&straight));
    eprintln!("resumed on 1 process after step {at_kill}: relative L2 difference {d:.2e}");
    assert!(d <= 1e-6, "relative difference {d:.3e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn rendezvous_faults_give_one_line_within_the_timeout() {
    let _s = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 4, 2);
    let out = tmp.path().join("out");
    let args = train_args(&cfg, &out, &["--dist-timeout", "3"]);
    let timed = |mut c: Command| {
        let t = Instant::now();
        let o = c.output().unwrap();
        (o, t.elapsed())
    };
    // A rank that never joins: rank 0 of 2 waits alone.
    let (o, took) = timed(worker(&args, 0, 2, free_port()));
    assert!(!o.status.success());
    one_error_line(&stderr(&o), "rank 0 of 2");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // No master: rank 1 of 2 finds nobody at MASTER_ADDR:MASTER_PORT.
    let (o, took) = timed(worker(&args, 1, 2, free_port()));
    assert!(!o.status.success());
    one_error_line(&stderr(&o), "rank 1 of 2");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The master port is taken.
    let busy = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = busy.local_addr().unwrap().port();
    let (o, _) = timed(worker(&args, 0, 2, port));
    assert!(!o.status.success());
    one_error_line(&stderr(&o), "address already in use");
    drop(busy);
    // A world size that does not divide the global batch (4): refused before any start.
    let (o, took) = timed(command(&train_args(&cfg, &out, &["--nproc", "3"]), 1));
    assert!(!o.status.success());
    one_error_line(&stderr(&o), "does not divide the global batch of 4");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (o, _) = timed(command(
        &train_args(&cfg, &out, &["--nproc", "2", "--dist-backend", "mpi"]),
        1,
    ));
    one_error_line(&stderr(&o), "--dist-backend mpi");
    assert!(!out.join("run/checkpoint.safetensors").exists());
}

#[test]
fn torchrun_launches_loracast_like_a_python_script() {
    let _s = serial();
    // scripts/setup.sh installs torch, and with it torchrun, into the venv.
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(
        torchrun.is_file(),
        "{} is missing: run scripts/setup.sh",
        torchrun.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 3, 3);
    let (ours, theirs) = (tmp.path().join("nproc"), tmp.path().join("torchrun"));
    run_ok(&train_args(&cfg, &ours, &["--nproc", "2"]), 2);
    // torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): every rank a client.
    let o = Command::new(&torchrun)
        .args(["--standalone", "--nproc-per-node", "2", "--no-python"])
        .arg(env!("CARGO_BIN_EXE_loracast"))
        .args(train_args(&cfg, &theirs, &["--dist-timeout", "60"]))
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "torchrun: {}", stderr(&o));
    assert!(
        bitwise_equal(&trained(&theirs), &trained(&ours)),
        "torchrun's run differs from --nproc 2's"
    );
    assert_eq!(metrics(&theirs)[0]["world_size"], 2);
}
