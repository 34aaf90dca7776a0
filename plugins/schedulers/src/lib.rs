//! # ecdit-schedulers
//!
//! The diffusion processes behind [`ecdit_engine::Scheduler`]:
//! - [`RectifiedFlow`] (`rectified-flow`, EC-DiT's objective): `x_t = (1 - t) x0 + t noise`,
//!   velocity target, logit-normal training times, Euler sampling with the optional SD3
//!   timestep shift;
//! - [`Ddpm`] (`ddpm`, for DiT checkpoints): linear betas, epsilon target, deterministic
//!   DDIM sampling (eta = 0).
//!
//! Both are built by name from a JSON spec through [`register`].
#![warn(missing_docs)]

mod buffers;
pub mod ddpm;
pub mod rectified_flow;

pub use ddpm::{Ddpm, TimestepSpacing};
pub use rectified_flow::RectifiedFlow;

use ecdit_engine::{ComponentInfo, Family, Registry, Result, Scheduler};
use std::sync::Arc;

/// Registers `rectified-flow` and `ddpm` into `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let infos = [
        info(
            RectifiedFlow::KIND,
            RectifiedFlow::DESCRIPTION,
            RectifiedFlow::param_infos(),
        ),
        info(Ddpm::KIND, Ddpm::DESCRIPTION, Ddpm::param_infos()),
    ];
    // All or nothing: a clash on the second kind must not leave the first registered.
    registry.check_free(&infos)?;
    let [flow, ddpm] = infos;
    registry.register_scheduler(
        flow,
        Arc::new(|params| Ok(Box::new(RectifiedFlow::from_params(params)?) as Box<dyn Scheduler>)),
    )?;
    registry.register_scheduler(
        ddpm,
        Arc::new(|params| Ok(Box::new(Ddpm::from_params(params)?) as Box<dyn Scheduler>)),
    )?;
    Ok(())
}

fn info(kind: &str, description: &str, params: Vec<ecdit_engine::ParamInfo>) -> ComponentInfo {
    ComponentInfo {
        family: Family::Scheduler,
        kind: kind.into(),
        description: description.into(),
        params,
        origin: "builtin".into(),
    }
}
