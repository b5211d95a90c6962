//! The hypernetwork (issue 5): decoder initialisation and averaging, end-to-end training on a
//! random-weight SD1.x folder with a tiny ViT (loss decreases), personalize + generate, images
//! as users have them, and bad inputs (one line, non-zero exit, nothing written).
mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails, fixtures, loracast, pipeline, stderr};
use loracast::hypernet::{DecoderConfig, HypernetConfig, Hypernetwork};
use loracast::models::unet::{UNet2DConditionModel, UNetConfig};
use loracast::models::vit::ViTConfig;
use tch::{nn, Device, Kind, Tensor};

fn tiny_hypernet(vs: &nn::VarStore) -> Hypernetwork {
    let uvs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(uvs.root(), &UNetConfig::tiny()).unwrap();
    let cfg = HypernetConfig::new(
        DecoderConfig::tiny(),
        ViTConfig::tiny(),
        serde_json::json!({"size": {"height": 64, "width": 64}}),
        unet.lora_sites().to_vec(),
        unet.lora_fingerprint(),
    );
    Hypernetwork::new(&vs.root(), &cfg).unwrap()
}

#[test]
fn first_prediction_is_zero_delta_and_subjects_average() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let hyper = tiny_hypernet(&vs);
    let px = Tensor::randn([3, 3, 64, 64], (Kind::Float, Device::Cpu));
    let theta = hyper.forward(&px).unwrap();
    assert_eq!(theta.len(), 2 * hyper.config.sites.len());
    let set = hyper.lora_set(&theta).unwrap();
    for (site, w) in &set.weights {
        let dw = w.delta_w();
        assert_eq!(
            dw.size(),
            [site.out_features as i64, site.in_features as i64]
        );
        assert_eq!(
            dw.abs().max().double_value(&[]),
            0.0,
            "{site}: ΔW ≠ 0 at init"
        );
        assert!(
            w.a.abs().max().double_value(&[]) > 0.0,
            "{site}: A is zero (no gradient to B)"
        );
    }
    // Give every head weights so outputs depend on the image, then check β = mean h(x_n).
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.starts_with("decoder.heads.") && name.ends_with("weight") {
                t.copy_(&(Tensor::randn_like(&t) * 0.1));
            }
        }
    });
    let theta = hyper.forward(&px).unwrap();
    let set = hyper.lora_set(&theta).unwrap();
    let one: Vec<_> = (0..3)
        .map(|i| {
            hyper
                .lora_set(&hyper.forward(&px.narrow(0, i, 1)).unwrap())
                .unwrap()
        })
        .collect();
    for (site, w) in &set.weights {
        let mean_b =
            (&one[0].weights[site].b + &one[1].weights[site].b + &one[2].weights[site].b) / 3.0;
        assert!(
            w.b.allclose(&mean_b, 1e-5, 1e-6, false),
            "{site}: B is not the mean"
        );
        assert!(w.b.abs().max().double_value(&[]) > 0.0);
    }
    // Per-sample LoRA rows fit the UNet.
    let batch = hyper
        .lora_batch(&theta, &Tensor::ones([3], (Kind::Float, Device::Cpu)))
        .unwrap();
    batch.validate(&hyper.config.sites, 3).unwrap();
}

/// `DIR/<subject>/*` from the committed test images (two subjects, several formats).
fn subject_folders(dir: &Path) {
    let imgs = fixtures().join("image_inputs");
    let metric = fixtures().join("metrics/images");
    for (subject, files) in [
        (
            "alpha",
            vec![
                imgs.join("photo.jpg"),
                imgs.join("exif6.jpg"),
                imgs.join("cmyk.jpg"),
            ],
        ),
        (
            "beta",
            vec![
                metric.join("square.png"),
                metric.join("wide.png"),
                imgs.join("gray.png"),
            ],
        ),
    ] {
        let d = dir.join(subject);
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
}

fn train_config(dir: &Path, steps: u64) -> PathBuf {
    let cfg = serde_json::json!({
        "decoder": {"rank": 2, "alpha": 2.0, "width": 32, "layers": 1, "heads": 4,
                    "intermediate": 64, "rounds": 2},
        "loop": {"steps": steps, "lr": 3e-3, "warmup": 0, "weight_decay": 0.0, "grad_clip": 1.0,
                 "checkpoint_every": 10, "log_every": 1, "seed": 5},
        "batch": 2, "accumulate": 2, "lambda": 0.0, "gamma": 0.0, "mode": "single",
        "class_word": "object", "null_weight": 0.5,
    });
    let path = dir.join("hypernet.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["l_ft"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// `train hypernet` arguments (the encoder is the tiny random ViT fixture), plus `extra`.
fn train_args(cfg: &Path, out: &Path, base: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let encoder = fixtures().join("metrics/dino");
    let mut v: Vec<String> = ["train", "hypernet", "--config"].map(String::from).to_vec();
    for (flag, path) in [
        (None, cfg),
        (Some("--out"), out),
        (Some("--base"), base),
        (Some("--encoder"), &encoder),
        (Some("--data"), data),
    ] {
        if let Some(f) = flag {
            v.push(f.to_string());
        }
        v.push(path.to_str().unwrap().to_string());
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn real_folder_training_personalize_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    subject_folders(&data);
    let cfg = train_config(tmp.path(), 30);
    let out = tmp.path().join("run");
    let base = pipeline("tiny-a");
    let o = loracast(&strs(&train_args(&cfg, &out, &base, &data, &[])));
    assert!(o.status.success(), "{}", stderr(&o));
    // The diffusion loss goes down over a short run (means of the first and last 10 steps).
    let l = losses(&out);
    assert_eq!(l.len(), 30);
    let first: f64 = l[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = l[20..].iter().sum::<f64>() / 10.0;
    eprintln!("l_ft first 10: {first:.4}, last 10: {last:.4}");
    assert!(last < first, "loss did not decrease: {first} → {last}");
    // The unconditional-preservation term is logged (the config sets null_weight).
    let log = std::fs::read_to_string(out.join("run/metrics.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(
        row["l_null"]
            .as_f64()
            .is_some_and(|v| v.is_finite() && v >= 0.0),
        "{row}"
    );

    // personalize: several images (CMYK, EXIF-rotated, grey, RGBA, 16-bit) → one PEFT LoRA.
    let hyper = out.join("hypernet.safetensors");
    let imgs = fixtures().join("image_inputs");
    let lora = tmp.path().join("subject.safetensors");
    let mut args: Vec<String> = vec![
        "personalize".into(),
        "--hypernet".into(),
        hyper.to_str().unwrap().into(),
        "--out".into(),
        lora.to_str().unwrap().into(),
        "--base".into(),
        base.to_str().unwrap().into(),
    ];
    for f in [
        "cmyk.jpg",
        "exif6.jpg",
        "gray.png",
        "rgba.png",
        "rgb16.png",
        "palette.png",
    ] {
        args.push("--image".into());
        args.push(imgs.join(f).to_str().unwrap().into());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = loracast(&argv);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ms"),
        "personalize prints its time: {}",
        stderr(&o)
    );
    // The LoRA loads in generate, with CFG and HM-CFG, and in `lora info`.
    for extra in [
        vec![],
        vec!["--generic-prompt", "a object", "--kappa", "1.0"],
    ] {
        let png = tmp.path().join(format!("g{}.png", extra.len()));
        let mut a = vec![
            "generate",
            "--base",
            base.to_str().unwrap(),
            "--prompt",
            "a sks object",
            "--lora",
            lora.to_str().unwrap(),
            "--steps",
            "2",
            "--out",
            png.to_str().unwrap(),
        ];
        a.extend(extra);
        let o = loracast(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(png.is_file());
    }
    let o = loracast(&["lora", "info", lora.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Bad inputs: one line, exit ≠ 0, nothing written.
    let bad = tmp.path().join("bad.safetensors");
    let h = hyper.to_str().unwrap();
    let b = bad.to_str().unwrap();
    for (file, needle) in [
        ("empty.jpg", "empty"),
        ("truncated.jpg", "truncated"),
        ("not_an_image.png", "not an image"),
        ("one_pixel.png", "too small"),
        ("bomb.png", "more than loracast decodes"),
    ] {
        let img = imgs.join(file);
        assert_fails(
            &[
                "personalize",
                "--hypernet",
                h,
                "--image",
                img.to_str().unwrap(),
                "--out",
                b,
            ],
            Some(&bad),
            needle,
        );
    }
    let photo = imgs.join("photo.jpg");
    let p = photo.to_str().unwrap();
    let other = pipeline("tiny-b");
    assert_fails(
        &[
            "personalize",
            "--hypernet",
            h,
            "--image",
            p,
            "--out",
            b,
            "--base",
            other.to_str().unwrap(),
        ],
        Some(&bad),
        "another base model",
    );
    assert_fails(
        &[
            "personalize",
            "--hypernet",
            lora.to_str().unwrap(),
            "--image",
            p,
            "--out",
            b,
        ],
        Some(&bad),
        "not a loracast hypernetwork",
    );
    assert_fails(
        &[
            "personalize",
            "--hypernet",
            "/nonexistent/h.safetensors",
            "--image",
            p,
            "--out",
            b,
        ],
        Some(&bad),
        "no such file",
    );
    // Prior preservation (γ > 0) with class images, and the cross-view mode.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["gamma"] = 1.0.into();
    v["mode"] = "cross_view".into();
    v["loop"]["steps"] = 2.into();
    let prior_cfg = tmp.path().join("prior.json");
    std::fs::write(&prior_cfg, v.to_string()).unwrap();
    let prior_out = tmp.path().join("prior");
    let class = fixtures().join("metrics/images");
    let o = loracast(&strs(&train_args(
        &prior_cfg,
        &prior_out,
        &base,
        &data,
        &["--class-data", class.to_str().unwrap()],
    )));
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(prior_out.join("run/metrics.jsonl")).unwrap();
    assert!(log.lines().all(|l| l.contains("l_prior")), "{log}");
    assert_fails(
        &strs(&train_args(
            &prior_cfg,
            &tmp.path().join("noclass"),
            &base,
            &data,
            &[],
        )),
        None,
        "--class-data",
    );

    // Training for another base refuses to resume this run's checkpoint.
    assert_fails(
        &strs(&train_args(&cfg, &out, &other, &data, &["--resume"])),
        None,
        "different config",
    );
}
