//! Finding the CUDA libraries before cudarc touches them.
//!
//! cudarc opens libcuda, libcublas and libnvrtc lazily and panics when one is missing.
//! So every way in (the registry factory, [`crate::CudaBackend::new`]) probes the
//! libraries here first and turns a missing one into an [`EngineError::Backend`].

use ecdit_engine::{EngineError, Result};

/// The names the driver library is looked up under, in order.
#[cfg(not(windows))]
pub const DRIVER_LIBRARIES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
/// The names the driver library is looked up under, in order.
#[cfg(windows)]
pub const DRIVER_LIBRARIES: [&str; 1] = ["nvcuda.dll"];

/// An error of the `cuda` backend.
pub fn cuda_error(reason: impl Into<String>) -> EngineError {
    EngineError::Backend {
        backend: "cuda".into(),
        reason: reason.into(),
    }
}

/// Ok when the driver library opens; otherwise `no CUDA driver found (tried ...: <dlopen error>)`.
pub fn probe_driver() -> Result<()> {
    let mut errors = Vec::new();
    for name in DRIVER_LIBRARIES {
        // SAFETY: opening libcuda runs only the driver's own initialisers. The handle is
        // dropped at once; cudarc opens its own when the backend is built.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(cuda_error(format!(
        "no CUDA driver found (tried {}: {})",
        DRIVER_LIBRARIES.join(", "),
        errors.join("; ")
    )))
}

/// Ok when one of the names cudarc will try for `lib` (`cublas`, `nvrtc`) opens.
/// `what` names the library for people (`cuBLAS`).
pub fn probe_toolkit_library(what: &str, lib: &str) -> Result<()> {
    let candidates = cudarc::get_lib_name_candidates(lib);
    let mut last_error = String::from("no candidate names");
    for name in &candidates {
        // SAFETY: as for the driver; these are NVIDIA's own libraries.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(cuda_error(format!(
        "the CUDA driver is present but {what} is not (tried {}; last error: {last_error}); \
         install the CUDA toolkit runtime libraries or add them to LD_LIBRARY_PATH",
        candidates.join(", ")
    )))
}

/// Everything the backend loads: the driver, cuBLAS and NVRTC.
pub fn probe_all() -> Result<()> {
    probe_driver()?;
    probe_toolkit_library("cuBLAS", "cublas")?;
    probe_toolkit_library("NVRTC", "nvrtc")?;
    Ok(())
}
