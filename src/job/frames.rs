//! Array jobs: frame specs (`"1-100"`, `"1-100x5"`, `"1,5,9-12"`) and how a
//! frame list is cut into chunks, one child message each. Pure.

/// One part of a frame spec: `first-lastxstep`, or a single frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    first: i64,
    last: i64,
    step: i64,
}

impl Range {
    /// Frames it names, repeats in other parts included.
    fn len(&self) -> u64 {
        let len = (self.last as i128 - self.first as i128) / self.step as i128 + 1;
        u64::try_from(len).unwrap_or(u64::MAX)
    }
}

/// Parses a frame spec into its frames, in the order written, without
/// repeats. Every range is measured before any is expanded, and the frames
/// named in all (repeats counted) may not exceed `max_frames`, so the work
/// done is bounded by `max_frames` whatever the spec. Every error says what
/// is wrong with which part.
pub fn parse_frames(spec: &str, max_frames: u64) -> Result<Vec<i64>, String> {
    if spec.trim().is_empty() {
        return Err("frame spec is empty".into());
    }
    let mut ranges = Vec::new();
    let mut named: u64 = 0;
    for part in spec.split(',') {
        let range = parse_range(part.trim())?;
        named = named.saturating_add(range.len());
        if named > max_frames {
            return Err(format!(
                "names more than {max_frames} frames (at `{}`)",
                part.trim()
            ));
        }
        ranges.push(range);
    }
    let mut frames = Vec::with_capacity(named as usize);
    let mut seen = std::collections::HashSet::with_capacity(named as usize);
    for range in ranges {
        let mut frame = range.first;
        loop {
            if seen.insert(frame) {
                frames.push(frame);
            }
            match frame.checked_add(range.step) {
                Some(next) if next <= range.last => frame = next,
                _ => break,
            }
        }
    }
    Ok(frames)
}

fn parse_range(part: &str) -> Result<Range, String> {
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
    Ok(Range { first, last, step })
}

/// Writes frames back as a spec, consecutive runs as ranges
/// (`[1, 2, 3, 7]` → `"1-3,7"`): what a client resubmits.
pub fn format_frames(frames: &[i64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(i64, i64)> = None;
    for &frame in frames {
        run = match run {
            Some((first, last)) if last.checked_add(1) == Some(frame) => Some((first, frame)),
            Some(done) => {
                parts.push(run_text(done));
                Some((frame, frame))
            }
            None => Some((frame, frame)),
        };
    }
    parts.extend(run.map(run_text));
    parts.join(",")
}

fn run_text((first, last): (i64, i64)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
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
        let top = format!("{}-{}", i64::MAX - 1, i64::MAX);
        assert_eq!(parse_frames(&top, 100).unwrap(), [i64::MAX - 1, i64::MAX]);
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
            ("1-60,1-60", "more than 100 frames (at `1-60`)"),
        ] {
            let err = parse_frames(spec, 100).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn huge_and_repeated_ranges_are_refused_before_any_is_expanded() {
        let spec = vec!["0-999999"; 20_000].join(",");
        let started = std::time::Instant::now();
        let err = parse_frames(&spec, 100_000).unwrap_err();
        assert!(err.contains("more than 100000 frames"), "{err}");
        // Measured, not expanded: far below the 2×10¹⁰ steps it names.
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        let whole = format!("{}-{}", i64::MIN, i64::MAX);
        assert!(parse_frames(&whole, 100_000).is_err());
    }

    #[test]
    fn frames_are_written_back_as_runs() {
        assert_eq!(format_frames(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(format_frames(&[5]), "5");
        assert_eq!(format_frames(&[]), "");
        let frames = parse_frames("1-20x5,3-4", 100).unwrap();
        assert_eq!(parse_frames(&format_frames(&frames), 100).unwrap(), frames);
    }
}
