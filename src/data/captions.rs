//! The caption grammar of the toy world, in one place (SPEC §6): the base model's training text
//! names only the context, never the identity:
//! `a creature[ wearing a {hat|scarf}] on a {background} background, {size}, {on the left|in the center|on the right}`.
//! The subject prompt puts an identifier token before "creature" ("a sks creature …").
//! [`parse_caption`] inverts both, so prompt fidelity can be scored from a prompt.
use anyhow::{bail, Context as _, Result};

use super::world::{Accessory, Background, Context, Position, Size};

/// The identifier token of the subject prompt unless one is given.
pub const DEFAULT_TOKEN: &str = "sks";

fn position_phrase(p: Position) -> &'static str {
    match p {
        Position::Left => "on the left",
        Position::Center => "in the center",
        Position::Right => "on the right",
    }
}

fn prompt(context: &Context, token: Option<&str>) -> String {
    let subject = match token {
        Some(t) => format!("a {t} creature"),
        None => "a creature".to_string(),
    };
    let wearing = match context.accessory {
        Accessory::None => String::new(),
        a => format!(" wearing a {a}"),
    };
    format!(
        "{subject}{wearing} on a {} background, {}, {}",
        context.background,
        context.size,
        position_phrase(context.position)
    )
}

/// The generic (base model) caption of a context.
pub fn caption(context: &Context) -> String {
    prompt(context, None)
}

/// The subject prompt: the caption with `token` before "creature".
pub fn subject_prompt(context: &Context, token: &str) -> String {
    prompt(context, Some(token))
}

/// A caption or a subject prompt → `(token if any, context)`. Case and surrounding
/// whitespace are ignored; anything else outside the grammar is an error.
pub fn parse_prompt(text: &str) -> Result<(Option<String>, Context)> {
    let bad = || format!("not a toy-world caption: {text:?}");
    let lower = text.trim().to_lowercase();
    let (head, rest) = lower.split_once(" background, ").with_context(bad)?;
    let mut parts = rest.splitn(2, ", ");
    let size = Size::from_name(parts.next().unwrap_or("")).with_context(bad)?;
    let position = match parts.next().unwrap_or("") {
        "on the left" => Position::Left,
        "in the center" => Position::Center,
        "on the right" => Position::Right,
        other => bail!("{}: unknown position phrase {other:?}", bad()),
    };
    let (head, background) = head.rsplit_once(" on a ").with_context(bad)?;
    let background = Background::from_name(background).with_context(bad)?;
    let (head, accessory) = match head.split_once(" wearing a ") {
        Some((h, a)) if a != "none" => (h, Accessory::from_name(a).with_context(bad)?),
        Some(_) => bail!("{}", bad()),
        None => (head, Accessory::None),
    };
    let words: Vec<&str> = head.split(' ').collect();
    let token = match words.as_slice() {
        ["a", "creature"] => None,
        ["a", token, "creature"] if !token.is_empty() => Some(token.to_string()),
        _ => bail!("{}: expected \"a creature\" or \"a TOKEN creature\"", bad()),
    };
    let context = Context {
        background,
        position,
        size,
        accessory,
    };
    Ok((token, context))
}

/// The context named by a caption or subject prompt.
pub fn parse_caption(text: &str) -> Result<Context> {
    parse_prompt(text).map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example() {
        let c = Context {
            background: Background::Sky,
            position: Position::Left,
            size: Size::Small,
            accessory: Accessory::Hat,
        };
        assert_eq!(
            caption(&c),
            "a creature wearing a hat on a sky background, small, on the left"
        );
        assert_eq!(
            subject_prompt(&c, "sks"),
            "a sks creature wearing a hat on a sky background, small, on the left"
        );
        let (t, p) =
            parse_prompt("  A sks creature wearing a hat on a sky background, small, on the left ")
                .unwrap();
        assert_eq!((t.as_deref(), p), (Some("sks"), c));
    }
}
