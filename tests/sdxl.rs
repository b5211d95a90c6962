//! SDXL parity with diffusers 0.42.1's StableDiffusionXLPipeline (issue 15), on the two
//! random-weight SDXL folders of scripts/fixtures/make_sdxl_pipelines.py with the references of
//! scripts/fixtures/sdxl.py: token ids of both tokenizers, prompt embeddings and pooled embeds
//! (clip_skip, prompt_2, negative None → zeros / "" encoded), time ids, UNet ε with added
//! conditioning at per-sample t, VAE decode (latents_mean/std), whole images for every sampler
//! with and without negative, non-square, > 77 tokens, guidance_rescale, micro-conditioning,
//! clip_skip, num_images_per_prompt, the fp16 variant, a PEFT and a kohya-SGM LoRA, and HM-CFG
//! against a hand-written diffusers loop; the real SDXL UNet config's 70 attn2 sites and kohya
//! SGM names without allocating its weights; bad SDXL folders fail with one clear line.
//! Tolerances (issue 15): tensors ≤ 1e-4 relative, images max ≤ 3 levels and mean ≤ 0.25.
mod common;

use std::collections::HashMap;

use loracast::diffusion::SchedulerKind;
use loracast::io::image::to_rgb8;
use loracast::io::safetensors::{save, SafeTensorsFile};
use loracast::lora::format::{layers_per_block, read_lora};
use loracast::lora::{BlockLoc, LoraSite};
use loracast::models::unet::{AddedCond, UNetCond, UNetConfig};
use loracast::pipeline::{GenerateRequest, LoadOptions, StableDiffusion, TextCond};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const SDXL: [&str; 2] = ["sdxl-a", "sdxl-b"];

fn fixture(name: &str) -> (Value, SafeTensorsFile) {
    let json = std::fs::read_to_string(common::fixtures().join(format!("sdxl_{name}.json")))
        .expect("sdxl fixture json");
    let refs = SafeTensorsFile::open(&common::fixtures().join(format!("sdxl_{name}.safetensors")))
        .expect("sdxl fixture tensors");
    (serde_json::from_str(&json).expect("json"), refs)
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&common::pipeline(name), Device::Cpu).expect("load SDXL fixture")
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn opt_pair(v: &Value) -> Option<(i64, i64)> {
    let a = v.as_array()?;
    Some((a[0].as_i64()?, a[1].as_i64()?))
}

/// A JSON string or list of strings as rows.
fn rows(v: &Value, n: usize) -> Vec<Option<String>> {
    match v {
        Value::Array(a) => a.iter().map(opt_str).collect(),
        v => vec![opt_str(v); n],
    }
}

#[test]
fn tokenizers_match_transformers() {
    for name in SDXL {
        let (json, refs) = fixture(name);
        let pipe = load(name);
        let tok2 = &pipe.text_encoder_2.as_ref().expect("SDXL").tokenizer;
        let (ids1, ids2) = (
            refs.tensor("ids.tok1", Kind::Int64).unwrap(),
            refs.tensor("ids.tok2", Kind::Int64).unwrap(),
        );
        for (i, p) in json["prompts"].as_array().unwrap().iter().enumerate() {
            let p = p.as_str().unwrap();
            for (what, tok, ids) in [("tok1", &pipe.tokenizer, &ids1), ("tok2", tok2, &ids2)] {
                let theirs = Vec::<i64>::try_from(ids.get(i as i64)).unwrap();
                assert_eq!(tok.encode(p), theirs, "{name} {what}: prompt {i} {p:?}");
            }
        }
    }
}

#[test]
fn prompt_embeddings_match_encode_prompt() {
    for name in SDXL {
        let (json, refs) = fixture(name);
        let pipe = load(name);
        for (i, case) in json["encode"].as_array().unwrap().iter().enumerate() {
            let prompts = rows(&case["prompt"], 1);
            let negatives = rows(&case["negative_prompt"], prompts.len());
            let n = case["num_images_per_prompt"].as_i64().unwrap();
            let clip_skip = case["clip_skip"].as_u64().map(|k| k as usize);
            let prompt_2 = opt_str(&case["prompt_2"]);
            let (mut cond, mut uncond) = (Vec::new(), Vec::new());
            for (p, neg) in prompts.iter().zip(&negatives) {
                let c = pipe
                    .encode_text(p.as_deref().unwrap(), prompt_2.as_deref(), clip_skip)
                    .unwrap();
                uncond.push(
                    pipe.encode_uncond(neg.as_deref(), None, &c)
                        .unwrap()
                        .repeat(n),
                );
                cond.push(c.repeat(n));
            }
            let (cond, uncond) = (
                TextCond::cat(&cond).unwrap(),
                TextCond::cat(&uncond).unwrap(),
            );
            let what = format!("{name} encode {i} {case}");
            let t = |k: &str| {
                refs.tensor(&format!("encode.{i}.{k}"), Kind::Float)
                    .unwrap()
            };
            common::assert_close(&cond.hidden, &t("prompt_embeds"), 1e-4, &what);
            common::assert_close(cond.pooled.as_ref().unwrap(), &t("pooled"), 1e-4, &what);
            let (neg, neg_pooled) = (t("negative_prompt_embeds"), t("negative_pooled"));
            if case["negative_prompt"].is_null() {
                // force_zeros_for_empty_prompt: exact zeros, not an encoded "".
                assert_eq!(uncond.hidden.abs().max().double_value(&[]), 0.0, "{what}");
                assert_eq!(neg.abs().max().double_value(&[]), 0.0, "{what}");
            } else {
                common::assert_close(&uncond.hidden, &neg, 1e-4, &what);
                common::assert_close(uncond.pooled.as_ref().unwrap(), &neg_pooled, 1e-4, &what);
            }
        }
    }
}

#[test]
fn time_ids_match() {
    for name in SDXL {
        let (json, refs) = fixture(name);
        let pipe = load(name);
        let default = json["default_size"].as_array().unwrap()[0]
            .as_i64()
            .unwrap();
        for (i, case) in json["time_ids"].as_array().unwrap().iter().enumerate() {
            let h = case["height"].as_i64().unwrap_or(default);
            let w = case["width"].as_i64().unwrap_or(default);
            let req = GenerateRequest {
                original_size: opt_pair(&case["original_size"]),
                crops_coords_top_left: opt_pair(&case["crops_coords_top_left"]).unwrap_or((0, 0)),
                target_size: opt_pair(&case["target_size"]),
                ..GenerateRequest::new("")
            };
            // Small integers as float32: exact on every machine.
            let theirs = refs.tensor(&format!("time_ids.{i}"), Kind::Float).unwrap();
            let ours = pipe.time_ids(&req, h, w);
            assert!(
                ours.equal(&theirs),
                "{name} time ids {i}: {ours} vs {theirs}"
            );
        }
    }
}

#[test]
fn unet_matches_with_added_conditioning() {
    for name in SDXL {
        let (json, refs) = fixture(name);
        let pipe = load(name);
        for case in json["unet"].as_object().unwrap().keys() {
            let t = |k: &str| {
                refs.tensor(&format!("unet.{case}.{k}"), Kind::Float)
                    .unwrap()
            };
            let (text, pooled, ids) = (t("ctx"), t("text_embeds"), t("time_ids"));
            let cond = UNetCond {
                image: None,
                text: &text,
                added: Some(AddedCond {
                    text_embeds: &pooled,
                    time_ids: &ids,
                }),
            };
            let eps =
                tch::no_grad(|| pipe.unet.forward_cond(&t("x"), &t("t"), &cond, None)).unwrap();
            common::assert_close(&eps, &t("eps"), 1e-4, &format!("{name} unet {case}"));
        }
    }
}

#[test]
fn vae_decode_matches() {
    for name in SDXL {
        let (_, refs) = fixture(name);
        let pipe = load(name);
        let z = refs.tensor("vae.latents", Kind::Float).unwrap();
        let decoded = tch::no_grad(|| {
            pipe.vae
                .decode(&pipe.vae.config().unscale_latents_sdxl(&z))
                .unwrap()
        });
        let theirs = refs.tensor("vae.decoded", Kind::Float).unwrap();
        common::assert_close(&decoded, &theirs, 1e-4, &format!("{name} vae decode"));
    }
}

/// A fixture image request as a GenerateRequest (LoRA read against the pipeline's UNet).
fn request(pipe: &StableDiffusion, case: &Value) -> GenerateRequest {
    let lora = opt_str(&case["lora"]).map(|f| {
        let lpb = layers_per_block(&pipe.unet.config);
        read_lora(
            &common::fixtures().join(f),
            Some(pipe.unet.lora_sites()),
            lpb,
        )
        .unwrap()
        .0
    });
    let hm = &case["hmcfg"];
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: opt_str(&case["negative_prompt"]),
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: case["guidance_rescale"].as_f64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        scheduler: case["scheduler"]
            .as_str()
            .map(|s| SchedulerKind::from_cli_name(s).unwrap()),
        seed: case["seed"].as_u64().unwrap(),
        height: case["height"].as_i64(),
        width: case["width"].as_i64(),
        original_size: opt_pair(&case["original_size"]),
        crops_coords_top_left: opt_pair(&case["crops_coords_top_left"]).unwrap_or((0, 0)),
        target_size: opt_pair(&case["target_size"]),
        clip_skip: case["clip_skip"].as_u64().map(|k| k as usize),
        num_images: case["num_images_per_prompt"].as_u64().unwrap() as usize,
        lora,
        lora_scale: case["lora_scale"].as_f64().unwrap_or(1.0),
        generic_prompt: opt_str(&hm["generic_prompt"]),
        kappa: hm["kappa"].as_f64().unwrap_or(1.0),
        ..GenerateRequest::new("")
    }
}

#[test]
fn images_match_diffusers() {
    for name in SDXL {
        let (json, refs) = fixture(name);
        let mut pipes: HashMap<Option<String>, StableDiffusion> = HashMap::new();
        let mut worst = (0u8, 0f64);
        for case in json["images"].as_array().unwrap() {
            let variant = opt_str(&case["variant"]);
            let pipe = pipes.entry(variant.clone()).or_insert_with(|| {
                let dir = common::pipeline(name);
                let opts = LoadOptions {
                    variant: variant.clone(),
                    ..LoadOptions::default()
                };
                StableDiffusion::load_with(&dir, &opts, Device::Cpu).unwrap()
            });
            let req = request(pipe, case);
            let images = pipe.generate_batch(&req, |_, _| {}).unwrap();
            let key = case["image"].as_str().unwrap();
            let reference = refs.tensor(key, Kind::Uint8).unwrap();
            assert_eq!(reference.size()[0], images.size()[0], "{name} {key}: count");
            for j in 0..images.size()[0] {
                let (_, _, ours) = to_rgb8(&images.get(j)).unwrap();
                let r = reference.get(j);
                let mut theirs = vec![0u8; r.numel()];
                r.copy_data_u8(&mut theirs, r.numel());
                let (max, mean) = common::image_diff(&ours, &theirs);
                assert!(
                    max <= 3 && mean <= 0.25,
                    "{name} {key} ({case}): max {max}, mean {mean:.3}"
                );
                worst = (worst.0.max(max), worst.1.max(mean));
            }
        }
        eprintln!(
            "{name}: {} images match diffusers; worst max {} mean {:.3}",
            json["images"].as_array().unwrap().len(),
            worst.0,
            worst.1
        );
    }
}

/// attn_processors order (down → up → mid, diffusers' module registration order).
fn processor_order(loc: BlockLoc) -> (u8, usize) {
    match loc {
        BlockLoc::Down(i) => (0, i),
        BlockLoc::Up(i) => (1, i),
        BlockLoc::Mid => (2, 0),
    }
}

#[test]
fn real_sdxl_config_sites_and_kohya_sgm_names() {
    let (json, _) = fixture("sdxl-a");
    let real = &json["real_sdxl"];
    let cfg = UNetConfig::from_json(real["unet_config"].clone()).unwrap();
    // The preset is the hub config.
    assert_eq!(
        UNetConfig::sdxl().lora_sites().unwrap(),
        cfg.lora_sites().unwrap()
    );
    let sites = cfg.lora_sites().unwrap();
    let weights: usize = sites
        .iter()
        .map(|s| 2 * (s.in_features + s.out_features))
        .sum();
    assert_eq!(
        weights as u64,
        real["lora_rank2_qkv_weights"].as_u64().unwrap()
    );
    let mut attn2: Vec<&LoraSite> = sites.iter().step_by(3).collect();
    attn2.sort_by_key(|s| processor_order(s.transformer.loc));
    let ours: Vec<String> = attn2
        .iter()
        .map(|s| s.module_path().trim_end_matches(".to_q").to_string())
        .collect();
    let theirs: Vec<String> = real["attn2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ours, theirs);

    // A kohya file with sd-scripts' SGM names for all 210 sites (A of each filled with its
    // index) maps every name to the site diffusers maps it to.
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    let mut expect = std::collections::BTreeMap::new();
    for (module, prefix) in theirs.iter().zip(real["kohya"].as_array().unwrap()) {
        for site in sites.iter().filter(|s| {
            s.module_path()
                .strip_prefix(module.as_str())
                .is_some_and(|r| r.starts_with(".to_"))
        }) {
            let proj = site.module_path().rsplit('.').next().unwrap().to_string();
            let key = format!("{}_{proj}", prefix.as_str().unwrap());
            let id = expect.len() as f64;
            expect.insert(*site, id);
            let opts = (Kind::Float, Device::Cpu);
            tensors.push((
                format!("{key}.lora_down.weight"),
                Tensor::full([1, site.in_features as i64], id, opts),
            ));
            tensors.push((
                format!("{key}.lora_up.weight"),
                Tensor::ones([site.out_features as i64, 1], opts),
            ));
            tensors.push((format!("{key}.alpha"), Tensor::from(1f32)));
        }
    }
    assert_eq!(expect.len(), 210);
    let file = dir.path().join("sgm.safetensors");
    save(&tensors, Kind::Float, None, &file).unwrap();
    let (set, _) = read_lora(&file, Some(&sites), layers_per_block(&cfg)).unwrap();
    assert_eq!(set.weights.len(), 210);
    for (site, w) in &set.weights {
        assert_eq!(w.a.double_value(&[0, 0]), expect[site], "{site}");
    }
}

#[test]
fn peft_and_kohya_sgm_loras_are_the_same_adapter() {
    let (json, _) = fixture("sdxl-a");
    let pipe = load("sdxl-a");
    let lpb = layers_per_block(&pipe.unet.config);
    let files = &json["lora"]["files"];
    let read = |k: &str| {
        read_lora(
            &common::fixtures().join(files[k].as_str().unwrap()),
            Some(pipe.unet.lora_sites()),
            lpb,
        )
    };
    let (peft, kohya) = (read("peft").unwrap().0, read("kohya").unwrap().0);
    assert_eq!(peft.weights.len(), pipe.unet.lora_sites().len());
    for (site, w) in &peft.weights {
        let k = &kohya.weights[site];
        assert!(common::rel_err(&w.delta_w(), &k.delta_w()) < 1e-6, "{site}");
    }
    // Text-encoder keys are out of scope: one error naming the first such key.
    let e = format!("{:#}", read("kohya_te").unwrap_err());
    let te_key = json["lora"]["te_key"].as_str().unwrap();
    assert!(
        e.contains(te_key.split('.').next().unwrap()),
        "{e} does not name {te_key}"
    );
}

#[test]
fn cli_generate_gives_diffusers_image() {
    // One case through the CLI flags (micro-conditioning, LoRA, sizes).
    let (json, refs) = fixture("sdxl-a");
    let dir = tempfile::tempdir().unwrap();
    let base = common::pipeline("sdxl-a");
    for case in
        json["images"].as_array().unwrap().iter().filter(|c| {
            !c["original_size"].is_null() || !c["lora"].is_null() && c["hmcfg"].is_null()
        })
    {
        let key = case["image"].as_str().unwrap();
        let out = dir.path().join(format!("{key}.png"));
        let mut args: Vec<String> = [
            "generate",
            "--base",
            base.to_str().unwrap(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--steps",
            &case["steps"].to_string(),
            "--seed",
            &case["seed"].to_string(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        let mut flag = |f: &str, v: &Value| {
            if let Some(a) = v.as_array() {
                args.extend([f.to_string(), format!("{},{}", a[0], a[1])]);
            } else if let Some(s) = v.as_str() {
                args.extend([f.to_string(), s.to_string()]);
            }
        };
        flag("--original-size", &case["original_size"]);
        flag("--crops-coords-top-left", &case["crops_coords_top_left"]);
        flag("--target-size", &case["target_size"]);
        flag("--negative-prompt", &case["negative_prompt"]);
        if let Some(f) = case["lora"].as_str() {
            args.extend([
                "--lora".into(),
                common::fixtures().join(f).display().to_string(),
            ]);
        }
        if let Some(s) = case["lora_scale"].as_f64() {
            args.extend(["--lora-scale".into(), s.to_string()]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = common::loracast(&a);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let (_, _, ours) = loracast::io::image::read_png_rgb8(&out).unwrap();
        let r = refs.tensor(key, Kind::Uint8).unwrap().get(0);
        let mut theirs = vec![0u8; r.numel()];
        r.copy_data_u8(&mut theirs, r.numel());
        let (max, mean) = common::image_diff(&ours, &theirs);
        assert!(
            max <= 3 && mean <= 0.25,
            "CLI {key}: max {max}, mean {mean:.3}"
        );
    }
}

#[test]
fn bad_sdxl_folders_fail_with_one_line() {
    let run = |dir: &std::path::Path, needle: &str| {
        let out = dir.join("out.png");
        common::assert_fails(
            &[
                "generate",
                "--base",
                dir.to_str().unwrap(),
                "--prompt",
                "a cat",
                "--steps",
                "1",
                "--out",
                out.to_str().unwrap(),
            ],
            Some(&out),
            needle,
        );
    };
    for missing in ["text_encoder_2", "tokenizer_2"] {
        let dir = common::copy_pipeline("sdxl-a");
        std::fs::remove_dir_all(dir.path().join(missing)).unwrap();
        run(dir.path(), missing);
    }
    // projection_class_embeddings_input_dim inconsistent with text_encoder_2's projection.
    let dir = common::copy_pipeline("sdxl-a");
    common::edit_json(&dir.path().join("unet/config.json"), |v| {
        let p = v["projection_class_embeddings_input_dim"].as_i64().unwrap();
        v["projection_class_embeddings_input_dim"] = (p + 4).into();
    });
    run(dir.path(), "projection_dim");
    // An SD1.x folder refuses SDXL-only flags; an SDXL LoRA with text-encoder keys names one.
    let dir = common::copy_pipeline("sdxl-a");
    let out = dir.path().join("out.png");
    let te = common::fixtures().join("lora_sdxl-a_kohya_te.safetensors");
    common::assert_fails(
        &[
            "generate",
            "--base",
            dir.path().to_str().unwrap(),
            "--prompt",
            "a cat",
            "--lora",
            te.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        Some(&out),
        "lora_te1_",
    );
    let tiny = common::pipeline("tiny-a");
    common::assert_fails(
        &[
            "generate",
            "--base",
            tiny.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--original-size",
            "64,64",
            "--out",
            out.to_str().unwrap(),
        ],
        Some(&out),
        "--original-size",
    );
}

#[test]
fn half_precision_compute_stays_close_to_f32() {
    // `--dtype f16|bf16` (diffusers' torch_dtype): weights and activations in half precision,
    // latents and the scheduler in f32, the fp16 VAE upcast (force_upcast). Bounds are the
    // formats' precision on this tiny random model (measured: f16 max 1 / mean 0.04 levels,
    // bf16 max 3 / mean 0.45 against f32), with margin for other CPUs.
    let (json, _) = fixture("sdxl-a");
    let case = &json["images"][0];
    let image = |dtype: Kind| {
        let opts = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let pipe =
            StableDiffusion::load_with(&common::pipeline("sdxl-a"), &opts, Device::Cpu).unwrap();
        assert_eq!(
            (pipe.dtype, pipe.vae_dtype == Kind::Float),
            (dtype, dtype != Kind::BFloat16)
        );
        let req = request(&pipe, case);
        to_rgb8(&pipe.generate(&req, |_, _| {}).unwrap()).unwrap().2
    };
    let f32 = image(Kind::Float);
    for (dtype, max_tol, mean_tol) in [(Kind::Half, 3, 0.25), (Kind::BFloat16, 12, 1.5)] {
        let (max, mean) = common::image_diff(&image(dtype), &f32);
        assert!(
            max <= max_tol && mean <= mean_tol,
            "{dtype:?}: max {max}, mean {mean:.3} from f32"
        );
    }
}

#[test]
fn lora_convert_and_info_work_on_sdxl_files() {
    // kohya SGM → PEFT → kohya-ldm (SGM names again) keeps ΔW on every site; `lora info` reads
    // SDXL files; the written SGM file names the same modules as sd-scripts' (the fixture's).
    let dir = tempfile::tempdir().unwrap();
    let base = common::pipeline("sdxl-a");
    let kohya = common::fixtures().join("lora_sdxl-a_kohya.safetensors");
    let peft = dir.path().join("peft.safetensors");
    let sgm = dir.path().join("sgm.safetensors");
    for (input, to, out) in [(&kohya, "peft", &peft), (&peft, "kohya-ldm", &sgm)] {
        let o = common::loracast(&[
            "lora",
            "convert",
            input.to_str().unwrap(),
            "--to",
            to,
            "--out",
            out.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
    }
    let o = common::loracast(&["lora", "info", sgm.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("kohya-ldm"));
    let pipe = load("sdxl-a");
    let (sites, lpb) = (pipe.unet.lora_sites(), layers_per_block(&pipe.unet.config));
    let (a, _) = read_lora(&kohya, Some(sites), lpb).unwrap();
    let (b, _) = read_lora(&sgm, Some(sites), lpb).unwrap();
    for (site, w) in &a.weights {
        assert!(
            common::rel_err(&b.weights[site].delta_w(), &w.delta_w()) <= 1e-6,
            "{site}"
        );
    }
    let names = |f: &std::path::Path| SafeTensorsFile::open(f).unwrap().names();
    assert_eq!(names(&sgm), names(&kohya));
}
