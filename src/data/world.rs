//! The toy world's vocabulary (SPEC §6): what a subject *is* ([`Identity`], never in a
//! caption), what a prompt controls ([`Context`]), the fixed held-out split of identity
//! combinations ([`Split`]), per-render continuous [`Jitter`], and a seeded sampler
//! ([`World`], [`Sample::at`]). Attributes are enums with `ALL`/`NAMES`/`COUNT`/`index()` so
//! evaluators use them directly as class labels. Everything is a pure function of its seed
//! (our own SplitMix64), so the same seed gives the same samples on any machine.
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::rng::{mix64, Rng};

/// One discrete attribute: an enum with its metadata/head name, value names and serde as names.
macro_rules! attribute {
    ($(#[$doc:meta])* $ty:ident = $attr:literal { $($v:ident = $name:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $ty { $($v),+ }

        impl $ty {
            /// The attribute's name (metadata key, classifier head name).
            pub const ATTRIBUTE: &'static str = $attr;
            /// Every value, in label order.
            pub const ALL: &'static [$ty] = &[$($ty::$v),+];
            /// Value names, in label order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            pub const COUNT: usize = Self::ALL.len();

            /// The class label, `0..COUNT`.
            pub fn index(self) -> usize {
                self as usize
            }

            pub fn name(self) -> &'static str {
                Self::NAMES[self as usize]
            }

            pub fn from_index(label: usize) -> Result<Self> {
                Self::ALL.get(label).copied().ok_or_else(|| {
                    anyhow!("{} label {label} is out of range 0..{}", $attr, Self::COUNT)
                })
            }

            pub fn from_name(name: &str) -> Result<Self> {
                match Self::NAMES.iter().position(|n| *n == name) {
                    Some(i) => Ok(Self::ALL[i]),
                    None => bail!(
                        "unknown {} {name:?} (expected one of: {})",
                        $attr,
                        Self::NAMES.join(", ")
                    ),
                }
            }

            /// Uniform over all values.
            pub fn sample(rng: &mut Rng) -> Self {
                Self::ALL[rng.below(Self::COUNT)]
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::from_name(s)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let name = String::deserialize(d)?;
                Self::from_name(&name).map_err(serde::de::Error::custom)
            }
        }
    };
}

attribute! {
    /// Body outline.
    Shape = "shape" { Circle = "circle", Square = "square", Triangle = "triangle", Diamond = "diamond" }
}
attribute! {
    /// Body fill colour.
    BodyColor = "body_color" {
        Red = "red", Orange = "orange", Yellow = "yellow", Green = "green", Blue = "blue", Purple = "purple",
    }
}
attribute! {
    /// Surface pattern drawn inside the body in the pattern colour (always present, so the
    /// pattern colour is always visible).
    Pattern = "pattern" { Stripes = "stripes", Dots = "dots", Checker = "checker" }
}
attribute! {
    /// Pattern colour (distinct from every body colour).
    PatternColor = "pattern_color" { White = "white", Black = "black", Pink = "pink", Cyan = "cyan" }
}
attribute! {
    /// Number of eyes (white with a black pupil, in a row on the face).
    Eyes = "eyes" { One = "one", Two = "two", Three = "three" }
}
attribute! {
    /// Background fill (prompt-controlled).
    Background = "background" {
        Stone = "stone", Sky = "sky", Grass = "grass", Sand = "sand", Dusk = "dusk", Night = "night",
    }
}
attribute! {
    /// Horizontal position of the body (prompt-controlled).
    Position = "position" { Left = "left", Center = "center", Right = "right" }
}
attribute! {
    /// Body size (prompt-controlled).
    Size = "size" { Small = "small", Large = "large" }
}
attribute! {
    /// Accessory (prompt-controlled): a top hat on the body, a scarf around its neck.
    Accessory = "accessory" { None = "none", Hat = "hat", Scarf = "scarf" }
}

impl Eyes {
    /// 1, 2 or 3.
    pub fn count(self) -> usize {
        self as usize + 1
    }
}

/// Mixed-radix index of `labels` over `counts` (first attribute most significant).
fn mixed_index(labels: &[usize], counts: &[usize]) -> usize {
    labels.iter().zip(counts).fold(0, |acc, (l, n)| acc * n + l)
}

/// Inverse of [`mixed_index`].
fn mixed_labels<const N: usize>(mut index: usize, counts: &[usize; N]) -> [usize; N] {
    let mut labels = [0; N];
    for i in (0..N).rev() {
        labels[i] = index % counts[i];
        index /= counts[i];
    }
    labels
}

/// What a subject is. Never mentioned in a caption; every attribute is visible in every render.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    pub shape: Shape,
    pub body_color: BodyColor,
    pub pattern: Pattern,
    pub pattern_color: PatternColor,
    pub eyes: Eyes,
}

impl Identity {
    /// `(attribute name, number of values)` in label order: one classifier head each.
    pub const ATTRIBUTES: [(&'static str, usize); 5] = [
        (Shape::ATTRIBUTE, Shape::COUNT),
        (BodyColor::ATTRIBUTE, BodyColor::COUNT),
        (Pattern::ATTRIBUTE, Pattern::COUNT),
        (PatternColor::ATTRIBUTE, PatternColor::COUNT),
        (Eyes::ATTRIBUTE, Eyes::COUNT),
    ];
    /// Value names per attribute, in label order.
    pub const VALUE_NAMES: [&'static [&'static str]; 5] = [
        Shape::NAMES,
        BodyColor::NAMES,
        Pattern::NAMES,
        PatternColor::NAMES,
        Eyes::NAMES,
    ];
    const COUNTS: [usize; 5] = [
        Shape::COUNT,
        BodyColor::COUNT,
        Pattern::COUNT,
        PatternColor::COUNT,
        Eyes::COUNT,
    ];
    /// Number of identities (4·6·3·4·3 = 864).
    pub const COUNT: usize =
        Shape::COUNT * BodyColor::COUNT * Pattern::COUNT * PatternColor::COUNT * Eyes::COUNT;

    pub fn labels(&self) -> [usize; 5] {
        [
            self.shape.index(),
            self.body_color.index(),
            self.pattern.index(),
            self.pattern_color.index(),
            self.eyes.index(),
        ]
    }

    pub fn from_labels(labels: [usize; 5]) -> Result<Self> {
        Ok(Identity {
            shape: Shape::from_index(labels[0])?,
            body_color: BodyColor::from_index(labels[1])?,
            pattern: Pattern::from_index(labels[2])?,
            pattern_color: PatternColor::from_index(labels[3])?,
            eyes: Eyes::from_index(labels[4])?,
        })
    }

    /// Value names in attribute order.
    pub fn names(&self) -> [&'static str; 5] {
        [
            self.shape.name(),
            self.body_color.name(),
            self.pattern.name(),
            self.pattern_color.name(),
            self.eyes.name(),
        ]
    }

    /// Stable index `0..COUNT` (mixed radix over the labels, shape most significant).
    pub fn index(&self) -> usize {
        mixed_index(&self.labels(), &Self::COUNTS)
    }

    pub fn from_index(index: usize) -> Result<Self> {
        if index >= Self::COUNT {
            bail!("identity index {index} is out of range 0..{}", Self::COUNT);
        }
        Self::from_labels(mixed_labels(index, &Self::COUNTS))
    }

    /// All identities in index order.
    pub fn all() -> impl Iterator<Item = Identity> {
        (0..Self::COUNT).filter_map(|i| Self::from_index(i).ok())
    }

    /// Which split this identity belongs to (fixed forever, see [`Split`]).
    pub fn split(&self) -> Split {
        static HELDOUT: OnceLock<Vec<bool>> = OnceLock::new();
        let heldout = HELDOUT.get_or_init(|| {
            // The HELDOUT_COUNT identities with the smallest stable hash.
            let mut order: Vec<usize> = (0..Self::COUNT).collect();
            order.sort_by_key(|&i| (mix64(HELDOUT_SALT ^ i as u64), i));
            let mut mask = vec![false; Self::COUNT];
            for &i in &order[..HELDOUT_COUNT] {
                mask[i] = true;
            }
            mask
        });
        if heldout[self.index()] {
            Split::Heldout
        } else {
            Split::Train
        }
    }

    /// Uniform over the identities of `split`.
    pub fn sample(rng: &mut Rng, split: Split) -> Self {
        let ids = split.identities();
        ids[rng.below(ids.len())]
    }

    /// Exact chance level of subject fidelity for a guess independent of the reference and
    /// uniform over each attribute's values: the mean over attributes of 1/#values = 4/15.
    pub fn chance_level() -> f64 {
        let n = Self::ATTRIBUTES.len() as f64;
        Self::ATTRIBUTES
            .iter()
            .map(|(_, c)| 1.0 / *c as f64)
            .sum::<f64>()
            / n
    }

    /// Exact expected subject fidelity when the generated identity is uniform over
    /// `generated`'s identities and the reference uniform over `reference`'s, independently:
    /// the mean over attributes of Σ_v P_gen(v)·P_ref(v). (Train vs held-out differs slightly
    /// from [`Identity::chance_level`] because the split is not exactly balanced.)
    pub fn chance_level_between(generated: Split, reference: Split) -> f64 {
        let marginals = |split: Split| {
            let ids = split.identities();
            let mut m: Vec<Vec<f64>> = Self::COUNTS.iter().map(|&c| vec![0.0; c]).collect();
            for id in ids {
                for (a, l) in id.labels().into_iter().enumerate() {
                    m[a][l] += 1.0 / ids.len() as f64;
                }
            }
            m
        };
        let (g, r) = (marginals(generated), marginals(reference));
        let per_attr = g
            .iter()
            .zip(&r)
            .map(|(g, r)| g.iter().zip(r).map(|(a, b)| a * b).sum::<f64>());
        per_attr.sum::<f64>() / Self::ATTRIBUTES.len() as f64
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let eyes = match self.eyes {
            Eyes::One => "one eye",
            Eyes::Two => "two eyes",
            Eyes::Three => "three eyes",
        };
        write!(
            f,
            "{} {} with {} {}, {eyes}",
            self.body_color, self.shape, self.pattern_color, self.pattern
        )
    }
}

/// What a prompt controls. Each attribute is independent of the identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Context {
    pub background: Background,
    pub position: Position,
    pub size: Size,
    pub accessory: Accessory,
}

impl Context {
    /// `(attribute name, number of values)` in label order.
    pub const ATTRIBUTES: [(&'static str, usize); 4] = [
        (Background::ATTRIBUTE, Background::COUNT),
        (Position::ATTRIBUTE, Position::COUNT),
        (Size::ATTRIBUTE, Size::COUNT),
        (Accessory::ATTRIBUTE, Accessory::COUNT),
    ];
    /// Value names per attribute, in label order.
    pub const VALUE_NAMES: [&'static [&'static str]; 4] = [
        Background::NAMES,
        Position::NAMES,
        Size::NAMES,
        Accessory::NAMES,
    ];
    const COUNTS: [usize; 4] = [
        Background::COUNT,
        Position::COUNT,
        Size::COUNT,
        Accessory::COUNT,
    ];
    /// Number of contexts (6·3·2·3 = 108).
    pub const COUNT: usize = Background::COUNT * Position::COUNT * Size::COUNT * Accessory::COUNT;

    pub fn labels(&self) -> [usize; 4] {
        [
            self.background.index(),
            self.position.index(),
            self.size.index(),
            self.accessory.index(),
        ]
    }

    pub fn from_labels(labels: [usize; 4]) -> Result<Self> {
        Ok(Context {
            background: Background::from_index(labels[0])?,
            position: Position::from_index(labels[1])?,
            size: Size::from_index(labels[2])?,
            accessory: Accessory::from_index(labels[3])?,
        })
    }

    pub fn names(&self) -> [&'static str; 4] {
        [
            self.background.name(),
            self.position.name(),
            self.size.name(),
            self.accessory.name(),
        ]
    }

    pub fn index(&self) -> usize {
        mixed_index(&self.labels(), &Self::COUNTS)
    }

    pub fn from_index(index: usize) -> Result<Self> {
        if index >= Self::COUNT {
            bail!("context index {index} is out of range 0..{}", Self::COUNT);
        }
        Self::from_labels(mixed_labels(index, &Self::COUNTS))
    }

    pub fn all() -> impl Iterator<Item = Context> {
        (0..Self::COUNT).filter_map(|i| Self::from_index(i).ok())
    }

    /// Uniform over all contexts.
    pub fn sample(rng: &mut Rng) -> Self {
        Context {
            background: Background::sample(rng),
            position: Position::sample(rng),
            size: Size::sample(rng),
            accessory: Accessory::sample(rng),
        }
    }

    /// The caption (see [`super::captions`]).
    pub fn caption(&self) -> String {
        super::captions::caption(self)
    }

    /// Exact chance level of prompt fidelity (mean over attributes of 1/#values = 1/3).
    pub fn chance_level() -> f64 {
        let n = Self::ATTRIBUTES.len() as f64;
        Self::ATTRIBUTES
            .iter()
            .map(|(_, c)| 1.0 / *c as f64)
            .sum::<f64>()
            / n
    }
}

const HELDOUT_SALT: u64 = 0x6c6f_7261_6361_7374; // "loracast"
/// Number of held-out identities (12.0% of 864).
pub const HELDOUT_COUNT: usize = 104;

/// The fixed split of identity combinations: the [`HELDOUT_COUNT`] identities whose index has
/// the smallest stable hash (SplitMix64 with a fixed salt) are held out — every attribute value
/// occurs in both splits, and every pair of values of two attributes occurs in training, so a
/// held-out identity is a new combination of seen values. No training (base model, evaluators,
/// hypernetwork) uses held-out identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Heldout,
}

impl Split {
    pub const ALL: [Split; 2] = [Split::Train, Split::Heldout];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Heldout => "heldout",
        }
    }

    /// The identities of this split, in index order.
    pub fn identities(self) -> &'static [Identity] {
        static SPLITS: OnceLock<[Vec<Identity>; 2]> = OnceLock::new();
        let [train, heldout] = SPLITS.get_or_init(|| {
            let (h, t): (Vec<_>, Vec<_>) =
                Identity::all().partition(|id| id.split() == Split::Heldout);
            [t, h]
        });
        match self {
            Split::Train => train,
            Split::Heldout => heldout,
        }
    }

    pub fn contains(self, identity: &Identity) -> bool {
        identity.split() == self
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "heldout" => Ok(Split::Heldout),
            other => bail!("unknown split {other:?} (expected train or heldout)"),
        }
    }
}

impl Serialize for Split {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Split {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Small continuous per-render variation, so an identity is not a single bitmap. Colour
/// offsets are added to the palette RGB (0–255 scale); the pattern phase is in periods.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Jitter {
    /// Body rotation in radians (the pattern, eyes and hat turn with it).
    pub rotation: f32,
    /// Body scale factor.
    pub scale: f32,
    /// Body width factor.
    pub aspect: f32,
    /// Body offset in pixels (x, y).
    pub offset: [f32; 2],
    pub body_rgb: [f32; 3],
    pub pattern_rgb: [f32; 3],
    pub background_rgb: [f32; 3],
    /// Pattern phase in periods (x, y), in [0, 1).
    pub phase: [f32; 2],
}

impl Jitter {
    /// No variation: the canonical render.
    pub const NONE: Jitter = Jitter {
        rotation: 0.0,
        scale: 1.0,
        aspect: 1.0,
        offset: [0.0; 2],
        body_rgb: [0.0; 3],
        pattern_rgb: [0.0; 3],
        background_rgb: [0.0; 3],
        phase: [0.0; 2],
    };
    /// Largest rotation, radians (±7°).
    pub const MAX_ROTATION: f32 = 0.12;
    pub const MAX_SCALE: f32 = 0.04;
    pub const MAX_ASPECT: f32 = 0.05;
    pub const MAX_OFFSET: [f32; 2] = [0.8, 0.5];
    pub const MAX_BODY_RGB: f32 = 12.0;
    pub const MAX_PATTERN_RGB: f32 = 8.0;
    pub const MAX_BACKGROUND_RGB: f32 = 8.0;

    pub fn sample(rng: &mut Rng) -> Self {
        let mut sym = |m: f32| rng.uniform(-m, m);
        let rotation = sym(Self::MAX_ROTATION);
        let scale = 1.0 + sym(Self::MAX_SCALE);
        let aspect = 1.0 + sym(Self::MAX_ASPECT);
        let offset = [sym(Self::MAX_OFFSET[0]), sym(Self::MAX_OFFSET[1])];
        let body_rgb = [0; 3].map(|_| sym(Self::MAX_BODY_RGB));
        let pattern_rgb = [0; 3].map(|_| sym(Self::MAX_PATTERN_RGB));
        let background_rgb = [0; 3].map(|_| sym(Self::MAX_BACKGROUND_RGB));
        let phase = [rng.unit(), rng.unit()];
        Jitter {
            rotation,
            scale,
            aspect,
            offset,
            body_rgb,
            pattern_rgb,
            background_rgb,
            phase,
        }
    }

    pub fn from_seed(seed: u64) -> Self {
        Self::sample(&mut Rng::new(seed))
    }
}

/// One draw: an identity in a context with its jitter (and the seed that reproduces it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub identity: Identity,
    pub context: Context,
    pub jitter_seed: u64,
    pub jitter: Jitter,
}

impl Sample {
    /// The `index`-th sample of the stream `(seed, split)`, independent of every other index
    /// (so `--count 10` is a prefix of `--count 1000`).
    pub fn at(seed: u64, split: Split, index: u64) -> Self {
        let stream = mix64(seed ^ mix64(split as u64 + 1)) ^ mix64(index);
        World::new(stream).sample(split)
    }

    pub fn render(&self) -> super::render::Image {
        super::render::render(&self.identity, &self.context, &self.jitter)
    }
}

/// A seeded sampler of the world (a PRNG stream; no global state).
#[derive(Clone, Debug)]
pub struct World {
    rng: Rng,
}

impl World {
    pub fn new(seed: u64) -> Self {
        World {
            rng: Rng::new(seed),
        }
    }

    /// The underlying stream, for callers that draw their own extras (e.g. batch shuffles).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// A uniform identity of `split`.
    pub fn identity(&mut self, split: Split) -> Identity {
        Identity::sample(&mut self.rng, split)
    }

    /// A uniform context.
    pub fn context(&mut self) -> Context {
        Context::sample(&mut self.rng)
    }

    /// A fresh jitter and the seed that reproduces it ([`Jitter::from_seed`]).
    pub fn jitter(&mut self) -> (u64, Jitter) {
        let seed = self.rng.next_u64();
        (seed, Jitter::from_seed(seed))
    }

    /// `n` distinct identities of `split` (all of them when it has fewer), in draw order.
    pub fn distinct_identities(&mut self, split: Split, n: usize) -> Vec<Identity> {
        let n = n.min(split.identities().len());
        let mut ids: Vec<Identity> = Vec::with_capacity(n);
        while ids.len() < n {
            let id = self.identity(split);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// `identity` in a fresh context with fresh jitter.
    pub fn view(&mut self, identity: Identity) -> Sample {
        let context = self.context();
        let (jitter_seed, jitter) = self.jitter();
        Sample {
            identity,
            context,
            jitter_seed,
            jitter,
        }
    }

    /// Identity, context and jitter in one draw.
    pub fn sample(&mut self, split: Split) -> Sample {
        let identity = self.identity(split);
        self.view(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip() {
        for (i, id) in Identity::all().enumerate() {
            assert_eq!(id.index(), i);
            assert_eq!(Identity::from_labels(id.labels()).unwrap(), id);
        }
        for (i, c) in Context::all().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert_eq!(Identity::all().count(), 864);
        assert_eq!(Context::all().count(), 108);
        assert!(Identity::from_index(864).is_err());
        assert!(Shape::from_name("hexagon").is_err());
    }

    #[test]
    fn chance_levels() {
        assert!((Identity::chance_level() - 4.0 / 15.0).abs() < 1e-12);
        assert!((Context::chance_level() - 1.0 / 3.0).abs() < 1e-12);
    }
}
