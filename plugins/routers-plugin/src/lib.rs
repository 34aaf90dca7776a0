//! The shipped routers and experts as a dynamic library (cdylib) behind the
//! ecdit plugin ABI (version 2: experts cross it as a component kind).
//!
//! The implementation lives in `ecdit-routers` (linked statically by default);
//! this crate only exports it, so the same code runs both ways and the
//! workspace tests prove the two give identical results.
#![warn(missing_docs)]

ecdit_engine::export_plugin!(ecdit_routers::register);
