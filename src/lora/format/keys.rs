//! Tensor names of every LoRA format loracast reads, parsed into and generated from the typed
//! sites (SPEC §5). The names follow diffusers 0.42.1 (`loaders/lora_conversion_utils.py`,
//! `utils/state_dict_utils.py`) and kohya sd-scripts:
//!
//! | format | A (down) / B (up) / alpha |
//! |---|---|
//! | PEFT | `unet.<module>.lora_A.weight` / `.lora_B.weight` (alpha in the header metadata) |
//! | old diffusers | `unet.<module>.lora.down.weight` / `.lora.up.weight`, or `unet.<…>.attn2[.processor].to_q_lora.down.weight` |
//! | kohya | `lora_unet_<module, "_"-joined>.lora_down.weight` / `.lora_up.weight` / `.alpha` |
//! | kohya LDM | `lora_unet_{input_blocks_<n>,middle_block,output_blocks_<n>}_1_transformer_blocks_<k>_attn2_to_q…` |
//!
//! `<module>` is `{down_blocks.<i>|mid_block|up_blocks.<i>}.attentions.<j>.transformer_blocks.<k>.attn2.to_{q,k,v}`;
//! the `unet.` prefix is optional (diffusers' `load_lora_adapter(prefix=None)` layout), and
//! `.processor.` may follow `attn2` in old files (diffusers drops it on load). Names are parsed
//! with a small grammar over the path segments, never by string replacement.
use crate::lora::{BlockLoc, Proj, TransformerSite};

/// A site without its shape: which projection of which transformer block.
pub type SiteKey = (TransformerSite, Proj);

/// What a tensor is to its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// A: `lora_A` / `lora.down` / `lora_down`, `[r, in]`.
    Down,
    /// B: `lora_B` / `lora.up` / `lora_up`, `[out, r]`.
    Up,
    /// kohya's 0-dim `alpha`.
    Alpha,
}

/// The naming scheme of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Peft,
    DiffusersOld,
    Kohya,
    KohyaLdm,
}

/// One parsed tensor name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedKey {
    pub family: Family,
    pub site: SiteKey,
    pub role: Role,
    /// The key starts with `unet.` (diffusers families only).
    pub prefixed: bool,
}

const KOHYA_PREFIX: &str = "lora_unet_";

/// Parses one tensor name; `Err` says why the key is not an attn2 q/k/v LoRA tensor.
/// `layers_per_block` maps LDM-layout block numbers (SD1.x: 2).
pub fn parse_key(key: &str, layers_per_block: i64) -> Result<ParsedKey, String> {
    if key.starts_with("lora_te") || key.starts_with("text_encoder") {
        return Err("text-encoder LoRA is not supported".into());
    }
    if key.contains("dora_scale") || key.contains("lora_magnitude_vector") {
        return Err("DoRA is not supported".into());
    }
    let parsed = if let Some(rest) = key.strip_prefix(KOHYA_PREFIX) {
        parse_kohya(rest, layers_per_block)
    } else {
        parse_diffusers(key)
    };
    parsed.ok_or_else(|| match key.strip_prefix(KOHYA_PREFIX) {
        Some(rest)
            if ["input_blocks", "middle_block", "output_blocks"]
                .iter()
                .any(|b| rest.starts_with(b))
                && rest.contains("attn2") =>
        {
            format!(
                "LDM-layout name that maps to no attn2 to_q/to_k/to_v with layers_per_block = \
                 {layers_per_block} (`lora convert/info`: pass the pipeline it is for as --base)"
            )
        }
        _ => unsupported_reason(key),
    })
}

fn parse_kohya(rest: &str, layers_per_block: i64) -> Option<ParsedKey> {
    let (module, suffix) = rest.split_once('.')?;
    let role = match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        _ => return None,
    };
    let (family, site) = match parse_module(module, '_', false) {
        Some(site) => (Family::Kohya, site),
        None => (Family::KohyaLdm, parse_ldm(module, layers_per_block)?),
    };
    Some(ParsedKey {
        family,
        site,
        role,
        prefixed: false,
    })
}

fn parse_diffusers(key: &str) -> Option<ParsedKey> {
    let (prefixed, rest) = match key.strip_prefix("unet.") {
        Some(rest) => (true, rest),
        None => (false, key),
    };
    const SUFFIXES: [(&str, Family, Role); 6] = [
        (".lora_A.weight", Family::Peft, Role::Down),
        (".lora_B.weight", Family::Peft, Role::Up),
        (".lora.down.weight", Family::DiffusersOld, Role::Down),
        (".lora.up.weight", Family::DiffusersOld, Role::Up),
        ("_lora.down.weight", Family::DiffusersOld, Role::Down),
        ("_lora.up.weight", Family::DiffusersOld, Role::Up),
    ];
    let (module, family, role) = SUFFIXES
        .iter()
        .find_map(|(s, f, r)| rest.strip_suffix(s).map(|m| (m, *f, *r)))?;
    let site = parse_module(module, '.', family == Family::DiffusersOld)?;
    Some(ParsedKey {
        family,
        site,
        role,
        prefixed,
    })
}

/// A hint for a key that is not an attn2 q/k/v LoRA tensor.
fn unsupported_reason(key: &str) -> String {
    let segments: Vec<&str> = key.split(['.', '_']).collect();
    let has = |w: &str| segments.contains(&w);
    let what = if key.contains("attn1") {
        "self-attention (attn1)"
    } else if has("ff") {
        "the feed-forward layers (ff)"
    } else if key.contains("to_out") || (has("to") && has("out")) {
        "attn2.to_out"
    } else if key.contains("proj_in") || key.contains("proj_out") {
        "proj_in/proj_out"
    } else if key.contains("resnets") || key.contains("conv") || key.contains("time_emb") {
        "convolution/resnet layers"
    } else {
        return "not a LoRA tensor name loracast knows (lora_A/lora_B, lora.down/lora.up, lora_down/lora_up/alpha on attn2 to_q/to_k/to_v)".into();
    };
    format!("LoRA on {what} is not supported, only on attn2 to_q/to_k/to_v")
}

/// `<loc> SEP attentions SEP j SEP transformer_blocks SEP k SEP attn2 [SEP processor] SEP to_x`.
fn parse_module(s: &str, sep: char, allow_processor: bool) -> Option<SiteKey> {
    let mut c = Cursor { rest: s, sep };
    let loc = if c.word("down_blocks") {
        c.sep()?;
        BlockLoc::Down(c.num()?)
    } else if c.word("mid_block") {
        BlockLoc::Mid
    } else if c.word("up_blocks") {
        c.sep()?;
        BlockLoc::Up(c.num()?)
    } else {
        return None;
    };
    c.sep()?;
    let attention = c.field("attentions")?;
    let block = c.field("transformer_blocks")?;
    let proj = c.attn2_proj(allow_processor)?;
    let site = TransformerSite {
        loc,
        attention,
        block,
    };
    c.rest.is_empty().then_some((site, proj))
}

/// LDM (original SD) layout, `_`-joined: `input_blocks_<n>_1_…`, `middle_block_1_…`,
/// `output_blocks_<n>_1_…` (index 1 of an LDM block is its attention). With `L` layers per
/// block, input block `n ≥ 1` is layer `(n−1) mod (L+1)` of down block `(n−1) div (L+1)` (the
/// last slot of each level is the downsampler), output block `n` is attention `n mod (L+1)` of up
/// block `n div (L+1)` (diffusers' `_maybe_map_sgm_blocks_to_diffusers`).
fn parse_ldm(s: &str, layers_per_block: i64) -> Option<SiteKey> {
    let per = usize::try_from(layers_per_block).ok()? + 1;
    let mut c = Cursor { rest: s, sep: '_' };
    let (loc, attention) = if c.word("input_blocks") {
        c.sep()?;
        let n = c.num()?.checked_sub(1)?;
        let (level, layer) = (n / per, n % per);
        (layer + 1 < per).then_some((BlockLoc::Down(level), layer))?
    } else if c.word("middle_block") {
        (BlockLoc::Mid, 0)
    } else if c.word("output_blocks") {
        c.sep()?;
        let n = c.num()?;
        (BlockLoc::Up(n / per), n % per)
    } else {
        return None;
    };
    c.sep()?;
    // Index 1 inside an LDM block is the SpatialTransformer (0 = resnet, 2 = up/downsampler).
    (c.num()? == 1).then_some(())?;
    c.sep()?;
    let block = c.field("transformer_blocks")?;
    let proj = c.attn2_proj(false)?;
    let site = TransformerSite {
        loc,
        attention,
        block,
    };
    c.rest.is_empty().then_some((site, proj))
}

/// The path segments of a site's module, e.g. `["down_blocks", "0", "attentions", "1", …, "to_q"]`.
pub fn module_segments(site: &SiteKey) -> Vec<String> {
    let (t, proj) = site;
    let mut seg: Vec<String> = match t.loc {
        BlockLoc::Down(i) => vec!["down_blocks".into(), i.to_string()],
        BlockLoc::Mid => vec!["mid_block".into()],
        BlockLoc::Up(i) => vec!["up_blocks".into(), i.to_string()],
    };
    seg.extend([
        "attentions".into(),
        t.attention.to_string(),
        "transformer_blocks".into(),
        t.block.to_string(),
        "attn2".into(),
        proj.name().into(),
    ]);
    seg
}

/// diffusers module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q`).
pub fn module_path(site: &SiteKey) -> String {
    module_segments(site).join(".")
}

/// diffusers-PEFT key with the `unet.` prefix.
pub fn peft_key(site: &SiteKey, role: Role) -> String {
    let suffix = match role {
        Role::Down => "lora_A.weight",
        Role::Up => "lora_B.weight",
        Role::Alpha => unreachable!("PEFT files keep alpha in the metadata"),
    };
    format!("unet.{}.{suffix}", module_path(site))
}

/// kohya key (diffusers-layout module names, as sd-scripts writes them for SD1.x).
pub fn kohya_key(site: &SiteKey, role: Role) -> String {
    let suffix = match role {
        Role::Down => "lora_down.weight",
        Role::Up => "lora_up.weight",
        Role::Alpha => "alpha",
    };
    format!("{KOHYA_PREFIX}{}.{suffix}", module_segments(site).join("_"))
}

/// kohya key in the LDM (SGM) layout, as kohya sd-scripts writes SD1.x LDM and SDXL LoRAs:
/// the inverse of [`parse_ldm`] for `layers_per_block` (down block `b` attention `a` → input
/// block `1 + b·(L+1) + a`, mid → `middle_block_1`, up block `b` attention `a` → output block
/// `b·(L+1) + a`).
pub fn kohya_ldm_key(site: &SiteKey, role: Role, layers_per_block: i64) -> String {
    let (t, proj) = site;
    let per = layers_per_block.max(0) as usize + 1;
    let block = match t.loc {
        BlockLoc::Down(b) => format!("input_blocks_{}_1", 1 + b * per + t.attention),
        BlockLoc::Mid => "middle_block_1".to_string(),
        BlockLoc::Up(b) => format!("output_blocks_{}_1", b * per + t.attention),
    };
    let suffix = match role {
        Role::Down => "lora_down.weight",
        Role::Up => "lora_up.weight",
        Role::Alpha => "alpha",
    };
    format!(
        "{KOHYA_PREFIX}{block}_transformer_blocks_{}_attn2_{}.{suffix}",
        t.block,
        proj.name()
    )
}

/// A cursor over a module path with a fixed separator.
struct Cursor<'a> {
    rest: &'a str,
    sep: char,
}

impl Cursor<'_> {
    /// Consumes `w` if the rest starts with it as a whole segment.
    fn word(&mut self, w: &str) -> bool {
        match self.rest.strip_prefix(w) {
            Some(r) if r.is_empty() || r.starts_with(self.sep) => {
                self.rest = r;
                true
            }
            _ => false,
        }
    }

    fn sep(&mut self) -> Option<()> {
        self.rest = self.rest.strip_prefix(self.sep)?;
        Some(())
    }

    /// A decimal index without leading zeros.
    fn num(&mut self) -> Option<usize> {
        let end = self
            .rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(self.rest.len());
        let digits = &self.rest[..end];
        if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        self.rest = &self.rest[end..];
        digits.parse().ok()
    }

    /// `name SEP <n> SEP`.
    fn field(&mut self, name: &str) -> Option<usize> {
        self.word(name).then_some(())?;
        self.sep()?;
        let n = self.num()?;
        self.sep()?;
        Some(n)
    }

    /// `attn2 [SEP processor] SEP to_q|to_k|to_v`.
    fn attn2_proj(&mut self, allow_processor: bool) -> Option<Proj> {
        self.word("attn2").then_some(())?;
        self.sep()?;
        if allow_processor && self.word("processor") {
            self.sep()?;
        }
        let proj = Proj::ALL.into_iter().find(|p| self.word(p.name()))?;
        Some(proj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(loc: BlockLoc, attention: usize, block: usize, proj: Proj) -> SiteKey {
        (
            TransformerSite {
                loc,
                attention,
                block,
            },
            proj,
        )
    }

    #[test]
    fn generated_keys_parse_back() {
        for loc in [BlockLoc::Down(1), BlockLoc::Mid, BlockLoc::Up(12)] {
            for proj in Proj::ALL {
                let s = site(loc, 1, 10, proj);
                for role in [Role::Down, Role::Up] {
                    let p = parse_key(&peft_key(&s, role), 2).unwrap();
                    assert_eq!(
                        (p.family, p.site, p.role, p.prefixed),
                        (Family::Peft, s, role, true)
                    );
                }
                for role in [Role::Down, Role::Up, Role::Alpha] {
                    let p = parse_key(&kohya_key(&s, role), 2).unwrap();
                    assert_eq!((p.family, p.site, p.role), (Family::Kohya, s, role));
                }
            }
        }
    }

    #[test]
    fn old_diffusers_and_unprefixed_keys() {
        let s = site(BlockLoc::Up(1), 2, 0, Proj::K);
        let m = "up_blocks.1.attentions.2.transformer_blocks.0.attn2";
        for (key, prefixed) in [
            (format!("unet.{m}.to_k.lora.down.weight"), true),
            (format!("unet.{m}.processor.to_k.lora.down.weight"), true),
            (format!("unet.{m}.processor.to_k_lora.down.weight"), true),
            (format!("unet.{m}.to_k_lora.down.weight"), true),
            (format!("{m}.processor.to_k_lora.down.weight"), false),
        ] {
            let p = parse_key(&key, 2).unwrap();
            assert_eq!(p.family, Family::DiffusersOld, "{key}");
            assert_eq!(
                (p.site, p.role, p.prefixed),
                (s, Role::Down, prefixed),
                "{key}"
            );
        }
        let p = parse_key(&format!("{m}.to_k.lora_B.weight"), 2).unwrap();
        assert_eq!(
            (p.family, p.role, p.prefixed),
            (Family::Peft, Role::Up, false)
        );
        // `.processor.` is an old-diffusers spelling only.
        assert!(parse_key(&format!("unet.{m}.processor.to_k.lora_A.weight"), 2).is_err());
    }

    #[test]
    fn ldm_keys_parse_back() {
        for lpb in [1, 2, 3] {
            for (loc, attention) in [
                (BlockLoc::Down(0), 0),
                (BlockLoc::Down(2), lpb as usize - 1),
                (BlockLoc::Mid, 0),
                (BlockLoc::Up(0), 0),
                (BlockLoc::Up(3), lpb as usize),
            ] {
                for proj in Proj::ALL {
                    let s = site(loc, attention, 4, proj);
                    for role in [Role::Down, Role::Up, Role::Alpha] {
                        let key = kohya_ldm_key(&s, role, lpb);
                        let p = parse_key(&key, lpb).unwrap();
                        assert_eq!(
                            (p.family, p.site, p.role),
                            (Family::KohyaLdm, s, role),
                            "{key}"
                        );
                    }
                }
            }
        }
        // sd-scripts' SDXL names (sdxl-ipadapter-facts §6).
        let s = site(BlockLoc::Down(1), 0, 0, Proj::Q);
        assert_eq!(
            kohya_ldm_key(&s, Role::Down, 2),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.lora_down.weight"
        );
    }

    #[test]
    fn ldm_layout_follows_layers_per_block() {
        let key = |m: &str| format!("lora_unet_{m}_transformer_blocks_1_attn2_to_v.lora_up.weight");
        let cases = [
            ("input_blocks_1_1", 2, BlockLoc::Down(0), 0),
            ("input_blocks_2_1", 2, BlockLoc::Down(0), 1),
            ("input_blocks_4_1", 2, BlockLoc::Down(1), 0),
            ("input_blocks_8_1", 2, BlockLoc::Down(2), 1),
            ("middle_block_1", 2, BlockLoc::Mid, 0),
            ("output_blocks_3_1", 2, BlockLoc::Up(1), 0),
            ("output_blocks_11_1", 2, BlockLoc::Up(3), 2),
            ("input_blocks_3_1", 1, BlockLoc::Down(1), 0),
            ("output_blocks_1_1", 1, BlockLoc::Up(0), 1),
        ];
        for (m, lpb, loc, attention) in cases {
            let p = parse_key(&key(m), lpb).unwrap();
            assert_eq!(p.family, Family::KohyaLdm);
            assert_eq!(p.site, site(loc, attention, 1, Proj::V), "{m} lpb {lpb}");
        }
        // Downsampler slots, conv_in, resnets are not attention blocks.
        for m in [
            "input_blocks_3_1",
            "input_blocks_0_1",
            "middle_block_0",
            "output_blocks_2_2",
        ] {
            assert!(parse_key(&key(m), 2).is_err(), "{m}");
        }
    }

    #[test]
    fn unsupported_keys_say_why() {
        let cases = [
            ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "text-encoder"),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "text-encoder"),
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", "attn1"),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_up.weight", "ff"),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight", "to_out"),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.dora_scale", "DoRA"),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.hada_w1_a", "not a LoRA"),
            ("unet.down_blocks.00.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight", "not a LoRA"),
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_qq.lora_A.weight", "not a LoRA"),
        ];
        for (key, needle) in cases {
            let e = parse_key(key, 2).unwrap_err();
            assert!(e.contains(needle), "{key}: {e}");
        }
    }
}
