//! Deterministic mutation test of every parser that reads user files (issue 14, item 4): the
//! stable-Rust companion of the `cargo fuzz` targets in `fuzz/`, through the same entry points
//! ([`loracast::fuzzing`]). For each parser, at least [`CASES`] inputs are derived from its seeds
//! (`fuzz/seeds/<target>`, made from `tests/fixtures`, and the tiny generated models) with a seeded
//! PRNG: bit flips, truncation at every 1/64 of the file, byte splices, and structure-aware
//! mutations (safetensors header-length lies, huge declared shapes, wrong and unknown dtypes,
//! duplicate keys, offsets out of range; JSON values replaced by zeros, negatives, huge numbers,
//! wrong types; invalid UTF-8). Every case must return (a clean one-line `Err`, or a load) without
//! panicking, in bounded time; peak memory stays bounded. `fuzz_regressions_replay` replays every
//! input the fuzzers ever crashed on (`tests/fixtures/fuzz_regressions/<target>/`).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loracast::fuzzing::{self, catch};
use serde_json::Value;

/// Mutated cases per parser.
const CASES: usize = 2000;
/// No single case may take longer (a declared size that is allocated before it is checked
/// would take far longer, or run out of memory).
const MAX_CASE: Duration = Duration::from_secs(5);
/// Peak resident memory of the whole test binary.
const MAX_RSS_MB: u64 = 3072;

type Check = fn(&[u8]) -> anyhow::Result<()>;

const TARGETS: [(&str, Check); 7] = [
    ("safetensors", fuzzing::check_safetensors),
    ("lora_file", fuzzing::check_lora_file),
    ("hypernet_file", fuzzing::check_hypernet_file),
    ("lora_keys", fuzzing::check_lora_key),
    ("configs", fuzzing::check_config),
    ("tokenizer", fuzzing::check_tokenizer),
    ("image", fuzzing::check_image),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// splitmix64: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn read_dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| {
                    let bytes = std::fs::read(e.path()).expect("read seed");
                    (e.file_name().to_string_lossy().into_owned(), bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The committed seeds of a target and the generated tiny-model seeds.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = read_dir_files(&root().join("fuzz/seeds").join(target));
    let generated = match target {
        "safetensors" => fuzzing::seeds::safetensors().expect("safetensors seeds"),
        "lora_file" => fuzzing::seeds::lora_files().expect("LoRA seeds"),
        "configs" => fuzzing::seeds::configs().expect("config seeds"),
        "hypernet_file" => vec![(
            "tiny".to_string(),
            fuzzing::seeds::hypernet_file().expect("hypernet seed"),
        )],
        _ => Vec::new(),
    };
    out.extend(generated);
    assert!(!out.is_empty(), "{target}: no seeds");
    out
}

/// Where the JSON of an input starts and how a structured mutation rebuilds the input.
enum Layout {
    /// Raw bytes only.
    Bytes,
    /// A safetensors file after `skip` selector bytes.
    SafeTensors { skip: usize },
    /// A JSON document after `skip` selector bytes, up to the first NUL (tokenizer parts).
    Json { skip: usize },
}

fn layout(target: &str) -> Layout {
    match target {
        "safetensors" => Layout::SafeTensors { skip: 1 },
        "lora_file" | "hypernet_file" => Layout::SafeTensors { skip: 0 },
        "configs" | "tokenizer" => Layout::Json { skip: 1 },
        _ => Layout::Bytes,
    }
}

/// Interesting replacement values for JSON leaves.
fn evil_values(rng: &mut Rng) -> Value {
    let vals = [
        Value::from(0),
        Value::from(-1),
        Value::from(1_000_000_000_000i64),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        Value::from(1.5),
        Value::from(1e300),
        Value::from("NaN"),
        Value::from("-Infinity"),
        Value::from("x"),
        Value::Null,
        Value::Bool(true),
        Value::Array(vec![]),
        Value::Array(vec![Value::from(0); 3]),
        serde_json::json!({}),
        Value::from(2),
        Value::from(3),
        Value::from(65537),
    ];
    rng.pick(&vals).clone()
}

/// Every leaf path of a JSON value (object keys and array indices).
fn leaves(v: &Value, path: &mut Vec<PathSeg>, out: &mut Vec<Vec<PathSeg>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                path.push(PathSeg::Key(k.clone()));
                out.push(path.clone());
                leaves(x, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(8) {
                path.push(PathSeg::Index(i));
                out.push(path.clone());
                leaves(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum PathSeg {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[PathSeg]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, seg| match seg {
        PathSeg::Key(k) => v.get_mut(k.as_str()),
        PathSeg::Index(i) => v.get_mut(*i),
    })
}

/// One structure-aware mutation of a JSON document: a value replaced, a key removed, a string
/// value's content mutated, or (as text) a duplicated key. `None` when the text is not JSON.
fn mutate_json(text: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(text).ok()?;
    let mut paths = Vec::new();
    leaves(&v, &mut Vec::new(), &mut paths);
    if paths.is_empty() {
        return None;
    }
    let path = rng.pick(&paths).clone();
    match rng.below(8) {
        0 => {
            // Remove the leaf from its parent.
            let (last, parent) = path.split_last()?;
            match (at(&mut v, parent)?, last) {
                (Value::Object(m), PathSeg::Key(k)) => {
                    m.remove(k);
                }
                (Value::Array(a), PathSeg::Index(i)) if *i < a.len() => {
                    a.remove(*i);
                }
                _ => {}
            }
        }
        1 => {
            // A JSON string leaf holding JSON (hypernet config, PEFT metadata): mutate inside.
            let leaf = at(&mut v, &path)?;
            if let Value::String(s) = leaf {
                if let Some(inner) = mutate_json(s.as_bytes(), rng) {
                    *s = String::from_utf8_lossy(&inner).into_owned();
                }
            } else {
                *leaf = evil_values(rng);
            }
        }
        2 => {
            // Duplicate the first key of the top-level object, textually.
            let out = serde_json::to_string(&v).ok()?;
            let first = v.as_object()?.iter().next()?;
            let dup = format!("{{{}:{},", serde_json::to_string(first.0).ok()?, first.1);
            return Some(out.replacen('{', &dup, 1).into_bytes());
        }
        _ => *at(&mut v, &path)? = evil_values(rng),
    }
    serde_json::to_vec(&v).ok()
}

/// A safetensors file rebuilt from a header (kept verbatim) and data.
fn rebuild(header: &[u8], data: &[u8], prefix: Option<u64>) -> Vec<u8> {
    let n = prefix.unwrap_or(header.len() as u64);
    [&n.to_le_bytes()[..], header, data].concat()
}

/// Structure-aware mutations of a safetensors file.
fn mutate_safetensors(file: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = file.get(8..8 + n)?;
    let data = &file[8 + n..];
    let mut h: serde_json::Map<String, Value> = serde_json::from_slice(header).ok()?;
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = rng.pick(&names).clone();
    let kind = rng.below(12);
    match kind {
        // Header-length lies.
        0 => {
            let lies = [
                n as u64 + 1,
                n as u64 - 1,
                file.len() as u64,
                1 << 60,
                u64::MAX,
                0,
                (file.len() - 8) as u64,
            ];
            return Some(rebuild(header, data, Some(*rng.pick(&lies))));
        }
        // Huge declared shapes.
        1 => {
            let shapes = [
                serde_json::json!([1_000_000_000_000u64]),
                serde_json::json!([1u64 << 32, 1u64 << 32]),
                serde_json::json!([u64::MAX]),
                serde_json::json!([0, 1u64 << 63]),
                serde_json::json!([1u64 << 40, 0]),
                serde_json::json!([-1]),
                serde_json::json!([]),
            ];
            h[&name]["shape"] = rng.pick(&shapes).clone();
        }
        // Wrong and unknown dtypes.
        2 => {
            let dtypes = [
                "Q4", "F8_E4M3", "BOOL", "I8", "", "f32", "F64", "I64", "U8", "C64", "F4",
            ];
            h[&name]["dtype"] = Value::from(*rng.pick(&dtypes));
        }
        // Offsets out of range.
        3 => {
            let len = data.len() as u64;
            let offs = [
                serde_json::json!([0, len * 2]),
                serde_json::json!([len, 0]),
                serde_json::json!([u64::MAX - 1, u64::MAX]),
                serde_json::json!([1, len]),
                serde_json::json!([0]),
                serde_json::json!("0..8"),
            ];
            h[&name]["data_offsets"] = rng.pick(&offs).clone();
        }
        // Duplicate tensor key (textual: a map cannot hold it).
        4 => {
            let text = serde_json::to_string(&h).ok()?;
            let dup = format!(
                "{{{}:{},",
                serde_json::to_string(&name).ok()?,
                h.get(&name)?
            );
            let text = text.replacen('{', &dup, 1);
            return Some(rebuild(text.as_bytes(), data, None));
        }
        // A tensor removed or renamed.
        5 => {
            let v = h.remove(&name)?;
            if rng.below(2) == 0 {
                h.insert(format!("{name}.x"), v);
            }
        }
        // Metadata (PEFT config, hypernet config) mutated as JSON or replaced.
        6 | 7 => {
            let meta = h.get_mut("__metadata__").and_then(Value::as_object_mut);
            match meta {
                Some(m) if !m.is_empty() => {
                    let keys: Vec<String> = m.keys().cloned().collect();
                    let k = rng.pick(&keys).clone();
                    let raw = m[&k].as_str().unwrap_or_default().as_bytes().to_vec();
                    m[&k] = match mutate_json(&raw, rng) {
                        Some(x) => Value::from(String::from_utf8_lossy(&x).into_owned()),
                        None => evil_values(rng),
                    };
                }
                _ => {
                    h.insert("__metadata__".into(), evil_values(rng));
                }
            }
        }
        // Data bytes flipped (NaN/Inf values, other numbers).
        8 => {
            let mut d = data.to_vec();
            if !d.is_empty() {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(d.len());
                    d[i] = *rng.pick(&[0xff, 0x7f, 0x80, 0x00]);
                }
            }
            return Some(rebuild(header, &d, None));
        }
        // Header text corrupted: invalid UTF-8 or broken JSON.
        9 => {
            let mut t = header.to_vec();
            let i = rng.below(t.len());
            t[i] = *rng.pick(&[0xff, 0xc3, b'"', b'{', b'}', b',', 0]);
            return Some(rebuild(&t, data, None));
        }
        _ => {
            let mut paths = Vec::new();
            let entry = h.get(&name)?.clone();
            leaves(&entry, &mut Vec::new(), &mut paths);
            let path = rng.pick(&paths).clone();
            let mut entry = entry;
            *at(&mut entry, &path)? = evil_values(rng);
            h.insert(name, entry);
        }
    }
    let text = serde_json::to_vec(&h).ok()?;
    Some(rebuild(&text, data, None))
}

/// A generic byte-level mutation: bit flips, a splice from another seed, a deleted or
/// duplicated range, an inserted invalid UTF-8 byte.
fn mutate_bytes(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    if b.is_empty() {
        return other.to_vec();
    }
    match rng.below(5) {
        0 | 1 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let (i, j) = (rng.below(b.len()), rng.below(other.len().max(1)));
            let len = rng.below(64).min(other.len() - j.min(other.len()));
            b.splice(i..i, other[j..j + len].iter().copied());
        }
        3 => {
            let i = rng.below(b.len());
            let len = rng.below(256).min(b.len() - i);
            if rng.below(2) == 0 {
                b.drain(i..i + len);
            } else {
                let chunk: Vec<u8> = b[i..i + len].to_vec();
                b.splice(i..i, chunk);
            }
        }
        _ => {
            let i = rng.below(b.len());
            b.insert(i, *rng.pick(&[0xff, 0xfe, 0xc0, 0x80, 0xed]));
        }
    }
    b
}

/// The deterministic cases of a target: every seed as is, truncated at every 1/64, then PRNG
/// mutations (structure-aware half of the time where the format allows) up to `CASES`.
fn cases(target: &str, seeds: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng(0x5EED ^ target.len() as u64 ^ (target.as_bytes()[0] as u64) << 32);
    let mut out = Vec::new();
    for (name, s) in seeds.iter().take(16) {
        out.push((format!("{name} as is"), s.clone()));
        for k in 0..64 {
            let cut = s.len() * k / 64;
            out.push((format!("{name} truncated at {k}/64"), s[..cut].to_vec()));
        }
    }
    let kind = layout(target);
    let want = CASES.max(out.len() + CASES * 3 / 4);
    let mut i = 0;
    while out.len() < want {
        i += 1;
        let (name, s) = rng.pick(seeds);
        let structured = rng.below(2) == 0;
        let m = match (&kind, structured) {
            (Layout::SafeTensors { skip }, true) => s
                .get(*skip..)
                .and_then(|f| mutate_safetensors(f, &mut rng))
                .map(|m| [&s[..*skip], &m[..]].concat()),
            (Layout::Json { skip }, true) => {
                let body = s.get(*skip..).unwrap_or_default();
                let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                mutate_json(&body[..end], &mut rng)
                    .map(|m| [&s[..*skip], &m[..], &body[end..]].concat())
            }
            _ => None,
        };
        let m = m.unwrap_or_else(|| {
            let (_, other) = rng.pick(seeds);
            mutate_bytes(s, other, &mut rng)
        });
        out.push((format!("{name} mutation {i}"), m));
    }
    out
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb / 1024)
}

fn run_target(target: &str) {
    tch::set_num_threads(1);
    let check = TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .expect("target")
        .1;
    let seeds = seeds(target);
    let cases = cases(target, &seeds);
    let start = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    let mut failures = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for (name, input) in &cases {
        let t = Instant::now();
        match catch(check, input) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => refused += 1,
            Err(panic) => {
                let first = panic.lines().next().unwrap_or_default().to_string();
                failures.push(format!("{name}: panicked: {first}"));
                // Kept for triage (and for tests/fixtures/fuzz_regressions once fixed).
                let dir = root().join("target/mutation-failures").join(target);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(dir.join(name.replace([' ', '/'], "_")), input);
            }
        }
        let dt = t.elapsed();
        if dt > slowest.0 {
            slowest = (dt, name.clone());
        }
        if dt > MAX_CASE {
            failures.push(format!("{name}: took {dt:?}"));
        }
    }
    let rss = peak_rss_mb().unwrap_or(0);
    eprintln!(
        "{target}: {} cases in {:.1?} ({ok} loaded, {refused} refused, {} failures), slowest {:?} ({}), peak RSS {rss} MiB",
        cases.len(),
        start.elapsed(),
        failures.len(),
        slowest.0,
        slowest.1
    );
    assert!(cases.len() >= CASES, "{target}: only {} cases", cases.len());
    assert!(ok > 0, "{target}: no case loaded (are the seeds valid?)");
    assert!(
        failures.is_empty(),
        "{target}: {} failures, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(8)]
    );
    assert!(rss <= MAX_RSS_MB, "{target}: peak RSS {rss} MiB");
}

#[test]
fn mutated_safetensors_weights() {
    run_target("safetensors");
}

#[test]
fn mutated_lora_files() {
    run_target("lora_file");
}

#[test]
fn mutated_hypernet_files() {
    run_target("hypernet_file");
}

#[test]
fn mutated_lora_keys() {
    run_target("lora_keys");
}

#[test]
fn mutated_configs() {
    run_target("configs");
}

#[test]
fn mutated_tokenizer_files() {
    run_target("tokenizer");
}

#[test]
fn mutated_images() {
    run_target("image");
}

/// Every input a fuzzer crashed on, replayed: each must now return without panicking.
#[test]
fn fuzz_regressions_replay() {
    tch::set_num_threads(1);
    let dir = root().join("tests/fixtures/fuzz_regressions");
    let mut n = 0;
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        for (name, input) in read_dir_files(&dir.join(target)) {
            n += 1;
            let t = Instant::now();
            match catch(check, &input) {
                Err(panic) => failures.push(format!("{target}/{name}: panicked: {panic}")),
                Ok(_) if t.elapsed() > MAX_CASE => {
                    failures.push(format!("{target}/{name}: took {:?}", t.elapsed()))
                }
                Ok(_) => {}
            }
        }
    }
    eprintln!("replayed {n} fuzz regressions");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A safetensors file with one tensor entry (`entry` is its JSON) and `data` bytes.
fn one_tensor(entry: &str, data: &[u8]) -> Vec<u8> {
    let header = format!("{{\"a.weight\":{entry}}}");
    rebuild(header.as_bytes(), data, None)
}

fn open_err(bytes: Vec<u8>) -> String {
    let t = Instant::now();
    let e =
        loracast::io::safetensors::SafeTensorsFile::from_bytes(Path::new("x.safetensors"), bytes)
            .err()
            .expect("refused");
    assert!(t.elapsed() < Duration::from_millis(500), "slow refusal");
    format!("{e:#}")
}

#[test]
fn declared_sizes_are_checked_before_allocation() {
    // A 1e12-element tensor in a 16-byte file: refused from the header, nothing allocated.
    let e = open_err(one_tensor(
        r#"{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}"#,
        &[0; 16],
    ));
    assert!(e.contains("declares 1000000000000 elements"), "{e}");
    // A header length prefix of 2^60 bytes.
    let mut b = one_tensor(
        r#"{"dtype":"F32","shape":[4],"data_offsets":[0,16]}"#,
        &[0; 16],
    );
    b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = open_err(b);
    assert!(e.contains("header claims 1152921504606846976 bytes"), "{e}");
    // Element counts that overflow u64, offsets past the data, and a duplicated key.
    let e = open_err(one_tensor(
        r#"{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}"#,
        &[0; 16],
    ));
    assert!(e.contains("overflows"), "{e}");
    let e = open_err(one_tensor(
        r#"{"dtype":"F32","shape":[4],"data_offsets":[0,1600]}"#,
        &[0; 16],
    ));
    assert!(e.contains("outside the 16 data bytes"), "{e}");
    let header = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let e = open_err(rebuild(header.as_bytes(), &[0], None));
    assert!(e.contains("\"a\" appears twice"), "{e}");
}

/// A config whose weights would not fit in its weights file is refused before the model is
/// built (found by the `configs` fuzzer: a VAE with 49994 latent channels allocated 40 GB).
#[test]
fn configs_larger_than_their_weights_are_refused_before_building() {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    std::fs::create_dir_all(&vae).unwrap();
    std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
    let (_, weights) = fuzzing::seeds::safetensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "vae")
        .unwrap();
    std::fs::write(
        vae.join("diffusion_pytorch_model.safetensors"),
        &weights[1..],
    )
    .unwrap();
    let mut cfg = serde_json::to_value(fuzzing::tiny_vae_config()).unwrap();
    cfg["latent_channels"] = 49994.into();
    std::fs::write(vae.join("config.json"), cfg.to_string()).unwrap();
    let folder = loracast::io::DiffusersFolder::open(dir.path()).unwrap();
    let t = Instant::now();
    let Err(e) = loracast::models::vae::AutoencoderKL::load(&folder, tch::Device::Cpu) else {
        panic!("a VAE larger than its weights file was built");
    };
    let e = format!("{e:#}");
    assert!(t.elapsed() < Duration::from_secs(2), "slow refusal");
    assert!(
        e.starts_with("vae/config.json declares at least")
            && e.contains("the config and the weights do not match"),
        "{e}"
    );
}

#[test]
fn unknown_dtype_is_one_short_line() {
    let e = open_err(one_tensor(
        r#"{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}"#,
        &[0; 16],
    ));
    assert_eq!(
        e,
        r#"x.safetensors: tensor "a.weight" has unsupported dtype "Q4""#
    );
}

#[test]
fn model_config_sizes_name_the_key() {
    let unet = |patch: Value| {
        let mut v = serde_json::to_value(fuzzing::tiny_unet_config()).unwrap();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        loracast::models::unet::UNetConfig::from_json(v)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };
    for (patch, want) in [
        (
            serde_json::json!({"cross_attention_dim": 0}),
            "unet config: cross_attention_dim must be ≥ 1, got 0",
        ),
        (
            serde_json::json!({"norm_num_groups": 0}),
            "unet config: norm_num_groups must be ≥ 1, got 0",
        ),
        (
            serde_json::json!({"norm_num_groups": 3}),
            "not divisible by norm_num_groups 3",
        ),
        (
            serde_json::json!({"attention_head_dim": 3}),
            "not divisible by 3 heads",
        ),
        (
            serde_json::json!({"block_out_channels": [8, 8, 8]}),
            "block types for 3 block_out_channels",
        ),
        (
            serde_json::json!({"layers_per_block": [1, 1, 1]}),
            "layers_per_block has 3 entries for 2 blocks",
        ),
        (
            serde_json::json!({"sample_size": -4}),
            "unet config: sample_size must be ≥ 1, got -4",
        ),
        (
            serde_json::json!({"in_channels": 1_000_000_000_000i64}),
            "unet config: in_channels must be ≤ 65536",
        ),
    ] {
        let e = unet(patch.clone());
        assert!(e.contains(want), "{patch}: {e:?}");
    }
    let vae = serde_json::json!({"latent_channels": 0});
    let cfg: loracast::models::vae::VaeConfig = serde_json::from_value(vae).unwrap();
    let e = format!("{:#}", cfg.check().unwrap_err());
    assert_eq!(e, "vae/config.json: latent_channels must be ≥ 1, got 0");
    let sched = serde_json::json!({"num_train_timesteps": 1_000_000_000_000i64});
    let e = loracast::diffusion::SchedulerConfig::from_json(
        &sched,
        loracast::diffusion::SchedulerKind::Ddim,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("num_train_timesteps must be in [2, 1048576]"),
        "{e}"
    );
}

/// Regenerates the tiny generated seeds of `fuzz/seeds/` (run after changing the tiny models).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = root().join("fuzz/seeds");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(dir.join(target)).unwrap();
        std::fs::write(dir.join(target).join(format!("tiny_{name}")), bytes).unwrap();
    };
    for (name, b) in fuzzing::seeds::safetensors().unwrap() {
        write("safetensors", &name, &b);
    }
    for (name, b) in fuzzing::seeds::lora_files().unwrap() {
        write("lora_file", &name, &b);
    }
    for (name, b) in fuzzing::seeds::configs().unwrap() {
        write("configs", &name, &b);
    }
    write(
        "hypernet_file",
        "hypernet",
        &fuzzing::seeds::hypernet_file().unwrap(),
    );
}
