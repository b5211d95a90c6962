//! The open category (issue 17) on the real-model path: a tiny random SDXL pipeline + a random
//! IP-Adapter-Plus + its tiny CLIP vision tower (the committed fixtures). `train hypernet
//! --ip-adapter` on `pairs.jsonl` data runs with the loss decreasing, `personalize` writes a LoRA
//! through the shared image encoder, `generate --ip-adapter … --lora …` uses both (CFG and
//! HM-CFG); a hypernetwork refuses another IP-Adapter; bad pairs files are one clear line.
//! Plus the resampler decoder's init (ΔW = 0) and its config rules, on tiny configs.
mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails, fixtures, loracast, pipeline, stderr};
use loracast::hypernet::{
    DecoderConfig, DecoderKind, HypernetConfig, Hypernetwork, IpAdapterBinding,
};
use tch::{nn, Device, Kind, Tensor};

fn adapter() -> PathBuf {
    fixtures().join("ip_adapter/ip-adapter-plus_sdxl-a.safetensors")
}

fn encoder() -> PathBuf {
    fixtures().join("ip_adapter/image_encoder")
}

/// Four pairs over three committed images (two "subjects").
fn pairs(dir: &Path) -> PathBuf {
    let imgs = fixtures().join("ip_adapter/images");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    for f in ["a.png", "b.png", "c.jpg"] {
        std::fs::copy(imgs.join(f), dir.join("img").join(f)).unwrap();
    }
    let lines = [
        r#"{"input": "img/a.png", "target": "img/b.png", "caption": "a photo of a dog on the beach", "class": "dog"}"#,
        r#"{"input": "img/b.png", "target": "img/a.png", "caption": "a dog in the snow", "class": "dog"}"#,
        r#"{"input": "img/c.jpg", "target": "img/c.jpg", "caption": "a red mug on a table", "class": "mug"}"#,
        r#"{"input": "img/c.jpg", "target": "img/a.png", "caption": "watercolor painting", "class": "mug"}"#,
    ];
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn train_config(dir: &Path, steps: u64) -> PathBuf {
    let cfg = serde_json::json!({
        "decoder": {"kind": "resampler", "rank": 2, "alpha": 2.0, "width": 64, "layers": 2,
                    "heads": 1, "intermediate": 128, "rounds": 1},
        "loop": {"steps": steps, "lr": 3e-3, "warmup": 0, "weight_decay": 0.0, "grad_clip": 1.0,
                 "checkpoint_every": 10, "log_every": 1, "seed": 7},
        "batch": 2, "accumulate": 1, "lambda": 0.0, "gamma": 0.0, "mode": "cross_view",
        "null_weight": 0.5,
    });
    let path = dir.join("hypernet-open.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn l_ft(run: &Path) -> Vec<f64> {
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sdxl_ip_adapter_plus_train_personalize_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let (adapter, encoder) = (adapter(), encoder());
    let data = pairs(tmp.path());
    let cfg = train_config(tmp.path(), 30);
    let out = tmp.path().join("run");
    let base = pipeline("sdxl-a");
    let o = loracast(&[
        "train",
        "hypernet",
        "--config",
        s(&cfg),
        "--out",
        s(&out),
        "--base",
        s(&base),
        "--ip-adapter",
        s(&adapter),
        "--image-encoder",
        s(&encoder),
        "--ip-adapter-scale",
        "0.55",
        "--data",
        s(&data),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The diffusion loss goes down over a short run (means of the first and last 10 steps).
    let l = l_ft(&out);
    assert_eq!(l.len(), 30);
    let (first, last) = (
        l[..10].iter().sum::<f64>() / 10.0,
        l[20..].iter().sum::<f64>() / 10.0,
    );
    eprintln!("l_ft first 10: {first:.4}, last 10: {last:.4}");
    assert!(last < first, "loss did not decrease: {first} → {last}");

    // The file records the adapter (SHA-256 of its bytes) and the scale; no encoder of its own.
    let hyper = out.join("hypernet.safetensors");
    let (h, _vs) = Hypernetwork::load(&hyper, Device::Cpu).unwrap();
    let b = h.config.ip_adapter.clone().expect("open-category config");
    assert_eq!(b.sha256, loracast::io::sha256_file(&adapter).unwrap());
    assert_eq!((b.scale, b.hidden_size, b.tokens), (0.55, 48, 17));
    assert!(h.encoder.is_none() && h.config.encoder.is_none());
    assert_eq!(h.config.decoder.kind, DecoderKind::Resampler);

    // personalize through the shared encoder → a PEFT LoRA.
    let imgs = fixtures().join("ip_adapter/images");
    let (img_a, img_b) = (imgs.join("a.png"), imgs.join("b.png"));
    let lora = tmp.path().join("subject.safetensors");
    let o = loracast(&[
        "personalize",
        "--hypernet",
        s(&hyper),
        "--base",
        s(&base),
        "--ip-adapter",
        s(&adapter),
        "--image-encoder",
        s(&encoder),
        "--image",
        s(&img_a),
        "--image",
        s(&img_b),
        "--out",
        s(&lora),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(lora.is_file());
    // generate with the IP-Adapter and the LoRA, CFG and HM-CFG.
    for extra in [
        vec![],
        vec!["--generic-prompt", "a dog on the beach", "--kappa", "0.8"],
    ] {
        let png = tmp.path().join(format!("g{}.png", extra.len()));
        let mut a = vec![
            "generate",
            "--base",
            s(&base),
            "--prompt",
            "a sks dog on the beach",
            "--lora",
            s(&lora),
            "--ip-adapter",
            s(&adapter),
            "--image-encoder",
            s(&encoder),
            "--ip-image",
            s(&img_a),
            "--ip-adapter-scale",
            "0.55",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            s(&png),
        ];
        a.extend(extra);
        let o = loracast(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(png.is_file());
    }

    // Another IP-Adapter (one weight changed) is refused by name; so is a missing --ip-adapter.
    let other = tmp.path().join("other.safetensors");
    let mut bytes = std::fs::read(&adapter).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&other, bytes).unwrap();
    let bad = tmp.path().join("bad.safetensors");
    let personalize = |ip: Option<&Path>| {
        let mut a = vec!["personalize", "--hypernet", s(&hyper), "--base", s(&base)];
        if let Some(ip) = ip {
            a.extend(["--ip-adapter", s(ip), "--image-encoder", s(&encoder)]);
        }
        a.extend(["--image", s(&img_a), "--out", s(&bad)]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = personalize(Some(&other));
    assert_fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&bad),
        "another IP-Adapter",
    );
    let args = personalize(None);
    assert_fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&bad),
        "--ip-adapter",
    );
}

#[test]
fn bad_pairs_files_name_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (adapter, encoder) = (adapter(), encoder());
    let good = pairs(tmp.path());
    let cfg = train_config(tmp.path(), 2);
    let base = pipeline("sdxl-a");
    let out = tmp.path().join("out");
    let text = std::fs::read_to_string(&good).unwrap();
    let first = text.lines().next().unwrap().to_string();
    for (name, content, needle) in [
        (
            "malformed.jsonl",
            format!("{first}\n{{\"input\": \"img/a.png\"\n"),
            "line 2",
        ),
        (
            "missing.jsonl",
            format!(
                "{first}\n\n{}\n",
                first.replace("img/b.png", "img/nope.png")
            ),
            "line 3: target image",
        ),
        (
            "unknown.jsonl",
            format!("{}\n", first.replace("\"class\"", "\"klass\"")),
            "line 1",
        ),
        (
            "outside.jsonl",
            format!("{}\n", first.replace("img/a.png", "../a.png")),
            "line 1: input",
        ),
        ("empty.jsonl", "\n\n".to_string(), "no pairs"),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, content).unwrap();
        assert_fails(
            &[
                "train",
                "hypernet",
                "--config",
                s(&cfg),
                "--out",
                s(&out),
                "--base",
                s(&base),
                "--ip-adapter",
                s(&adapter),
                "--image-encoder",
                s(&encoder),
                "--data",
                s(&path),
            ],
            Some(&out.join("hypernet.safetensors")),
            needle,
        );
    }
    // --encoder and --ip-adapter exclude each other; --image-encoder needs --ip-adapter.
    let vit = fixtures().join("metrics/dino");
    assert_fails(
        &[
            "train",
            "hypernet",
            "--config",
            s(&cfg),
            "--out",
            s(&out),
            "--base",
            s(&base),
            "--encoder",
            s(&vit),
            "--ip-adapter",
            s(&adapter),
            "--data",
            s(&good),
        ],
        None,
        "exclude each other",
    );
    assert_fails(
        &[
            "train",
            "hypernet",
            "--config",
            s(&cfg),
            "--out",
            s(&out),
            "--base",
            s(&base),
            "--encoder",
            s(&vit),
            "--image-encoder",
            s(&encoder),
            "--data",
            s(&good),
        ],
        None,
        "--image-encoder and --ip-adapter-scale need --ip-adapter",
    );
}

fn open_config(kind: DecoderKind, rounds: i64, heads: i64) -> HypernetConfig {
    let sites = loracast::models::unet::UNetConfig::tiny()
        .lora_sites()
        .unwrap();
    HypernetConfig::on_ip_adapter(
        DecoderConfig {
            kind,
            rounds,
            heads,
            width: 64,
            layers: 2,
            intermediate: 96,
            ..DecoderConfig::tiny()
        },
        IpAdapterBinding {
            sha256: "0".repeat(64),
            hidden_size: 24,
            tokens: 5,
            scale: 0.55,
        },
        sites,
        "fp".into(),
    )
}

#[test]
fn resampler_decoder_starts_at_zero_delta() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = open_config(DecoderKind::Resampler, 1, 1);
    let h = Hypernetwork::new(&vs.root(), &cfg).unwrap();
    let features = Tensor::randn([3, 5, 24], (Kind::Float, Device::Cpu));
    let theta = h.decode(&features).unwrap();
    assert_eq!(theta.len(), 2 * cfg.sites.len());
    // ΔW = B·A = 0 for every row at init (B heads start at zero), A is not zero.
    let norm = h.squared_norm(&theta).unwrap();
    assert_eq!(norm.size(), [3]);
    assert_eq!(norm.abs().max().double_value(&[]), 0.0);
    assert!(theta[0].abs().max().double_value(&[]) > 0.0);
    // One query per matrix: the Resampler's latents are [1, M, width].
    let latents = vs.variables()["decoder.latents"].size();
    assert_eq!(latents, [1, 2 * cfg.sites.len() as i64, 64]);
    // Features of another encoder (token count) are refused; so is the pixel path.
    assert!(h
        .decode(&Tensor::zeros([1, 7, 24], (Kind::Float, Device::Cpu)))
        .is_err());
    let px = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    assert!(h
        .forward(&px)
        .unwrap_err()
        .to_string()
        .contains("--ip-adapter"));
    // Config rules: rounds 1, heads = width / 64.
    for (rounds, heads) in [(2, 1), (1, 4)] {
        let err = open_config(DecoderKind::Resampler, rounds, heads)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("resampler decoder"), "{err}");
    }
    // The config round-trips through JSON with its kind; a closed-category one keeps its bytes.
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"kind\":\"resampler\""));
    assert_eq!(serde_json::from_str::<HypernetConfig>(&json).unwrap(), cfg);
    let closed = serde_json::to_string(&DecoderConfig::paper()).unwrap();
    assert!(!closed.contains("kind"), "{closed}");
}

#[test]
fn pair_prompts_insert_the_token() {
    use loracast::train::hypernet::Pair;
    let p = |caption: &str, class: &str| Pair {
        input: "a".into(),
        target: "b".into(),
        caption: caption.into(),
        class: class.into(),
    };
    assert_eq!(
        p("a dog on the beach", "dog").prompt("sks"),
        "a sks dog on the beach"
    );
    assert_eq!(
        p("A Dog, running", "dog").prompt("sks"),
        "A sks Dog, running"
    );
    assert_eq!(
        p("watercolor painting", "mug").prompt("sks"),
        "a sks mug, watercolor painting"
    );
    // whole words only
    assert_eq!(
        p("hotdog stand", "dog").prompt("sks"),
        "a sks dog, hotdog stand"
    );
}
