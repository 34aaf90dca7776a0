//! The one registry that builds any component from a JSON spec and lists what
//! it holds. Built-ins register at start-up; plugins register the same way,
//! tagged with where they came from.

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::expert::Expert;
use crate::router::Router;
use crate::scheduler::Scheduler;
use crate::spec::{check_params, split_spec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// The four component kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Compute backends.
    Backend,
    /// Routing strategies.
    Router,
    /// Expert networks.
    Expert,
    /// Diffusion processes.
    Scheduler,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Backend => "backend",
            Family::Router => "router",
            Family::Expert => "expert",
            Family::Scheduler => "scheduler",
        })
    }
}

/// The type of a declared parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Any JSON number.
    Float,
    /// A non-negative integer.
    Int,
    /// A boolean.
    Bool,
    /// A string.
    Str,
    /// One string out of a fixed list.
    Choice(Vec<String>),
    /// Routing groups: `"per_sample"`, `"batch"` or `{"tokens": N}`.
    Groups,
    /// A number or null (an optional limit).
    OptionalFloat,
    /// Anything (passed through).
    Json,
}

/// One declared parameter of a component (also the plugin ABI's `params_json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Name in the spec.
    pub name: String,
    /// Accepted type.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Default; `None` means required. In JSON an absent `default` means
    /// required and `"default": null` a null default.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present_value")]
    pub default: Option<Value>,
    /// One line of help.
    #[serde(default)]
    pub help: String,
}

/// A present JSON field, even `null`, is `Some` (an absent one is `None` via `default`).
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl ParamInfo {
    /// A parameter declaration.
    pub fn new(name: &str, ty: ParamType, default: Option<Value>, help: &str) -> Self {
        Self {
            name: name.into(),
            ty,
            default,
            help: help.into(),
        }
    }
}

/// What the registry knows about one component.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ComponentInfo {
    /// Component family.
    pub family: Family,
    /// Kind name used in specs.
    pub kind: String,
    /// One line of description.
    pub description: String,
    /// Declared parameters.
    pub params: Vec<ParamInfo>,
    /// `builtin` or the plugin library it came from.
    pub origin: String,
}

/// Builds a component from its checked parameters (defaults filled in).
pub type Factory<T> = Arc<dyn Fn(&Map<String, Value>) -> Result<T> + Send + Sync>;

struct Entry<T> {
    info: ComponentInfo,
    factory: Factory<T>,
}

struct Catalog<T> {
    family: Family,
    entries: BTreeMap<String, Entry<T>>,
}

impl<T> Catalog<T> {
    fn new(family: Family) -> Self {
        Self {
            family,
            entries: BTreeMap::new(),
        }
    }

    fn check_free(&self, info: &ComponentInfo) -> Result<()> {
        match self.entries.get(&info.kind) {
            Some(existing) => Err(EngineError::Duplicate {
                family: self.family.to_string(),
                kind: info.kind.clone(),
                existing: existing.info.origin.clone(),
                incoming: info.origin.clone(),
            }),
            None => Ok(()),
        }
    }

    fn insert(&mut self, info: ComponentInfo, factory: Factory<T>) -> Result<()> {
        self.check_free(&info)?;
        self.entries.insert(info.kind.clone(), Entry { info, factory });
        Ok(())
    }

    fn with_factories(&self) -> Vec<(ComponentInfo, Factory<T>)> {
        self.entries
            .values()
            .map(|e| (e.info.clone(), e.factory.clone()))
            .collect()
    }

    fn build(&self, spec: &Value) -> Result<T> {
        let family = self.family.to_string();
        let (kind, params) = split_spec(&family, spec)?;
        let entry = self.entries.get(&kind).ok_or_else(|| EngineError::UnknownKind {
            family: family.clone(),
            kind: kind.clone(),
            known: self.entries.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let full = check_params(&format!("{family} '{kind}'"), &entry.info.params, &params)?;
        (entry.factory)(&full)
    }
}

/// Holds every known component and builds them from specs.
pub struct Registry {
    backends: Catalog<Box<dyn Backend>>,
    routers: Catalog<Box<dyn Router>>,
    experts: Catalog<Box<dyn Expert>>,
    schedulers: Catalog<Box<dyn Scheduler>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry (the shipped components register through their
    /// crates' `register` functions; `ecdit_model::registry()` adds them all).
    pub fn new() -> Self {
        Self {
            backends: Catalog::new(Family::Backend),
            routers: Catalog::new(Family::Router),
            experts: Catalog::new(Family::Expert),
            schedulers: Catalog::new(Family::Scheduler),
        }
    }

    /// Registers a backend; errors if the kind is taken.
    pub fn register_backend(&mut self, info: ComponentInfo, factory: Factory<Box<dyn Backend>>) -> Result<()> {
        self.backends.insert(info, factory)
    }
    /// Registers a router; errors if the kind is taken.
    pub fn register_router(&mut self, info: ComponentInfo, factory: Factory<Box<dyn Router>>) -> Result<()> {
        self.routers.insert(info, factory)
    }
    /// Registers an expert; errors if the kind is taken.
    pub fn register_expert(&mut self, info: ComponentInfo, factory: Factory<Box<dyn Expert>>) -> Result<()> {
        self.experts.insert(info, factory)
    }
    /// Registers a scheduler; errors if the kind is taken.
    pub fn register_scheduler(&mut self, info: ComponentInfo, factory: Factory<Box<dyn Scheduler>>) -> Result<()> {
        self.schedulers.insert(info, factory)
    }

    /// Errors if any of `infos` would clash with a registered kind or with
    /// each other, so a plugin registers all of its components or none.
    pub fn check_free(&self, infos: &[ComponentInfo]) -> Result<()> {
        for (i, info) in infos.iter().enumerate() {
            if let Some(prev) = infos[..i]
                .iter()
                .find(|p| p.family == info.family && p.kind == info.kind)
            {
                return Err(EngineError::Duplicate {
                    family: info.family.to_string(),
                    kind: info.kind.clone(),
                    existing: prev.origin.clone(),
                    incoming: info.origin.clone(),
                });
            }
            match info.family {
                Family::Backend => self.backends.check_free(info)?,
                Family::Router => self.routers.check_free(info)?,
                Family::Expert => self.experts.check_free(info)?,
                Family::Scheduler => self.schedulers.check_free(info)?,
            }
        }
        Ok(())
    }

    /// Builds a backend from a spec.
    pub fn backend(&self, spec: &Value) -> Result<Box<dyn Backend>> {
        self.backends.build(spec)
    }
    /// Builds a router from a spec.
    pub fn router(&self, spec: &Value) -> Result<Box<dyn Router>> {
        self.routers.build(spec)
    }
    /// Builds an expert from a spec.
    pub fn expert(&self, spec: &Value) -> Result<Box<dyn Expert>> {
        self.experts.build(spec)
    }
    /// Builds a scheduler from a spec.
    pub fn scheduler(&self, spec: &Value) -> Result<Box<dyn Scheduler>> {
        self.schedulers.build(spec)
    }

    /// Routers with their factories, for the plugin exporter.
    pub(crate) fn router_factories(&self) -> Vec<(ComponentInfo, Factory<Box<dyn Router>>)> {
        self.routers.with_factories()
    }
    /// Schedulers with their factories, for the plugin exporter.
    pub(crate) fn scheduler_factories(&self) -> Vec<(ComponentInfo, Factory<Box<dyn Scheduler>>)> {
        self.schedulers.with_factories()
    }
    /// Backends with their factories, for the plugin exporter.
    pub(crate) fn backend_factories(&self) -> Vec<(ComponentInfo, Factory<Box<dyn Backend>>)> {
        self.backends.with_factories()
    }
    /// Experts with their factories, for the plugin exporter (ABI 2).
    pub(crate) fn expert_factories(&self) -> Vec<(ComponentInfo, Factory<Box<dyn Expert>>)> {
        self.experts.with_factories()
    }

    /// Everything registered, by family then kind.
    pub fn list(&self) -> Vec<ComponentInfo> {
        let mut out = Vec::new();
        out.extend(self.backends.entries.values().map(|e| e.info.clone()));
        out.extend(self.routers.entries.values().map(|e| e.info.clone()));
        out.extend(self.experts.entries.values().map(|e| e.info.clone()));
        out.extend(self.schedulers.entries.values().map(|e| e.info.clone()));
        out
    }
}
