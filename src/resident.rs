//! What an idle process keeps resident. Start-up runs much code that never
//! runs again (the config's parsing, every client's set-up, the schema
//! checks), and the kernel maps a file's pages 64 KiB around each one
//! touched: of an idle `serve`'s 20-21 MB resident, 16-17 MB were pages of
//! the executable, and about 4 MB of those stay in use once it is idle.
//!
//! [`release_start_up_code`] unmaps the executable's read-only pages from
//! this process (`madvise(MADV_DONTNEED)`) once it has started: they stay
//! in the page cache (shared, and free for the kernel to reclaim), and what
//! runs again is mapped again at its first touch, a page fault each.
//! Only mappings that were never written are released (no private copy in
//! them: `Anonymous: 0 kB` in `/proc/self/smaps`), so nothing can be lost:
//! a read-only private mapping of a file reads back the file's bytes.

use std::time::Duration;

/// How long after start-up the code is released: time for the first
/// receives and the listeners' first accepts to have run.
const AFTER: Duration = Duration::from_secs(1);

/// Releases the executable's start-up code [`AFTER`] a while, in the
/// background.
pub fn release_start_up_code_soon() {
    tokio::spawn(async {
        tokio::time::sleep(AFTER).await;
        match tokio::task::spawn_blocking(release_start_up_code).await {
            Ok(Ok(bytes)) => tracing::debug!(bytes, "start-up code released"),
            Ok(Err(error)) => tracing::debug!(%error, "cannot release start-up code"),
            Err(_) => {}
        }
    });
}

/// Unmaps this process's never-written mappings of its executable; returns
/// the bytes that were resident in them.
pub fn release_start_up_code() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for mapping in mappings(&smaps) {
        if mapping.path != exe || mapping.writable || mapping.anonymous_kib != 0 {
            continue;
        }
        // SAFETY: the range is a whole mapping of the executable that is
        // not writable and holds no private (written) page: dropping its
        // pages changes no byte any code can read, they come back from the
        // file at their next touch.
        let done = unsafe {
            nix::libc::madvise(
                mapping.start as *mut nix::libc::c_void,
                mapping.end - mapping.start,
                nix::libc::MADV_DONTNEED,
            )
        };
        if done == 0 {
            released += mapping.rss_kib * 1024;
        }
    }
    Ok(released)
}

/// One mapping, as `/proc/self/smaps` describes it.
#[derive(Debug, PartialEq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    writable: bool,
    path: &'a str,
    rss_kib: u64,
    anonymous_kib: u64,
}

/// The mappings in `smaps`' text.
fn mappings(smaps: &str) -> Vec<Mapping<'_>> {
    let mut found: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            let perms = fields.next().unwrap_or_default();
            // offset, device, inode, then the path (which may hold spaces).
            let path = line
                .splitn(6, char::is_whitespace)
                .nth(5)
                .unwrap_or_default()
                .trim();
            found.push(Mapping {
                start,
                end,
                writable: perms.contains('w'),
                path,
                rss_kib: 0,
                // Unknown until read: taken as written.
                anonymous_kib: u64::MAX,
            });
            continue;
        }
        let kib = || fields.clone().next().and_then(|n| n.parse::<u64>().ok());
        if let Some(mapping) = found.last_mut() {
            match first {
                "Rss:" => mapping.rss_kib = kib().unwrap_or(0),
                "Anonymous:" => mapping.anonymous_kib = kib().unwrap_or(u64::MAX),
                _ => {}
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_is_read_per_mapping_with_its_private_pages() {
        let smaps = "\
55a17932d000-55a179c54000 r--p 00000000 fd:01 123 /usr/bin/renderq q
Size:               9404 kB
Rss:                1216 kB
Anonymous:             0 kB
55a17b688000-55a17b7ef000 r--p 0235b000 fd:01 123 /usr/bin/renderq q
Rss:                1436 kB
Anonymous:          1436 kB
7f0000000000-7f0000001000 rw-p 00000000 00:00 0
Rss:                   4 kB
Anonymous:             4 kB
";
        let found = mappings(smaps);
        assert_eq!(found.len(), 3);
        assert_eq!(
            found[0],
            Mapping {
                start: 0x55a17932d000,
                end: 0x55a179c54000,
                writable: false,
                path: "/usr/bin/renderq q",
                rss_kib: 1216,
                anonymous_kib: 0,
            }
        );
        assert_eq!(found[1].anonymous_kib, 1436, "relocated: never released");
        assert!(found[2].writable);
        assert_eq!(found[2].path, "");
    }

    #[test]
    fn releasing_start_up_code_leaves_the_process_running_it() {
        let resident = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let before = resident();
        let released = release_start_up_code().unwrap();
        assert!(released > 0, "the test binary's code was resident");
        // Code runs on, its pages mapped again as it goes.
        let json = serde_json::json!({"still": "running"}).to_string();
        assert_eq!(json, r#"{"still":"running"}"#);
        assert!(resident() < before, "{} kB then {} kB", before, resident());
        // Again: nothing breaks either.
        release_start_up_code().unwrap();
    }
}
