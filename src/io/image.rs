//! Image output: diffusers' `numpy_to_pil` — `(x/2+0.5).clamp(0,1)`, `round(x·255)` → u8.
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
