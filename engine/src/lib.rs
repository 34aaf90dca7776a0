//! # ecdit-engine
//!
//! The core of ecdit, with no knowledge of EC-DiT itself: the four component
//! traits ([`Backend`], [`Router`], [`Expert`], [`Scheduler`]), tensors that
//! live in buffers their backend allocated ([`Tensor`], views, dtypes), the
//! one parameter type ([`Param`]), the [`Registry`] that builds any component
//! from a JSON spec `{"kind": "...", ...params}`, and typed errors.
//!
//! Shipped components live in `plugins/` and register themselves into a
//! [`Registry`]; third-party ones arrive the same way.
#![warn(missing_docs)]

pub mod backend;
#[cfg(feature = "backend-kit")]
pub mod backend_kit;
pub mod buffer;
pub mod counting;
pub mod dtype;
pub mod error;
pub mod expert;
pub mod moe;
pub mod param;
pub mod plugin;
pub mod registry;
pub mod router;
#[cfg(feature = "router-kit")]
pub mod router_kit;
pub mod routing_math;
pub mod routing_stats;
pub mod scheduler;
pub mod spec;
pub mod tensor;
pub mod transfer;

pub use backend::{AdamW, AttnDims, Backend, GemmDims, ModChunks, PatchDims, RmsProp, RowDims, Unary};
pub use buffer::{Buffer, BufferStorage, BufferWatch, HostStorage};
pub use dtype::{bf16, DType, Element};
pub use error::{EngineError, Result};
pub use expert::{Expert, ExpertCache, ParamShape};
pub use moe::{MoeCache, MoeGrads, MoeLayer};
pub use param::{Init, Layout, Param, Params};
pub use registry::{ComponentInfo, Family, ParamInfo, ParamType, Registry};
pub use router::{expert_capacity, DeviceRouting, Dispatch, RouteShape, Router, Routing, RoutingGroups};
pub use routing_stats::RoutingStats;
pub use scheduler::Scheduler;
pub use tensor::{HostTensor, Shape, Tensor, TensorMut, TensorRef};
pub use transfer::BackendExt;
