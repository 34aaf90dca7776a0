//! The shipped schedulers as a dynamic library (cdylib) behind the ecdit plugin ABI.
//!
//! The implementation lives in `ecdit-schedulers` (linked statically by default);
//! this crate only exports it, so the same code runs both ways and the
//! workspace tests prove the two give identical results.
#![warn(missing_docs)]

ecdit_engine::export_plugin!(ecdit_schedulers::register);
