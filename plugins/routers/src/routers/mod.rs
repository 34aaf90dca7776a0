//! The shipped routers, one file each, and their registration.

mod common;
pub mod dense;
pub mod expert_choice;
pub mod expert_race;
pub mod token_choice;

pub use dense::DenseRouter;
pub use expert_choice::ExpertChoiceRouter;
pub use expert_race::{ExpertRaceRouter, ScoreFn};
pub use token_choice::TokenChoiceRouter;

use ecdit_engine::{Registry, Result, Router};
use std::sync::Arc;

/// Registers expert choice, token choice, dense and expert race.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register_router(
        ExpertChoiceRouter::info(),
        Arc::new(|p| Ok(Box::new(ExpertChoiceRouter::from_params(p)?) as Box<dyn Router>)),
    )?;
    registry.register_router(
        TokenChoiceRouter::info(),
        Arc::new(|p| Ok(Box::new(TokenChoiceRouter::from_params(p)?) as Box<dyn Router>)),
    )?;
    registry.register_router(
        DenseRouter::info(),
        Arc::new(|_| Ok(Box::new(DenseRouter) as Box<dyn Router>)),
    )?;
    registry.register_router(
        ExpertRaceRouter::info(),
        Arc::new(|p| Ok(Box::new(ExpertRaceRouter::from_params(p)?) as Box<dyn Router>)),
    )
}
