//! Images in and out. Output: diffusers' `numpy_to_pil` — `(x/2+0.5).clamp(0,1)`,
//! `round(x·255)` → u8. Input: images as users have them (PNG 8/16-bit, grey, RGBA, JPEG incl.
//! grey and CMYK, EXIF orientation applied), with size limits checked before decoding. JPEG is
//! decoded by libjpeg-turbo configured as Pillow uses it ([`crate::io::jpeg`]), so its pixels
//! are the reference's bit for bit; PNG by the `png` crate through `image`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// `[3, H, W]` in [-1, 1] → RGB bytes (HWC), exactly as diffusers rounds.
pub fn to_rgb8(image: &Tensor) -> Result<(u32, u32, Vec<u8>)> {
    let size = image.size();
    if size.len() != 3 || size[0] != 3 {
        bail!("expected a [3, H, W] image, got {size:?}");
    }
    let (h, w) = (size[1], size[2]);
    // diffusers: (image / 2 + 0.5).clamp(0, 1) in the model dtype, then numpy
    // (images * 255).round().astype("uint8") in float32.
    let x = (image.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0);
    // [3, H, W] → [H, W, 3]
    let x = (x.permute([1, 2, 0]) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .contiguous();
    let mut bytes = vec![0u8; (h * w * 3) as usize];
    let n = bytes.len();
    x.copy_data_u8(&mut bytes, n);
    Ok((w as u32, h as u32, bytes))
}

/// Encodes RGB8 as PNG and writes it atomically.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<()> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("PNG header")?;
        writer.write_image_data(rgb).context("PNG data")?;
    }
    crate::util::write_atomic(path, &buf)
}

/// Reads an 8-bit RGB(A) PNG into RGB bytes (used by tests and tools).
pub fn read_png_rgb8(path: &Path) -> Result<(u32, u32, Vec<u8>)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
    let mut buf = vec![0u8; reader.output_buffer_size().context("PNG too large")?];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: corrupt PNG", path.display()))?;
    let (w, h) = (info.width, info.height);
    let px = (w * h) as usize;
    let rgb = match info.color_type {
        png::ColorType::Rgb => buf[..px * 3].to_vec(),
        png::ColorType::Rgba => buf[..px * 4]
            .chunks(4)
            .flat_map(|c| [c[0], c[1], c[2]])
            .collect(),
        png::ColorType::Grayscale => buf[..px].iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => buf[..px * 2]
            .chunks(2)
            .flat_map(|c| [c[0], c[0], c[0]])
            .collect(),
        png::ColorType::Indexed => bail!("{}: unexpected indexed PNG", path.display()),
    };
    Ok((w, h, rgb))
}

/// Largest side and pixel count loracast decodes; a larger declared size is refused before any
/// pixel is decoded (decompression bombs).
pub const MAX_SIDE: u32 = 16_384;
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Decodes an image file to RGB8 (HWC) like `PIL.Image.open(p)` + EXIF transpose +
/// `.convert("RGB")`: alpha is dropped, grey is replicated, 16-bit is reduced to 8-bit.
pub fn read_rgb8(path: &Path) -> Result<(u32, u32, Vec<u8>)> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {shown}"))?;
    decode_rgb8(&bytes, &shown.to_string())
}

/// [`read_rgb8`] on the bytes of an image file; `shown` names it in messages.
pub fn decode_rgb8(bytes: &[u8], shown: &str) -> Result<(u32, u32, Vec<u8>)> {
    if bytes.is_empty() {
        bail!("image {shown}: the file is empty");
    }
    let too_large = |w: u32, h: u32| {
        anyhow::anyhow!("image {shown}: declares {w}×{h} pixels, more than loracast decodes ({MAX_SIDE} per side, {MAX_PIXELS} in all)")
    };
    // Pillow's JPEG signature: SOI followed by a marker.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        let limits = crate::io::jpeg::Limits {
            max_side: MAX_SIDE,
            max_pixels: MAX_PIXELS,
        };
        let jpeg = crate::io::jpeg::decode(bytes, &limits).map_err(|e| match e {
            crate::io::jpeg::Error::TooLarge { width, height } => too_large(width, height),
            crate::io::jpeg::Error::Empty { .. } => anyhow::anyhow!("image {shown}: {e}"),
            crate::io::jpeg::Error::Corrupt(msg) => {
                anyhow::anyhow!("image {shown}: cannot decode ({msg}); truncated or corrupted?")
            }
        })?;
        let orientation = jpeg
            .exif
            .as_deref()
            .and_then(image::metadata::Orientation::from_exif_chunk)
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        let (w, h) = (jpeg.width, jpeg.height);
        let rgb = image::RgbImage::from_raw(w, h, jpeg.rgb)
            .with_context(|| format!("image {shown}: decoded buffer does not match {w}×{h}"))?;
        let mut img = image::DynamicImage::ImageRgb8(rgb);
        img.apply_orientation(orientation);
        let rgb = img.into_rgb8();
        return Ok((rgb.width(), rgb.height(), rgb.into_raw()));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("cannot read image {shown}"))?;
    if reader.format() != Some(image::ImageFormat::Png) {
        bail!("image {shown}: not an image loracast can read (PNG or JPEG)");
    }
    // Decoder messages can span lines: keep the one-line contract.
    let broken = |e: image::ImageError| {
        let msg = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        anyhow::anyhow!("image {shown}: cannot decode ({msg}); truncated or corrupted?")
    };
    let mut decoder = reader.into_decoder().map_err(broken)?;
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    if w > MAX_SIDE || h > MAX_SIDE || (w as u64) * (h as u64) > MAX_PIXELS {
        return Err(too_large(w, h));
    }
    if w == 0 || h == 0 {
        bail!("image {shown}: declares an empty {w}×{h} image");
    }
    let orientation = image::ImageDecoder::orientation(&mut decoder)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(broken)?;
    img.apply_orientation(orientation);
    let rgb = img.to_rgb8();
    Ok((rgb.width(), rgb.height(), rgb.into_raw()))
}
