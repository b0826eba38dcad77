//! Job and message ids in their one spelling. Every id renderq makes is a
//! UUID, written lower-case and hyphenated; a person may type one in
//! upper case, braced or without hyphens. An id that comes in (a cancel, a
//! redrive, a status query, from the endpoint, the command line or the
//! monitor) is parsed here before it is recorded or compared, so that two
//! spellings of one id never count as two jobs, and anything that is not a
//! UUID is refused before it changes anything.

use std::fmt;

/// A job's or a message's id, lower-case and hyphenated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

/// Why a text is not an id; shows (the start of) the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a message or job id (a UUID)")]
pub struct NotAnId(String);

/// How much of a refused text an error repeats.
const SHOWN: usize = 64;

impl Id {
    /// The id `text` spells, in any of the UUID forms (hyphenated, simple,
    /// braced, URN; any case).
    pub fn parse(text: &str) -> Result<Self, NotAnId> {
        match uuid::Uuid::try_parse(text) {
            Ok(id) => Ok(Self(id.hyphenated().to_string())),
            Err(_) => {
                let shown: String = text.chars().take(SHOWN).collect();
                let ellipsis = if shown.len() < text.len() { "…" } else { "" };
                Err(NotAnId(format!("{}{ellipsis}", shown.escape_debug())))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `other` (an id read from a message or a ledger, spelt as
    /// whoever wrote it spelt it) is this id.
    pub fn is(&self, other: &str) -> bool {
        other == self.0 || Self::parse(other).is_ok_and(|other| other == *self)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f2e8a1c-3b4d-4e6f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn every_spelling_of_a_uuid_is_one_id() {
        for spelling in [
            ID,
            "5F2E8A1C-3B4D-4E6F-8A9B-0C1D2E3F4A5B",
            "5f2e8a1c3b4d4e6f8a9b0c1d2e3f4a5b",
            "{5f2e8a1c-3b4d-4e6f-8a9b-0c1d2e3f4a5b}",
            "urn:uuid:5F2E8A1C-3b4d-4e6f-8a9b-0c1d2e3f4a5b",
        ] {
            assert_eq!(Id::parse(spelling).unwrap().as_str(), ID, "{spelling}");
            assert!(Id::parse(ID).unwrap().is(spelling), "{spelling}");
        }
        assert!(!Id::parse(ID).unwrap().is("5f2e8a1c"));
    }

    #[test]
    fn what_is_not_a_uuid_is_refused_naming_it() {
        for text in [
            "",
            "frame-7",
            " 5f2e8a1c-3b4d-4e6f-8a9b-0c1d2e3f4a5b",
            "5f2e8a1c-3b4d",
        ] {
            let error = Id::parse(text).unwrap_err().to_string();
            assert!(
                error.contains("is not a message or job id (a UUID)"),
                "{error}"
            );
        }
        let long = "x".repeat(10_000);
        let error = Id::parse(&long).unwrap_err().to_string();
        assert!(error.len() < 200 && error.contains('…'), "{error}");
        assert!(Id::parse("a\nb").unwrap_err().to_string().contains("a\\nb"));
    }
}
