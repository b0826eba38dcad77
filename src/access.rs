//! Who runs what, and who may touch which files: decided here, once.
//!
//! The worker is the privileged party; a job is not. With `[worker]
//! run_as`, every external program a job starts (process commands,
//! adaptors) runs as that user, with that user's own groups and none of the
//! worker's, and the file system says what it may touch, by owner and mode,
//! not by checks a job could satisfy:
//!
//! | What | Owner | Mode |
//! |------|-------|------|
//! | the worker's folder under `work_dir` (`renderq-<pid>-<start>`) | worker | 0711: a job reaches its own folder by path, lists nothing |
//! | process-group records in it | worker | 0600 |
//! | a job's folder (and the folders inputs are staged in) | job user | 0700 |
//! | inputs placed in a job's folder | worker | 0444 (hard links to blobs, or copies) |
//! | the input cache (blobs, index, locks, downloads) | worker | 0700 |
//! | an embedded queue's folder (queue, ledger, status table), a local bucket's | worker | 0700 |
//! | a status table elsewhere, an events file | worker | 0600 |
//!
//! The worker takes this up at start ([`crate::app`]): it refuses a user it
//! cannot switch to, or one that cannot reach `work_dir` or a command's
//! program, and seals its state. Jobs running at the same time share the
//! job user, so they are not kept from each other's processes (nor, through
//! `/proc/PID/cwd`, folders); they cannot find them by listing.
//!
//! Without `run_as` jobs run as the worker's own user, and modes keep
//! nothing from them: the cache then never shares an inode with a job (see
//! [`crate::storage::cache::placement`]), and a worker running jobs as
//! root says so at start.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{Gid, Uid, User};

/// Folders only the worker may enter: the cache, embedded queues.
pub const STATE_DIR: u32 = 0o700;
/// Files only the worker may read: records, a status table.
pub const STATE_FILE: u32 = 0o600;
/// The worker's folder under `work_dir`: anyone may pass through to a
/// folder whose name they know (a job, to its own), nobody may list it.
pub const PROCESS_DIR: u32 = 0o711;
/// A job's folder, once given to the job user.
pub const JOB_DIR: u32 = 0o700;
/// A cached blob and every input placed from it: readable, written by no
/// one (a job user does not own it, so cannot `chmod` it either).
pub const INPUT_FILE: u32 = 0o444;

/// Who runs a job's programs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum JobUser {
    /// The worker's own user (no `run_as`).
    #[default]
    Worker,
    /// Another user (`run_as`).
    Account(Account),
}

/// A user jobs run as, resolved when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// As `run_as` spells it, for messages.
    pub spelled: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Its supplementary groups (its own, from the group database; none
    /// for a bare `uid:gid`).
    pub groups: Vec<Gid>,
}

impl Account {
    /// `name` (looked up, with its groups) or `uid:gid` (taken as is: a
    /// container may have no user database entry for it).
    pub fn resolve(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some((uid, gid)) = text.split_once(':') {
            let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
                return Err(format!(
                    "`{text}` is neither a user name nor numeric `uid:gid`"
                ));
            };
            return Ok(Self {
                spelled: text.to_owned(),
                uid: Uid::from_raw(uid),
                gid: Gid::from_raw(gid),
                groups: vec![Gid::from_raw(gid)],
            });
        }
        let user = User::from_name(text)
            .map_err(|e| format!("cannot look up user `{text}`: {e}"))?
            .ok_or_else(|| {
                format!("no user `{text}` on this machine (create it, e.g. `useradd --system {text}`, or give `uid:gid`)")
            })?;
        let name = CString::new(text).map_err(|_| format!("`{text}` holds a NUL"))?;
        let groups = nix::unistd::getgrouplist(&name, user.gid)
            .map_err(|e| format!("cannot list the groups of `{text}`: {e}"))?;
        Ok(Self {
            spelled: text.to_owned(),
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }

    /// Becomes this user in a child between `fork` and `exec`: its groups
    /// first (while still allowed to set them), then its group, then its
    /// user, which drops every privilege.
    ///
    /// Only async-signal-safe calls, and nothing allocated.
    pub fn become_in_child(&self) -> std::io::Result<()> {
        nix::unistd::setgroups(&self.groups)?;
        nix::unistd::setgid(self.gid)?;
        nix::unistd::setuid(self.uid)?;
        // A worker that is not root holds its capabilities as ambient ones
        // (systemd's AmbientCapabilities), which survive a change between
        // two users that are not root and then `exec`: the job gets none.
        // SAFETY: prctl takes plain integers here and touches no memory.
        let cleared = unsafe {
            nix::libc::prctl(
                nix::libc::PR_CAP_AMBIENT,
                nix::libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        if cleared != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Account {
    /// Why this user cannot get to `path`, if it cannot: every folder on
    /// the way (links resolved) must let it search, and `path` itself
    /// (a folder to work in, or a program to run) must let it enter or run.
    pub fn cannot_reach(&self, path: &Path) -> Option<String> {
        if self.uid.is_root() {
            return None;
        }
        let real = std::fs::canonicalize(path).ok()?;
        let mut at = std::path::PathBuf::new();
        for part in real.components() {
            at.push(part);
            let meta = std::fs::metadata(&at).ok()?;
            if !self.may(&meta, 0o1) {
                return Some(format!(
                    "{} cannot pass {} (mode {:o}, uid {}, gid {})",
                    self.spelled,
                    at.display(),
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ));
            }
        }
        None
    }

    /// Whether the mode bits `want` (of `rwx` = 0o7) apply to this user:
    /// the owner's if it owns the file, else its groups', else others'.
    fn may(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        let shift = if meta.uid() == self.uid.as_raw() {
            6
        } else if meta.gid() == self.gid.as_raw()
            || self.groups.contains(&Gid::from_raw(meta.gid()))
        {
            3
        } else {
            0
        };
        (meta.mode() >> shift) & want == want
    }
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.spelled, self.uid, self.gid)
    }
}

impl JobUser {
    /// Whether this worker can run jobs as that user; `Err` says why not,
    /// for an error naming the setting. Says once, at warning level, when
    /// jobs would run as root.
    pub fn check(&self) -> Result<(), String> {
        match self {
            JobUser::Worker => {
                if Uid::effective().is_root() {
                    tracing::warn!(
                        "jobs run as root, with every right of the worker: set [worker] run_as to a user of their own"
                    );
                }
                Ok(())
            }
            JobUser::Account(account) => {
                let missing = missing_capabilities();
                if missing.is_empty() {
                    tracing::info!(run_as = %account, "jobs run as their own user");
                    return Ok(());
                }
                Err(format!(
                    "this worker cannot run jobs as {account}: it runs as uid {} without {} (run it as root, or remove run_as)",
                    Uid::effective(),
                    missing.join(", ")
                ))
            }
        }
    }

    /// Gives a job's (or an adaptor's) folder to the job user: it and every
    /// folder in it become the user's, mode [`JOB_DIR`] at the top. Files
    /// stay as they are: inputs placed there are the worker's, read-only.
    pub fn give(&self, dir: &Path) -> std::io::Result<()> {
        let JobUser::Account(account) = self else {
            return Ok(());
        };
        set_mode(dir, JOB_DIR)?;
        chown_folders(dir, account)
    }
}

fn chown_folders(dir: &Path, account: &Account) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(account.uid.as_raw()), Some(account.gid.as_raw()))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // Never followed: a link is not a folder here.
        if entry.file_type()?.is_dir() {
            chown_folders(&entry.path(), account)?;
        }
    }
    Ok(())
}

/// Sets a path's mode bits.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Keeps a piece of the worker's state from jobs: a folder [`STATE_DIR`],
/// a file (and SQLite's `-wal` and `-shm` beside it) [`STATE_FILE`].
/// What does not exist yet is skipped: SQLite makes the `-wal` and `-shm`
/// with the mode of their database.
pub fn seal(path: &Path) -> std::io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        return set_mode(path, STATE_DIR);
    }
    set_mode(path, STATE_FILE)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut beside = path.as_os_str().to_owned();
        beside.push(suffix);
        if Path::new(&beside).exists() {
            set_mode(Path::new(&beside), STATE_FILE)?;
        }
    }
    Ok(())
}

/// Keeps a folder of the worker's state from jobs ([`STATE_DIR`]), made
/// now if it is not there yet (a local bucket's, made at its first upload
/// otherwise), so it is never made with a wider mode.
pub fn seal_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    set_mode(path, STATE_DIR)
}

/// Keeps a file the worker appends to (an events file) from jobs
/// ([`STATE_FILE`]), made now if it is not there yet.
pub fn seal_log(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::File::options()
        .append(true)
        .create(true)
        .mode(STATE_FILE)
        .open(path)?;
    set_mode(path, STATE_FILE)
}

/// Of the capabilities a worker needs to run jobs as another user (switch
/// to it, give it folders, still read and remove them, and kill its
/// processes), the ones this process lacks. Root has them all.
fn missing_capabilities() -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
        })
        .unwrap_or(0);
    [
        (0, "CAP_CHOWN"),
        (1, "CAP_DAC_OVERRIDE"),
        (5, "CAP_KILL"),
        (6, "CAP_SETGID"),
        (7, "CAP_SETUID"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_named_or_numeric() {
        let root = Account::resolve("root").unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        let numeric = Account::resolve("1234:5678").unwrap();
        assert_eq!((numeric.uid.as_raw(), numeric.gid.as_raw()), (1234, 5678));
        assert_eq!(numeric.groups, vec![Gid::from_raw(5678)]);
        let err = Account::resolve("no-such-renderq-user").unwrap_err();
        assert!(err.contains("no user `no-such-renderq-user`"), "{err}");
        let err = Account::resolve("12:x").unwrap_err();
        assert!(err.contains("neither a user name nor numeric"), "{err}");
    }

    #[test]
    fn a_folder_closed_to_the_user_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("work");
        std::fs::create_dir(&inner).unwrap();
        let stranger = Account::resolve("54321:54321").unwrap();
        set_mode(dir.path(), 0o755).unwrap();
        assert_eq!(stranger.cannot_reach(&inner), None);
        set_mode(dir.path(), 0o700).unwrap();
        let why = stranger.cannot_reach(&inner).unwrap();
        assert!(
            why.contains("54321:54321 cannot pass") && why.contains("mode 700"),
            "{why}"
        );
        assert_eq!(Account::resolve("root").unwrap().cannot_reach(&inner), None);
    }

    #[test]
    fn sealed_state_is_the_owners_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("status.sqlite3");
        std::fs::write(&db, b"").unwrap();
        std::fs::write(dir.path().join("status.sqlite3-wal"), b"").unwrap();
        set_mode(dir.path(), 0o755).unwrap();
        for path in [dir.path().to_owned(), db.clone()] {
            seal(&path).unwrap();
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), STATE_DIR);
        assert_eq!(mode(&db), STATE_FILE);
        assert_eq!(mode(&dir.path().join("status.sqlite3-wal")), STATE_FILE);
        seal(&dir.path().join("not-there")).unwrap();
    }
}
