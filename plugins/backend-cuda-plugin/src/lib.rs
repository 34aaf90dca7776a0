//! The CUDA backend as a dynamic library (cdylib) behind the ecdit plugin ABI.
//!
//! The implementation lives in `ecdit-backend-cuda` (linked statically by default);
//! this crate only exports it, so the same code runs both ways and the
//! workspace tests prove the two give identical results.
#![warn(missing_docs)]

ecdit_engine::export_plugin!(ecdit_backend_cuda::register);
