//! The `loracast` binary end to end: generate writes the diffusers image; bad input gives one
//! clear line, a non-zero exit, and no output file.
mod common;

use std::path::Path;

#[test]
fn generate_writes_the_diffusers_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    let base = common::pipeline("tiny-a");
    let o = common::loracast(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "a photo of an astronaut riding a horse, on the Moon!",
        "--steps",
        "8",
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (w, h, ours) = loracast::io::image::read_png_rgb8(&out).unwrap();
    assert_eq!((w, h), (32, 32));
    // Case 0 of images_tiny-a: the folder's scheduler, seed 0, no negative prompt.
    let fx = loracast::io::safetensors::SafeTensorsFile::open(
        &common::fixtures().join("images_tiny-a.safetensors"),
    )
    .unwrap();
    let reference = fx.tensor("image0", tch::Kind::Uint8).unwrap();
    let mut theirs = vec![0u8; ours.len()];
    reference.copy_data_u8(&mut theirs, ours.len());
    let max = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max <= 3, "max diff {max}");

    // The output now exists: a second run refuses to clobber it, --force overwrites.
    let o = common::loracast(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("already exists"),
        "{}",
        common::stderr(&o)
    );
}

#[test]
fn bad_generate_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let good = common::pipeline("tiny-b");
    let good = good.to_str().unwrap();
    let missing = dir.path().join("nope");
    let run = |base: &str, extra: &[&str], needle: &str| {
        let mut args = vec![
            "generate", "--base", base, "--prompt", "p", "--steps", "2", "--out", o,
        ];
        args.extend_from_slice(extra);
        common::assert_fails(&args, Some(&out), needle);
    };
    run(missing.to_str().unwrap(), &[], "no such folder");
    run(good, &["--scheduler", "lms"], "lms");
    run(good, &["--height", "30"], "multiples of 8");
    run(good, &["--steps", "0"], "--steps");
    run(good, &["--device", "tpu"], "tpu");
    common::assert_fails(
        &[
            "generate",
            "--base",
            good,
            "--prompt",
            "p",
            "--out",
            dir.path().join("x.jpg").to_str().unwrap(),
        ],
        Some(&dir.path().join("x.jpg")),
        ".png",
    );

    // Broken folders: a missing component, a truncated weight file, an unreadable config.
    for (what, needle) in [
        ("vae", "vae/"),
        ("truncate", "truncated or corrupted"),
        ("config", "config.json"),
        ("tokenizer", "tokenizer"),
    ] {
        let copy = common::copy_pipeline("tiny-b");
        let p = copy.path();
        match what {
            "vae" => std::fs::remove_dir_all(p.join("vae")).unwrap(),
            "truncate" => {
                let f = p.join("unet/diffusion_pytorch_model.safetensors");
                let bytes = std::fs::read(&f).unwrap();
                std::fs::write(&f, &bytes[..100]).unwrap();
            }
            "config" => std::fs::write(p.join("unet/config.json"), "[1, 2").unwrap(),
            _ => std::fs::remove_file(p.join("tokenizer/tokenizer.json")).unwrap(),
        }
        run(p.to_str().unwrap(), &[], needle);
    }
}

/// Mutated user files (issue 14's two known classes) fail with one line naming the key or the
/// tensor and the dtype, exit non-zero, and print no C++ stack trace.
#[test]
fn mutated_user_files_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let generate = |base: &Path, needle: &str| {
        let args = [
            "generate",
            "--base",
            base.to_str().unwrap(),
            "--prompt",
            "p",
            "--steps",
            "2",
            "--out",
            o,
        ];
        common::assert_fails(&args, Some(&out), needle);
    };

    // A UNet config.json with cross_attention_dim 0 (once an unwrap on a libtorch error).
    let copy = common::copy_pipeline("tiny-b");
    common::edit_json(&copy.path().join("unet/config.json"), |v| {
        v["cross_attention_dim"] = 0.into();
    });
    generate(
        copy.path(),
        "unet config: cross_attention_dim must be ≥ 1, got 0",
    );

    // A weights file whose header gives a tensor an unknown dtype (once a 400-character serde
    // line listing every dtype).
    let copy = common::copy_pipeline("tiny-b");
    let w = copy.path().join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let at = 9 + bytes
        .windows(9)
        .position(|s| s == br#""dtype":""#)
        .expect("a dtype");
    let len = bytes[at..].iter().position(|&b| b == b'"').unwrap();
    // "F16" → "Q4" and a space: the header keeps its length.
    let new = [&b"Q4\""[..], &vec![b' '; len - 2]].concat();
    bytes[at..at + len + 1].copy_from_slice(&new);
    std::fs::write(&w, &bytes).unwrap();
    generate(copy.path(), r#"has unsupported dtype "Q4""#);

    // The same in a LoRA file, whole line checked.
    let lora = dir.path().join("x.safetensors");
    let header = br#"{"a.weight":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 16]);
    std::fs::write(&lora, &file).unwrap();
    let lora = lora.to_str().unwrap();
    let o = common::loracast(&["lora", "info", lora]);
    assert!(!o.status.success());
    assert_eq!(
        common::stderr(&o).trim_end(),
        format!(r#"error: {lora}: tensor "a.weight" has unsupported dtype "Q4""#)
    );
}
