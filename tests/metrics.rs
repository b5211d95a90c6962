//! Parity of the real-model metrics (CLIP-I, CLIP-T, DINO) with transformers 5.23 and PIL on
//! the tiny fixture models (references from scripts/fixtures/metrics.py), on PNG and JPEG
//! inputs, and their errors.
mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, fixtures};
use loracast::eval::metrics::{score, ClipScorer, DinoScorer};
use loracast::io::preprocess::{Preprocess, RgbImage};
use loracast::io::safetensors::SafeTensorsFile;
use tch::{Device, Kind, Tensor};

fn dir(name: &str) -> PathBuf {
    fixtures().join("metrics").join(name)
}

fn reference() -> SafeTensorsFile {
    SafeTensorsFile::open(&fixtures().join("metrics_ref.safetensors")).unwrap()
}

fn meta(key: &str) -> Vec<String> {
    let m = reference().metadata().unwrap().unwrap();
    serde_json::from_str(&m[key]).unwrap()
}

fn image(name: &str) -> RgbImage {
    RgbImage::open(&dir("images").join(format!("{name}.png"))).unwrap()
}

/// `[3, H, W]` u8 tensor of our resized/cropped image.
fn chw(img: &RgbImage) -> Tensor {
    Tensor::from_slice(&img.data)
        .view([img.height as i64, img.width as i64, 3])
        .permute([2, 0, 1])
}

#[test]
fn preprocessing_matches_pil_within_one_level() {
    let r = reference();
    for name in meta("images") {
        let img = image(&name);
        for (key, pre) in [
            ("clip", Preprocess::clip()),
            ("dino", Preprocess::dino(224)),
            ("vit", Preprocess::vit()),
        ] {
            let ours = chw(&pre.resize_crop(&img)).to_kind(Kind::Int64);
            let theirs = r
                .tensor(&format!("{key}_pixels.{name}"), Kind::Int64)
                .unwrap();
            assert_eq!(ours.size(), theirs.size(), "{key} {name}");
            let diff = (&ours - &theirs).abs();
            let max = diff.max().int64_value(&[]);
            let off = diff.gt(0).sum(Kind::Int64).int64_value(&[]);
            eprintln!("{key} {name}: max diff {max}, {off} values off");
            assert!(max <= 1, "{key} {name}: max diff {max} levels");
        }
    }
}

#[test]
fn normalized_pixels_match_processors() {
    let r = reference();
    let clip = Preprocess::clip().from_folder(&dir("clip")).unwrap();
    let dino = Preprocess::dino(64);
    for name in meta("images") {
        let img = image(&name);
        let ours = clip.pixel_values(&img);
        let theirs = r
            .tensor(&format!("clip_tiny_pixels.{name}"), Kind::Float)
            .unwrap();
        assert_close(&ours, &theirs, 1e-6, &format!("clip pixels {name}"));
        let ours = dino.pixel_values(&img);
        let theirs = r
            .tensor(&format!("dino_tiny_pixels.{name}"), Kind::Float)
            .unwrap();
        assert_close(&ours, &theirs, 1e-6, &format!("dino pixels {name}"));
    }
}

#[test]
fn embeddings_match_transformers() {
    let r = reference();
    let clip = ClipScorer::load(&dir("clip"), Device::Cpu).unwrap();
    let dino = DinoScorer::load(&dir("dino"), Device::Cpu).unwrap();
    for name in meta("images") {
        let img = image(&name);
        let emb = clip.image_embeds(std::slice::from_ref(&img)).unwrap();
        let theirs = r
            .tensor(&format!("image_embeds.{name}"), Kind::Float)
            .unwrap();
        assert_close(&emb.get(0), &theirs, 1e-4, &format!("image_embeds {name}"));
        let px = dino.preprocess.batch(std::slice::from_ref(&img)).unwrap();
        let out = tch::no_grad(|| dino.model.forward(&px)).unwrap();
        for (key, ours) in [
            ("dino_cls", out.cls().get(0)),
            ("dino_last_hidden", out.last_hidden_state.get(0)),
            ("dino_pooler", out.pooler_output.as_ref().unwrap().get(0)),
        ] {
            let theirs = r.tensor(&format!("{key}.{name}"), Kind::Float).unwrap();
            assert_close(&ours, &theirs, 1e-4, &format!("{key} {name}"));
        }
    }
    for (k, prompt) in meta("prompts").iter().enumerate() {
        let ids = r.tensor(&format!("text_ids.{k}"), Kind::Int64).unwrap();
        let n = ids.size()[0];
        let ours_ids = clip.tokenizer.encode(prompt);
        assert_eq!(
            Vec::<i64>::try_from(&ids).unwrap(),
            ours_ids[..n as usize].to_vec()
        );
        // Ours is padded to 77; the pooled EOS state is the same (causal attention).
        let emb = clip.text_embeds(&[prompt.as_str()]).unwrap();
        let theirs = r.tensor(&format!("text_embeds.{k}"), Kind::Float).unwrap();
        assert_close(&emb.get(0), &theirs, 1e-4, &format!("text_embeds {k}"));
    }
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("metrics_scores.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn scores_match_transformers() {
    let clip = ClipScorer::load(&dir("clip"), Device::Cpu).unwrap();
    let dino = DinoScorer::load(&dir("dino"), Device::Cpu).unwrap();
    // JPEG inputs (baseline 4:2:0, progressive 4:2:2, grey, CMYK) as transformers + PIL read
    // them: equal pixels, so the same tolerance as PNG (a decoder a few levels off, such as
    // zune-jpeg, moves DINO by 2e-4 here).
    let jpeg = cases()
        .iter()
        .filter(|c| c.to_string().contains(".jpg\""))
        .count();
    assert!(jpeg >= 3, "JPEG cases in metrics_scores.json: {jpeg}");
    for c in cases() {
        let open = |k: &str| RgbImage::open(&dir("images").join(c[k].as_str().unwrap())).unwrap();
        let s = score(
            &clip,
            &dino,
            &open("reference"),
            &open("image"),
            c["prompt"].as_str().unwrap(),
        )
        .unwrap();
        for (k, ours) in [("clip_i", s.clip_i), ("clip_t", s.clip_t), ("dino", s.dino)] {
            let theirs = c[k].as_f64().unwrap();
            eprintln!(
                "{} vs {} {k}: |ours - transformers| = {:.2e}",
                c["reference"],
                c["image"],
                (ours - theirs).abs()
            );
            assert!(
                (ours - theirs).abs() <= 1e-4,
                "{k}: {ours} vs {theirs} ({c})"
            );
        }
    }
}

fn loracast(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loracast"))
        .args(args)
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        s(&out.stdout),
        s(&out.stderr),
    )
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[test]
fn cli_score_prints_json() {
    let all = cases();
    let (clip, dino) = (p(&dir("clip")), p(&dir("dino")));
    // A PNG case and a JPEG one (PIL-read reference).
    let first_jpeg = all
        .iter()
        .find(|c| c["reference"].as_str().unwrap().ends_with(".jpg"))
        .unwrap();
    for c in [&all[0], first_jpeg] {
        let img = |k: &str| p(&dir("images").join(c[k].as_str().unwrap()));
        let (code, out, err) = loracast(&[
            "score",
            "--clip",
            &clip,
            "--dino",
            &dino,
            "--reference",
            &img("reference"),
            "--image",
            &img("image"),
            "--prompt",
            c["prompt"].as_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        for k in ["clip_i", "clip_t", "dino"] {
            assert!(
                (v[k].as_f64().unwrap() - c[k].as_f64().unwrap()).abs() <= 1e-4,
                "{k} ({c})"
            );
        }
    }
    let c = &all[0];
    let img = |k: &str| p(&dir("images").join(c[k].as_str().unwrap()));
    // score-bench over a DreamBench-style layout.
    let data = tempfile::tempdir().unwrap();
    let s = data.path().join("dog");
    std::fs::create_dir_all(s.join("reference")).unwrap();
    std::fs::create_dir_all(s.join("generated").join("a photo of a dog")).unwrap();
    std::fs::copy(img("reference"), s.join("reference/0.png")).unwrap();
    std::fs::copy(img("image"), s.join("generated/a photo of a dog/0.png")).unwrap();
    let out_file = data.path().join("scores.json");
    let (code, _, err) = loracast(&[
        "score-bench",
        "--clip",
        &clip,
        "--dino",
        &dino,
        "--data",
        &p(data.path()),
        "--out",
        &p(&out_file),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert!(
        (v["subjects"]["dog"]["clip_i"].as_f64().unwrap() - c["clip_i"].as_f64().unwrap()).abs()
            <= 1e-4
    );
    assert!((v["mean"]["dino"].as_f64().unwrap() - c["dino"].as_f64().unwrap()).abs() <= 1e-4);
}

fn copy_folder(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
    }
    t
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn clear_errors() {
    let cpu = Device::Cpu;
    let e = err_of(ClipScorer::load(Path::new("/no/such/clip"), cpu));
    assert!(e.contains("no such folder"), "{e}");
    let t = copy_folder("clip");
    std::fs::remove_file(t.path().join("config.json")).unwrap();
    let e = err_of(ClipScorer::load(t.path(), cpu));
    assert!(e.contains("missing config.json"), "{e}");
    let t = copy_folder("dino");
    std::fs::remove_file(t.path().join("model.safetensors")).unwrap();
    let e = err_of(DinoScorer::load(t.path(), cpu));
    assert!(e.contains("missing model.safetensors"), "{e}");
    // A CLIP folder given as DINO: the weights do not match.
    let e = err_of(DinoScorer::load(&dir("clip"), cpu));
    assert!(e.contains("do not match") || e.contains("missing"), "{e}");
    // Mismatched config: a hidden size the weights do not have.
    let t = copy_folder("dino");
    common::edit_json(&t.path().join("config.json"), |v| {
        v["hidden_size"] = 48.into()
    });
    let e = err_of(DinoScorer::load(t.path(), cpu));
    assert!(e.contains("shape") || e.contains("do not match"), "{e}");
    // Bad images.
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("bad.png");
    std::fs::write(&bad, b"not an image at all").unwrap();
    assert!(err_of(RgbImage::open(&bad)).contains("not an image"));
    let jpg = t.path().join("photo.jpg");
    std::fs::write(
        &jpg,
        [0xff, 0xd8, 0xff, 0xe0, 0, 0x10, b'J', b'F', b'I', b'F'],
    )
    .unwrap();
    // A JPEG cut after its first marker.
    assert!(err_of(RgbImage::open(&jpg)).contains("truncated or corrupted"));
    let mut png = std::fs::read(dir("images").join("wide.png")).unwrap();
    png.truncate(200);
    let trunc = t.path().join("trunc.png");
    std::fs::write(&trunc, png).unwrap();
    assert!(RgbImage::open(&trunc).is_err());
    assert!(err_of(RgbImage::open(&t.path().join("none.png"))).contains("no such file"));
    let (code, _, err) = loracast(&[
        "score",
        "--clip",
        &p(&dir("clip")),
        "--dino",
        &p(&dir("dino")),
        "--reference",
        &p(&bad),
        "--image",
        &p(&bad),
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--reference") && err.contains("not an image"),
        "{err}"
    );
}
