//! Finding where in the text of `workers.toml` a key is written, so that
//! every config error can name its line.

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Where an unknown field is written in the table starting at `span`.
/// Errors inside tagged tables (`[queues.NAME]`) point at the table's
/// header; this finds the field's own line.
pub(super) fn unknown_field_at(
    text: &str,
    span: std::ops::Range<usize>,
    message: &str,
) -> Option<usize> {
    let field = message.strip_prefix("unknown field `")?.split('`').next()?;
    let mut offset = span.start;
    let table = text.get(span.start..)?;
    for (i, line) in table.split_inclusive('\n').enumerate() {
        if i > 0 && line.trim_start().starts_with('[') {
            break;
        }
        let rest = line.trim_start().strip_prefix(field);
        if rest.is_some_and(|r| r.trim_start().starts_with('=')) {
            return Some(offset + (line.len() - line.trim_start().len()));
        }
        offset += line.len();
    }
    None
}

/// The dotted key an error at `offset` is about: the key of the
/// `key = value` line it falls on, under the table header above it, or the
/// header itself.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let header = |l: &str| {
        l.strip_prefix('[').map(|rest| {
            rest.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned()
        })
    };
    if let Some(table) = header(line) {
        return Some(table);
    }
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    let table = text[..line_start]
        .lines()
        .rev()
        .find_map(|l| header(l.trim()));
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// Byte offset of a dotted key (`a.b[2]` style) in the document.
pub(super) fn span_of_key(text: &str, dotted: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut start = None;
    for part in dotted.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (key, value) = item.as_table_like()?.get_key_value(name)?;
        start = key.span().map(|s| s.start).or(start);
        item = value;
        if let Some(index) = index {
            let array = item.as_array()?;
            start = array.get(index)?.span().map(|s| s.start).or(start);
            return start;
        }
    }
    start
}
