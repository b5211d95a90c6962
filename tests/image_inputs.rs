//! Images as users have them (io::image::read_rgb8) against PIL's
//! `ImageOps.exif_transpose(Image.open(p)).convert("RGB")` (scripts/fixtures/image_inputs.py):
//! PNG RGBA/grey/palette/16-bit exactly, JPEG (RGB, CMYK, EXIF-rotated) within the spread of
//! two JPEG decoders; bad files give one clear error.
mod common;

use loracast::io::image::read_rgb8;
use loracast::io::safetensors::SafeTensorsFile;
use tch::Kind;

fn dir() -> std::path::PathBuf {
    common::fixtures().join("image_inputs")
}

#[test]
fn decodes_like_pil() {
    let refs = SafeTensorsFile::open(&common::fixtures().join("image_inputs.safetensors")).unwrap();
    for (name, max_tol, mean_tol) in [
        ("rgba.png", 0, 0.0),
        ("gray.png", 0, 0.0),
        ("palette.png", 0, 0.0),
        ("rgb16.png", 0, 0.0),
        // Two JPEG decoders (libjpeg-turbo in PIL, zune-jpeg here) differ in IDCT/upsampling.
        ("photo.jpg", 4, 0.5),
        ("cmyk.jpg", 4, 0.5),
        ("exif6.jpg", 4, 0.5),
    ] {
        let (w, h, ours) = read_rgb8(&dir().join(name)).unwrap();
        let r = refs.tensor(name, Kind::Uint8).unwrap();
        assert_eq!(
            r.size(),
            [h as i64, w as i64, 3],
            "{name}: size/orientation"
        );
        let mut theirs = vec![0u8; ours.len()];
        r.copy_data_u8(&mut theirs, ours.len());
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let mean = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / ours.len() as f64;
        eprintln!("{name}: {w}×{h}, max {max}, mean {mean:.3}");
        assert!(
            max <= max_tol && mean <= mean_tol,
            "{name}: max {max}, mean {mean:.3}"
        );
    }
    // EXIF orientation 6 turns the 48×40 photo upright: 40×48.
    let (w, h, _) = read_rgb8(&dir().join("exif6.jpg")).unwrap();
    assert_eq!((w, h), (40, 48));
}

#[test]
fn bad_files_are_one_clear_error() {
    for (name, needle) in [
        ("not_an_image.png", "not an image"),
        ("empty.jpg", "empty"),
        ("truncated.jpg", "truncated or corrupted"),
        ("bomb.png", "100000×100000"),
        ("missing.png", "cannot read"),
    ] {
        let err = format!("{:#}", read_rgb8(&dir().join(name)).unwrap_err());
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains('\n'), "{name}: {err}");
    }
    // A 1×1 image is a valid image (commands that need more say so themselves).
    assert_eq!(
        read_rgb8(&dir().join("one_pixel.png")).unwrap().2,
        vec![10, 20, 30]
    );
}
