//! The toy world's renderer: `(identity, context, jitter) → 32×32 RGB`, 4×4 supersampled and
//! box-filtered (SPEC §6). Deterministic bit for bit on any machine: only IEEE-exact float
//! operations (+ − × ÷, sqrt, floor, round; sin/cos of the small jitter angle by a fixed
//! polynomial, never libm).
//!
//! Layout, in the body frame (rotated by the jitter): the body stands on a ground line near the
//! bottom edge (small = 16.5 px tall, large = 22 px); eyes sit in a row where the shape is wide
//! enough for three (upper body; lower middle for the triangle), snapped to pixel centres so
//! each pupil is one crisp dark pixel in a 3×3 white eye, each in a thin halo of plain body
//! colour so a white/black pattern never merges with the eye; the pattern fills the rest of the
//! body; the hat sits on the top of the body; the scarf is a thin band that sticks out 1 px on
//! both sides, placed where it hides the least pattern and never the eyes (below the eyes; on
//! the upper cone for the triangle).
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use tch::Tensor;

use super::world::{
    Accessory, Background, BodyColor, Context, Identity, Jitter, Pattern, PatternColor, Position,
    Shape, Size,
};

/// Image side in pixels.
pub const IMAGE_SIZE: usize = 32;
/// Subsamples per pixel side (4×4 box filter).
const SUB: usize = 4;

type Rgb = [f32; 3];

/// Palette RGB of each body colour.
pub fn body_rgb(c: BodyColor) -> Rgb {
    match c {
        BodyColor::Red => [215.0, 45.0, 45.0],
        BodyColor::Orange => [245.0, 135.0, 25.0],
        BodyColor::Yellow => [240.0, 210.0, 35.0],
        BodyColor::Green => [45.0, 165.0, 65.0],
        BodyColor::Blue => [45.0, 95.0, 215.0],
        BodyColor::Purple => [145.0, 60.0, 190.0],
    }
}

/// Palette RGB of each pattern colour.
pub fn pattern_rgb(c: PatternColor) -> Rgb {
    match c {
        PatternColor::White => [250.0, 250.0, 250.0],
        PatternColor::Black => [25.0, 25.0, 25.0],
        PatternColor::Pink => [255.0, 150.0, 205.0],
        PatternColor::Cyan => [60.0, 225.0, 235.0],
    }
}

/// Palette RGB of each background.
pub fn background_rgb(b: Background) -> Rgb {
    match b {
        Background::Stone => [150.0, 150.0, 150.0],
        Background::Sky => [140.0, 195.0, 240.0],
        Background::Grass => [145.0, 205.0, 115.0],
        Background::Sand => [225.0, 200.0, 140.0],
        Background::Dusk => [195.0, 170.0, 230.0],
        Background::Night => [25.0, 30.0, 80.0],
    }
}

/// Eye white, pupil, and the hat/scarf colour (a brown no other part uses).
pub const EYE_WHITE_RGB: Rgb = [255.0, 255.0, 255.0];
pub const PUPIL_RGB: Rgb = [10.0, 10.0, 10.0];
pub const ACCESSORY_RGB: Rgb = [140.0, 85.0, 35.0];

/// Body height `s` in pixels for a size.
pub fn body_size(size: Size) -> f32 {
    match size {
        Size::Small => 16.5,
        Size::Large => 22.0,
    }
}

/// Body centre x in pixels (left/right leave the widest shape ~1 px from the edge).
pub fn body_center_x(position: Position, size: Size) -> f32 {
    let dx = match size {
        Size::Small => 5.5,
        Size::Large => 4.5,
    };
    let c = IMAGE_SIZE as f32 / 2.0;
    match position {
        Position::Left => c - dx,
        Position::Center => c,
        Position::Right => c + dx,
    }
}

/// The y of the ground line the body stands on.
const GROUND_Y: f32 = 31.0;

/// Per shape: width and height factors (× body size), the eye row and the scarf line in
/// normalized body coordinates (b = −1 top, +1 bottom), chosen so eyes and pattern fit.
fn shape_geometry(shape: Shape) -> (f32, f32, f32, f32) {
    match shape {
        Shape::Circle => (1.0, 1.0, -0.42, 0.05),
        Shape::Square => (0.88, 0.88, -0.5, 0.08),
        Shape::Triangle => (1.1, 1.0, 0.3, -0.5),
        Shape::Diamond => (1.12, 1.06, -0.15, 0.62),
    }
}

/// Is the normalized body point (a, b) ∈ [−1, 1]² inside the shape?
fn inside(shape: Shape, a: f32, b: f32) -> bool {
    match shape {
        Shape::Circle => a * a + b * b <= 1.0,
        Shape::Square => a.abs() <= 1.0 && b.abs() <= 1.0,
        Shape::Triangle => b <= 1.0 && a.abs() * 2.0 <= b + 1.0,
        Shape::Diamond => a.abs() + b.abs() <= 1.0,
    }
}

/// Normalized half-width of the shape at height b.
fn half_width(shape: Shape, b: f32) -> f32 {
    match shape {
        Shape::Circle => (1.0 - b * b).max(0.0).sqrt(),
        Shape::Square => 1.0,
        Shape::Triangle => (b + 1.0) / 2.0,
        Shape::Diamond => 1.0 - b.abs(),
    }
}

/// sin and cos by Taylor polynomials (|θ| ≤ 0.2: error < 1e-9), so no libm is involved.
fn sin_cos(t: f32) -> (f32, f32) {
    let t2 = t * t;
    let sin = t * (1.0 - t2 / 6.0 * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0)));
    let cos = 1.0 - t2 / 2.0 * (1.0 - t2 / 12.0 * (1.0 - t2 / 30.0));
    (sin, cos)
}

fn frac(x: f32) -> f32 {
    x - x.floor()
}

fn add(a: Rgb, b: Rgb) -> Rgb {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

/// Everything `color_at` needs, precomputed once per render.
struct Scene {
    shape: Shape,
    pattern: Pattern,
    cx: f32,
    cy: f32,
    sin: f32,
    cos: f32,
    inv_w2: f32,
    inv_h2: f32,
    /// Eye centres in image pixels, snapped to pixel centres so each pupil is a crisp dark
    /// pixel whatever the jitter.
    eyes: [(f32, f32); 3],
    n_eyes: usize,
    eye_r2: f32,
    pupil_r2: f32,
    halo_r2: f32,
    /// Scarf band: centre v, half thickness, half width (u).
    scarf: Option<(f32, f32, f32)>,
    /// Hat: brim (v0, v1, half width) and crown (v0, v1, half width).
    hat: Option<[(f32, f32, f32); 2]>,
    size: f32,
    phase: [f32; 2],
    body: Rgb,
    pattern_rgb: Rgb,
    background: Rgb,
}

impl Scene {
    fn new(id: &Identity, ctx: &Context, j: &Jitter) -> Scene {
        let (wf, hf, eye_b, scarf_b) = shape_geometry(id.shape);
        let s = body_size(ctx.size) * j.scale;
        let (w2, h2) = (s * wf * j.aspect / 2.0, s * hf / 2.0);
        let cx = body_center_x(ctx.position, ctx.size) + j.offset[0];
        let cy = GROUND_Y - h2 + j.offset[1];
        let (sin, cos) = sin_cos(j.rotation);

        let eye_r = (0.105 * s).max(1.5);
        let spacing = (2.25 * eye_r).round().max(4.0);
        let n_eyes = id.eyes.count();
        let mut eyes = [(0.0, 0.0); 3];
        for (i, e) in eyes.iter_mut().enumerate().take(n_eyes) {
            let (u, v) = ((i as f32 - (n_eyes - 1) as f32 / 2.0) * spacing, eye_b * h2);
            // body frame → image, then snap to the pixel centre
            let (x, y) = (cx + u * cos - v * sin, cy + u * sin + v * cos);
            *e = (x.floor() + 0.5, y.floor() + 0.5);
        }
        let halo = eye_r + 0.6;
        let pupil = (0.45 * eye_r).max(0.78);

        let scarf = (ctx.accessory == Accessory::Scarf).then(|| {
            let half_t = (0.065 * s).max(0.9);
            (
                scarf_b * h2,
                half_t,
                half_width(id.shape, scarf_b) * w2 + 1.0,
            )
        });
        let hat = (ctx.accessory == Accessory::Hat).then(|| {
            let top = -h2 + 0.3; // sits 0.3 px into the body top
            let brim_t = (0.08 * s).max(1.2);
            // As tall as the room above the body allows (large diamonds nearly touch the top).
            let room = cy - h2 - 0.6;
            let crown_h = (0.32 * s).min(4.6).min(room - brim_t).max(2.0);
            [
                (top - brim_t, top, 0.42 * s),
                (top - brim_t - crown_h, top - brim_t, 0.26 * s),
            ]
        });
        let jitter_rgb = |c: Rgb, d: [f32; 3]| add(c, d).map(|x| x.clamp(0.0, 255.0));
        Scene {
            shape: id.shape,
            pattern: id.pattern,
            cx,
            cy,
            sin,
            cos,
            inv_w2: 1.0 / w2,
            inv_h2: 1.0 / h2,
            eyes,
            n_eyes,
            eye_r2: eye_r * eye_r,
            pupil_r2: pupil * pupil,
            halo_r2: halo * halo,
            scarf,
            hat,
            size: s,
            phase: j.phase,
            body: jitter_rgb(body_rgb(id.body_color), j.body_rgb),
            pattern_rgb: jitter_rgb(pattern_rgb(id.pattern_color), j.pattern_rgb),
            background: jitter_rgb(background_rgb(ctx.background), j.background_rgb),
        }
    }

    /// Is body-frame point (u, v) (pixels) on the pattern? Scales are fractions of the body
    /// size, chosen so the three patterns differ at 32 px: thin diagonal stripes (50% cover),
    /// sparse round dots (~23%), big checker squares (50%).
    fn on_pattern(&self, u: f32, v: f32) -> bool {
        let (ph, s) = (self.phase, self.size);
        match self.pattern {
            Pattern::Stripes => {
                let t = (u + v) * std::f32::consts::FRAC_1_SQRT_2 / (0.26 * s);
                frac(t + ph[0]) < 0.5
            }
            // Round dots on a staggered (hexagonal) grid, so every strip of the body gets some.
            Pattern::Dots => {
                let p = 0.3 * s;
                let row = v / (0.866 * p) + ph[1];
                let odd = frac(row.floor() * 0.5) * 2.0; // 0 or 1
                let fx = frac(u / p + ph[0] + 0.5 * odd) - 0.5;
                let fy = (frac(row) - 0.5) * 0.866;
                fx * fx + fy * fy <= 0.3 * 0.3
            }
            Pattern::Checker => {
                let (x, y) = (u / (0.22 * s), v / (0.22 * s));
                let parity = (x + ph[0]).floor() + (y + ph[1]).floor();
                frac(parity * 0.5) < 0.25
            }
        }
    }

    fn color_at(&self, x: f32, y: f32) -> Rgb {
        let (dx, dy) = (x - self.cx, y - self.cy);
        // image → body frame (rotation by −θ)
        let u = dx * self.cos + dy * self.sin;
        let v = dy * self.cos - dx * self.sin;
        let mut near_eye = false;
        for &(ex, ey) in &self.eyes[..self.n_eyes] {
            let d2 = (x - ex) * (x - ex) + (y - ey) * (y - ey);
            if d2 <= self.pupil_r2 {
                return PUPIL_RGB;
            }
            if d2 <= self.eye_r2 {
                return EYE_WHITE_RGB;
            }
            near_eye |= d2 <= self.halo_r2;
        }
        if let Some((sv, half_t, half_w)) = self.scarf {
            if (v - sv).abs() <= half_t && u.abs() <= half_w {
                return ACCESSORY_RGB;
            }
        }
        if inside(self.shape, u * self.inv_w2, v * self.inv_h2) {
            return if !near_eye && self.on_pattern(u, v) {
                self.pattern_rgb
            } else {
                self.body
            };
        }
        if let Some(parts) = &self.hat {
            for &(v0, v1, half_w) in parts {
                if v >= v0 && v <= v1 && u.abs() <= half_w {
                    return ACCESSORY_RGB;
                }
            }
        }
        self.background
    }
}

/// An RGB8 image, rows top to bottom, HWC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// `[3, H, W]` f32 in [-1, 1] (x/127.5 − 1; inverse of `io::image::to_rgb8`).
    pub fn to_tensor(&self) -> Tensor {
        images_to_tensor(std::slice::from_ref(self)).squeeze_dim(0)
    }

    /// PNG bytes.
    pub fn png_bytes(&self) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let mut enc = png::Encoder::new(&mut buf, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("PNG header")?;
        writer.write_image_data(&self.rgb).context("PNG data")?;
        writer.finish().context("PNG end")?;
        Ok(buf)
    }

    /// Writes a PNG atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        crate::io::image::write_png(path, self.width as u32, self.height as u32, &self.rgb)
    }
}

/// Renders one subject in one context.
pub fn render(identity: &Identity, context: &Context, jitter: &Jitter) -> Image {
    let scene = Scene::new(identity, context, jitter);
    let n = IMAGE_SIZE;
    let mut rgb = vec![0u8; n * n * 3];
    let step = 1.0 / SUB as f32;
    let norm = 1.0 / (SUB * SUB) as f32;
    for py in 0..n {
        for px in 0..n {
            let mut acc = [0f32; 3];
            for sy in 0..SUB {
                let y = py as f32 + (sy as f32 + 0.5) * step;
                for sx in 0..SUB {
                    let x = px as f32 + (sx as f32 + 0.5) * step;
                    acc = add(acc, scene.color_at(x, y));
                }
            }
            let i = (py * n + px) * 3;
            for c in 0..3 {
                rgb[i + c] = (acc[c] * norm).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Image {
        width: n,
        height: n,
        rgb,
    }
}

/// Images of one size → `[B, 3, H, W]` f32 in [-1, 1].
pub fn images_to_tensor(images: &[Image]) -> Tensor {
    let (w, h) = images.first().map_or((0, 0), |im| (im.width, im.height));
    let plane = w * h;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (b, im) in images.iter().enumerate() {
        assert_eq!((im.width, im.height), (w, h), "images of different sizes");
        let out = &mut data[b * 3 * plane..(b + 1) * 3 * plane];
        // HWC u8 → CHW f32
        for (p, px) in im.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = px[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Tensor::from_slice(&data).view([images.len() as i64, 3, h as i64, w as i64])
}

/// A grid of images (row-major, `cols` per row), each upscaled `scale`× by nearest neighbour,
/// separated by `gap` pixels of dark gray.
pub fn contact_sheet(images: &[Image], cols: usize, scale: usize, gap: usize) -> Result<Image> {
    let Some(first) = images.first() else {
        bail!("contact sheet: no images");
    };
    if cols == 0 || scale == 0 {
        bail!("contact sheet: cols and scale must be ≥ 1");
    }
    let (tw, th) = (first.width * scale, first.height * scale);
    let rows = images.len().div_ceil(cols);
    let (w, h) = (cols * tw + (cols + 1) * gap, rows * th + (rows + 1) * gap);
    let mut rgb = vec![40u8; w * h * 3];
    for (k, im) in images.iter().enumerate() {
        if (im.width, im.height) != (first.width, first.height) {
            bail!("contact sheet: images of different sizes");
        }
        let (ox, oy) = (gap + (k % cols) * (tw + gap), gap + (k / cols) * (th + gap));
        for y in 0..th {
            for x in 0..tw {
                let src = im.pixel(x / scale, y / scale);
                let i = ((oy + y) * w + ox + x) * 3;
                rgb[i..i + 3].copy_from_slice(&src);
            }
        }
    }
    Ok(Image {
        width: w,
        height: h,
        rgb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sin_cos_matches_std() {
        for i in -20..=20 {
            let t = i as f32 * 0.01;
            let (s, c) = sin_cos(t);
            assert!(
                (s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6,
                "{t}"
            );
        }
    }
}
