//! `loracast experiment paper|open [--seed S] [--subjects N] --out DIR`: the papers' experiments
//! on held-out toy subjects (issues 6 and 17); the machinery is [`crate::eval::experiment`].
use anyhow::Result;
use clap::Subcommand;

use crate::eval::experiment::{self, OpenOptions, PaperOptions};

#[derive(Subcommand, Debug)]
pub enum ExperimentCommand {
    /// The papers' findings F1–F5 on held-out toy subjects → results.json + report.html.
    Paper(PaperOptions),
    /// The open category (θ0 = base + IP-Adapter-Plus): findings F6–F7 → results.json +
    /// report.html.
    Open(OpenOptions),
}

pub fn run(cmd: ExperimentCommand) -> Result<()> {
    match cmd {
        ExperimentCommand::Paper(args) => experiment::paper(args),
        ExperimentCommand::Open(args) => experiment::open(args),
    }
}
