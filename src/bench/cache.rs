//! The input cache's own costs, for `renderq bench --inputs`: making room
//! with a small and a large index, and placing one large input as a plain
//! copy and as a reflink clone; and the XFS image that the benchmark (and
//! the tests) mount to have a file system that clones.

use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::access::JobUser;
use crate::storage::cache::Cache;
use crate::storage::cache::placement::Placement;

/// Evictions timed per index size.
const EVICTIONS: usize = 200;

/// Making room for one byte in a full cache of `rows` one-byte blobs, for a
/// small and a large index: the cost must follow what is evicted, not how
/// many blobs the index holds.
pub async fn eviction() -> anyhow::Result<()> {
    for rows in [1_000, 100_000] {
        let dir = tempfile::tempdir()?;
        let cache = Cache::open(
            &dir.path().join("cache"),
            rows as u64,
            &dir.path().join("jobs"),
            &JobUser::Worker,
        )?;
        cache.seed(0, rows)?;
        let mut took = Vec::with_capacity(EVICTIONS);
        for i in 0..EVICTIONS {
            let started = Instant::now();
            cache.make_room_for(1)?;
            took.push(started.elapsed());
            // Full again: the next one evicts one blob too.
            cache.seed(rows + i, 1)?;
        }
        took.sort();
        println!(
            "  making room (one blob evicted) with {rows} blobs indexed: median {:.3} ms, p99 {:.3} ms",
            ms(took[EVICTIONS / 2]),
            ms(took[EVICTIONS * 99 / 100]),
        );
    }
    Ok(())
}

/// Places the file `blob` (the cached input) as a plain copy into the
/// system's temporary folder, and as a reflink clone beside itself where
/// its file system can clone. (On XFS and Btrfs a "copy" within one file
/// system is itself a clone: `copy_file_range` shares the extents.)
pub fn placement(blob: &Path, size_mib: u64) -> anyhow::Result<()> {
    let plain = tempfile::tempdir()?;
    let copy = timed(Placement::Copy, blob, &plain.path().join("copy"))?;
    println!(
        "  placing the {size_mib} MiB input as a plain copy into {}: {:.1} ms",
        plain.path().display(),
        ms(copy)
    );
    let beside = tempfile::tempdir_in(blob.parent().unwrap_or(Path::new(".")))?;
    let jobs = beside.path().join("jobs");
    match Placement::probe(beside.path(), &jobs, &JobUser::Worker) {
        Placement::Reflink => {
            let clone = timed(Placement::Reflink, blob, &jobs.join("clone"))?;
            println!("  as a reflink clone beside the cache: {:.2} ms", ms(clone));
        }
        _ => println!("  as a reflink clone: not here (the cache's file system cannot clone)"),
    }
    Ok(())
}

fn timed(placement: Placement, blob: &Path, dest: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    placement.place(blob, dest, SystemTime::now())?;
    Ok(started.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub mod xfs {
    //! An XFS file system on a loop-mounted image, for measuring and
    //! testing reflink clones where the machine's own disk cannot clone.

    use std::ffi::OsStr;
    use std::path::{Path, PathBuf};

    /// A mounted image, unmounted when dropped.
    #[derive(Debug)]
    pub struct Mounted(PathBuf);

    impl Mounted {
        /// Makes an XFS image of `mib` MiB at `image` and mounts it at
        /// `at`; the reason where that cannot be done (not root, no
        /// `mkfs.xfs`, no loop devices).
        pub fn xfs(image: &Path, at: &Path, mib: u64) -> Result<Self, String> {
            std::fs::File::create(image)
                .and_then(|f| f.set_len(mib << 20))
                .map_err(|e| e.to_string())?;
            run("mkfs.xfs", &["-q".as_ref(), image.as_os_str()])?;
            run(
                "mount",
                &[
                    "-o".as_ref(),
                    "loop".as_ref(),
                    image.as_os_str(),
                    at.as_os_str(),
                ],
            )?;
            Ok(Self(at.to_owned()))
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    fn run(program: &str, args: &[&OsStr]) -> Result<(), String> {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}
