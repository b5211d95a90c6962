//! JPEG decoding exactly as the metrics' reference reads JPEG: Pillow's `Image.open(p)` +
//! `.convert("RGB")`, i.e. libjpeg-turbo with its defaults (islow integer IDCT, fancy
//! upsampling, block smoothing) and output colour space RGB / grey / CMYK by component count.
//!
//! The decoder is libjpeg-turbo's own, as MozJPEG ships it (`mozjpeg-sys`, built from source
//! with `cc`; without SIMD, whose islow IDCT, upsampling and colour conversion libjpeg-turbo
//! keeps bit-identical to the C code). Errors never reach libjpeg's default `error_exit` (which
//! calls `exit()`): ours unwinds (`resume_unwind`, so no panic message is printed) back to
//! [`decode`], which returns them as one line. Warnings are ignored as Pillow ignores them,
//! except running out of data (libjpeg's in-memory source then warns and pads), which Pillow
//! reports as a truncated file, also when only the EOI marker is missing.
use std::ffi::{c_int, c_ulong, CStr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg_sys::*;

/// A decoded JPEG as Pillow holds it before `.convert("RGB")`.
pub struct Decoded {
    pub width: u32,
    pub height: u32,
    /// RGB (3 bytes a pixel) after Pillow's `convert("RGB")`: grey replicated, CMYK through
    /// Pillow's `cmyk2rgb`.
    pub rgb: Vec<u8>,
    /// The EXIF block as Pillow's `info["exif"]` (APP1 `Exif\0\0` segments, joined), without
    /// the `Exif\0\0` prefix: what EXIF orientation is read from.
    pub exif: Option<Vec<u8>>,
}

/// Size limits, checked on the declared size before anything is decoded.
pub struct Limits {
    pub max_side: u32,
    pub max_pixels: u64,
}

/// Progressive files may hold any number of scans, each a full pass over the image (a small
/// file can so cost minutes); real encoders write ≤ ~20. Pillow has no cap; libjpeg-turbo's
/// fuzzers and TurboJPEG's `TJPARAM_SCANLIMIT` use 500.
const MAX_SCANS: c_int = 500;

/// Why a JPEG was not decoded.
#[derive(Debug)]
pub enum Error {
    /// The declared size is over [`Limits`] (checked before anything is decoded).
    TooLarge { width: u32, height: u32 },
    /// The file declares no pixels.
    Empty { width: u32, height: u32 },
    /// libjpeg's message (one line), or a kind of JPEG Pillow does not read either.
    Corrupt(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::TooLarge { width, height } => write!(f, "declares {width}×{height} pixels"),
            Error::Empty { width, height } => write!(f, "declares an empty {width}×{height} image"),
            Error::Corrupt(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

/// The unwinding payload of a libjpeg error.
struct JpegError(String);

fn message(cinfo: &mut jpeg_common_struct) -> String {
    // JMSG_LENGTH_MAX is 200 in jpeglib.h (the binding's 80-byte type is too short).
    let buf = [0u8; 200];
    // SAFETY: cinfo.err is our error manager, set before any libjpeg call; format_message
    // writes a NUL-terminated string of at most JMSG_LENGTH_MAX bytes.
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            format(cinfo, &*(buf.as_ptr() as *const [u8; 80]));
        }
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown libjpeg error".into())
}

/// libjpeg's `error_exit`: must not return; unwinds to [`decode`] (no panic hook runs).
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let msg = message(cinfo);
    resume_unwind(Box::new(JpegError(msg)));
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return; // trace messages
    }
    // SAFETY: err is set by `decode_in` before any libjpeg call.
    let code = unsafe { (*cinfo.err).msg_code };
    if code == JWRN_JPEG_EOF {
        resume_unwind(Box::new(JpegError(
            "premature end of JPEG file".to_string(),
        )));
    }
}

unsafe extern "C-unwind" fn output_message(_cinfo: &mut jpeg_common_struct) {}

unsafe extern "C-unwind" fn progress(cinfo: &mut jpeg_common_struct) {
    if cinfo.is_decompressor != 0 {
        // SAFETY: a decompressor's common struct is the first field of jpeg_decompress_struct.
        let scans = unsafe {
            (*(cinfo as *mut jpeg_common_struct as *const jpeg_decompress_struct)).input_scan_number
        };
        if scans > MAX_SCANS {
            resume_unwind(Box::new(JpegError(format!(
                "more than {MAX_SCANS} scans in a progressive JPEG"
            ))));
        }
    }
}

/// Owns the libjpeg objects; destroying them is valid in any state, also after an error.
struct Decompressor {
    cinfo: jpeg_decompress_struct,
    err: jpeg_error_mgr,
    progress: jpeg_progress_mgr,
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by jpeg_create_decompress in `decode`; destroy frees its pools.
        unsafe { jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

/// Decodes a JPEG held in memory. Errors are one line (libjpeg's message).
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Decoded, Error> {
    // Boxed: libjpeg keeps pointers to the error and progress managers.
    // SAFETY: all-zero is the state jpeg_std_error / jpeg_create_decompress expect to fill.
    let mut d: Box<Decompressor> = Box::new(unsafe { std::mem::zeroed() });
    let run = catch_unwind(AssertUnwindSafe(|| unsafe {
        decode_in(&mut d, bytes, limits)
    }));
    match run {
        Ok(r) => r,
        Err(payload) => match payload.downcast::<JpegError>() {
            Ok(e) => Err(Error::Corrupt(e.0)),
            Err(other) => resume_unwind(other),
        },
    }
}

/// The decode proper; libjpeg errors unwind out of it.
///
/// # Safety
/// `d` is all-zero on entry and boxed (libjpeg keeps pointers into it).
unsafe fn decode_in(d: &mut Decompressor, bytes: &[u8], limits: &Limits) -> Result<Decoded, Error> {
    d.cinfo.common.err = jpeg_std_error(&mut d.err);
    d.err.error_exit = Some(error_exit);
    d.err.emit_message = Some(emit_message);
    d.err.output_message = Some(output_message);
    jpeg_create_decompress(&mut d.cinfo);
    d.progress.progress_monitor = Some(progress);
    d.cinfo.common.progress = &mut d.progress;
    let cinfo = &mut d.cinfo;
    jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
    jpeg_save_markers(cinfo, 0xE1, 0xFFFF);
    jpeg_read_header(cinfo, 1);
    let (w, h) = (cinfo.image_width, cinfo.image_height);
    if w == 0 || h == 0 {
        return Err(Error::Empty {
            width: w,
            height: h,
        });
    }
    if w > limits.max_side || h > limits.max_side || (w as u64) * (h as u64) > limits.max_pixels {
        return Err(Error::TooLarge {
            width: w,
            height: h,
        });
    }
    // Pillow: 1 layer → "L", 3 → "RGB", 4 → "CMYK" (rawmode "CMYK;I"), others refused.
    let components = cinfo.num_components;
    cinfo.out_color_space = match components {
        1 => J_COLOR_SPACE::JCS_GRAYSCALE,
        3 => J_COLOR_SPACE::JCS_RGB,
        4 => J_COLOR_SPACE::JCS_CMYK,
        n => {
            return Err(Error::Corrupt(format!(
                "cannot handle {n}-component JPEG images"
            )))
        }
    };
    // libjpeg's defaults, which Pillow keeps outside draft mode; set explicitly.
    cinfo.dct_method = J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    cinfo.do_block_smoothing = 1;
    cinfo.scale_num = 1;
    cinfo.scale_denom = 1;
    jpeg_start_decompress(cinfo);
    let (ow, oh) = (cinfo.output_width, cinfo.output_height);
    let nc = cinfo.output_components as usize;
    if (ow, oh) != (w, h) || nc != components as usize {
        return Err(Error::Corrupt(format!(
            "unexpected output geometry {ow}×{oh}×{nc}"
        )));
    }
    let stride = w as usize * nc;
    // Grown as rows arrive: a short file claiming a large size fails before a large allocation.
    let mut raw: Vec<u8> = Vec::new();
    while cinfo.output_scanline < oh {
        let at = raw.len();
        raw.resize(at + stride, 0);
        let mut row = raw[at..].as_mut_ptr();
        if jpeg_read_scanlines(cinfo, &mut row, 1) != 1 {
            return Err(Error::Corrupt("the decoder returned no scanline".into()));
        }
    }
    let exif = exif_block(cinfo);
    jpeg_finish_decompress(&mut d.cinfo);
    let rgb = match nc {
        1 => raw.iter().flat_map(|&g| [g, g, g]).collect(),
        3 => raw,
        _ => raw.chunks_exact(4).flat_map(inverted_cmyk_to_rgb).collect(),
    };
    Ok(Decoded {
        width: w,
        height: h,
        rgb,
        exif,
    })
}

/// Pillow's `info["exif"]`: the first APP1 `Exif\0\0` segment, later ones appended without
/// their prefix. Returned without the first prefix (the TIFF block).
unsafe fn exif_block(cinfo: &jpeg_decompress_struct) -> Option<Vec<u8>> {
    let mut exif: Option<Vec<u8>> = None;
    let mut m = cinfo.marker_list;
    while !m.is_null() {
        let marker = &*m;
        if marker.marker == 0xE1 && !marker.data.is_null() {
            let data = std::slice::from_raw_parts(marker.data, marker.data_length as usize);
            if let Some(tiff) = data.strip_prefix(b"Exif\0\0") {
                exif.get_or_insert_with(Vec::new).extend_from_slice(tiff);
            }
        }
        m = marker.next;
    }
    exif
}

/// One pixel of libjpeg's CMYK output to RGB as Pillow does it: rawmode `CMYK;I` stores
/// `255 − v` (Adobe's inverted convention), then Convert.c `cmyk2rgb`:
/// `nk = 255 − K; out = CLIP8(nk − MULDIV255(C, nk))` with
/// `MULDIV255(a, b) = ((a·b + 128) >> 8 + a·b + 128) >> 8`.
pub fn inverted_cmyk_to_rgb(raw: &[u8]) -> [u8; 3] {
    let [c, m, y, k] = [raw[0], raw[1], raw[2], raw[3]].map(|v| 255 - v as i32);
    let nk = 255 - k;
    let ch = |v: i32| {
        let t = v * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    };
    [ch(c), ch(m), ch(y)]
}
