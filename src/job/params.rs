//! Parameter schemas: what a command accepts, checked at submit and again on
//! receive (a message may have been inserted straight into the queue).

use std::collections::BTreeMap;

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The JSON type a parameter must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    /// A list whose elements all have the `items` type.
    Array,
}

impl ParamType {
    fn name(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Array => "array",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match self {
            ParamType::String => value.is_string(),
            ParamType::Integer => value.is_i64() || value.is_u64(),
            ParamType::Number => value.is_number(),
            ParamType::Boolean => value.is_boolean(),
            ParamType::Array => value.is_array(),
        }
    }
}

/// `[commands.NAME.parameters] NAME = { ... }`: one parameter as written in
/// workers.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// `string`, `integer`, `number`, `boolean` or `array`.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// For arrays: the type of every element (not itself an array).
    #[serde(default)]
    pub items: Option<ParamType>,
    /// The job must give it (unless a default is set).
    #[serde(default)]
    pub required: bool,
    /// Used when the job does not give it.
    #[serde(default)]
    pub default: Option<Value>,
    /// Smallest allowed number (for arrays: each element).
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest allowed number (for arrays: each element).
    #[serde(default)]
    pub max: Option<f64>,
    /// The only values allowed.
    #[serde(default, rename = "enum")]
    pub one_of: Option<Vec<Value>>,
    /// Regular expression a string must match; anchor it with `^…$`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Allow strings starting with `-` (which a program could take for an
    /// option). Off by default.
    #[serde(default)]
    pub allow_dash: bool,
}

/// One parameter of a command, ready to check values.
#[derive(Debug, Clone)]
pub struct Param {
    pub kind: ParamType,
    pub items: Option<ParamType>,
    pub required: bool,
    pub default: Option<Value>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub one_of: Option<Vec<Value>>,
    pub pattern: Option<Regex>,
    pub allow_dash: bool,
}

impl Param {
    pub fn new(kind: ParamType) -> Self {
        Self {
            kind,
            items: None,
            required: false,
            default: None,
            min: None,
            max: None,
            one_of: None,
            pattern: None,
            allow_dash: false,
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

    /// Builds a parameter from its spec; errors say what is inconsistent.
    pub fn from_spec(spec: &ParamSpec) -> Result<Self, String> {
        let items = match (spec.kind, spec.items) {
            (ParamType::Array, Some(ParamType::Array)) => {
                return Err("`items` cannot itself be `array`".into());
            }
            (ParamType::Array, Some(items)) => Some(items),
            (ParamType::Array, None) => return Err("an array needs `items`".into()),
            (_, Some(_)) => return Err("`items` is only for arrays".into()),
            (_, None) => None,
        };
        let pattern = spec
            .pattern
            .as_deref()
            .map(Regex::new)
            .transpose()
            .map_err(|e| format!("bad `pattern`: {e}"))?;
        let param = Self {
            kind: spec.kind,
            items,
            required: spec.required,
            default: spec.default.clone(),
            min: spec.min,
            max: spec.max,
            one_of: spec.one_of.clone(),
            pattern,
            allow_dash: spec.allow_dash,
        };
        if let Some(default) = &param.default {
            param
                .check(default, "default")
                .map_err(|e| format!("`default` does not fit the parameter: {}", e.reason))?;
        }
        Ok(param)
    }

    /// Checks one value (for arrays, every element).
    fn check(&self, value: &Value, field: &str) -> Result<(), FieldError> {
        if !self.kind.admits(value) {
            return Err(FieldError::new(
                field,
                format!("expected {}, got {value}", self.kind.name()),
            ));
        }
        match (value, self.items) {
            (Value::Array(elements), Some(items)) => {
                for (i, element) in elements.iter().enumerate() {
                    let field = format!("{field}[{i}]");
                    if !items.admits(element) {
                        return Err(FieldError::new(
                            field,
                            format!("expected {}, got {element}", items.name()),
                        ));
                    }
                    self.check_scalar(element, &field)?;
                }
                Ok(())
            }
            _ => self.check_scalar(value, field),
        }
    }

    fn check_scalar(&self, value: &Value, field: &str) -> Result<(), FieldError> {
        if let Some(n) = value.as_f64()
            && (self.min.is_some_and(|min| n < min) || self.max.is_some_and(|max| n > max))
        {
            return Err(FieldError::new(
                field,
                format!(
                    "{n} is outside {}..={}",
                    self.min.unwrap_or(f64::NEG_INFINITY),
                    self.max.unwrap_or(f64::INFINITY)
                ),
            ));
        }
        if let Some(allowed) = &self.one_of
            && !allowed.contains(value)
        {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return Err(FieldError::new(
                field,
                format!("{value} is not one of {}", list.join(", ")),
            ));
        }
        if let Value::String(text) = value {
            if let Some(pattern) = &self.pattern
                && !pattern.is_match(text)
            {
                return Err(FieldError::new(
                    field,
                    format!("{value} does not match {}", pattern.as_str()),
                ));
            }
            if text.starts_with('-') && !self.allow_dash {
                return Err(FieldError::new(
                    field,
                    format!("{value} starts with `-` (a program could read it as an option)"),
                ));
            }
        }
        Ok(())
    }
}

/// The parameters a command accepts. Unknown parameters are refused.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    params: BTreeMap<String, Param>,
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
    pub fn with(mut self, name: &str, param: Param) -> Self {
        self.params.insert(name.to_owned(), param);
        self
    }

    /// Builds a schema from `[commands.NAME.parameters]`; errors name the
    /// parameter.
    pub fn from_specs(specs: &BTreeMap<String, ParamSpec>) -> Result<Self, (String, String)> {
        let params = specs
            .iter()
            .map(|(name, spec)| {
                Param::from_spec(spec)
                    .map(|p| (name.clone(), p))
                    .map_err(|e| (name.clone(), e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { params })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
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
                if let Some(items) = p.items {
                    d.insert("items".into(), items.name().into());
                }
                if let Some(default) = &p.default {
                    d.insert("default".into(), default.clone());
                }
                // Whole limits read as integers (`4096`, not `4096.0`).
                let limit = |x: f64| {
                    if x.fract() == 0.0 && x.abs() < 9e15 {
                        Value::from(x as i64)
                    } else {
                        Value::from(x)
                    }
                };
                if let Some(min) = p.min {
                    d.insert("min".into(), limit(min));
                }
                if let Some(max) = p.max {
                    d.insert("max".into(), limit(max));
                }
                if let Some(one_of) = &p.one_of {
                    d.insert("enum".into(), one_of.clone().into());
                }
                if let Some(pattern) = &p.pattern {
                    d.insert("pattern".into(), pattern.as_str().into());
                }
                (name.clone(), Value::Object(d))
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
            let field = format!("parameters.{name}");
            let value = match (given.get(name), &param.default) {
                (Some(v), _) => v,
                (None, Some(default)) => default,
                (None, None) if param.required => {
                    return Err(FieldError::new(field, "required parameter is missing"));
                }
                (None, None) => continue,
            };
            param.check(value, &field)?;
            out.insert(name.clone(), value.clone());
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

    fn spec(toml_text: &str) -> ParamSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn pattern_enum_and_dash_rules() {
        let scene = Param::from_spec(&spec(
            r#"type = "string"
pattern = "^[a-z/]+\\.blend$""#,
        ))
        .unwrap();
        let s = Schema::default().with("scene", scene);
        let check = |v: Value| s.apply(v.as_object().unwrap());
        assert!(check(json!({"scene": "shots/a.blend"})).is_ok());
        assert!(check(json!({"scene": "a.blend; rm -rf /"})).is_err());

        let mode = Param::from_spec(&spec(
            r#"type = "string"
enum = ["fast", "final"]"#,
        ))
        .unwrap();
        let s = Schema::default().with("mode", mode);
        assert!(
            s.apply(json!({"mode": "final"}).as_object().unwrap())
                .is_ok()
        );
        assert!(
            s.apply(json!({"mode": "slow"}).as_object().unwrap())
                .is_err()
        );

        let free = Schema::default().with("text", Param::new(ParamType::String));
        let err = free.apply(json!({"text": "--output=/etc/passwd"}).as_object().unwrap());
        assert_eq!(err.unwrap_err().field, "parameters.text");
    }

    #[test]
    fn arrays_check_every_element() {
        let frames =
            Param::from_spec(&spec("type = \"array\"\nitems = \"integer\"\nmin = 0")).unwrap();
        let s = Schema::default().with("frames", frames);
        assert!(
            s.apply(json!({"frames": [1, 2, 3]}).as_object().unwrap())
                .is_ok()
        );
        let err = s
            .apply(json!({"frames": [1, -2]}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(err.field, "parameters.frames[1]");
        let err = s
            .apply(json!({"frames": [1, "x"]}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(err.field, "parameters.frames[1]");
    }

    #[test]
    fn inconsistent_specs_are_refused() {
        assert!(Param::from_spec(&spec("type = \"array\"")).is_err());
        assert!(Param::from_spec(&spec("type = \"string\"\nitems = \"string\"")).is_err());
        assert!(Param::from_spec(&spec("type = \"string\"\npattern = \"(\"")).is_err());
        assert!(Param::from_spec(&spec("type = \"integer\"\ndefault = \"x\"")).is_err());
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
