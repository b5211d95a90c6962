//! VAE parity with diffusers' `AutoencoderKL` on both fixture pipelines (references from
//! scripts/fixtures/vae.py), plus shapes on `VaeConfig::tiny()`, deprecated attention names
//! and config/weights error messages.
use std::path::PathBuf;

use anyhow::Result;
use loracast::io::safetensors::{save, SafeTensorsFile};
use loracast::io::DiffusersFolder;
use loracast::models::vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
use tch::{nn, Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn pipeline(name: &str) -> PathBuf {
    root().join("pipelines").join(name)
}

/// max|ours − ref| / max|ref|
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size());
    let diff = (ours - reference).abs().max().double_value(&[]);
    diff / reference.abs().max().double_value(&[])
}

fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    let e = rel_err(ours, reference);
    println!("{what}: rel err {e:.2e}");
    assert!(e <= TOL, "{what}: rel err {e:.2e} > {TOL:e}");
}

/// A scratch pipeline folder holding only `model_index.json` and `vae/`.
fn scratch(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("loracast-vae-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("vae"))?;
    std::fs::copy(
        pipeline("tiny-a").join("model_index.json"),
        dir.join("model_index.json"),
    )?;
    Ok(dir)
}

fn parity(name: &str, scaling_factor: f64, scale_factor: i64) -> Result<()> {
    let (vae, _vs) = AutoencoderKL::load(&DiffusersFolder::open(&pipeline(name))?, Device::Cpu)?;
    assert_eq!(vae.scaling_factor(), scaling_factor);
    assert_eq!(vae.scale_factor(), scale_factor);
    let refs = SafeTensorsFile::open(&root().join(format!("vae_{name}.safetensors")))?;
    let t = |k: &str| refs.tensor(k, Kind::Float);
    tch::no_grad(|| -> Result<()> {
        for i in 0..2 {
            let img = vae.decode(&t(&format!("decode.{i}.latents"))?)?;
            check(
                &format!("{name} decode.{i}"),
                &img,
                &t(&format!("decode.{i}.image"))?,
            );
        }
        for i in 0..3 {
            let post = vae.encode(&t(&format!("encode.{i}.image"))?)?;
            check(
                &format!("{name} encode.{i}.mean"),
                &post.mode(),
                &t(&format!("encode.{i}.mean"))?,
            );
            check(
                &format!("{name} encode.{i}.logvar"),
                &post.logvar,
                &t(&format!("encode.{i}.logvar"))?,
            );
            if i == 0 {
                let seed = refs
                    .metadata()?
                    .and_then(|m| m.get("sample_seed")?.parse().ok());
                let _rng = loracast::util::rng_lock();
                tch::manual_seed(seed.expect("sample_seed metadata"));
                check(
                    &format!("{name} encode.0.sample"),
                    &post.sample(),
                    &t("encode.0.sample")?,
                );
            }
        }
        Ok(())
    })
}

#[test]
fn parity_tiny_a() -> Result<()> {
    parity("tiny-a", 0.18215, 2)
}

#[test]
fn parity_tiny_b() -> Result<()> {
    parity("tiny-b", 0.13025, 4)
}

#[test]
fn tiny_shapes() -> Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = VaeConfig::tiny();
    assert_eq!(cfg.scale_factor(), 2);
    let vae = AutoencoderKL::new(vs.root(), &cfg)?;
    let opts = (Kind::Float, Device::Cpu);
    let post = vae.encode(&(Tensor::rand([2, 3, 16, 12], opts) * 2 - 1))?;
    assert_eq!(post.mean.size(), [2, 4, 8, 6]);
    assert_eq!(post.logvar.size(), [2, 4, 8, 6]);
    assert_eq!(post.sample().size(), [2, 4, 8, 6]);
    let img = vae.decode(&Tensor::randn([1, 4, 5, 7], opts))?;
    assert_eq!(img.size(), [1, 3, 10, 14]);
    // Wrong channel counts are errors, not panics.
    assert!(vae.encode(&Tensor::rand([1, 4, 16, 16], opts)).is_err());
    assert!(vae.decode(&Tensor::rand([1, 3, 8, 8], opts)).is_err());
    Ok(())
}

#[test]
fn logvar_is_clamped() {
    let p = Tensor::from_slice(&[0.5f32, -0.5, 100.0, -100.0]).view([1, 4, 1, 1]);
    let g = DiagonalGaussian::new(&p);
    assert_eq!(
        Vec::<f32>::try_from(g.mode().flatten(0, -1)).unwrap(),
        [0.5, -0.5]
    );
    assert_eq!(
        Vec::<f32>::try_from(g.logvar.flatten(0, -1)).unwrap(),
        [20.0, -30.0]
    );
}

#[test]
fn deprecated_attention_names_load() -> Result<()> {
    let a = pipeline("tiny-a");
    let dir = scratch("legacy")?;
    std::fs::copy(a.join("vae/config.json"), dir.join("vae/config.json"))?;
    let file = SafeTensorsFile::open(&a.join("vae/diffusion_pytorch_model.safetensors"))?;
    let mut renamed = 0;
    let mut tensors = vec![];
    for name in file.tensors().names() {
        let old = name
            .replace("attentions.0.to_q", "attentions.0.query")
            .replace("attentions.0.to_k", "attentions.0.key")
            .replace("attentions.0.to_v", "attentions.0.value")
            .replace("attentions.0.to_out.0", "attentions.0.proj_attn");
        renamed += usize::from(old != name);
        tensors.push((old, file.tensor(name, Kind::Half)?));
    }
    assert_eq!(renamed, 16);
    save(
        &tensors,
        Kind::Half,
        None,
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
    )?;

    let (legacy, vs) = AutoencoderKL::load(&DiffusersFolder::open(&dir)?, Device::Cpu)?;
    let (current, _) = AutoencoderKL::load(&DiffusersFolder::open(&a)?, Device::Cpu)?;
    let vars = vs.variables();
    assert!(vars.contains_key("decoder.mid_block.attentions.0.to_out.0.weight"));
    assert!(!vars
        .keys()
        .any(|k| k.contains("query") || k.contains("proj_attn")));
    let z = Tensor::randn([1, 4, 6, 6], (Kind::Float, Device::Cpu));
    let x = Tensor::rand([1, 3, 12, 12], (Kind::Float, Device::Cpu));
    tch::no_grad(|| -> Result<()> {
        assert_eq!(rel_err(&legacy.decode(&z)?, &current.decode(&z)?), 0.0);
        assert_eq!(
            rel_err(&legacy.encode(&x)?.mean, &current.encode(&x)?.mean),
            0.0
        );
        Ok(())
    })?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// tiny-a's weights with a config whose last level has 96 channels instead of 64.
#[test]
fn config_weights_mismatch_names_key_and_shapes() -> Result<()> {
    let a = pipeline("tiny-a");
    let dir = scratch("mismatch")?;
    let text = std::fs::read_to_string(a.join("vae/config.json"))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
    cfg["block_out_channels"] = serde_json::json!([32, 96]);
    std::fs::write(dir.join("vae/config.json"), cfg.to_string())?;
    std::fs::copy(
        a.join("vae/diffusion_pytorch_model.safetensors"),
        dir.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    let err = AutoencoderKL::load(&DiffusersFolder::open(&dir)?, Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    println!("{msg}");
    assert!(msg.contains("decoder.conv_in.bias"), "{msg}");
    assert!(msg.contains("[64]") && msg.contains("[96]"), "{msg}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn unsupported_block_type_is_an_error() -> Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = VaeConfig::tiny();
    cfg.down_block_types[1] = "AttnDownEncoderBlock2D".into();
    let msg = format!("{:#}", AutoencoderKL::new(vs.root(), &cfg).unwrap_err());
    assert!(msg.contains("AttnDownEncoderBlock2D"), "{msg}");

    // Through a folder too: the config is parsed, then rejected before any weight is read.
    let dir = scratch("blocktype")?;
    let text = std::fs::read_to_string(pipeline("tiny-a").join("vae/config.json"))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)?;
    json["up_block_types"] = serde_json::json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]);
    std::fs::write(dir.join("vae/config.json"), json.to_string())?;
    std::fs::copy(
        pipeline("tiny-a").join("vae/diffusion_pytorch_model.safetensors"),
        dir.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    let msg = format!(
        "{:#}",
        AutoencoderKL::load(&DiffusersFolder::open(&dir)?, Device::Cpu).unwrap_err()
    );
    assert!(msg.contains("AttnUpDecoderBlock2D"), "{msg}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
