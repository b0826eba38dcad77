//! Dependencies between jobs, as values: a submit's `depends_on` edges and
//! how a `same` edge maps a dependant's children onto the parent children
//! that render their frames. Pure.
//!
//! A parent (or a dependant) that is not an array is one unit, index 0.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Which of the parent's frames a dependant waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frames {
    /// Each child waits for the parent children that render its frames.
    Same,
    /// The job (or every child) waits for the whole parent.
    #[default]
    All,
}

/// Which ends of the parent release a dependant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum On {
    /// Released when its parent frames succeeded; cancelled when one
    /// dead-lettered or was cancelled.
    #[default]
    Success,
    /// Released when its parent frames ended, however.
    Finish,
}

/// One `depends_on` entry of a submit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependsOn {
    /// The id the parent's submit returned.
    pub job_id: String,
    #[serde(default)]
    pub frames: Frames,
    #[serde(default)]
    pub on: On,
}

impl DependsOn {
    /// `ID[:same][:finish]`, as `renderq submit --after` takes it.
    pub fn parse_after(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        let job_id = parts.next().unwrap_or_default().trim().to_owned();
        if job_id.is_empty() {
            return Err(format!("`{text}`: no job id (ID[:same][:finish])"));
        }
        let mut edge = Self {
            job_id,
            frames: Frames::All,
            on: On::Success,
        };
        for part in parts {
            match part.trim() {
                "same" => edge.frames = Frames::Same,
                "all" => edge.frames = Frames::All,
                "finish" => edge.on = On::Finish,
                "success" => edge.on = On::Success,
                other => {
                    return Err(format!(
                        "`{text}`: `{other}` is none of same, all, success, finish"
                    ));
                }
            }
        }
        Ok(edge)
    }
}

/// A `same` edge that cannot be mapped: a dependant frame the parent never
/// renders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame {frame} (child {child}) is not one of the parent's frames")]
pub struct Unmapped {
    pub child: u32,
    pub frame: i64,
}

/// For each dependant child (its frames, in order), the parent children
/// that cover any of its frames, ascending: it waits for every one of them.
/// Chunking and steps may differ between the two arrays.
pub fn map_same(parent: &[&[i64]], child: &[&[i64]]) -> Result<Vec<Vec<u32>>, Unmapped> {
    let by_frame: HashMap<i64, u32> = parent
        .iter()
        .enumerate()
        .flat_map(|(index, frames)| frames.iter().map(move |&f| (f, index as u32)))
        .collect();
    child
        .iter()
        .enumerate()
        .map(|(index, frames)| {
            let mut covering: Vec<u32> = frames
                .iter()
                .map(|frame| {
                    by_frame.get(frame).copied().ok_or(Unmapped {
                        child: index as u32,
                        frame: *frame,
                    })
                })
                .collect::<Result<_, _>>()?;
            covering.sort_unstable();
            covering.dedup();
            Ok(covering)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::frames::parse_frames;

    fn chunks(spec: &str, chunk: usize) -> Vec<Vec<i64>> {
        parse_frames(spec, 10_000)
            .unwrap()
            .chunks(chunk)
            .map(<[i64]>::to_vec)
            .collect()
    }

    fn slices(chunks: &[Vec<i64>]) -> Vec<&[i64]> {
        chunks.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn opencue_1448_stepped_frames_chunked_differently() {
        // Parent 1001-1200x10 chunk 3: [1001,1011,1021], [1031,1041,1051], ...
        // Child: the same frames, chunk 2: [1001,1011], [1021,1031], ...
        let parent = chunks("1001-1200x10", 3);
        let child = chunks("1001-1200x10", 2);
        let map = map_same(&slices(&parent), &slices(&child)).unwrap();
        assert_eq!(map.len(), 10);
        assert_eq!(map[0], [0]);
        // 1021 is parent child 0's, 1031 parent child 1's: it waits for both.
        assert_eq!(map[1], [0, 1]);
        assert_eq!(map[2], [1]);
        assert_eq!(map[3], [2]);
        assert_eq!(map[4], [2, 3]);
        // The last parent child holds only 1191.
        assert_eq!(parent[6], [1181, 1191]);
        assert_eq!(map[9], [6]);
        // Every child waits for exactly the parent children holding its
        // frames, no fewer.
        for (c, covering) in map.iter().enumerate() {
            for frame in &child[c] {
                let owner = parent.iter().position(|p| p.contains(frame)).unwrap();
                assert!(
                    covering.contains(&(owner as u32)),
                    "child {c} frame {frame}"
                );
            }
            for &p in covering {
                assert!(parent[p as usize].iter().any(|f| child[c].contains(f)));
            }
        }
    }

    #[test]
    fn a_frame_the_parent_never_renders_is_named() {
        let parent = chunks("1-10x2", 1);
        let child = chunks("1-4", 2);
        let err = map_same(&slices(&parent), &slices(&child)).unwrap_err();
        assert_eq!(err, Unmapped { child: 0, frame: 2 });
        assert!(err.to_string().contains("frame 2"), "{err}");
    }

    #[test]
    fn a_subset_of_the_parent_frames_maps() {
        let parent = chunks("1-100", 10);
        let child = chunks("5,55", 1);
        let map = map_same(&slices(&parent), &slices(&child)).unwrap();
        assert_eq!(map, [vec![0], vec![5]]);
    }

    #[test]
    fn after_takes_an_id_and_its_options() {
        let edge = DependsOn::parse_after("abc:same:finish").unwrap();
        assert_eq!(
            edge,
            DependsOn {
                job_id: "abc".into(),
                frames: Frames::Same,
                on: On::Finish
            }
        );
        let edge = DependsOn::parse_after("abc").unwrap();
        assert_eq!((edge.frames, edge.on), (Frames::All, On::Success));
        assert!(DependsOn::parse_after("abc:sometimes").is_err());
        assert!(DependsOn::parse_after(":same").is_err());
    }
}
