//! Checking a JSON component spec against the parameters a component declares.
//!
//! A spec is `{"kind": "...", ...params}`. [`check_params`] rejects unknown,
//! missing and mistyped parameters with an error that names the field and the
//! value, and fills in defaults, so factories only see complete parameter sets.

use crate::error::{EngineError, Result};
use crate::registry::{ParamInfo, ParamType};
use serde_json::{Map, Value};

/// Splits a spec into its kind and its parameter object.
pub fn split_spec(family: &str, spec: &Value) -> Result<(String, Map<String, Value>)> {
    let bad = |reason: &str| EngineError::BadSpec {
        family: family.to_string(),
        reason: reason.to_string(),
        spec: spec.to_string(),
    };
    let obj = match spec {
        // A bare string is shorthand for a kind with default parameters.
        Value::String(kind) => return Ok((kind.clone(), Map::new())),
        Value::Object(obj) => obj,
        _ => return Err(bad("expected a JSON object with a \"kind\" field, or a kind name")),
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(bad("\"kind\" must be a string")),
        None => return Err(bad("missing \"kind\"")),
    };
    let mut params = obj.clone();
    params.remove("kind");
    Ok((kind, params))
}

/// Validates `params` against `declared`, returning them with defaults filled.
/// `component` names the component in errors (e.g. `router 'expert-choice'`).
pub fn check_params(
    component: &str,
    declared: &[ParamInfo],
    params: &Map<String, Value>,
) -> Result<Map<String, Value>> {
    for (key, value) in params {
        if !declared.iter().any(|p| &p.name == key) {
            let known: Vec<&str> = declared.iter().map(|p| p.name.as_str()).collect();
            return Err(EngineError::param(
                component,
                key,
                value,
                format!(
                    "unknown parameter (known: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    let mut full = Map::new();
    for p in declared {
        let value = match (params.get(&p.name), &p.default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(EngineError::param(
                    component,
                    &p.name,
                    "<missing>",
                    format!("required {} parameter", p.ty.describe()),
                ))
            }
        };
        if !p.ty.accepts(&value) {
            return Err(EngineError::param(
                component,
                &p.name,
                &value,
                format!("expected {}", p.ty.describe()),
            ));
        }
        full.insert(p.name.clone(), value);
    }
    Ok(full)
}

/// Reads a typed parameter out of a checked parameter map.
pub fn get<T: serde::de::DeserializeOwned>(component: &str, params: &Map<String, Value>, name: &str) -> Result<T> {
    let value = params.get(name).cloned().unwrap_or(Value::Null);
    serde_json::from_value(value.clone()).map_err(|e| EngineError::param(component, name, value, e.to_string()))
}

impl ParamType {
    /// Whether a JSON value has this type.
    pub fn accepts(&self, v: &Value) -> bool {
        match self {
            ParamType::Float => v.is_number(),
            ParamType::Int => v.is_u64() || v.as_f64().is_some_and(|f| f >= 0.0 && f.fract() == 0.0),
            ParamType::Bool => v.is_boolean(),
            ParamType::Str => v.is_string(),
            ParamType::Choice(options) => v.as_str().is_some_and(|s| options.iter().any(|o| o == s)),
            ParamType::Groups => serde_json::from_value::<crate::router::RoutingGroups>(v.clone()).is_ok(),
            ParamType::OptionalFloat => v.is_null() || v.is_number(),
            ParamType::Json => true,
        }
    }

    /// A phrase for error messages and `ecdit components`.
    pub fn describe(&self) -> String {
        match self {
            ParamType::Float => "a number".into(),
            ParamType::Int => "a non-negative integer".into(),
            ParamType::Bool => "true or false".into(),
            ParamType::Str => "a string".into(),
            ParamType::Choice(options) => format!("one of {}", options.join(", ")),
            ParamType::Groups => "\"per_sample\", \"batch\" or {\"tokens\": N}".into(),
            ParamType::OptionalFloat => "a number or null".into(),
            ParamType::Json => "any JSON value".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared() -> Vec<ParamInfo> {
        vec![
            ParamInfo::new("capacity_factor", ParamType::Float, Some(json!(2.0)), "f_c"),
            ParamInfo::new("k", ParamType::Int, None, "experts per token"),
        ]
    }

    #[test]
    fn fills_defaults_and_rejects_unknown_missing_mistyped() {
        let p = json!({"k": 2}).as_object().unwrap().clone();
        let full = check_params("router 'x'", &declared(), &p).unwrap();
        assert_eq!(full["capacity_factor"], json!(2.0));

        let p = json!({"k": 2, "bogus": 1}).as_object().unwrap().clone();
        let e = check_params("router 'x'", &declared(), &p).unwrap_err().to_string();
        assert!(
            e.contains("'bogus'") && e.contains("unknown") && e.contains("capacity_factor"),
            "{e}"
        );

        let e = check_params("router 'x'", &declared(), &Map::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'k'") && e.contains("<missing>"), "{e}");

        let p = json!({"k": "two"}).as_object().unwrap().clone();
        let e = check_params("router 'x'", &declared(), &p).unwrap_err().to_string();
        assert!(
            e.contains("'k'") && e.contains("\"two\"") && e.contains("integer"),
            "{e}"
        );
    }

    #[test]
    fn split_spec_needs_kind() {
        assert!(split_spec("router", &json!({"k": 1})).is_err());
        assert!(split_spec("router", &json!(3)).is_err());
        let (k, p) = split_spec("router", &json!({"kind": "dense", "a": 1})).unwrap();
        assert_eq!(k, "dense");
        assert_eq!(p.len(), 1);
        assert_eq!(split_spec("router", &json!("dense")).unwrap().0, "dense");
    }
}
