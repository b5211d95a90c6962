//! Parity of the CLIP tokenizer and text encoder with transformers 5.23 on the fixture
//! pipelines (references from scripts/fixtures/text.py), and their error paths.
use std::path::{Path, PathBuf};

use loracast::io::folder::DiffusersFolder;
use loracast::io::safetensors::{save, SafeTensorsFile};
use loracast::models::clip_text::ClipTextModel;
use loracast::models::tokenizer::ClipTokenizer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn pipeline(name: &str) -> PathBuf {
    fixtures().join("pipelines").join(name)
}

fn sidecar() -> Value {
    let text = std::fs::read_to_string(fixtures().join("text_prompts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn prompts(v: &Value) -> Vec<String> {
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn reference(name: &str, key: &str, kind: Kind) -> Tensor {
    let file = SafeTensorsFile::open(&fixtures().join(format!("text_{name}.safetensors"))).unwrap();
    file.tensor(key, kind).unwrap()
}

/// A fresh empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loracast-text-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_ids_equal(ours: &Tensor, reference: &Tensor, prompts: &[String], what: &str) {
    assert_eq!(ours.size(), reference.size(), "{what}");
    for (i, p) in prompts.iter().enumerate() {
        let (a, b) = (
            Vec::<i64>::try_from(ours.get(i as i64)).unwrap(),
            Vec::<i64>::try_from(reference.get(i as i64)).unwrap(),
        );
        assert_eq!(a, b, "{what}: prompt {i} {p:?}");
    }
}

#[test]
fn tokenizer_ids_match_transformers() {
    let side = sidecar();
    let prompts = prompts(&side);
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    for name in ["tiny-a", "tiny-b"] {
        let tok = ClipTokenizer::from_dir(&pipeline(name).join("tokenizer")).unwrap();
        let ours = tok.encode_batch(&refs);
        assert_eq!(ours.kind(), Kind::Int64);
        assert_ids_equal(&ours, &reference(name, "ids", Kind::Int64), &prompts, name);
    }
}

#[test]
fn tokenizer_special_tokens() {
    let t0 = std::time::Instant::now();
    let a = ClipTokenizer::from_dir(&pipeline("tiny-a").join("tokenizer")).unwrap();
    let t1 = std::time::Instant::now();
    let long: String = "abcdefghij".repeat(500);
    assert_eq!(a.encode(&long).len(), 77);
    println!(
        "49408-token vocabulary loaded in {:?}, a 5000-letter word encoded in {:?}",
        t1 - t0,
        t1.elapsed()
    );
    assert_eq!(
        (a.bos, a.eos, a.pad, a.max_length),
        (49406, 49407, 49407, 77)
    );
    assert_eq!(a.vocab_size(), 49408);
    let b = ClipTokenizer::from_dir(&pipeline("tiny-b").join("tokenizer")).unwrap();
    assert_eq!((b.bos, b.eos, b.pad, b.max_length), (998, 999, 0, 77));
    let ids = b.encode("");
    assert_eq!(&ids[..3], &[998, 999, 0]);
    assert_eq!(ids.len(), 77);
}

/// The SD1.5 hub folder's tokenizer configs make `<|startoftext|>` a `normalized` token.
#[test]
fn tokenizer_hub_config_flags() {
    let side = sidecar();
    let prompts = prompts(&side);
    let dir = temp_dir("hub");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(pipeline("tiny-a").join("tokenizer").join(f), dir.join(f)).unwrap();
    }
    for (f, key) in [
        ("tokenizer_config.json", "hub_tokenizer_config"),
        ("special_tokens_map.json", "hub_special_tokens_map"),
    ] {
        std::fs::write(dir.join(f), side[key].to_string()).unwrap();
    }
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let expected = reference("tiny-a", "hub_ids", Kind::Int64);
    assert_ids_equal(&tok.encode_batch(&refs), &expected, &prompts, "hub configs");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn text_encoder_matches_transformers() {
    let side = sidecar();
    let hidden: Vec<i64> = side["hidden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_i64().unwrap())
        .collect();
    for name in ["tiny-a", "tiny-b"] {
        let folder = DiffusersFolder::open(&pipeline(name)).unwrap();
        let (model, _vs) = ClipTextModel::load(&folder, Device::Cpu).unwrap();
        let ids = reference(name, "ids", Kind::Int64).index_select(0, &Tensor::from_slice(&hidden));
        let ours = tch::no_grad(|| model.forward(&ids)).unwrap();
        let expected = reference(name, "hidden", Kind::Float);
        assert_eq!(ours.size(), expected.size());
        let rel = (&ours - &expected).abs().max().double_value(&[])
            / expected.abs().max().double_value(&[]);
        println!("{name}: text encoder relative error {rel:.3e}");
        assert!(rel <= 1e-4, "{name}: relative error {rel}");
    }
}

#[test]
fn missing_or_broken_tokenizer_files_are_errors() {
    let dir = temp_dir("tok-missing");
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::copy(
        pipeline("tiny-a").join("tokenizer/vocab.json"),
        dir.join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "{err}");
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nq zzz\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).unwrap_err());
    assert!(err.contains("not in the vocabulary"), "{err}");
    std::fs::write(dir.join("vocab.json"), "{\"a\": ").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).unwrap_err());
    assert!(err.contains("vocab.json"), "{err}");
    let err = ClipTokenizer::from_dir(&dir.join("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A copy of tiny-a with only model_index.json and text_encoder/.
fn text_encoder_copy(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let src = pipeline("tiny-a");
    std::fs::copy(src.join("model_index.json"), dir.join("model_index.json")).unwrap();
    std::fs::create_dir(dir.join("text_encoder")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            src.join("text_encoder").join(f),
            dir.join("text_encoder").join(f),
        )
        .unwrap();
    }
    dir
}

fn read_all(path: &Path) -> Vec<(String, Tensor)> {
    let file = SafeTensorsFile::open(path).unwrap();
    let mut names: Vec<String> = file
        .tensors()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n, Kind::Float).unwrap();
            (n, t)
        })
        .collect()
}

#[test]
fn wrong_shape_weight_is_an_error_naming_the_key() {
    let dir = text_encoder_copy("te-shape");
    let path = dir.join("text_encoder/model.safetensors");
    let key = "encoder.layers.1.self_attn.k_proj.weight";
    let tensors: Vec<(String, Tensor)> = read_all(&path)
        .into_iter()
        .map(|(n, t)| {
            let t = if n == key {
                t.narrow(1, 0, 31).contiguous()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    save(&tensors, Kind::Half, None, &path).unwrap();
    let folder = DiffusersFolder::open(&dir).unwrap();
    let err = ClipTextModel::load(&folder, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(key) && err.contains("31"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Hub checkpoints name the keys `text_model.…` and may carry a `position_ids` buffer
/// (stored as f32 here: the crate's `save` writes one dtype; the loader ignores it anyway).
#[test]
fn hub_key_layout_loads_the_same_model() {
    let dir = text_encoder_copy("te-hub");
    let path = dir.join("text_encoder/model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = read_all(&path)
        .into_iter()
        .map(|(n, t)| (format!("text_model.{n}"), t))
        .collect();
    let pos = Tensor::arange(77, (Kind::Float, Device::Cpu)).unsqueeze(0);
    tensors.push(("text_model.embeddings.position_ids".into(), pos));
    save(&tensors, Kind::Float, None, &path).unwrap();
    let (hub, vs) =
        ClipTextModel::load(&DiffusersFolder::open(&dir).unwrap(), Device::Cpu).unwrap();
    assert!(vs
        .variables()
        .contains_key("text_model.encoder.layers.0.self_attn.q_proj.weight"));
    let (flat, _vs) = ClipTextModel::load(
        &DiffusersFolder::open(&pipeline("tiny-a")).unwrap(),
        Device::Cpu,
    )
    .unwrap();
    let ids = reference("tiny-a", "ids", Kind::Int64);
    let (a, b) = tch::no_grad(|| (hub.forward(&ids).unwrap(), flat.forward(&ids).unwrap()));
    assert!(a.equal(&b));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn truncated_weights_are_an_error() {
    let dir = text_encoder_copy("te-trunc");
    let path = dir.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let folder = DiffusersFolder::open(&dir).unwrap();
    let err = ClipTextModel::load(&folder, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_ids_are_errors() {
    let folder = DiffusersFolder::open(&pipeline("tiny-b")).unwrap();
    let (model, _vs) = ClipTextModel::load(&folder, Device::Cpu).unwrap();
    let too_long = Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu));
    assert!(model.forward(&too_long).is_err());
    let out_of_vocab = Tensor::from_slice(&[1000i64]).unsqueeze(0);
    assert!(model.forward(&out_of_vocab).is_err());
    assert!(model
        .forward(&Tensor::zeros([77], (Kind::Int64, Device::Cpu)))
        .is_err());
}
