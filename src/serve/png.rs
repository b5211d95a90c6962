//! Result images as PNG bytes carrying their generation parameters in an iTXt chunk keyed
//! `parameters` (the key AUTOMATIC1111 uses; iTXt so non-Latin-1 prompts survive), pixels as
//! [`crate::io::image::write_png`] writes them (8-bit RGB).
use anyhow::{Context, Result};

/// Encodes RGB8 (`width × height`) with the given text chunks.
pub fn encode_png(width: u32, height: u32, rgb: &[u8], texts: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in texts {
            enc.add_itxt_chunk(k.to_string(), v.to_string())
                .context("PNG text chunk")?;
        }
        let mut writer = enc.write_header().context("PNG header")?;
        writer.write_image_data(rgb).context("PNG data")?;
    }
    Ok(buf)
}

/// The text of chunk `key` of a PNG (tEXt, zTXt or iTXt), if any.
pub fn read_text(png_bytes: &[u8], key: &str) -> Option<String> {
    let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = dec.read_info().ok()?;
    let info = reader.info();
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == key) {
        return t.get_text().ok();
    }
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
    {
        return Some(t.text.clone());
    }
    info.compressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
        .and_then(|t| t.get_text().ok())
}
