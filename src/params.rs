//! Parameter schemas: what a command accepts, checked at submit and again on
//! receive (a message may have been inserted straight into the queue).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The JSON type a parameter must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
}

impl ParamType {
    fn name(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match self {
            ParamType::String => value.is_string(),
            ParamType::Integer => value.is_i64() || value.is_u64(),
            ParamType::Number => value.is_number(),
            ParamType::Boolean => value.is_boolean(),
        }
    }
}

/// One parameter of a command.
#[derive(Debug, Clone)]
pub struct Param {
    pub kind: ParamType,
    pub required: bool,
    pub default: Option<Value>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Param {
    pub fn new(kind: ParamType) -> Self {
        Self {
            kind,
            required: false,
            default: None,
            min: None,
            max: None,
        }
    }

    pub fn default_value(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }

    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }
}

/// The parameters a command accepts. Unknown parameters are refused.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    params: BTreeMap<&'static str, Param>,
}

/// A parameter that broke its schema; `field` is what JSON-RPC errors name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Deserializes `value`, naming the failing field under `prefix` on error
/// (`tasks[0].config.bucket`).
pub fn deserialize_named<T: serde::de::DeserializeOwned>(
    value: Value,
    prefix: &str,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        let path = e.path().to_string();
        // Missing and unknown fields are reported on the map itself; the
        // field they concern is the first name in backticks.
        let key = if path == "." {
            message.split('`').nth(1).unwrap_or_default().to_owned()
        } else {
            path
        };
        let field = match (prefix.is_empty(), key.is_empty()) {
            (true, _) => key,
            (false, true) => prefix.to_owned(),
            (false, false) => format!("{prefix}.{key}"),
        };
        FieldError::new(field, message)
    })
}

impl Schema {
    pub fn with(mut self, name: &'static str, param: Param) -> Self {
        self.params.insert(name, param);
        self
    }

    /// A JSON description for `queue_manager_list_commands`.
    pub fn describe(&self) -> Value {
        let params = self
            .params
            .iter()
            .map(|(name, p)| {
                let mut d = Map::new();
                d.insert("type".into(), p.kind.name().into());
                d.insert("required".into(), p.required.into());
                if let Some(default) = &p.default {
                    d.insert("default".into(), default.clone());
                }
                if let Some(min) = p.min {
                    d.insert("min".into(), min.into());
                }
                if let Some(max) = p.max {
                    d.insert("max".into(), max.into());
                }
                (name.to_string(), Value::Object(d))
            })
            .collect();
        Value::Object(params)
    }

    /// Checks `given` and returns it with defaults filled in.
    pub fn apply(&self, given: &Map<String, Value>) -> Result<Map<String, Value>, FieldError> {
        if let Some(unknown) = given.keys().find(|k| !self.params.contains_key(k.as_str())) {
            return Err(FieldError::new(
                format!("parameters.{unknown}"),
                "unknown parameter",
            ));
        }
        let mut out = Map::new();
        for (name, param) in &self.params {
            let field = || format!("parameters.{name}");
            let value = match (given.get(*name), &param.default) {
                (Some(v), _) => v,
                (None, Some(default)) => default,
                (None, None) if param.required => {
                    return Err(FieldError::new(field(), "required parameter is missing"));
                }
                (None, None) => continue,
            };
            if !param.kind.admits(value) {
                return Err(FieldError::new(
                    field(),
                    format!("expected {}, got {value}", param.kind.name()),
                ));
            }
            if let Some(n) = value.as_f64()
                && (param.min.is_some_and(|min| n < min) || param.max.is_some_and(|max| n > max))
            {
                return Err(FieldError::new(
                    field(),
                    format!(
                        "{n} is outside {}..={}",
                        param.min.unwrap_or(f64::NEG_INFINITY),
                        param.max.unwrap_or(f64::INFINITY)
                    ),
                ));
            }
            out.insert(name.to_string(), value.clone());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::default()
            .with(
                "width",
                Param::new(ParamType::Integer)
                    .default_value(64)
                    .range(1.0, 4096.0),
            )
            .with("seconds", Param::new(ParamType::Number))
    }

    fn apply(v: Value) -> Result<Map<String, Value>, FieldError> {
        schema().apply(v.as_object().unwrap())
    }

    #[test]
    fn defaults_are_filled_in() {
        assert_eq!(apply(json!({})).unwrap()["width"], 64);
    }

    #[test]
    fn wrong_type_names_the_parameter() {
        let err = apply(json!({"width": "wide"})).unwrap_err();
        assert_eq!(err.field, "parameters.width");
    }

    #[test]
    fn integers_refuse_fractions() {
        assert!(apply(json!({"width": 1.5})).is_err());
        assert!(apply(json!({"seconds": 1.5})).is_ok());
    }

    #[test]
    fn out_of_range_is_refused() {
        assert_eq!(
            apply(json!({"width": 0})).unwrap_err().field,
            "parameters.width"
        );
    }

    #[test]
    fn unknown_parameter_is_refused() {
        assert_eq!(
            apply(json!({"depth": 3})).unwrap_err().field,
            "parameters.depth"
        );
    }

    #[test]
    fn required_parameter_must_be_given() {
        let s = Schema::default().with(
            "scene",
            Param {
                required: true,
                ..Param::new(ParamType::String)
            },
        );
        assert_eq!(s.apply(&Map::new()).unwrap_err().field, "parameters.scene");
    }
}
