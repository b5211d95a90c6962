//! Build script: give the final binaries an rpath to libtorch's `lib/` folder.
//!
//! torch-sys links libtorch dynamically but its own rpath does not reach our final link
//! (SPEC §4), so without this `target/release/loracast` would need LD_LIBRARY_PATH.
//! With the `cuda` feature, force-link `libtorch_cuda.so`, which `--as-needed` drops otherwise.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
