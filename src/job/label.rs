//! What a person calls a job: its `name` ("shot010_lighting_v3"), its
//! `owner` and its `metadata` (a small flat map of strings: project,
//! sequence, shot). A submit may set them; they travel in the envelope and
//! in every event of the job, and the status table and the monitor show
//! and filter by them. Each is bounded in size ([`LabelLimits`], from
//! `[queue_manager]`), checked at submit naming the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::params::FieldError;

/// A job's name, owner and metadata; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// How large a label may be: `[queue_manager]`'s `max_name_bytes` (a name,
/// an owner, a metadata key or value) and `max_metadata_entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelLimits {
    pub max_name_bytes: usize,
    pub max_metadata_entries: usize,
}

impl Label {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.owner.is_none() && self.metadata.is_empty()
    }

    /// Checks every part against `limits`; the error names the field
    /// (`name`, `owner`, `metadata`, `metadata.KEY`).
    pub fn check(&self, limits: &LabelLimits) -> Result<(), FieldError> {
        for (field, value) in [("name", &self.name), ("owner", &self.owner)] {
            if let Some(value) = value {
                check_text(field, value, limits)?;
            }
        }
        if self.metadata.len() > limits.max_metadata_entries {
            return Err(FieldError::new(
                "metadata",
                format!(
                    "{} entries; at most {} (queue_manager.max_metadata_entries)",
                    self.metadata.len(),
                    limits.max_metadata_entries
                ),
            ));
        }
        for (key, value) in &self.metadata {
            let field = format!("metadata.{key}");
            if key.is_empty() {
                return Err(FieldError::new("metadata", "a key is empty"));
            }
            check_text(&field, key, limits)?;
            check_text(&field, value, limits)?;
        }
        Ok(())
    }

    /// The name where there is one, else `id`: what a person reads.
    pub fn display<'a>(&'a self, id: &'a str) -> &'a str {
        self.name.as_deref().unwrap_or(id)
    }
}

/// A name, owner, key or value: not empty, printable, and short.
fn check_text(field: &str, value: &str, limits: &LabelLimits) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "is empty"));
    }
    if value.len() > limits.max_name_bytes {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes; at most {} (queue_manager.max_name_bytes)",
                value.len(),
                limits.max_name_bytes
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(field, "contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LabelLimits = LabelLimits {
        max_name_bytes: 16,
        max_metadata_entries: 2,
    };

    fn label(name: &str, metadata: &[(&str, &str)]) -> Label {
        Label {
            name: Some(name.into()),
            owner: None,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_label_within_its_limits_passes_and_one_past_them_names_its_field() {
        assert!(label("shot010", &[("project", "x")]).check(&LIMITS).is_ok());
        let field = |l: Label| l.check(&LIMITS).unwrap_err().field;
        assert_eq!(field(label(&"n".repeat(17), &[])), "name");
        assert_eq!(field(label("a\nb", &[])), "name");
        assert_eq!(field(label(" ", &[])), "name");
        assert_eq!(
            field(label("a", &[("a", "1"), ("b", "2"), ("c", "3")])),
            "metadata"
        );
        assert_eq!(
            field(label("a", &[("shot", &"v".repeat(17))])),
            "metadata.shot"
        );
        let owner = Label {
            owner: Some("o".repeat(17)),
            ..Label::default()
        };
        assert_eq!(field(owner), "owner");
    }

    #[test]
    fn an_empty_label_writes_nothing() {
        assert_eq!(serde_json::to_string(&Label::default()).unwrap(), "{}");
        assert_eq!(label("n", &[]).display("id"), "n");
        assert_eq!(Label::default().display("id"), "id");
    }
}
