//! How a cached blob reaches a job's folder, decided once per cache, from
//! who runs jobs (see [`crate::access`]).
//!
//! With a job user (`[worker] run_as`), a job gets a hard link to the blob
//! itself: the worker owns it and its mode is 0444, so the job can read it
//! but not write it, `chmod` it or set its times, and the link shows it
//! nothing else of the cache (whose folder it cannot enter).
//!
//! Without one, jobs run as the worker's own user, so a job may write to
//! any file it is given, whatever its mode (the owner may `chmod u+w`; root
//! ignores modes), and may put its size and modification time back. So a
//! job never gets a blob's own inode: it gets a new file, a copy-on-write
//! clone (`FICLONE`: XFS, Btrfs) where the file system can make one, else a
//! plain copy. What a job does to its file changes only that file.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use crate::access::{self, JobUser};

/// How blobs are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A hard link to the blob (jobs run as another user than the cache's
    /// owner). A file whose modification time must differ from the blob's
    /// (the same content under another manifest mtime), or a job folder on
    /// another file system, gets a copy instead: a clone where `clones`.
    Link { clones: bool },
    /// A copy-on-write clone: instant, no bytes copied, its own inode.
    Reflink,
    /// The bytes copied (the file system cannot clone, or the job folder
    /// is on another file system than the cache).
    Copy,
}

impl Placement {
    /// Links when jobs run as their own user and a hard link from the
    /// cache's `tmp` folder into `jobs` (where job folders are made) works;
    /// else copies, as [`Placement::probe_copies`] finds.
    pub fn probe(tmp: &Path, jobs: &Path, job_user: &JobUser) -> Self {
        let copies = Self::probe_copies(tmp, jobs);
        if matches!(job_user, JobUser::Worker) {
            return copies;
        }
        let name = format!(".renderq-link-probe-{}", uuid::Uuid::new_v4().simple());
        let (from, to) = (tmp.join(&name), jobs.join(&name));
        let linked =
            std::fs::write(&from, b"probe").is_ok() && std::fs::hard_link(&from, &to).is_ok();
        let _ = std::fs::remove_file(&from);
        let _ = std::fs::remove_file(&to);
        match linked {
            true => Placement::Link {
                clones: copies == Placement::Reflink,
            },
            false => copies,
        }
    }

    /// Tries a clone from the cache's `tmp` folder into `jobs`; either
    /// folder may be missing a file system feature, so only a clone that
    /// worked says `Reflink`.
    fn probe_copies(tmp: &Path, jobs: &Path) -> Self {
        let name = format!(".renderq-reflink-probe-{}", uuid::Uuid::new_v4().simple());
        let (from, to) = (tmp.join(&name), jobs.join(&name));
        let cloned = std::fs::create_dir_all(jobs).is_ok()
            && std::fs::write(&from, b"probe").is_ok()
            && File::open(&from)
                .and_then(|from| {
                    let to = File::options().write(true).create_new(true).open(&to)?;
                    reflink_copy::reflink_file(&from, &to)
                })
                .is_ok();
        let _ = std::fs::remove_file(&from);
        let _ = std::fs::remove_file(&to);
        if cloned {
            Placement::Reflink
        } else {
            Placement::Copy
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Link { .. } => "link",
            Placement::Reflink => "reflink",
            Placement::Copy => "copy",
        }
    }

    /// Makes `dest` (which must not exist) a file with the blob's bytes,
    /// read-only ([`access::INPUT_FILE`]), modified at `mtime`: the blob
    /// itself, linked, or a new file.
    pub fn place(self, blob: &Path, dest: &Path, mtime: SystemTime) -> std::io::Result<()> {
        let copies = match self {
            Placement::Link { clones } => {
                if std::fs::metadata(blob)?.modified()? == mtime {
                    match std::fs::hard_link(blob, dest) {
                        Ok(()) => return Ok(()),
                        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EXDEV as i32) => {}
                        Err(e) => return Err(e),
                    }
                }
                match clones {
                    true => Placement::Reflink,
                    false => Placement::Copy,
                }
            }
            copies => copies,
        };
        let mut from = File::open(blob)?;
        // Made here, so its handle can still set the time and mode of a
        // file whose mode no longer lets its owner write.
        let mut to = File::options().write(true).create_new(true).open(dest)?;
        let cloned = match copies {
            Placement::Reflink => match reflink_copy::reflink_file(&from, &to) {
                Ok(()) => true,
                // Cloning worked for the probe; a folder mounted elsewhere
                // since still gets the bytes.
                Err(e) if cannot_clone(&e) => false,
                Err(e) => return Err(e),
            },
            Placement::Copy | Placement::Link { .. } => false,
        };
        if !cloned {
            std::io::copy(&mut from, &mut to)?;
        }
        to.set_modified(mtime)?;
        to.set_permissions(std::fs::Permissions::from_mode(access::INPUT_FILE))
    }
}

fn cannot_clone(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    [
        Errno::EXDEV,
        Errno::EOPNOTSUPP,
        Errno::EINVAL,
        Errno::ENOTTY,
    ]
    .iter()
    .any(|errno| e.raw_os_error() == Some(*errno as i32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_placed_file_is_a_new_inode_with_its_own_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"admitted").unwrap();
        let placement = Placement::probe(dir.path(), &dir.path().join("jobs"), &JobUser::Worker);
        let before_1970 = SystemTime::UNIX_EPOCH - std::time::Duration::from_micros(1_500_000);
        let dest = dir.path().join("jobs/a");
        placement.place(&blob, &dest, before_1970).unwrap();
        let (b, d) = (blob.metadata().unwrap(), dest.metadata().unwrap());
        assert_ne!(b.ino(), d.ino());
        assert_eq!(d.modified().unwrap(), before_1970);
        assert!(d.permissions().readonly());
        // Written through (as root or after chmod): the blob is unchanged.
        std::fs::set_permissions(
            &dest,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644),
        )
        .unwrap();
        std::fs::write(&dest, b"spoiled!").unwrap();
        assert_eq!(std::fs::read(&blob).unwrap(), b"admitted");
        assert!(
            placement.place(&blob, &dest, before_1970).is_err(),
            "an existing file is never replaced"
        );
    }

    #[test]
    fn a_link_is_the_blob_unless_its_file_needs_another_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"admitted").unwrap();
        access::set_mode(&blob, access::INPUT_FILE).unwrap();
        let jobs = dir.path().join("jobs");
        let user = JobUser::Account(access::Account::resolve("1234:1234").unwrap());
        let placement = Placement::probe(dir.path(), &jobs, &user);
        assert!(matches!(placement, Placement::Link { .. }), "{placement:?}");
        let admitted = blob.metadata().unwrap().modified().unwrap();
        placement.place(&blob, &jobs.join("a"), admitted).unwrap();
        let linked = jobs.join("a").metadata().unwrap();
        assert_eq!(linked.ino(), blob.metadata().unwrap().ino());
        assert_eq!(linked.mode() & 0o777, access::INPUT_FILE);
        // Another manifest's mtime for the same content: its own file.
        let other = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        placement.place(&blob, &jobs.join("b"), other).unwrap();
        let copied = jobs.join("b").metadata().unwrap();
        assert_ne!(copied.ino(), blob.metadata().unwrap().ino());
        assert_eq!(copied.modified().unwrap(), other);
        assert_eq!(copied.mode() & 0o777, access::INPUT_FILE);
        assert_eq!(blob.metadata().unwrap().modified().unwrap(), admitted);
    }
}
