//! How a cached blob reaches a job's folder, decided once per cache.
//!
//! Jobs run as the worker's own user, so a job may write to any file it is
//! given, whatever its mode (the owner may `chmod u+w`; root ignores modes),
//! and may put its size and modification time back. So a job never gets a
//! blob's own inode: it gets a new file, a copy-on-write clone (`FICLONE`:
//! XFS, Btrfs) where the file system can make one, else a plain copy. What a
//! job does to its file changes only that file. (Read-only links to blobs
//! the job cannot write are safe only when jobs run as another user than the
//! cache's owner.)

use std::fs::File;
use std::path::Path;
use std::time::SystemTime;

/// How blobs are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A copy-on-write clone: instant, no bytes copied, its own inode.
    Reflink,
    /// The bytes copied (the file system cannot clone, or the job folder
    /// is on another file system than the cache).
    Copy,
}

impl Placement {
    /// Tries a clone from the cache's `tmp` folder into `jobs` (where job
    /// folders are made); either folder may be missing a file system
    /// feature, so only a clone that worked says `Reflink`.
    pub fn probe(tmp: &Path, jobs: &Path) -> Self {
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
            Placement::Reflink => "reflink",
            Placement::Copy => "copy",
        }
    }

    /// Makes `dest` (which must not exist) a new file with the blob's bytes,
    /// read-only, modified at `mtime`.
    pub fn place(self, blob: &Path, dest: &Path, mtime: SystemTime) -> std::io::Result<()> {
        let mut from = File::open(blob)?;
        // Made here, so its handle can still set the time and mode of a
        // file whose mode no longer lets its owner write.
        let mut to = File::options().write(true).create_new(true).open(dest)?;
        let cloned = match self {
            Placement::Reflink => match reflink_copy::reflink_file(&from, &to) {
                Ok(()) => true,
                // Cloning worked for the probe; a folder mounted elsewhere
                // since still gets the bytes.
                Err(e) if cannot_clone(&e) => false,
                Err(e) => return Err(e),
            },
            Placement::Copy => false,
        };
        if !cloned {
            std::io::copy(&mut from, &mut to)?;
        }
        to.set_modified(mtime)?;
        let mut permissions = to.metadata()?.permissions();
        permissions.set_readonly(true);
        to.set_permissions(permissions)
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
        let placement = Placement::probe(dir.path(), &dir.path().join("jobs"));
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
}
