//! Makes the `imagegen` binary (and the test binaries) find libtorch at run time
//! without LD_LIBRARY_PATH: torch-sys tells us where libtorch's lib dir is, and we
//! record it as an rpath. `--no-as-needed -ltorch` keeps libtorch.so (and through it
//! libtorch_cuda.so) in the dependency list even though no Rust symbol refers to it
//! directly; without it CUDA looks unavailable at run time.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
