//! What a job is, as plain values: the queue message envelope, post-task
//! specs, key templates and the checks on rendered keys (here); job and
//! message ids in their one spelling ([`id`]); command parameters
//! ([`params`]), frame specs ([`frames`]), inputs ([`inputs`]) and Deadline
//! Cloud manifests ([`manifest`]), lifecycle events ([`event`]) and a
//! command's result
//! ([`output`]). Pure: no I/O here, and
//! nothing here imports from another folder of the crate.

pub mod depends;
pub mod event;
pub mod frames;
pub mod id;
pub mod inputs;
pub mod label;
pub mod manifest;
pub mod output;
pub mod params;
pub mod usage;

pub use output::{Body, Output};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::event::Notification;
use crate::job::inputs::InputSpec;
use crate::job::label::Label;

/// The envelope version this build writes and understands.
pub const PROTOCOL: u32 = 1;

/// A post-task as a job names it: `{"name": "s3_upload", "config": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    #[serde(default)]
    pub config: Map<String, Value>,
}

/// The body of a queue message (SPEC §3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    /// Envelope version; absent on a bare direct insert.
    #[serde(default = "protocol")]
    pub renderq: u32,
    /// The job's own id; a bare insert takes its message id.
    #[serde(default)]
    pub job_id: String,
    pub command: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    /// When the job was first submitted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
    /// Times the job was handed back by an interrupted worker.
    #[serde(default)]
    pub interrupts: u32,
    /// Times a worker that had failed it declined it (its blocklist),
    /// handing it back for another worker.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub declines: u32,
    /// Tries used before the job was last handed back: a hand-back starts
    /// the message's receive count again, but not the failure budget.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// The id the submit returned, carried when a backend must re-send the
    /// job as a new message, so `${message_id}` stays the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Set on a child of an array job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayPart>,
    /// The job's own event subscriptions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
    /// Objects placed in the job's working folder before it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputSpec>,
    /// Its name, owner and metadata, for people.
    #[serde(flatten)]
    pub label: Label,
    /// An array's budget: once its children's tries cost this much, its
    /// unstarted children are not started (SPEC §13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<usage::Budget>,
}

/// A child's place in its array job (SPEC §7).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ArrayPart {
    /// The array's id: the one the submit returned.
    pub job_id: String,
    pub index: u32,
    /// Children in the array.
    pub size: u32,
    /// The frames this child renders.
    pub frames: Vec<i64>,
    /// Set on a child of a re-render (a revision after the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
}

/// A re-render child's place in its revision: the revision's number (the
/// submit's children are revision 1) and this child's index among the
/// revision's children. The ledger counts each revision as an array of its
/// own, so each announces its `ArrayJobCompleted` once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    pub number: u32,
    pub index: u32,
    /// Children in this revision.
    pub size: u32,
}

impl ArrayPart {
    /// The revision this child belongs to (1: the submit's).
    pub fn revision(&self) -> u32 {
        self.revision.map_or(1, |r| r.number)
    }

    /// Where the ledger counts this child: the array (or revision) id it
    /// is counted under, its size and the child's index in it.
    pub fn ledger_slot(&self) -> (String, u32, u32) {
        match self.revision {
            None => (self.job_id.clone(), self.size, self.index),
            Some(r) => (revision_id(&self.job_id, r.number), r.size, r.index),
        }
    }
}

/// The id the ledger counts revision `number` of array `array_id` under
/// (the array's own id for the first).
pub fn revision_id(array_id: &str, number: u32) -> String {
    if number <= 1 {
        array_id.to_owned()
    } else {
        format!("{array_id}.r{number}")
    }
}

fn protocol() -> u32 {
    PROTOCOL
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Envelope {
    /// Whether this is the job `id`, or a child of the array `id`.
    pub fn is_part_of(&self, id: &id::Id) -> bool {
        id.is(&self.job_id) || self.array.as_ref().is_some_and(|a| id.is(&a.job_id))
    }

    /// A fresh envelope for a job being submitted now.
    pub fn new(command: String, parameters: Map<String, Value>, tasks: Vec<TaskSpec>) -> Self {
        Self {
            renderq: PROTOCOL,
            job_id: uuid::Uuid::new_v4().to_string(),
            command,
            parameters,
            tasks,
            submitted_at: Some(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
            interrupts: 0,
            declines: 0,
            failures: 0,
            message_id: None,
            array: None,
            notifications: Vec::new(),
            inputs: Vec::new(),
            label: Label::default(),
            budget: None,
        }
    }

    /// The id `${job_id}` stands for: an array child's is its array's.
    pub fn template_job_id(&self) -> &str {
        self.array.as_ref().map_or(&self.job_id, |a| &a.job_id)
    }

    /// Parses a message body: a full envelope or a bare
    /// `{"command", "parameters", "tasks"}` insert.
    pub fn parse(body: &str, message_id: &str) -> Result<Self, String> {
        let mut envelope: Envelope =
            serde_json::from_str(body).map_err(|e| format!("malformed message body: {e}"))?;
        if envelope.renderq != PROTOCOL {
            return Err(format!(
                "unsupported envelope version {} (this worker speaks {PROTOCOL})",
                envelope.renderq
            ));
        }
        if envelope.job_id.is_empty() {
            envelope.job_id = message_id.to_owned();
        }
        Ok(envelope)
    }

    /// The id `${message_id}` stands for.
    pub fn message_id<'a>(&'a self, received_id: &'a str) -> &'a str {
        self.message_id.as_deref().unwrap_or(received_id)
    }

    pub fn to_body(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serializes")
    }

    /// The body to send this job on with as a new message (a hand-back, a
    /// dead letter, a redrive): naming `message_id`, the id the submit
    /// returned, which a new message would not otherwise keep; then
    /// changed by `edit`.
    pub fn resent(&self, message_id: &str, edit: impl FnOnce(&mut Envelope)) -> String {
        let mut envelope = self.clone();
        envelope.message_id = Some(message_id.to_owned());
        edit(&mut envelope);
        envelope.to_body()
    }

    /// [`Envelope::resent`] for a message read as `body` whose id is
    /// `received_id` (the id the envelope names wins); a body that is no
    /// envelope goes on as it was.
    pub fn restamp(body: &str, received_id: &str, edit: impl FnOnce(&mut Envelope)) -> String {
        match Self::parse(body, received_id) {
            Ok(envelope) => envelope.resent(envelope.message_id(received_id), edit),
            Err(_) => body.to_owned(),
        }
    }
}

/// A variable a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    MessageId,
    JobId,
    MimeExt,
    Command,
    ArrayIndex,
    Frame,
    OutputName,
    Date,
}

impl Var {
    const ALL: [(&'static str, Var); 8] = [
        ("message_id", Var::MessageId),
        ("job_id", Var::JobId),
        ("mime_ext", Var::MimeExt),
        ("command", Var::Command),
        ("array_index", Var::ArrayIndex),
        ("frame", Var::Frame),
        ("output_name", Var::OutputName),
        ("date", Var::Date),
    ];

    fn from_name(name: &str) -> Option<Var> {
        Var::ALL.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// Values for a template's variables, known once the command has run.
#[derive(Debug, Clone, Default)]
pub struct Vars<'a> {
    pub message_id: &'a str,
    pub job_id: &'a str,
    pub mime_ext: &'a str,
    pub command: &'a str,
    /// Index of an array child; empty for a plain job.
    pub array_index: String,
    /// The frame an output belongs to, else the job's first frame; empty
    /// when the job has none.
    pub frame: String,
    /// The output's file name without its extension (`result` for one
    /// that is not a file).
    pub output_name: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
}

impl Vars<'_> {
    fn get(&self, var: Var) -> &str {
        match var {
            Var::MessageId => self.message_id,
            Var::JobId => self.job_id,
            Var::MimeExt => self.mime_ext,
            Var::Command => self.command,
            Var::ArrayIndex => &self.array_index,
            Var::Frame => &self.frame,
            Var::OutputName => &self.output_name,
            Var::Date => &self.date,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(Var),
}

/// A string with `${name}` variables, parsed (and so checked) up front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Segment>);

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                segments.push(Segment::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in template `{text}`"))?;
            let name = &after[..end];
            let var = Var::from_name(name).ok_or_else(|| {
                let known: Vec<_> = Var::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown template variable `${{{name}}}` (known: {})",
                    known.join(", ")
                )
            })?;
            segments.push(Segment::Var(var));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        // `{message_id}` without its `$` would be written out literally.
        for segment in &segments {
            if let Segment::Literal(text) = segment
                && let Some((name, _)) = Var::ALL
                    .iter()
                    .find(|(name, _)| text.contains(&format!("{{{name}}}")))
            {
                return Err(format!(
                    "`{{{name}}}` in template `{text}` would be kept as it is: did you mean `${{{name}}}`?"
                ));
            }
        }
        Ok(Self(segments))
    }

    pub fn render(&self, vars: &Vars) -> String {
        self.0
            .iter()
            .map(|s| match s {
                Segment::Literal(text) => text.as_str(),
                Segment::Var(var) => vars.get(*var),
            })
            .collect()
    }

    /// True when the template has no variables.
    pub fn is_literal(&self) -> bool {
        self.0.iter().all(|s| matches!(s, Segment::Literal(_)))
    }

    /// The text before the first variable: enough to check a URL's scheme
    /// and host at submit when they are written out.
    pub fn literal_prefix(&self) -> &str {
        match self.0.first() {
            Some(Segment::Literal(text)) => text,
            _ => "",
        }
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Template::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Longest object key S3 accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Checks a rendered object key: it must stay inside its bucket.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("object key is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "object key is {} bytes, over the {MAX_KEY_BYTES}-byte limit",
            key.len()
        ));
    }
    if key.starts_with('/') {
        return Err(format!("object key `{key}` starts with `/`"));
    }
    if key.chars().any(char::is_control) {
        return Err("object key contains a control character".into());
    }
    if key.split('/').any(|part| part == ".." || part == ".") {
        return Err(format!("object key `{key}` has a `.` or `..` segment"));
    }
    if key.ends_with('/') {
        return Err(format!(
            "object key `{key}` ends with `/`: a key names an object, not a folder"
        ));
    }
    if key.split('/').any(|part| part.starts_with(RESERVED_PREFIX)) {
        return Err(format!(
            "object key `{key}` uses `{RESERVED_PREFIX}…`, reserved for renderq's own files"
        ));
    }
    Ok(())
}

/// Key segments starting with this are the local bucket's own
/// (`.renderq-meta/`, `.renderq-tmp/`).
pub const RESERVED_PREFIX: &str = ".renderq-";

/// Checks a key template at submit: its written-out parts must make a good
/// key whatever the variables hold (each is tried as a plain name).
pub fn check_key_template(template: &Template) -> Result<(), String> {
    let sample = Vars {
        message_id: "m",
        job_id: "j",
        mime_ext: "bin",
        command: "c",
        array_index: "0".into(),
        frame: "1".into(),
        output_name: "o".into(),
        date: "2026-01-01".into(),
    };
    check_key(&template.render(&sample))
}

/// The file extension `${mime_ext}` stands for.
pub fn mime_ext(mime: &mime::Mime) -> String {
    // mime_guess lists extensions alphabetically; prefer the usual one.
    let preferred = match mime.essence_str() {
        "image/jpeg" => Some("jpg"),
        "image/tiff" => Some("tif"),
        "text/plain" => Some("txt"),
        "application/octet-stream" => Some("bin"),
        "image/x-exr" | "image/aces" => Some("exr"),
        _ => None,
    };
    preferred
        .or_else(|| {
            mime_guess::get_mime_extensions_str(mime.essence_str())
                .and_then(|exts| {
                    exts.iter()
                        .find(|e| **e == mime.subtype().as_str())
                        .or(exts.first())
                })
                .copied()
        })
        .unwrap_or("bin")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_renders_known_vars() {
        let t = Template::parse("renders/demo-${message_id}.${mime_ext}").unwrap();
        let vars = Vars {
            message_id: "abc",
            mime_ext: "png",
            ..Vars::default()
        };
        assert_eq!(t.render(&vars), "renders/demo-abc.png");
    }

    #[test]
    fn template_refuses_unknown_var() {
        let err = Template::parse("x/${nope}.png").unwrap_err();
        assert!(err.contains("${nope}"), "{err}");
    }

    #[test]
    fn template_refuses_unclosed_var() {
        assert!(Template::parse("x/${message_id").is_err());
    }

    #[test]
    fn a_known_variable_without_its_dollar_is_refused_with_a_hint() {
        let err = Template::parse("r/{message_id}.png").unwrap_err();
        assert!(err.contains("did you mean `${message_id}`?"), "{err}");
        assert!(
            Template::parse("r/{scene}/${message_id}").is_ok(),
            "unknown names stay literal"
        );
    }

    #[test]
    fn dollar_without_brace_is_literal() {
        let t = Template::parse("price$5").unwrap();
        assert_eq!(t.render(&Vars::default()), "price$5");
    }

    #[test]
    fn keys_must_stay_inside_the_bucket() {
        assert!(check_key("renders/a.png").is_ok());
        assert!(check_key("/etc/passwd").is_err());
        assert!(check_key("a/../../b").is_err());
        assert!(check_key("a\nb").is_err());
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(1025)).is_err());
    }

    #[test]
    fn reserved_and_folder_keys_are_refused() {
        assert!(check_key(".renderq-meta/a.png.json").is_err());
        assert!(check_key("out/.renderq-tmp/x").is_err());
        assert!(check_key("out/").is_err());
        assert!(check_key("out/.tmp-x").is_ok());
        let template = |t: &str| check_key_template(&Template::parse(t).unwrap());
        assert!(template("shots/${message_id}/").is_err());
        assert!(template(".renderq-meta/${message_id}").is_err());
        assert!(template("../${frame}").is_err());
        assert!(template("shots/${job_id}/${frame}.${mime_ext}").is_ok());
    }

    #[test]
    fn mime_ext_prefers_usual_extensions() {
        assert_eq!(mime_ext(&mime::IMAGE_PNG), "png");
        assert_eq!(mime_ext(&mime::APPLICATION_JSON), "json");
        assert_eq!(mime_ext(&mime::IMAGE_JPEG), "jpg");
        assert_eq!(mime_ext(&mime::TEXT_PLAIN), "txt");
    }

    #[test]
    fn bare_insert_parses_and_takes_message_id() {
        let e = Envelope::parse(r#"{"command":"get_version"}"#, "m-1").unwrap();
        assert_eq!(e.job_id, "m-1");
        assert_eq!(e.renderq, PROTOCOL);
        assert!(e.tasks.is_empty());
    }

    #[test]
    fn envelope_round_trips() {
        let e = Envelope::new("sleep".into(), Map::new(), vec![]);
        assert_eq!(Envelope::parse(&e.to_body(), "m").unwrap(), e);
    }

    #[test]
    fn a_restamped_body_keeps_the_submits_message_id() {
        // A job sent once, as the redrive policy moves it: no id inside.
        let e = Envelope::new("sleep".into(), Map::new(), vec![]);
        let first = Envelope::restamp(&e.to_body(), "m-1", |e| e.failures = 0);
        let again = Envelope::parse(&first, "sqs-2").unwrap();
        assert_eq!(again.message_id("sqs-2"), "m-1");
        assert_eq!(again.job_id, e.job_id);
        // Sent on again: the id inside wins over the new message's.
        let second = Envelope::restamp(&first, "sqs-2", |e| e.failures = 2);
        let again = Envelope::parse(&second, "sqs-3").unwrap();
        assert_eq!((again.message_id("sqs-3"), again.failures), ("m-1", 2));
        assert_eq!(Envelope::restamp("hello", "m", |_| {}), "hello");
    }

    #[test]
    fn malformed_and_future_bodies_are_refused() {
        assert!(Envelope::parse("not json", "m").is_err());
        assert!(Envelope::parse(r#"{"parameters":{}}"#, "m").is_err());
        assert!(Envelope::parse(r#"{"renderq":2,"command":"x"}"#, "m").is_err());
    }
}
