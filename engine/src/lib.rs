//! # ecdit-engine
//!
//! The core of ecdit, with no knowledge of EC-DiT itself: the four component
//! traits ([`Backend`], [`Router`], [`Expert`], [`Scheduler`]), the host tensor
//! that converts to and from ndarray, the [`Registry`] that builds any component
//! from a JSON spec `{"kind": "...", ...params}`, and typed errors.
//!
//! Shipped components live in `plugins/` and register themselves into a
//! [`Registry`]; third-party ones arrive the same way.
#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod expert;
pub mod moe;
pub mod plugin;
pub mod registry;
pub mod router;
pub mod router_kit;
pub mod routing_stats;
pub mod scheduler;
pub mod spec;
pub mod tensor;

pub use backend::{AdamW, AttnDims, Backend, GemmDims, Unary};
pub use error::{EngineError, Result};
pub use expert::{Expert, ExpertCache, ParamShape};
pub use moe::{MoeCache, MoeGrads, MoeLayer};
pub use registry::{ComponentInfo, Family, ParamInfo, ParamType, Registry};
pub use router::{expert_capacity, Dispatch, RouteShape, Router, Routing, RoutingGroups};
pub use routing_stats::RoutingStats;
pub use scheduler::Scheduler;
pub use tensor::HostTensor;
