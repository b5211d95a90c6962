//! Build script of the fuzz targets: the same rpath to libtorch's `lib/` folder as the main
//! crate's build.rs gives its binaries (a link argument of a dependency's build script does not
//! reach our binaries).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
