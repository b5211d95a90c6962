//! The `loracast` binary: a thin shell over `loracast::cli`.
fn main() {
    std::process::exit(loracast::cli::main());
}
