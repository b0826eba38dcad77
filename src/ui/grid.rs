//! An array's page as a grid of frames: one cell per frame, labelled with
//! its frame number, in the state of the child that carries it, with the
//! thumbnail of that frame. A page shows `PAGE_CELLS` cells, so that a
//! 10,000-frame array is 20 pages of a bounded size, and only the children
//! of those cells are read.

use std::collections::HashMap;
use std::ops::Range;

use super::board::{ArrayRow, JobRow};
use crate::job::frames::parse_frames;

/// Cells a page shows.
pub const PAGE_CELLS: usize = 500;

/// Where a page's cells come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The array's frames, when it said them (`JobSubmitted`); otherwise a
    /// cell per child.
    frames: Option<Vec<i64>>,
    /// Frames a child carries (1 when only children are known).
    chunk_size: usize,
    /// The cells this page shows, by position in the array.
    pub cells: Range<usize>,
    /// Cells in all.
    pub total: usize,
    pub page: usize,
    pub pages: usize,
}

impl Layout {
    /// Page `page` (from 0; past the last, the last) of `array`, whose
    /// sizes the board already clamped to `max_frames`.
    pub fn of(array: &ArrayRow, page: usize, max_frames: u32) -> Self {
        let frames = (array.chunk_size > 0 && !array.frame_spec.is_empty())
            .then(|| parse_frames(&array.frame_spec, max_frames.into()).ok())
            .flatten()
            .filter(|frames| frames.len() == array.frames as usize);
        let (chunk_size, total) = match &frames {
            Some(frames) => (array.chunk_size as usize, frames.len()),
            None => (1, array.size as usize),
        };
        let pages = total.div_ceil(PAGE_CELLS).max(1);
        let page = page.min(pages - 1);
        let cells = page * PAGE_CELLS..((page + 1) * PAGE_CELLS).min(total);
        Self {
            frames,
            chunk_size,
            cells,
            total,
            page,
            pages,
        }
    }

    /// The children (by index) whose cells this page shows.
    pub fn children(&self) -> Range<u32> {
        if self.cells.is_empty() {
            return 0..0;
        }
        let first = self.cells.start / self.chunk_size;
        let last = (self.cells.end - 1) / self.chunk_size;
        first as u32..last as u32 + 1
    }

    /// Whether cells are frames (else children, for an array whose frames
    /// were never said).
    pub fn by_frame(&self) -> bool {
        self.frames.is_some()
    }

    /// This page's cells, from its children (any order; missing ones are
    /// queued). A frame shows the newest revision's child of its index
    /// that carries it (a re-render's child carries only its frames).
    pub fn cells<'a>(&self, children: &'a [JobRow]) -> Vec<Cell<'a>> {
        let mut by_index: HashMap<u32, Vec<&JobRow>> = HashMap::new();
        for child in children {
            if let Some(index) = child.array_index {
                by_index.entry(index).or_default().push(child);
            }
        }
        for revisions in by_index.values_mut() {
            revisions.sort_by_key(|c| std::cmp::Reverse(c.revision));
        }
        self.cells
            .clone()
            .map(|position| {
                let index = position / self.chunk_size;
                let frame = self.frames.as_ref().map(|f| f[position]);
                let found = by_index.get(&(index as u32)).and_then(|revisions| {
                    revisions.iter().copied().find(|c| {
                        c.frames.is_empty() || frame.is_some_and(|f| c.frames.contains(&f))
                    })
                });
                Cell {
                    frame,
                    index: index as u32,
                    thumbnail: found.and_then(|c| thumbnail(c, frame, position % self.chunk_size)),
                    child: found,
                }
            })
            .collect()
    }
}

/// One cell: a frame (or a child, where frames are unknown).
#[derive(Debug, Clone)]
pub struct Cell<'a> {
    pub frame: Option<i64>,
    /// The child that carries it.
    pub index: u32,
    /// That child's row, once any event named it.
    pub child: Option<&'a JobRow>,
    /// This frame's thumbnail.
    pub thumbnail: Option<&'a str>,
}

impl Cell<'_> {
    pub fn state(&self) -> &str {
        self.child.map_or("queued", |c| c.state.as_str())
    }
}

/// The thumbnail of `frame`, the `offset`th frame of `child`: the one the
/// worker said shows that frame; from a worker that said none, the
/// `offset`th.
fn thumbnail(child: &JobRow, frame: Option<i64>, offset: usize) -> Option<&str> {
    let named = match (frame, child.thumbnail_frames.is_empty()) {
        (Some(frame), false) => child
            .thumbnail_frames
            .iter()
            .position(|f| *f == Some(frame)),
        _ => Some(offset),
    };
    named
        .and_then(|i| child.thumbnails.get(i))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(spec: &str, frames: u32, chunk_size: u32, size: u32) -> ArrayRow {
        ArrayRow {
            job_id: "a".into(),
            frame_spec: spec.into(),
            frames,
            chunk_size,
            size,
            ..ArrayRow::default()
        }
    }

    fn child(index: u32, state: &str, frames: &[i64]) -> JobRow {
        JobRow {
            job_id: format!("child-{index}"),
            state: state.into(),
            array_index: Some(index),
            thumbnails: frames.iter().map(|f| format!("m{index}/{f}.jpg")).collect(),
            thumbnail_frames: frames.iter().copied().map(Some).collect(),
            ..JobRow::default()
        }
    }

    #[test]
    fn a_20_frame_array_in_chunks_of_4_has_a_cell_per_frame_labelled_by_frame() {
        let array = array("1-20", 20, 4, 5);
        let layout = Layout::of(&array, 0, 100_000);
        assert_eq!(layout.children(), 0..5);
        let children: Vec<JobRow> = vec![
            child(0, "succeeded", &[1, 2, 3, 4]),
            // A frame without its thumbnail keeps none, not its neighbour's.
            child(1, "succeeded", &[5, 7, 8]),
            child(3, "running", &[]),
        ];
        let cells = layout.cells(&children);
        assert_eq!(cells.len(), 20);
        let frames: Vec<i64> = cells.iter().filter_map(|c| c.frame).collect();
        assert_eq!(frames, (1..=20).collect::<Vec<_>>());
        let states: Vec<&str> = cells.iter().map(Cell::state).collect();
        assert_eq!(&states[0..4], ["succeeded"; 4]);
        assert_eq!(&states[8..12], ["queued"; 4], "child 2 never started");
        assert_eq!(
            &states[12..16],
            ["running"; 4],
            "a chunk's frames share its state"
        );
        assert_eq!(cells[0].thumbnail, Some("m0/1.jpg"));
        assert_eq!(cells[3].thumbnail, Some("m0/4.jpg"));
        assert_eq!(cells[4].thumbnail, Some("m1/5.jpg"));
        assert_eq!(cells[5].thumbnail, None, "frame 6 has no thumbnail");
        assert_eq!(cells[6].thumbnail, Some("m1/7.jpg"));
    }

    #[test]
    fn stepped_frames_and_a_short_last_chunk() {
        let array = array("10-30x10,99", 4, 3, 2);
        let layout = Layout::of(&array, 0, 100_000);
        let children = [child(1, "succeeded", &[99])];
        let cells = layout.cells(&children);
        let seen: Vec<(Option<i64>, u32, &str)> = cells
            .iter()
            .map(|c| (c.frame, c.index, c.state()))
            .collect();
        assert_eq!(
            seen,
            [
                (Some(10), 0, "queued"),
                (Some(20), 0, "queued"),
                (Some(30), 0, "queued"),
                (Some(99), 1, "succeeded")
            ]
        );
        assert_eq!(cells[3].thumbnail, Some("m1/99.jpg"));
    }

    #[test]
    fn a_10000_frame_array_is_paged_and_reads_only_its_pages_children() {
        let array = array("1-10000", 10_000, 4, 2_500);
        let layout = Layout::of(&array, 3, 100_000);
        assert_eq!(layout.pages, 20);
        assert_eq!(layout.cells, 1_500..2_000);
        assert_eq!(layout.children(), 375..500);
        let cells = layout.cells(&[]);
        assert_eq!(cells.len(), PAGE_CELLS);
        assert_eq!(cells[0].frame, Some(1_501));
        // Past the last page: the last.
        assert_eq!(Layout::of(&array, 1_000, 100_000).page, 19);
    }

    #[test]
    fn sizes_from_the_table_are_clamped_and_unknown_frames_fall_back_to_children() {
        // A spec naming more frames than `max_frames` allows is not
        // expanded; the board clamped the forged size already.
        let forged = array("1-4000000000", 1_000, 1, 1_000);
        let layout = Layout::of(&forged, 0, 1_000);
        assert!(!layout.by_frame());
        assert_eq!(layout.total, 1_000);
        assert_eq!(layout.cells.len(), PAGE_CELLS);
        // No spec (no `JobSubmitted` seen): a cell per child.
        let layout = Layout::of(&array("", 0, 0, 7), 0, 1_000);
        let children = [child(6, "succeeded", &[])];
        let cells = layout.cells(&children);
        assert_eq!(cells.len(), 7);
        assert_eq!(cells[6].state(), "succeeded");
        assert_eq!(cells[6].frame, None);
    }

    #[test]
    fn a_rerendered_frame_shows_its_newest_revision_and_its_neighbours_theirs() {
        let layout = Layout::of(&array("1-8", 8, 4, 2), 0, 100);
        let first = [
            child(0, "succeeded", &[1, 2, 3, 4]),
            child(1, "succeeded", &[5, 6, 7, 8]),
        ];
        let again = |job_id: &str, index: u32, state: &str, revision: u32, frames: &[i64]| JobRow {
            job_id: job_id.into(),
            state: state.into(),
            array_index: Some(index),
            revision,
            frames: frames.to_vec(),
            ..JobRow::default()
        };
        let children = [
            again("r3", 0, "running", 3, &[3]),
            first[0].clone(),
            again("r2", 0, "succeeded", 2, &[3, 4]),
            first[1].clone(),
        ];
        let cells = layout.cells(&children);
        let shown: Vec<(&str, &str)> = cells
            .iter()
            .map(|c| (c.child.map_or("", |c| c.job_id.as_str()), c.state()))
            .collect();
        assert_eq!(
            &shown[..5],
            [
                ("child-0", "succeeded"),
                ("child-0", "succeeded"),
                ("r3", "running"),
                ("r2", "succeeded"),
                ("child-1", "succeeded")
            ]
        );
    }

    #[test]
    fn a_worker_that_named_no_frames_gives_thumbnails_in_order() {
        let layout = Layout::of(&array("1-2", 2, 2, 1), 0, 100);
        let mut old = child(0, "succeeded", &[1, 2]);
        old.thumbnail_frames.clear();
        let cells = layout.cells(std::slice::from_ref(&old));
        assert_eq!(cells[1].thumbnail, Some("m0/2.jpg"));
    }
}
