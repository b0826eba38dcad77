//! Argument templates for external programs: `{param}`, `{param:04}`,
//! `{workdir}`, `{config_dir}`, `{job_id}`; `{{` and `}}` for braces. One
//! template renders to exactly one argv element; nothing is ever split or
//! passed through a shell.

use std::path::Path;

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// A variable, zero-padded to `width` digits when it is an integer.
    Var {
        name: String,
        width: Option<usize>,
    },
}

/// Names every command template knows besides its parameters (`frames`
/// is an array chunk's frame list, joined with `,`).
pub const BUILT_IN_VARS: [&str; 4] = ["workdir", "config_dir", "job_id", "frames"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgTemplate(Vec<Piece>);

/// What a template's variables stand for in one run.
pub struct ArgVars<'a> {
    pub params: &'a Map<String, Value>,
    pub workdir: &'a Path,
    pub config_dir: &'a Path,
    pub job_id: &'a str,
}

impl ArgTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        inner.push(c);
                    }
                    if !closed {
                        return Err(format!("unclosed `{{` in `{text}`"));
                    }
                    let (name, format) = inner.split_once(':').unwrap_or((&inner, ""));
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!("bad placeholder `{{{inner}}}` in `{text}`"));
                    }
                    let width = match format {
                        "" => None,
                        f if f.starts_with('0') && f.len() > 1 => Some(
                            f[1..]
                                .parse()
                                .map_err(|_| format!("bad format `{f}` in `{text}`"))?,
                        ),
                        f => return Err(format!("bad format `{f}` in `{text}` (use e.g. `:04`)")),
                    };
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Var {
                        name: name.to_owned(),
                        width,
                    });
                }
                '}' => return Err(format!("unmatched `}}` in `{text}` (write `}}}}`)")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self(pieces))
    }

    /// The variable names the template uses.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Piece::Var { name, .. } => Some(name.as_str()),
            Piece::Literal(_) => None,
        })
    }

    /// Renders one argument. A parameter the job left out (optional, no
    /// default) renders as empty.
    pub fn render(&self, vars: &ArgVars) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Var { name, width } => match name.as_str() {
                    "workdir" => out.push_str(&vars.workdir.to_string_lossy()),
                    "config_dir" => out.push_str(&vars.config_dir.to_string_lossy()),
                    "job_id" => out.push_str(vars.job_id),
                    param => {
                        if let Some(value) = vars.params.get(param) {
                            out.push_str(&value_text(value, *width));
                        }
                    }
                },
            }
        }
        out
    }
}

fn value_text(value: &Value, width: Option<usize>) -> String {
    match (value, width) {
        (Value::String(s), _) => s.clone(),
        (Value::Number(n), Some(width)) if n.is_i64() => {
            let n = n.as_i64().unwrap_or_default();
            format!("{n:0width$}")
        }
        (Value::Array(items), _) => items
            .iter()
            .map(|v| value_text(v, width))
            .collect::<Vec<_>>()
            .join(","),
        (other, _) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(template: &str, params: Value) -> String {
        let params = params.as_object().unwrap().clone();
        let vars = ArgVars {
            params: &params,
            workdir: Path::new("/w"),
            config_dir: Path::new("/c"),
            job_id: "j",
        };
        ArgTemplate::parse(template).unwrap().render(&vars)
    }

    #[test]
    fn renders_params_padding_and_built_ins() {
        assert_eq!(
            render("{workdir}/out_{frame:04}.png", json!({"frame": 7})),
            "/w/out_0007.png"
        );
        assert_eq!(
            render("{scene}", json!({"scene": "a b; rm -rf /"})),
            "a b; rm -rf /"
        );
        assert_eq!(render("{frames}", json!({"frames": [1, 2]})), "1,2");
        assert_eq!(render("{{literal}}", json!({})), "{literal}");
        assert_eq!(render("{config_dir}/x {job_id}", json!({})), "/c/x j");
    }

    #[test]
    fn refuses_malformed_placeholders() {
        assert!(ArgTemplate::parse("{bad name}").is_err());
        assert!(ArgTemplate::parse("{x:4}").is_err());
        assert!(ArgTemplate::parse("a}b").is_err());
        assert!(ArgTemplate::parse("{}").is_err());
        assert!(ArgTemplate::parse("x{frame").is_err());
    }
}
