//! The HTML + JSON report of a toy-world run (`demo`'s report.html/metrics.json, `experiment
//! paper`'s report.html/results.json): a metrics table with the exact chance level and the
//! VAE ceiling, optional extra HTML (plots), and a grid reference | generations per method.
//! Written into `OUT.tmp` and renamed over `OUT`, so a failed run leaves nothing half-written.
use std::path::Path;

use anyhow::{Context as _, Result};

use super::toy::{to_png_bytes, Row, Subject};
use crate::data::{caption, subject_prompt, DEFAULT_TOKEN};

/// Everything a report shows.
pub struct Report<'a> {
    pub title: &'a str,
    /// The JSON file's name (`metrics.json`, `results.json`).
    pub json_name: &'a str,
    pub subjects: &'a [Subject],
    pub rows: &'a [Row],
    /// `images[row][subject][prompt]` for the rows shown in the grid (`grid_rows`).
    pub images: &'a [Vec<Vec<tch::Tensor>>],
    /// Index into `rows` of each entry of `images`.
    pub grid_rows: &'a [usize],
    /// (subject, prompt) fidelity.
    pub chance: (f64, f64),
    pub ceiling: (f64, f64),
    pub settings: serde_json::Value,
    /// HTML inserted after the metrics table.
    pub extra_html: String,
    /// Other files written into the folder: (name, bytes).
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// A row's label: `method guidance [κ=k] [steps]`.
pub fn label(r: &Row) -> String {
    let mut s = format!("{} {}", r.method, r.guidance);
    if let Some(k) = r.kappa {
        s.push_str(&format!(" κ={k}"));
    }
    if let Some(n) = r.finetune_steps {
        s.push_str(&format!(" {n} steps"));
    }
    s
}

/// The metrics table's columns (HTML and Markdown).
const COLUMNS: [&str; 8] = [
    "method",
    "guidance",
    "κ",
    "λ",
    "finetune steps",
    "subject fidelity",
    "prompt fidelity",
    "s/subject",
];

/// One row's cells in [`COLUMNS`] order, seconds with `secs_digits` decimals.
fn cells(r: &Row, secs_digits: usize) -> [String; 8] {
    let opt = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_else(|| "–".into());
    [
        r.method.clone(),
        r.guidance.clone(),
        opt(r.kappa),
        opt(r.lambda),
        r.finetune_steps
            .map(|n| n.to_string())
            .unwrap_or_else(|| "–".into()),
        format!("{:.3}", r.subject_fidelity),
        format!("{:.3}", r.prompt_fidelity),
        format!("{:.secs_digits$}", r.seconds_per_subject),
    ]
}

/// The rows as a Markdown table (for docs/RESULTS.md), with the chance and ceiling lines.
pub fn markdown_table(rows: &[Row], chance: (f64, f64), ceiling: (f64, f64)) -> String {
    let mut md = format!(
        "| {} |\n|{}\n",
        COLUMNS.join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for r in rows {
        md.push_str(&format!("| {} |\n", cells(r, 3).join(" | ")));
    }
    md.push_str(&format!(
        "| chance (exact) | | | | | {:.3} | {:.3} | |\n| ceiling (renders through the VAE) | | | | | {:.3} | {:.3} | |\n",
        chance.0, chance.1, ceiling.0, ceiling.1
    ));
    md
}

/// Writes `out/` (report.html, the JSON, images/) atomically.
pub fn write(out: &Path, rep: &Report) -> Result<()> {
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let result = write_into(&tmp, rep);
    if let Err(e) = result {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e).context(format!("writing {}", out.display()));
    }
    if out.exists() {
        std::fs::remove_dir_all(out)
            .with_context(|| format!("cannot replace {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

fn write_into(tmp: &Path, rep: &Report) -> Result<()> {
    std::fs::create_dir_all(tmp.join("images"))?;
    let json = serde_json::json!({
        "chance": {"subject_fidelity": rep.chance.0, "prompt_fidelity": rep.chance.1},
        "ceiling": {"subject_fidelity": rep.ceiling.0, "prompt_fidelity": rep.ceiling.1},
        "rows": rep.rows,
        "settings": rep.settings,
    });
    crate::util::write_atomic(
        &tmp.join(rep.json_name),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let mut html = format!(
        "<!doctype html><meta charset=utf-8><title>{0}</title><style>body{{font-family:sans-serif}}img{{width:96px;image-rendering:pixelated}}td,th{{padding:4px;text-align:center;font-size:12px}}table{{border-collapse:collapse}}</style>\n<h1>{0}</h1>\n",
        rep.title
    );
    html.push_str(&format!(
        "<h2>Metrics</h2><table border=1><tr><th>{}</tr>\n",
        COLUMNS.join("<th>")
    ));
    for r in rep.rows {
        html.push_str(&format!("<tr><td>{}</tr>\n", cells(r, 4).join("<td>")));
    }
    html.push_str(&format!(
        "<tr><td colspan=5>chance (exact)<td>{:.3}<td>{:.3}<td></tr><tr><td colspan=5>ceiling (renders through the VAE)<td>{:.3}<td>{:.3}<td></tr></table>\n",
        rep.chance.0, rep.chance.1, rep.ceiling.0, rep.ceiling.1
    ));
    html.push_str(&rep.extra_html);
    let labels: Vec<String> = rep.grid_rows.iter().map(|&i| label(&rep.rows[i])).collect();
    html.push_str("<h2>Generations</h2><p>Each cell: ");
    html.push_str(&labels.join(" | "));
    html.push_str("</p><table border=1>\n");
    for (i, s) in rep.subjects.iter().enumerate() {
        let reference = format!("images/s{i}_reference.png");
        std::fs::write(tmp.join(&reference), s.reference.render().png_bytes()?)?;
        html.push_str(&format!(
            "<tr><td><img src=\"{reference}\"><br>reference<br>{}</td>",
            s.identity
        ));
        for (j, ctx) in s.contexts.iter().enumerate() {
            html.push_str("<td>");
            for (m, imgs) in rep.images.iter().enumerate() {
                let name = format!("images/s{i}_p{j}_m{m}.png");
                std::fs::write(tmp.join(&name), to_png_bytes(&imgs[i][j])?)?;
                html.push_str(&format!("<img src=\"{name}\" title=\"{}\">", labels[m]));
            }
            html.push_str(&format!(
                "<br>{}<br><i>{}</i></td>",
                subject_prompt(ctx, DEFAULT_TOKEN),
                caption(ctx)
            ));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    std::fs::write(tmp.join("report.html"), html)?;
    for (name, bytes) in &rep.extra_files {
        std::fs::write(tmp.join(name), bytes)?;
    }
    Ok(())
}

/// A report folder `--out`: refused if it exists without `--force`; its parents are created
/// (it is a folder of outputs, like `train --out`).
pub fn prepare_dir(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        anyhow::bail!(
            "--out {} already exists (pass --force to replace it)",
            out.display()
        );
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            anyhow::anyhow!(
                "--out {}: cannot create {}: {e}",
                out.display(),
                parent.display()
            )
        })?;
    }
    Ok(())
}
