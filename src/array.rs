//! Array jobs: frame specs (`"1-100"`, `"1-100x5"`, `"1,5,9-12"`) and how a
//! frame list is cut into chunks, one child message each. Pure.

/// Parses a frame spec into its frames, in the order written, without
/// repeats. Every error says what is wrong with which part.
pub fn parse_frames(spec: &str, max_frames: usize) -> Result<Vec<i64>, String> {
    let mut frames = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if spec.trim().is_empty() {
        return Err("frame spec is empty".into());
    }
    for part in spec.split(',') {
        let part = part.trim();
        let (range, step) = match part.split_once('x') {
            Some((range, step)) => {
                let step: i64 = step
                    .parse()
                    .map_err(|_| format!("`{part}`: step `{step}` is not a whole number"))?;
                if step < 1 {
                    return Err(format!("`{part}`: step must be at least 1"));
                }
                (range, step)
            }
            None => (part, 1),
        };
        let number = |text: &str| -> Result<i64, String> {
            text.trim()
                .parse()
                .map_err(|_| format!("`{part}`: `{text}` is not a frame number"))
        };
        // A leading `-` is a negative frame, not a range.
        let (first, last) = match range.get(1..).and_then(|rest| rest.find('-')) {
            Some(at) => (number(&range[..=at])?, number(&range[at + 2..])?),
            None if step != 1 => {
                return Err(format!("`{part}`: a step needs a range (`1-100x5`)"));
            }
            None => {
                let frame = number(range)?;
                (frame, frame)
            }
        };
        if last < first {
            return Err(format!("`{part}`: the range ends before it starts"));
        }
        let mut frame = first;
        while frame <= last {
            if seen.insert(frame) {
                frames.push(frame);
                if frames.len() > max_frames {
                    return Err(format!("more than {max_frames} frames"));
                }
            }
            frame = frame.saturating_add(step);
            if frame == i64::MAX {
                break;
            }
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_expand_in_order() {
        assert_eq!(parse_frames("1-5", 100).unwrap(), [1, 2, 3, 4, 5]);
        assert_eq!(parse_frames("1-20x5", 100).unwrap(), [1, 6, 11, 16]);
        assert_eq!(
            parse_frames("1,5,9-12", 100).unwrap(),
            [1, 5, 9, 10, 11, 12]
        );
        assert_eq!(parse_frames("3, 1-3", 100).unwrap(), [3, 1, 2]);
        assert_eq!(parse_frames("-2--1", 100).unwrap(), [-2, -1]);
        assert_eq!(parse_frames("7", 100).unwrap(), [7]);
    }

    #[test]
    fn bad_specs_say_why() {
        for (spec, why) in [
            ("5-1", "ends before it starts"),
            ("1-", "not a frame number"),
            ("a-b", "not a frame number"),
            ("1-10x0", "at least 1"),
            ("", "empty"),
            ("1-10xq", "not a whole number"),
            ("1-1000", "more than 100 frames"),
        ] {
            let err = parse_frames(spec, 100).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }
}
