//! Build script: give the final binaries an rpath to libtorch's `lib/` folder, and compile the
//! c10d bridge (`src/dist/c10d_bridge.cpp`, torch.distributed's engine) against that libtorch.
//!
//! torch-sys links libtorch dynamically but its own rpath does not reach our final link
//! (SPEC §4), so without this `target/release/loracast` would need LD_LIBRARY_PATH.
//! With the `cuda` feature, force-link `libtorch_cuda.so`, which `--as-needed` drops otherwise,
//! and compile the bridge's NCCL path (`-DUSE_C10D_NCCL`).
//!
//! The bridge is compiled as torch-sys compiles libtch (cc crate, `-std=c++17`,
//! `-D_GLIBCXX_USE_CXX11_ABI=1`, libtorch's two include dirs), plus `-DUSE_C10D_GLOO` and the
//! gloo headers vendored in `vendor/gloo/` (the wheel ships gloo's code, not its headers).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=src/dist/c10d_bridge.cpp");
    println!("cargo:rerun-if-changed=vendor/gloo");
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys always reports its libtorch; without it nothing below can be built.
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: the c10d bridge is not built");
        return;
    };
    let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    compile_bridge(&lib, cuda);
}

fn compile_bridge(lib: &Path, cuda: bool) {
    let root = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    let include = root.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .file("src/dist/c10d_bridge.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include("vendor/gloo/include")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_C10D_GLOO")
        // libtorch's headers are not ours to warn about (c++20 extensions, unused parameters).
        .flag_if_supported("-Wno-c++20-extensions")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .opt_level(2);
    if cuda {
        build.flag("-DUSE_C10D_NCCL");
        for dir in cuda_include_dirs(&root) {
            build.include(dir);
        }
    }
    build.compile("loracast_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    if cuda {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// NCCL and CUDA headers of the wheel's `nvidia-*` packages (site-packages/nvidia/*/include),
/// next to `torch/` in the same site-packages; `LORACAST_CUDA_INCLUDE` (colon-separated) adds more.
fn cuda_include_dirs(torch_root: &Path) -> Vec<PathBuf> {
    println!("cargo:rerun-if-env-changed=LORACAST_CUDA_INCLUDE");
    let mut dirs: Vec<PathBuf> = std::env::var("LORACAST_CUDA_INCLUDE")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Some(nvidia) = torch_root.parent().map(|p| p.join("nvidia")) {
        if let Ok(entries) = std::fs::read_dir(&nvidia) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("include"))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    dirs
}
