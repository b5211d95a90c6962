//! The toy world generator (SPEC §6, issue 4): determinism (golden bytes), the fixed held-out
//! split, the caption grammar, every identity attribute visible in the rendered pixels of every
//! context, position/size really move/scale the body, and `loracast world render` end to end.
mod common;

use std::collections::HashSet;
use std::path::Path;

use loracast::data::render::{background_rgb, body_rgb, pattern_rgb};
use loracast::data::*;

/// FNV-1a over the rendered bytes of samples `0..n` of a stream.
fn stream_hash(seed: u64, split: Split, n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..n {
        for b in Sample::at(seed, split, i).render().rgb {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// A failing `loracast` call (world commands write into folders checked by each test).
fn assert_fails(args: &[&str], needle: &str) {
    common::assert_fails(args, None, needle);
}

#[test]
fn deterministic_golden_bytes() {
    // Same seed → same bytes, on any machine (integer PRNG, IEEE-exact float ops only).
    let train = stream_hash(0, Split::Train, 64);
    let heldout = stream_hash(0, Split::Heldout, 64);
    eprintln!("train {train:#x} heldout {heldout:#x}");
    assert_eq!(train, stream_hash(0, Split::Train, 64));
    assert_eq!(
        train, GOLDEN_TRAIN,
        "renders changed: update GOLDEN_* only on purpose"
    );
    assert_eq!(
        heldout, GOLDEN_HELDOUT,
        "renders changed: update GOLDEN_* only on purpose"
    );
    // Different seeds and splits differ; a stream's samples are independent of its length.
    assert_ne!(train, stream_hash(1, Split::Train, 64));
    assert_ne!(train, heldout);
    let mut w = World::new(5);
    let (a, b) = (w.sample(Split::Train), w.sample(Split::Train));
    assert_ne!(a, b);
    assert_eq!(World::new(5).sample(Split::Train), a);
    assert_eq!(
        Sample::at(3, Split::Train, 7),
        Sample::at(3, Split::Train, 7)
    );
    let s = Sample::at(3, Split::Train, 7);
    assert_eq!(Jitter::from_seed(s.jitter_seed), s.jitter);
}

const GOLDEN_TRAIN: u64 = 0x0cf7_b9b5_683a_20fe;
const GOLDEN_HELDOUT: u64 = 0x60ab_a37b_56a3_a930;

#[test]
fn heldout_split_is_fixed_and_disjoint() {
    let train = Split::Train.identities();
    let heldout = Split::Heldout.identities();
    assert_eq!(heldout.len(), HELDOUT_COUNT);
    assert_eq!(loracast::data::world::HELDOUT_COUNT, HELDOUT_COUNT);
    assert_eq!(train.len() + heldout.len(), Identity::COUNT);
    let t: HashSet<_> = train.iter().collect();
    assert!(heldout.iter().all(|id| !t.contains(id)));
    assert!(heldout.iter().all(|id| id.split() == Split::Heldout));
    // A few fixed members (by index) on both sides: the split never changes.
    for i in HELDOUT_MEMBERS {
        assert_eq!(
            Identity::from_index(i).unwrap().split(),
            Split::Heldout,
            "{i}"
        );
    }
    for i in TRAIN_MEMBERS {
        assert_eq!(
            Identity::from_index(i).unwrap().split(),
            Split::Train,
            "{i}"
        );
    }
    // Every attribute value occurs in both splits; every pair of values of two attributes
    // occurs in training (held-out identities are new combinations of seen values).
    for split in Split::ALL {
        for (a, (name, n)) in Identity::ATTRIBUTES.iter().enumerate() {
            for v in 0..*n {
                assert!(
                    split.identities().iter().any(|id| id.labels()[a] == v),
                    "{split}: no {name} = {v}"
                );
            }
        }
    }
    let pairs: HashSet<_> = train
        .iter()
        .flat_map(|id| {
            let l = id.labels();
            (0..5).flat_map(move |a| (0..5).map(move |b| (a, l[a], b, l[b])))
        })
        .collect();
    for id in heldout {
        let l = id.labels();
        for a in 0..5 {
            for b in 0..5 {
                assert!(pairs.contains(&(a, l[a], b, l[b])), "{id}: pair unseen");
            }
        }
    }
    // Sampling a split only ever draws its identities.
    let mut w = World::new(0);
    for _ in 0..2000 {
        assert_eq!(w.identity(Split::Heldout).split(), Split::Heldout);
        assert_eq!(w.identity(Split::Train).split(), Split::Train);
    }
    // Chance levels.
    assert!((Identity::chance_level() - 4.0 / 15.0).abs() < 1e-12);
    assert!((Context::chance_level() - 1.0 / 3.0).abs() < 1e-12);
    let between = Identity::chance_level_between(Split::Train, Split::Heldout);
    eprintln!(
        "chance: uniform {:.5}, train vs heldout {between:.5}",
        Identity::chance_level()
    );
    assert!((between - Identity::chance_level()).abs() < 0.01);
}

const HELDOUT_COUNT: usize = 104;
const HELDOUT_MEMBERS: [usize; 8] = [1, 6, 8, 10, 16, 378, 379, 857];
const TRAIN_MEMBERS: [usize; 5] = [0, 2, 3, 453, 863];

#[test]
fn captions_round_trip_and_never_name_the_identity() {
    let identity_words: HashSet<&str> = Identity::VALUE_NAMES
        .iter()
        .flat_map(|v| v.iter().copied())
        .collect();
    let mut seen = HashSet::new();
    for c in Context::all() {
        let cap = caption(&c);
        assert_eq!(parse_caption(&cap).unwrap(), c, "{cap}");
        let sp = subject_prompt(&c, "sks");
        assert_eq!(
            parse_prompt(&sp).unwrap(),
            (Some("sks".to_string()), c),
            "{sp}"
        );
        assert_eq!(sp.replacen("a sks creature", "a creature", 1), cap);
        assert!(seen.insert(cap.clone()), "duplicate caption {cap}");
        for word in cap.split(|ch: char| !ch.is_alphanumeric()) {
            assert!(
                !identity_words.contains(word),
                "{cap:?} names an identity value {word:?}"
            );
        }
    }
    assert_eq!(
        caption(&Context::from_index(0).unwrap()),
        "a creature on a stone background, small, on the left"
    );
    for bad in [
        "",
        "a creature",
        "a creature on a red background, small, on the left",
        "a creature on a sky background, tiny, on the left",
        "a creature on a sky background, small, somewhere",
        "a creature wearing a crown on a sky background, small, on the left",
        "a creature wearing a none on a sky background, small, on the left",
        "two sks creature on a sky background, small, on the left",
        "a big sks creature on a sky background, small, on the left",
    ] {
        assert!(parse_caption(bad).is_err(), "{bad:?} parsed");
    }
}

/// Max-channel distance.
fn dist(p: [u8; 3], c: [f32; 3]) -> f32 {
    (0..3)
        .map(|i| (p[i] as f32 - c[i]).abs())
        .fold(0.0, f32::max)
}

fn jittered(c: [f32; 3], d: [f32; 3]) -> [f32; 3] {
    [0, 1, 2].map(|i| (c[i] + d[i]).clamp(0.0, 255.0))
}

/// Pupils: 8-connected components of dark pixels (max channel < 60) whose whole surrounding
/// ring is bright (min channel > 110: the eye white). Returns their centres.
fn pupils(im: &Image) -> Vec<(f32, f32)> {
    let n = im.width as i64;
    let at = |x: i64, y: i64| im.pixel(x as usize, y as usize);
    let dark = |x: i64, y: i64| at(x, y).iter().all(|&c| c < 60);
    let mut seen = vec![false; (n * n) as usize];
    let mut found = vec![];
    for y0 in 0..n {
        for x0 in 0..n {
            if seen[(y0 * n + x0) as usize] || !dark(x0, y0) {
                continue;
            }
            let (mut stack, mut comp) = (vec![(x0, y0)], vec![]);
            seen[(y0 * n + x0) as usize] = true;
            while let Some((x, y)) = stack.pop() {
                comp.push((x, y));
                for (dx, dy) in [
                    (-1, -1),
                    (0, -1),
                    (1, -1),
                    (-1, 0),
                    (1, 0),
                    (-1, 1),
                    (0, 1),
                    (1, 1),
                ] {
                    let (a, b) = (x + dx, y + dy);
                    if a >= 0
                        && b >= 0
                        && a < n
                        && b < n
                        && !seen[(b * n + a) as usize]
                        && dark(a, b)
                    {
                        seen[(b * n + a) as usize] = true;
                        stack.push((a, b));
                    }
                }
            }
            let inside: HashSet<_> = comp.iter().copied().collect();
            let enclosed = comp.len() <= 4
                && comp.iter().all(|&(x, y)| {
                    (-1..=1).all(|dy| {
                        (-1..=1).all(|dx| {
                            let (a, b) = (x + dx, y + dy);
                            inside.contains(&(a, b))
                                || (a >= 0
                                    && b >= 0
                                    && a < n
                                    && b < n
                                    && at(a, b).iter().all(|&c| c > 110))
                        })
                    })
                });
            if enclosed {
                let k = comp.len() as f32;
                let cx = comp.iter().map(|p| p.0 as f32).sum::<f32>() / k;
                let cy = comp.iter().map(|p| p.1 as f32).sum::<f32>() / k;
                found.push((cx, cy));
            }
        }
    }
    found
}

/// What the pixels of one render show.
struct Seen {
    body: usize,
    pattern: usize,
    pupils: Vec<(f32, f32)>,
}

fn look(id: &Identity, j: &Jitter, im: &Image) -> Seen {
    let body = jittered(body_rgb(id.body_color), j.body_rgb);
    let pat = jittered(pattern_rgb(id.pattern_color), j.pattern_rgb);
    let pupils = pupils(im);
    let (mut nb, mut np) = (0, 0);
    for y in 0..im.height {
        for x in 0..im.width {
            let p = im.pixel(x, y);
            // Eye pixels (white, pupil) are not pattern.
            let near_eye = pupils
                .iter()
                .any(|&(ex, ey)| (x as f32 - ex).abs() < 2.6 && (y as f32 - ey).abs() < 2.6);
            // Body: pure body colour. Pattern: pixels dominated by the pattern colour.
            if dist(p, body) <= 10.0 {
                nb += 1;
            } else if !near_eye && dist(p, pat) <= 40.0 && dist(p, pat) < dist(p, body) {
                np += 1;
            }
        }
    }
    Seen {
        body: nb,
        pattern: np,
        pupils,
    }
}

#[test]
fn every_identity_attribute_is_visible_in_every_context() {
    // Every identity × size × accessory (the crowded cases), backgrounds and positions
    // cycling, jitter drawn per render: body colour, pattern colour and exactly the right
    // number of pupils are in the pixels.
    let (mut min_body, mut min_pattern) = (usize::MAX, usize::MAX);
    let mut worst = String::new();
    let mut all = vec![];
    let mut k = 0usize;
    for id in Identity::all() {
        for size in Size::ALL {
            for acc in Accessory::ALL {
                // Background and position cycle independently of size and accessory.
                let ctx = Context {
                    background: Background::ALL[(k / 6) % 6],
                    position: Position::ALL[(k / 36 + k) % 3],
                    size: *size,
                    accessory: *acc,
                };
                let j = Jitter::from_seed(k as u64);
                k += 1;
                let im = render(&id, &ctx, &j);
                let s = look(&id, &j, &im);
                let what = format!("{id} | {} | jitter {}", caption(&ctx), k - 1);
                assert_eq!(
                    s.pupils.len(),
                    id.eyes.count(),
                    "{what}: pupils {:?}",
                    s.pupils
                );
                if s.pattern < min_pattern {
                    worst = what.clone();
                }
                min_body = min_body.min(s.body);
                min_pattern = min_pattern.min(s.pattern);
                all.push((s.pattern, s.body, what, im));
            }
        }
    }
    eprintln!("{k} renders: min body px {min_body}, min pattern px {min_pattern} ({worst})");
    if std::env::var_os("WORLD_DUMP").is_some() {
        all.sort_by_key(|a| a.0);
        for a in &all[..24] {
            eprintln!("pattern {} body {}: {}", a.0, a.1, a.2);
        }
        let ims: Vec<Image> = all[..24].iter().map(|a| a.3.clone()).collect();
        contact_sheet(&ims, 6, 6, 2)
            .unwrap()
            .write_png(Path::new("/tmp/world_worst.png"))
            .unwrap();
    }
    assert!(min_body >= MIN_BODY_PX, "body colour nearly hidden");
    assert!(
        min_pattern >= MIN_PATTERN_PX,
        "pattern nearly hidden: {worst}"
    );
}

/// Measured minima over the 5184 renders: body 12 px of pure body colour, pattern 5 px
/// dominated by the pattern colour (small triangles/diamonds with three eyes and a scarf).
const MIN_BODY_PX: usize = 10;
const MIN_PATTERN_PX: usize = 4;

#[test]
fn position_moves_the_body_and_size_scales_it() {
    let mut w = World::new(11);
    for _ in 0..300 {
        let id = w.identity(Split::Train);
        let (_, j) = w.jitter();
        let mut ctx = w.context();
        ctx.accessory = Accessory::None;
        // The subject = every pixel that is not background: its area and centroid x.
        let subject = |ctx: &Context| {
            let im = render(&id, ctx, &j);
            let bg = jittered(background_rgb(ctx.background), j.background_rgb);
            let xs: Vec<f32> = (0..32 * 32)
                .filter(|i| dist(im.pixel(i % 32, i / 32), bg) > 12.0)
                .map(|i| (i % 32) as f32 + 0.5)
                .collect();
            (xs.len(), xs.iter().sum::<f32>() / xs.len() as f32)
        };
        for size in Size::ALL {
            ctx.size = *size;
            let xs: Vec<f32> = Position::ALL
                .iter()
                .map(|p| {
                    subject(&Context {
                        position: *p,
                        ..ctx
                    })
                    .1
                })
                .collect();
            let what = format!("{id}, {size}: centroids {xs:?}");
            assert!(xs[1] - xs[0] >= 3.5 && xs[2] - xs[1] >= 3.5, "{what}");
            assert!((xs[1] - 16.0).abs() < 1.5, "{what}");
        }
        let small = subject(&Context {
            size: Size::Small,
            ..ctx
        })
        .0;
        let large = subject(&Context {
            size: Size::Large,
            ..ctx
        })
        .0;
        assert!(
            large as f32 >= 1.5 * small as f32,
            "{id}: area small {small}, large {large}"
        );
    }
}

#[test]
fn tensors_are_in_range_and_match_the_bytes() {
    let ims: Vec<Image> = (0..3)
        .map(|i| Sample::at(0, Split::Train, i).render())
        .collect();
    let t = images_to_tensor(&ims);
    assert_eq!(t.size(), [3, 3, 32, 32]);
    let one = ims[1].to_tensor();
    assert_eq!(one.size(), [3, 32, 32]);
    assert!(one.equal(&t.get(1)));
    let (_, _, back) = loracast::io::image::to_rgb8(&one).unwrap();
    assert_eq!(back, ims[1].rgb);
    assert!(t.min().double_value(&[]) >= -1.0 && t.max().double_value(&[]) <= 1.0);
}

#[test]
fn render_speed() {
    let samples: Vec<Sample> = (0..2000).map(|i| Sample::at(9, Split::Train, i)).collect();
    let start = std::time::Instant::now();
    let mut acc = 0u64;
    for s in &samples {
        acc += s.render().rgb[0] as u64;
    }
    let rate = samples.len() as f64 / start.elapsed().as_secs_f64();
    eprintln!("{rate:.0} renders/s single thread ({acc})");
    // Release builds reach well over 1000/s; keep a loose floor for debug/shared CPUs.
    assert!(rate > 50.0, "{rate:.0} renders/s");
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn cli_render_writes_pngs_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("renders");
    let o = out.to_str().unwrap();
    let run = common::loracast(&[
        "world", "render", "--split", "heldout", "--seed", "4", "--count", "6", "--out", o,
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let names = files(&out);
    let mut expect: Vec<String> = (0..6).map(|i| format!("{i:05}.png")).collect();
    expect.push("metadata.jsonl".into());
    assert_eq!(names, expect);
    assert_eq!(files(tmp.path()), ["renders"], "temp folders left behind");
    let meta = std::fs::read_to_string(out.join("metadata.jsonl")).unwrap();
    let lines: Vec<&str> = meta.lines().collect();
    assert_eq!(lines.len(), 6);
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = Sample::at(4, Split::Heldout, i as u64);
        assert_eq!(v["file"], format!("{i:05}.png"));
        assert_eq!(v["split"], "heldout");
        assert_eq!(v["seed"], 4);
        assert_eq!(v["jitter_seed"], s.jitter_seed);
        let id: Identity = serde_json::from_value(v["identity"].clone()).unwrap();
        let ctx: Context = serde_json::from_value(v["context"].clone()).unwrap();
        assert_eq!((id, ctx), (s.identity, s.context));
        assert_eq!(id.split(), Split::Heldout);
        assert_eq!(v["identity"]["body_color"], s.identity.body_color.name());
        assert_eq!(v["caption"], caption(&ctx));
        assert_eq!(v["subject_prompt"], subject_prompt(&ctx, "sks"));
        let j: Jitter = serde_json::from_value(v["jitter"].clone()).unwrap();
        assert_eq!(j, s.jitter);
        let (w, h, rgb) =
            loracast::io::image::read_png_rgb8(&out.join(format!("{i:05}.png"))).unwrap();
        assert_eq!((w, h), (32, 32));
        assert_eq!(rgb, s.render().rgb);
    }
    // Refuses to overwrite; --force replaces an earlier render.
    let again = [
        "world", "render", "--split", "train", "--count", "2", "--out", o,
    ];
    assert_fails(&again, "--force");
    assert_eq!(files(&out).len(), 7);
    let forced = common::loracast(&[&again[..], &["--force"]].concat());
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_eq!(files(&out), ["00000.png", "00001.png", "metadata.jsonl"]);
    // --force never deletes a folder that is not a render.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "x").unwrap();
    assert_fails(
        &[
            "world",
            "render",
            "--split",
            "train",
            "--count",
            "1",
            "--out",
            other.to_str().unwrap(),
            "--force",
        ],
        "not a world render",
    );
    assert!(other.join("keep.txt").exists());
    // An empty existing folder is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = empty.to_str().unwrap();
    assert!(
        common::loracast(&["world", "render", "--split", "train", "--count", "1", "--out", e])
            .status
            .success()
    );
    assert_eq!(files(&empty), ["00000.png", "metadata.jsonl"]);
}

#[test]
fn cli_bad_arguments_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    assert_fails(
        &[
            "world", "render", "--split", "test", "--count", "1", "--out", o,
        ],
        "split",
    );
    assert_fails(
        &[
            "world", "render", "--split", "train", "--count", "0", "--out", o,
        ],
        "--count",
    );
    assert_fails(
        &[
            "world", "render", "--split", "train", "--count", "x", "--out", o,
        ],
        "--count",
    );
    assert_fails(
        &[
            "world", "render", "--split", "train", "--count", "1", "--out", o, "--token", "a b",
        ],
        "--token",
    );
    let missing = tmp.path().join("no/such/dir");
    assert_fails(
        &[
            "world",
            "render",
            "--split",
            "train",
            "--count",
            "1",
            "--out",
            missing.to_str().unwrap(),
        ],
        "does not exist",
    );
    let file = tmp.path().join("f");
    std::fs::write(&file, "x").unwrap();
    assert_fails(
        &[
            "world",
            "render",
            "--split",
            "train",
            "--count",
            "1",
            "--out",
            file.to_str().unwrap(),
        ],
        "not a folder",
    );
    assert!(!out.exists());
    assert_eq!(files(tmp.path()), ["f"]);
}
