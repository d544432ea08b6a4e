//! The build script (a build script speaks to cargo on stdout).
//! Links what llama-cpp-sys-2's build script cannot: with `--features
//! cuda` on the toolkit `scripts/setup.sh --gpu cuda` installs from PyPI,
//! whose cuBLAS is shared libraries only (llama-cpp-sys-2 names the static
//! ones, for which setup leaves empty stand-ins), the shared ones.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=scripts/build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let roots = std::env::var_os("CUDA_PATH").map(PathBuf::from).into_iter().chain([PathBuf::from("/usr/local/cuda")]);
    for root in roots {
        let lib = root.join("lib64");
        if lib.join(".elpis-wheels").exists() {
            let lib = lib.canonicalize().unwrap_or(lib);
            println!("cargo:rustc-link-search=native={}", lib.display());
            println!("cargo:rustc-link-lib=dylib=cublas");
            println!("cargo:rustc-link-lib=dylib=cublasLt");
            // Found at run time where setup put them (another machine's
            // toolkit or driver package puts them on the loader's path).
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,-rpath,/usr/local/cuda/lib64");
            return;
        }
    }
}
