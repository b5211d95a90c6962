//! The `loracast` binary end to end: generate writes the diffusers image; bad input gives one
//! clear line, a non-zero exit, and no output file.
mod common;

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
