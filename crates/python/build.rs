//! Lets `cargo test` binaries (which embed the interpreter) find the libpython they were
//! linked against when it lives outside the loader's default paths (pyenv, venvs). Wheels
//! built by maturin do not link libpython at all (`PYO3_BUILD_EXTENSION_MODULE`).

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
