//! Image preprocessing for the metrics, exactly as transformers 5.23's PIL image processors
//! (`PilBackend._preprocess`: `CLIPImageProcessorPil`, `ViTImageProcessorPil`) compute it:
//! resize on the u8 image with PIL's `Image.resize` (Pillow `libImaging/Resample.c`: separable
//! filters with support scaled by the downscale factor, 22-bit fixed-point coefficients,
//! horizontal pass then vertical, each rounded and clipped to u8), centre crop
//! (`top = (h - ch) // 2`, zero padding when the image is smaller), rescale in f64 then f32,
//! normalize `(x - mean) / std` in f32.
//!
//! Settings come from a model folder's `preprocessor_config.json` when present
//! ([`Preprocess::from_folder`]), over presets: [`Preprocess::clip`], [`Preprocess::vit`]
//! (google/vit-base-patch16-224-in21k) and [`Preprocess::dino`] (the DreamBooth evaluation
//! protocol: resize 256 bicubic, centre crop 224, ImageNet mean/std).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tch::Tensor;

pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// An 8-bit RGB image, rows of `[r, g, b]` (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        if data.len() as u64 != width as u64 * height as u64 * 3 {
            bail!(
                "RGB image {width}x{height} needs {} bytes, got {}",
                width as u64 * height as u64 * 3,
                data.len()
            );
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Reads an image file ([`crate::io::image::read_rgb8`]: PNG or JPEG, EXIF orientation
    /// applied, alpha dropped, grey replicated, 16-bit reduced).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("image {}: no such file", path.display());
        }
        let (w, h, data) = crate::io::image::read_rgb8(path)?;
        Self::new(w, h, data)
    }
}

/// PIL resampling filters (`PIL.Image.Resampling` ints in configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
    Bicubic,
}

impl Resample {
    pub fn from_pil(v: i64) -> Result<Self> {
        Ok(match v {
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            other => bail!("resample {other} is not supported (2 = bilinear, 3 = bicubic)"),
        })
    }
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }
    fn filter(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => (1.0 - x).max(0.0),
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The `size` of a processor: shortest edge (aspect kept) or an exact size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    ShortestEdge(u32),
    Exact { height: u32, width: u32 },
}

/// One image processor's settings (transformers' names).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub do_resize: bool,
    pub size: Size,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// `(height, width)`
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// `preprocessor_config.json`: every field optional, over a preset.
#[derive(Debug, Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<serde_json::Value>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<serde_json::Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<serde_json::Value>,
    image_std: Option<serde_json::Value>,
}

fn parse_size(v: &serde_json::Value, square: bool) -> Result<Size> {
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as u32);
    let size = if let Some(s) = v.as_u64() {
        // A bare int: transformers' get_size_dict(default_to_square).
        match square {
            true => Size::Exact {
                height: s as u32,
                width: s as u32,
            },
            false => Size::ShortestEdge(s as u32),
        }
    } else if let (Some(height), Some(width)) = (get("height"), get("width")) {
        Size::Exact { height, width }
    } else if let (Some(s), None) = (get("shortest_edge"), get("longest_edge")) {
        Size::ShortestEdge(s)
    } else {
        bail!("size {v}: expected {{\"shortest_edge\": N}}, {{\"height\", \"width\"}} or an int");
    };
    let max = crate::io::image::MAX_SIDE as u64;
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64());
    let raw = [
        v.as_u64(),
        get("height"),
        get("width"),
        get("shortest_edge"),
    ];
    if let Some(big) = raw.into_iter().flatten().find(|&x| x > max) {
        bail!("size {v}: {big} is more than {max} pixels");
    }
    match size {
        Size::ShortestEdge(0) | Size::Exact { height: 0, .. } | Size::Exact { width: 0, .. } => {
            bail!("size {v} must be ≥ 1")
        }
        s => Ok(s),
    }
}

fn parse_triple(v: &serde_json::Value, name: &str) -> Result<[f64; 3]> {
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let xs: Vec<f64> = serde_json::from_value(v.clone())
        .with_context(|| format!("{name}: expected a number or 3 numbers"))?;
    match xs[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => bail!("{name}: expected 3 values, got {}", xs.len()),
    }
}

impl Preprocess {
    /// `CLIPImageProcessor`'s defaults (openai/clip-vit-*): shortest edge 224 bicubic, crop 224.
    pub fn clip() -> Self {
        Self {
            do_resize: true,
            size: Size::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// `ViTImageProcessor`'s defaults (google/vit-base-patch16-224-in21k): 224×224 bilinear,
    /// mean/std 0.5, no crop.
    pub fn vit() -> Self {
        Self {
            size: Size::Exact {
                height: 224,
                width: 224,
            },
            resample: Resample::Bilinear,
            do_center_crop: false,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            ..Self::clip()
        }
    }

    /// The DreamBooth DINO protocol for a model of `image_size` (224: resize shortest edge to
    /// 256 bicubic, centre crop 224, ImageNet mean/std); the resize is `image_size · 8 / 7`.
    pub fn dino(image_size: u32) -> Self {
        Self {
            size: Size::ShortestEdge(image_size * 8 / 7),
            crop_size: (image_size, image_size),
            image_mean: IMAGENET_MEAN,
            image_std: IMAGENET_STD,
            ..Self::clip()
        }
    }

    /// Applies a `preprocessor_config.json` over `self` (the preset of its processor class).
    pub fn with_json(mut self, value: serde_json::Value) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(value)?;
        let square = matches!(self.size, Size::Exact { .. });
        if let Some(v) = raw.do_resize {
            self.do_resize = v;
        }
        if let Some(v) = &raw.size {
            self.size = parse_size(v, square).context("size")?;
        }
        if let Some(v) = raw.resample {
            self.resample = Resample::from_pil(v)?;
        }
        if let Some(v) = raw.do_center_crop {
            self.do_center_crop = v;
        }
        if let Some(v) = &raw.crop_size {
            self.crop_size = match parse_size(v, true).context("crop_size")? {
                Size::Exact { height, width } => (height, width),
                Size::ShortestEdge(_) => bail!("crop_size {v}: expected height and width"),
            };
        }
        if let Some(v) = raw.do_rescale {
            self.do_rescale = v;
        }
        if let Some(v) = raw.rescale_factor {
            self.rescale_factor = v;
        }
        if let Some(v) = raw.do_normalize {
            self.do_normalize = v;
        }
        if let Some(v) = &raw.image_mean {
            self.image_mean = parse_triple(v, "image_mean")?;
        }
        if let Some(v) = &raw.image_std {
            self.image_std = parse_triple(v, "image_std")?;
            if self.image_std.contains(&0.0) {
                bail!("image_std must not be 0");
            }
        }
        Ok(self)
    }

    /// `dir/preprocessor_config.json` over `self` when the file exists, else `self`.
    pub fn from_folder(self, dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(self);
        }
        let value = crate::io::folder::read_json(&path)?;
        self.with_json(value)
            .with_context(|| format!("{}", path.display()))
    }

    /// Resize and centre crop on the u8 image (what PIL and numpy produce before rescaling).
    pub fn resize_crop(&self, img: &RgbImage) -> RgbImage {
        let mut img = img.clone();
        if self.do_resize {
            let (h, w) = match self.size {
                Size::Exact { height, width } => (height, width),
                Size::ShortestEdge(s) => {
                    // get_resize_output_image_size(default_to_square=False)
                    let (short, long) = (img.width.min(img.height), img.width.max(img.height));
                    let new_long = (s as f64 * long as f64 / short as f64) as u32;
                    match img.width <= img.height {
                        true => (new_long, s),
                        false => (s, new_long),
                    }
                }
            };
            img = resize(&img, w, h, self.resample);
        }
        if self.do_center_crop {
            img = center_crop(&img, self.crop_size.0, self.crop_size.1);
        }
        img
    }

    /// `pixel_values` `[3, H, W]` f32 of one image.
    pub fn pixel_values(&self, img: &RgbImage) -> Tensor {
        let img = self.resize_crop(img);
        let (w, h) = (img.width as usize, img.height as usize);
        let mut out = vec![0f32; 3 * w * h];
        for c in 0..3 {
            let (mean, std) = (self.image_mean[c] as f32, self.image_std[c] as f32);
            for i in 0..w * h {
                let v = img.data[i * 3 + c];
                // np_rescale: float64 multiply, then float32
                let mut x = match self.do_rescale {
                    true => (v as f64 * self.rescale_factor) as f32,
                    false => v as f32,
                };
                if self.do_normalize {
                    x = (x - mean) / std;
                }
                out[c * w * h + i] = x;
            }
        }
        // [3 · H · W] → [3, H, W]
        Tensor::from_slice(&out).view([3, h as i64, w as i64])
    }

    /// `[B, 3, H, W]` of several images (all resize to the same size when cropping).
    pub fn batch(&self, imgs: &[RgbImage]) -> Result<Tensor> {
        let px: Vec<Tensor> = imgs.iter().map(|i| self.pixel_values(i)).collect();
        if px.windows(2).any(|p| p[0].size() != p[1].size()) {
            bail!("images preprocess to different sizes; use a centre crop or an exact size");
        }
        Ok(Tensor::stack(&px, 0))
    }
}

/// numpy's centre crop (`top = (h - ch) // 2`), zero padding where the image is smaller.
pub fn center_crop(img: &RgbImage, ch: u32, cw: u32) -> RgbImage {
    let (h, w) = (img.height as i64, img.width as i64);
    let top = (h - ch as i64).div_euclid(2);
    let left = (w - cw as i64).div_euclid(2);
    let mut data = vec![0u8; ch as usize * cw as usize * 3];
    for y in 0..ch as i64 {
        let sy = y + top;
        if !(0..h).contains(&sy) {
            continue;
        }
        for x in 0..cw as i64 {
            let sx = x + left;
            if (0..w).contains(&sx) {
                let (o, s) = (
                    ((y * cw as i64 + x) * 3) as usize,
                    ((sy * w + sx) * 3) as usize,
                );
                data[o..o + 3].copy_from_slice(&img.data[s..s + 3]);
            }
        }
    }
    RgbImage {
        width: cw,
        height: ch,
        data,
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index and the fixed-point weights.
fn coeffs(in_size: u32, out_size: u32, filter: Resample) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let w: Vec<f64> = (0..xmax.max(0))
                .map(|x| filter.filter((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if ww != 0.0 { v / ww } else { v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    match v < 0.0 {
                        true => (-0.5 + f) as i32,
                        false => (0.5 + f) as i32,
                    }
                })
                .collect();
            (xmin as usize, k)
        })
        .collect()
}

fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize((width, height), resample)` of an RGB u8 image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let (w0, h0) = (img.width as usize, img.height as usize);
    let mut cur = img.data.clone();
    let mut cur_w = w0;
    let half = 1i32 << (PRECISION_BITS - 1);
    if width != img.width {
        let kx = coeffs(img.width, width, filter);
        let w = width as usize;
        let mut out = vec![0u8; w * h0 * 3];
        for y in 0..h0 {
            let row = &cur[y * w0 * 3..(y + 1) * w0 * 3];
            for (xx, (xmin, k)) in kx.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = half;
                    for (i, &kv) in k.iter().enumerate() {
                        ss = ss.wrapping_add(row[(xmin + i) * 3 + c] as i32 * kv);
                    }
                    out[(y * w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = out;
        cur_w = w;
    }
    if height != img.height {
        let ky = coeffs(img.height, height, filter);
        let mut out = vec![0u8; cur_w * height as usize * 3];
        for (yy, (ymin, k)) in ky.iter().enumerate() {
            for x in 0..cur_w * 3 {
                let mut ss = half;
                for (i, &kv) in k.iter().enumerate() {
                    ss = ss.wrapping_add(cur[(ymin + i) * cur_w * 3 + x] as i32 * kv);
                }
                out[yy * cur_w * 3 + x] = clip8(ss);
            }
        }
        cur = out;
    }
    RgbImage {
        width,
        height,
        data: cur,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant() {
        let img = RgbImage::new(5, 3, (0..45).map(|i| i as u8 * 5).collect()).unwrap();
        assert_eq!(resize(&img, 5, 3, Resample::Bicubic), img);
        let flat = RgbImage::new(7, 9, vec![200; 7 * 9 * 3]).unwrap();
        for f in [Resample::Bilinear, Resample::Bicubic] {
            let r = resize(&flat, 3, 20, f);
            assert!(r.data.iter().all(|&v| v == 200));
        }
        let c = center_crop(&img, 5, 2);
        assert_eq!(c.data[..3], [0, 0, 0]);
        assert!(Resample::from_pil(1).is_err());
        let cfg = Preprocess::clip()
            .with_json(
                serde_json::json!({"size": {"shortest_edge": 64}, "crop_size": 64, "resample": 2}),
            )
            .unwrap();
        assert_eq!(cfg.size, Size::ShortestEdge(64));
        assert_eq!(cfg.crop_size, (64, 64));
        assert_eq!(cfg.resample, Resample::Bilinear);
        assert!(Preprocess::clip()
            .with_json(serde_json::json!({"resample": 0}))
            .is_err());
    }
}
