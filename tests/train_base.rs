//! `loracast train base` on a tiny config (what CI can afford): the exported folder loads and
//! generates, the UNet loss decreases, and a run killed with SIGKILL and resumed ends with
//! exactly the weights of an uninterrupted run (same seed, same thread count).
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loracast::io::safetensors::SafeTensorsFile;

fn tiny_config(dir: &Path, unet_steps: u64) -> std::path::PathBuf {
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/toy/base.json"),
        )
        .unwrap(),
    )
    .unwrap();
    cfg["batch"] = 8.into();
    cfg["vae"]["block_out_channels"] = serde_json::json!([16, 32]);
    cfg["vae"]["norm_num_groups"] = 8.into();
    cfg["vae_loop"] = serde_json::json!({"steps": 6, "lr": 2e-3, "warmup": 2, "checkpoint_every": 3,
                                         "log_every": 3, "seed": 3});
    cfg["text_encoder"]["hidden_size"] = 16.into();
    cfg["text_encoder"]["intermediate_size"] = 32.into();
    cfg["text_encoder"]["num_attention_heads"] = 2.into();
    cfg["text_encoder"]["num_hidden_layers"] = 1.into();
    cfg["unet"]["block_out_channels"] = serde_json::json!([32, 32]);
    cfg["unet"]["down_block_types"] = serde_json::json!(["CrossAttnDownBlock2D", "DownBlock2D"]);
    cfg["unet"]["up_block_types"] = serde_json::json!(["UpBlock2D", "CrossAttnUpBlock2D"]);
    cfg["unet"]["cross_attention_dim"] = 16.into();
    cfg["unet"]["attention_head_dim"] = 2.into();
    cfg["unet"]["norm_num_groups"] = 8.into();
    cfg["unet_loop"] = serde_json::json!({"steps": unet_steps, "lr": 2e-3, "warmup": 5,
                                          "checkpoint_every": 10, "log_every": 10, "seed": 4});
    let path = dir.join("tiny.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn train(config: &Path, out: &Path, resume: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loracast"));
    cmd.args([
        "train",
        "base",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .env("OMP_NUM_THREADS", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn tiny_base_trains_exports_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path(), 60);

    // Uninterrupted run.
    let a = tmp.path().join("a");
    let o = train(&config, &a, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = losses(&a.join("unet"));
    let (first, last) = (l[0], l[l.len() - 1]);
    assert!(last < 0.8 * first, "UNet loss did not decrease: {l:?}");
    // The export is a diffusers folder loracast can generate from.
    let pipe =
        loracast::pipeline::StableDiffusion::load(&a.join("model"), tch::Device::Cpu).unwrap();
    let req = loracast::pipeline::GenerateRequest {
        steps: 2,
        ..loracast::pipeline::GenerateRequest::new(
            "a creature on a sky background, small, on the left",
        )
    };
    assert_eq!(pipe.generate(&req, |_, _| {}).unwrap().size(), [3, 32, 32]);

    // Killed with SIGKILL once the UNet stage has a checkpoint, then resumed.
    let b = tmp.path().join("b");
    let mut child = train(&config, &b, false).spawn().unwrap();
    let ckpt = b.join("unet/checkpoint.safetensors");
    let start = Instant::now();
    while !ckpt.exists() && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !b.join("model").exists(),
        "the run finished before it was killed"
    );
    let o = train(&config, &b, true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    for part in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        let fa = SafeTensorsFile::open(&a.join("model").join(part)).unwrap();
        let fb = SafeTensorsFile::open(&b.join("model").join(part)).unwrap();
        for name in fa.tensors().names() {
            let ta = fa.tensor(name, tch::Kind::Float).unwrap();
            let tb = fb.tensor(name, tch::Kind::Float).unwrap();
            assert!(ta.equal(&tb), "{part}: {name} differs after kill + resume");
        }
    }
    assert_eq!(
        losses(&a.join("unet")),
        losses(&b.join("unet")),
        "metrics differ"
    );

    // Without --resume an existing run is refused with one line.
    let o = train(&config, &b, false).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--resume") && err.lines().count() == 1,
        "{err}"
    );
}
