//! The toy world (SPEC §6), loracast's embedded default: a deterministic, seeded procedural
//! generator of subjects (`Identity`: shape, body colour, pattern, pattern colour, eyes — never
//! in captions) in contexts (`Context`: background, position, size, accessory — what prompts
//! control), with captions, a fixed held-out split of identity combinations, and a 32×32 RGB
//! renderer.
pub mod captions;
pub mod render;
pub mod rng;
pub mod world;

pub use captions::{caption, parse_caption, parse_prompt, subject_prompt, DEFAULT_TOKEN};
pub use render::{contact_sheet, images_to_tensor, render, Image, IMAGE_SIZE};
pub use rng::Rng;
pub use world::{
    Accessory, Background, BodyColor, Context, Eyes, Identity, Jitter, Pattern, PatternColor,
    Position, Sample, Shape, Size, Split, World,
};
