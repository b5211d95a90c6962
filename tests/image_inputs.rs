//! Images as users have them (io::image::read_rgb8) against PIL's
//! `ImageOps.exif_transpose(Image.open(p)).convert("RGB")` (scripts/fixtures/image_inputs.py):
//! PNG RGBA/grey/palette/16-bit and every JPEG kind (baseline 4:2:0 / 4:2:2 / 4:4:4,
//! progressive, grey, CMYK, Adobe RGB, EXIF-rotated, odd sizes) bit for bit; bad files give one
//! clear error.
mod common;

use loracast::io::image::read_rgb8;
use loracast::io::jpeg::inverted_cmyk_to_rgb;
use loracast::io::safetensors::SafeTensorsFile;
use tch::Kind;

fn dir() -> std::path::PathBuf {
    common::fixtures().join("image_inputs")
}

#[test]
fn decodes_like_pil() {
    let refs = SafeTensorsFile::open(&common::fixtures().join("image_inputs.safetensors")).unwrap();
    // Integer decoding on both sides (libjpeg-turbo's islow IDCT and fancy upsampling, as PIL
    // configures it; Pillow's integer cmyk2rgb): equal on every CPU, so no tolerance.
    for name in [
        "rgba.png",
        "gray.png",
        "palette.png",
        "rgb16.png",
        "photo.jpg",
        "cmyk.jpg",
        "exif6.jpg",
        "sub420.jpg",
        "sub422.jpg",
        "sub444.jpg",
        "progressive.jpg",
        "progressive444.jpg",
        "optimized_restart.jpg",
        "grey.jpg",
        "grey_progressive.jpg",
        "cmyk_odd.jpg",
        "cmyk_progressive.jpg",
        "adobe_rgb.jpg",
        "one_pixel.jpg",
        "exif8_progressive.jpg",
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
        assert!(max == 0 && mean == 0.0, "{name}: max {max}, mean {mean:.3}");
    }
    // EXIF orientation 6 turns the 48×40 photo upright: 40×48; 8 the 37×23 one: 23×37.
    let (w, h, _) = read_rgb8(&dir().join("exif6.jpg")).unwrap();
    assert_eq!((w, h), (40, 48));
    let (w, h, _) = read_rgb8(&dir().join("exif8_progressive.jpg")).unwrap();
    assert_eq!((w, h), (23, 37));
}

/// Pillow's `CMYK;I` unpacking + Convert.c `cmyk2rgb` for every (C, K) pair (M and Y go through
/// the same per-channel function), against PIL's `Image.convert("RGB")`.
#[test]
fn cmyk_to_rgb_is_pils() {
    let refs = SafeTensorsFile::open(&common::fixtures().join("image_inputs.safetensors")).unwrap();
    let table = refs.tensor("cmyk_to_rgb", Kind::Uint8).unwrap();
    assert_eq!(table.size(), [256, 256]);
    let mut theirs = vec![0u8; 256 * 256];
    table.copy_data_u8(&mut theirs, 256 * 256);
    for c in 0..=255u8 {
        for k in 0..=255u8 {
            // libjpeg's Adobe CMYK is inverted: PIL's C = 255 − raw.
            let rgb = inverted_cmyk_to_rgb(&[255 - c, 255 - c, 255 - c, 255 - k]);
            let want = theirs[c as usize * 256 + k as usize];
            assert_eq!(rgb, [want; 3], "C {c} K {k}");
        }
    }
}

#[test]
fn bad_files_are_one_clear_error() {
    for (name, needle) in [
        ("not_an_image.png", "not an image"),
        ("empty.jpg", "empty"),
        ("truncated.jpg", "truncated or corrupted"),
        ("truncated_progressive.jpg", "truncated or corrupted"),
        // PIL: "image file is truncated" for a JPEG missing only its EOI marker.
        ("no_eoi.jpg", "truncated or corrupted"),
        ("bomb.png", "100000×100000"),
        ("bomb.jpg", "65000×60000 pixels, more than loracast decodes"),
        ("zero_height.jpg", "Empty JPEG image"),
        ("missing.png", "cannot read"),
    ] {
        let err = format!("{:#}", read_rgb8(&dir().join(name)).unwrap_err());
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains('\n'), "{name}: {err}");
    }
    // Cut at every 1/16 of each JPEG kind, and a bit flipped in every 1/16: no panic, no abort,
    // an error on one line or an image of the declared size (PIL, too, decodes many corrupt
    // entropy-coded segments with a warning).
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "sub420.jpg",
        "progressive.jpg",
        "grey_progressive.jpg",
        "cmyk_progressive.jpg",
        "exif8_progressive.jpg",
    ] {
        let good = std::fs::read(dir().join(name)).unwrap();
        for i in 1..16 {
            let at = good.len() * i / 16;
            let cut = tmp.path().join(format!("cut{i}_{name}"));
            std::fs::write(&cut, &good[..at]).unwrap();
            let err = format!("{:#}", read_rgb8(&cut).unwrap_err());
            assert!(
                !err.contains('\n') && err.contains("image "),
                "{name} cut at {at}: {err}"
            );
            let mut flipped = good.clone();
            flipped[at] ^= 0x10;
            let f = tmp.path().join(format!("flip{i}_{name}"));
            std::fs::write(&f, &flipped).unwrap();
            match read_rgb8(&f) {
                Ok((w, h, rgb)) => assert_eq!(rgb.len(), (w * h * 3) as usize, "{name} flip {at}"),
                Err(e) => assert!(!format!("{e:#}").contains('\n'), "{name} flip {at}: {e:#}"),
            }
        }
    }
    // A progressive file whose last scan is repeated 600 times: each scan is a pass over the
    // whole image, so the scan count is capped (at 500, as TurboJPEG's scan limit).
    let prog = std::fs::read(dir().join("progressive.jpg")).unwrap();
    let last_sos = prog.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    let mut many = prog[..last_sos].to_vec();
    for _ in 0..600 {
        many.extend_from_slice(&prog[last_sos..prog.len() - 2]);
    }
    many.extend_from_slice(&[0xFF, 0xD9]);
    let f = tmp.path().join("many_scans.jpg");
    std::fs::write(&f, &many).unwrap();
    let err = format!("{:#}", read_rgb8(&f).unwrap_err());
    assert!(err.contains("more than 500 scans"), "{err}");
    // A 1×1 image is a valid image (commands that need more say so themselves).
    assert_eq!(
        read_rgb8(&dir().join("one_pixel.png")).unwrap().2,
        vec![10, 20, 30]
    );
}
