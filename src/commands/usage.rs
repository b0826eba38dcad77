//! What an external program used during one run: CPU time and peak
//! resident memory (the `usage` of its job's end event).
//!
//! A `process` program: its rusage as it exits, read from the kernel
//! before the child is reaped (`waitid` with `WNOWAIT`), so it covers the
//! program and every descendant it waited for (a shell and the renderer it
//! ran, a script and the child that allocated). An `adaptor`: the process
//! lives across runs, so a run is the difference of `/proc/PID/stat`
//! (its own time and its waited-for children's) between its start and
//! its answer, and its peak is `VmHWM` after the peak was reset at the
//! start (`clear_refs`); where the reset is refused, the larger of the
//! resident sizes at both ends.

use std::sync::{Arc, Mutex};

use crate::job::usage::ProcessUsage;

/// Where a command leaves what its program used, and the worker how long
/// the command ran, for the job's end event; no program usage for
/// built-ins.
#[derive(Debug, Clone, Default)]
pub struct UsageCell(Arc<Mutex<Measured>>);

#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    process: Option<ProcessUsage>,
    wall: Option<std::time::Duration>,
}

impl UsageCell {
    pub fn set(&self, usage: ProcessUsage) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).process = Some(usage);
    }

    pub fn get(&self) -> Option<ProcessUsage> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).process
    }

    /// The command ran for `wall` (its start to its end).
    pub fn ran_for(&self, wall: std::time::Duration) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).wall = Some(wall);
    }

    pub fn wall(&self) -> Option<std::time::Duration> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).wall
    }
}

fn from_rusage(r: &nix::libc::rusage) -> ProcessUsage {
    let seconds = |t: nix::libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    ProcessUsage {
        cpu_s: seconds(r.ru_utime) + seconds(r.ru_stime),
        // Kilobytes on Linux.
        peak_rss_bytes: (r.ru_maxrss.max(0) as u64) * 1024,
    }
}

/// Blocks until child `pid` has exited, and returns what it and the
/// descendants it waited for used; the child is left to be reaped by its
/// owner (tokio's `Child::wait`). Only for a child of this process.
pub fn wait_exited(pid: u32) -> std::io::Result<ProcessUsage> {
    // SAFETY: both out-parameters are zeroed plain C structs the kernel
    // fills; the syscall's fifth argument (rusage) is Linux's extension
    // of waitid, given the zombie's own and waited-for children's usage
    // (getrusage RUSAGE_BOTH) even with WNOWAIT.
    unsafe {
        let mut info: nix::libc::siginfo_t = std::mem::zeroed();
        let mut usage: nix::libc::rusage = std::mem::zeroed();
        loop {
            let rc = nix::libc::syscall(
                nix::libc::SYS_waitid,
                nix::libc::P_PID,
                pid as nix::libc::id_t,
                &mut info as *mut nix::libc::siginfo_t,
                nix::libc::WEXITED | nix::libc::WNOWAIT,
                &mut usage as *mut nix::libc::rusage,
            );
            if rc == 0 {
                return Ok(from_rusage(&usage));
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// Clock ticks per second of `/proc/PID/stat`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime + cutime + cstime of `/proc/PID/stat`, in seconds.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields are
    // counted after its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 ... cstime 17.
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / ticks_per_second())
}

/// A field of `/proc/PID/status` in bytes (`VmHWM:  1234 kB`).
fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A long-lived process at the start of a run.
#[derive(Debug)]
pub struct RunMeter {
    pid: u32,
    cpu_s: f64,
    rss_bytes: u64,
    /// Whether `VmHWM` was reset, so that it is this run's peak.
    reset: bool,
}

impl RunMeter {
    /// Reads the process's counters and resets its peak; `None` when its
    /// `/proc` entry cannot be read (it is gone). Its resident size is read
    /// only where the reset is refused (one read fewer a run).
    pub fn start(pid: u32) -> Option<Self> {
        let proc = std::path::Path::new("/proc").join(pid.to_string());
        let cpu_s = cpu_seconds(&std::fs::read_to_string(proc.join("stat")).ok()?)?;
        // "5" resets the peak resident set size (proc(5)).
        let reset = std::fs::write(proc.join("clear_refs"), "5").is_ok();
        let rss_bytes = match reset {
            true => 0,
            false => {
                let status = std::fs::read_to_string(proc.join("status")).ok()?;
                status_bytes(&status, "VmRSS").unwrap_or(0)
            }
        };
        Some(Self {
            pid,
            cpu_s,
            rss_bytes,
            reset,
        })
    }

    /// What the process used since [`Self::start`].
    pub fn finish(&self) -> Option<ProcessUsage> {
        let proc = std::path::Path::new("/proc").join(self.pid.to_string());
        let cpu_s = cpu_seconds(&std::fs::read_to_string(proc.join("stat")).ok()?)?;
        let status = std::fs::read_to_string(proc.join("status")).ok()?;
        let peak_rss_bytes = if self.reset {
            status_bytes(&status, "VmHWM")?
        } else {
            self.rss_bytes
                .max(status_bytes(&status, "VmRSS").unwrap_or(0))
        };
        Some(ProcessUsage {
            cpu_s: (cpu_s - self.cpu_s).max(0.0),
            peak_rss_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_status_fields_parse() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 5 0 0";
        let cpu = cpu_seconds(stat).unwrap();
        assert!((cpu - 310.0 / ticks_per_second()).abs() < 1e-9, "{cpu}");
        let status = "Name:\tx\nVmHWM:\t  300 kB\nVmRSS:\t  120 kB\n";
        assert_eq!(status_bytes(status, "VmHWM"), Some(300 * 1024));
        assert_eq!(status_bytes(status, "VmRSS"), Some(120 * 1024));
        assert_eq!(status_bytes(status, "VmSwap"), None);
    }

    #[test]
    fn an_exited_childs_usage_is_read_before_it_is_reaped() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let usage = wait_exited(child.id()).unwrap();
        assert!(usage.cpu_s > 0.0, "{usage:?}");
        assert!(usage.peak_rss_bytes > 0, "{usage:?}");
        // Still the owner's to reap.
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn a_running_process_is_metered_between_two_points() {
        let meter = RunMeter::start(std::process::id()).unwrap();
        let buffer = vec![1u8; 8 << 20];
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i ^ buffer[(i as usize) % buffer.len()] as u64);
        }
        std::hint::black_box(x);
        let usage = meter.finish().unwrap();
        assert!(usage.peak_rss_bytes >= 8 << 20, "{usage:?}");
        assert!(usage.cpu_s >= 0.0);
    }
}
