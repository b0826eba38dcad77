//! What a renderq process leaves on disk and in the process table, and how
//! it is cleaned up when the process dies without doing it itself.
//!
//! A process keeps what it makes under a root (the worker's `work_dir`, a
//! local bucket's temp folder) in a folder of its own, named for its pid and
//! start time: `renderq-<pid>-<start>`. Inside are job folders
//! (`renderq-job-*`), adaptor homes, and one `group-<pgid>` record per
//! running command's process group, removed when the group is killed.
//!
//! Two things clean up after a process that died (`kill -9`, OOM):
//! - its reaper, a child forked at start-up (see [`start_reaper`]), which
//!   notices the death when its pipe closes, kills the recorded process
//!   groups and removes the folders, within milliseconds;
//! - a sweep ([`sweep`]) when a worker starts, which does the same for
//!   every folder under the root whose owner is no longer running (in case
//!   the reaper died too).
//!
//! Each command also gets SIGKILL as its parent-death signal, so even with
//! no reaper the program the worker started dies with it.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::access::{self, JobUser};

/// Prefix of every per-process folder.
const DIR_PREFIX: &str = "renderq-";
/// Prefix of a process-group record inside a per-process folder.
const GROUP_PREFIX: &str = "group-";

/// A process, told apart from a later one that reuses its pid by its start
/// time (clock ticks after boot, `/proc/PID/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pid: i32,
    start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Self {
        let pid = std::process::id() as i32;
        Self::of(pid).unwrap_or(Self { pid, start: 0 })
    }

    /// The process running as `pid` now, if any.
    fn of(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses; the
        // fields after it are plain.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let start = after_name.split_whitespace().nth(19)?.parse().ok()?;
        Some(Self { pid, start })
    }

    fn is_running(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }

    fn dir_name(&self) -> String {
        format!("{DIR_PREFIX}{}-{}", self.pid, self.start)
    }

    fn from_dir_name(name: &str) -> Option<Self> {
        let (pid, start) = name.strip_prefix(DIR_PREFIX)?.split_once('-')?;
        Some(Self {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }
}

/// This process's folder under a root, made on first use.
#[derive(Debug)]
pub struct Workspace {
    /// `root/renderq-<pid>-<start>`.
    dir: PathBuf,
    /// Whether the folder has been made (and handed to the reaper).
    made: AtomicBool,
    /// Who gets the job folders made here.
    job_user: JobUser,
}

impl Workspace {
    /// Touches nothing on disk until a folder is asked for.
    pub fn new(root: &Path) -> Self {
        Self::for_jobs(root, JobUser::Worker)
    }

    /// A workspace whose job folders [`Workspace::job_dir`] gives to
    /// `job_user`.
    pub fn for_jobs(root: &Path, job_user: JobUser) -> Self {
        Self {
            dir: root.join(Owner::current().dir_name()),
            made: AtomicBool::new(false),
            job_user,
        }
    }

    pub fn job_user(&self) -> &JobUser {
        &self.job_user
    }

    /// The per-process folder, made (and watched by the reaper) if needed;
    /// a job may pass through it to its own folder but list nothing.
    pub fn dir(&self) -> std::io::Result<&Path> {
        if !self.made.load(Ordering::Acquire) {
            std::fs::create_dir_all(&self.dir)?;
            access::set_mode(&self.dir, access::PROCESS_DIR)?;
            reap_at_exit(&self.dir);
            let mut own = OWN.lock().expect("own folders lock");
            if !own.contains(&self.dir) {
                own.push(self.dir.clone());
            }
            self.made.store(true, Ordering::Release);
        }
        Ok(&self.dir)
    }

    /// A fresh folder, removed when the guard is dropped.
    pub fn temp_dir(&self, prefix: &str) -> std::io::Result<TempFolder> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.dir()?)
            .map(|dir| TempFolder(Some(dir)))
    }

    /// A fresh folder for a job's (or an adaptor's) programs, given to the
    /// job user; removed when the guard is dropped.
    pub fn job_dir(&self, prefix: &str) -> std::io::Result<TempFolder> {
        let dir = self.temp_dir(prefix)?;
        self.give(dir.path())?;
        Ok(dir)
    }

    /// Gives a job folder, and the folders made in it since (its inputs'),
    /// to the job user (see [`access`]).
    pub fn give(&self, dir: &Path) -> std::io::Result<()> {
        self.job_user.give(dir)
    }

    /// Records a running process group so that it is killed should this
    /// process die; the record goes when the guard is dropped.
    pub fn record_group(&self, pgid: Pid) -> Option<GroupRecord> {
        let leader = Owner::of(pgid.as_raw())?;
        let path = self.dir().ok()?.join(format!("{GROUP_PREFIX}{pgid}"));
        let write = || {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(access::STATE_FILE)
                .open(&path)?
                .write_all(leader.start.to_string().as_bytes())
        };
        match write() {
            Ok(()) => Some(GroupRecord(path)),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot record a process group");
                None
            }
        }
    }
}

/// A process group's record on disk; removed on drop.
#[derive(Debug)]
pub struct GroupRecord(PathBuf);

impl Drop for GroupRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a sweep found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Folders of dead processes removed.
    pub folders: usize,
    /// Process groups of dead processes killed.
    pub groups: usize,
}

/// Cleans up after every process under `root` that is no longer running:
/// kills the process groups it recorded and removes its folder.
pub fn sweep(root: &Path) -> Swept {
    let mut swept = Swept::default();
    let Ok(entries) = std::fs::read_dir(root) else {
        return swept;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(Owner::from_dir_name) else {
            continue;
        };
        if owner.is_running() || !entry.path().is_dir() {
            continue;
        }
        swept.groups += clean(&entry.path());
        swept.folders += 1;
    }
    if swept != Swept::default() {
        tracing::info!(
            root = %root.display(),
            folders = swept.folders,
            groups = swept.groups,
            "Cleaned up after dead workers."
        );
    }
    swept
}

/// Kills the groups recorded in a dead process's folder and removes it;
/// returns how many groups were still there.
fn clean(dir: &Path) -> usize {
    let killed = kill_recorded(dir);
    let _ = std::fs::remove_dir_all(dir);
    killed
}

/// This process's own folders, for [`kill_own_groups`].
static OWN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Kills every process group this process's commands are running in (on
/// a second signal, just before exiting); returns how many.
pub fn kill_own_groups() -> usize {
    let own = OWN.lock().map(|o| o.clone()).unwrap_or_default();
    own.iter().map(|dir| kill_recorded(dir)).sum()
}

/// Kills the process groups recorded in `dir`; returns how many.
fn kill_recorded(dir: &Path) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pgid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(GROUP_PREFIX))
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let start = std::fs::read_to_string(entry.path()).unwrap_or_default();
        // A leader that is still there must be the one recorded; once it is
        // gone, Linux hands out its pid to no one while its group lives on.
        let reused = Owner::of(pgid).is_some_and(|o| o.start.to_string() != start.trim());
        if !reused && killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// The write end of the pipe to this process's reaper, if it has one.
static REAPER: OnceLock<Mutex<std::io::PipeWriter>> = OnceLock::new();

/// Forks the reaper: a child that waits for this process to die (its pipe
/// closes) and then cleans up every folder handed to it.
///
/// Call it first thing in `main`, before any thread exists: the child runs
/// on after `fork`, which is only sound in a single-threaded process.
pub fn start_reaper() -> std::io::Result<()> {
    let (reader, writer) = std::io::pipe()?;
    // SAFETY: the caller guarantees no other thread exists, so the child
    // inherits no lock held by a thread that is not there.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(writer);
            reap(reader)
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(reader);
            let _ = REAPER.set(Mutex::new(writer));
            Ok(())
        }
    }
}

/// Hands a folder to the reaper, to be cleaned when this process dies.
fn reap_at_exit(dir: &Path) {
    let Some(writer) = REAPER.get() else {
        return;
    };
    let mut line = dir.as_os_str().as_encoded_bytes().to_vec();
    line.push(b'\n');
    if let Ok(mut writer) = writer.lock()
        && let Err(error) = writer.write_all(&line)
    {
        tracing::warn!(%error, "the reaper is gone; a crash may leave files behind");
    }
}

/// The reaper's life: collect folders until the parent is gone, then clean
/// them up and exit.
fn reap(reader: std::io::PipeReader) -> ! {
    use nix::sys::signal::{SigHandler, signal};
    // Signals meant for the worker (Ctrl-C reaches the whole process group)
    // must not take the reaper first.
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: ignoring a signal installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    // Let go of the parent's stdin and stdout, so whoever reads them sees
    // the end when the parent exits.
    if let Ok(null) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
    }
    let mut dirs = Vec::new();
    for line in std::io::BufReader::new(reader).split(b'\n').flatten() {
        // SAFETY: the bytes were written by `reap_at_exit` from an OsStr.
        let dir = PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(line) });
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for dir in &dirs {
        clean(dir);
    }
    std::process::exit(0)
}

/// A job's or an adaptor's folder, removed when dropped: on a blocking
/// thread when a runtime is there (a job folder may hold gigabytes, and
/// the last output holding it is often dropped on an async thread).
#[derive(Debug)]
pub struct TempFolder(Option<tempfile::TempDir>);

impl TempFolder {
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(dir))),
            Err(_) => drop(dir),
        }
    }
}

#[cfg(test)]
mod tests;
