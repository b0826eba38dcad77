//! Cancelled jobs, as the ledger keeps them: a row per job id beside the
//! embedded queue, and a stamp file holding the last row's number, which a
//! worker reads (a few microseconds) to learn whether to query; on S3 a marker object per job id under
//! `PREFIX/QUEUE/cancelled/`, and one index object that every cancel
//! rewrites after its marker, so that a worker learns of a change with one
//! `HEAD` and lists the markers only when the index changed.
//!
//! A worker keeps what it learnt in [`Known`]. On S3 it refreshes it at
//! most once a period (see `worker::cancel`), never once per message.

use std::collections::HashSet;

use rusqlite::params;

use super::{Ledger, LedgerError};

/// The S3 ledger's object rewritten by every cancel.
const INDEX: &str = "cancelled.index";
/// The S3 ledger's folder of markers, one per cancelled job id.
const MARKERS: &str = "cancelled/";

/// The cancelled job ids a worker knows of, and how far it has read.
#[derive(Debug, Default)]
pub struct Known {
    ids: HashSet<String>,
    /// The last row read (embedded) or the index's ETag (S3).
    version: Option<String>,
    /// The embedded ledger's stamp file.
    stamp: Option<std::path::PathBuf>,
}

impl Known {
    pub fn contains(&self, job_id: &str) -> bool {
        self.ids.contains(job_id)
    }

    /// How far it has read: it changes with every cancel read.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
}

impl Ledger {
    /// Records that a job, or every child of an array, is cancelled.
    /// True when this call recorded it; false when it already was.
    pub async fn cancel(&self, job_id: &str) -> Result<bool, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let job_id = job_id.to_owned();
                let (new, last) = Self::sql(conn, move |c| {
                    let new = c.execute(
                        "INSERT OR IGNORE INTO cancelled (job_id, at) VALUES (?1, ?2)",
                        params![job_id, crate::sqlite::now_s()],
                    )? == 1;
                    let last: i64 =
                        c.query_row("SELECT COALESCE(MAX(rowid), 0) FROM cancelled", [], |r| {
                            r.get(0)
                        })?;
                    Ok((new, last))
                })
                .await?;
                // After the row is committed: a reader that sees the stamp
                // finds the row.
                let stamp = stamp_path(conn)?;
                tokio::fs::write(&stamp, last.to_string())
                    .await
                    .map_err(|e| LedgerError(format!("{}: {e}", stamp.display())))?;
                Ok(new)
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let marker = format!("{prefix}{MARKERS}{job_id}");
                let new = Self::create(client, bucket, marker, "cancelled").await?;
                // Rewritten even when the marker existed: a cancel that died
                // between the two writes is finished by the next one.
                let key = format!("{prefix}{INDEX}");
                let stamp = format!("{job_id} {}", chrono::Utc::now().to_rfc3339());
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(stamp.into_bytes().into())
                    .send()
                    .await
                    .map_err(|e| LedgerError(format!("{key}: {}", crate::aws::describe(&e))))?;
                Ok(new)
            }
        }
    }

    /// Brings `known` up to date with the cancels recorded since it was
    /// last refreshed.
    pub async fn refresh_cancelled(&self, known: &mut Known) -> Result<(), LedgerError> {
        match self {
            Ledger::Local(conn) => {
                if known.stamp.is_none() {
                    known.stamp = Some(stamp_path(conn)?);
                }
                let stamp = match known.stamp.as_ref().map(std::fs::read_to_string) {
                    // No cancel was ever recorded here.
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Some(Ok(stamp)) => Some(stamp),
                    // Unreadable (mid-write): query.
                    _ => None,
                };
                if stamp.is_some() && stamp == known.version {
                    return Ok(());
                }
                let after: i64 = known
                    .version
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let rows = Self::sql(conn, move |c| {
                    c.prepare_cached(
                        "SELECT rowid, job_id FROM cancelled WHERE rowid > ?1 ORDER BY rowid",
                    )?
                    .query_map([after], |row| Ok((row.get::<_, i64>(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<(i64, String)>>>()
                })
                .await?;
                if let Some((last, _)) = rows.last() {
                    known.version = Some(last.to_string());
                }
                known.ids.extend(rows.into_iter().map(|(_, id)| id));
                Ok(())
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = format!("{prefix}{INDEX}");
                let etag = match client.head_object().bucket(bucket).key(&key).send().await {
                    Ok(head) => head.e_tag,
                    // Nothing was ever cancelled on this queue.
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e))));
                    }
                };
                if etag.is_some() && etag == known.version {
                    return Ok(());
                }
                let root = format!("{prefix}{MARKERS}");
                let mut ids = HashSet::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&root)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| LedgerError(crate::aws::describe(&e)))?;
                    ids.extend(
                        page.contents()
                            .iter()
                            .filter_map(|o| o.key()?.strip_prefix(&root).map(str::to_owned)),
                    );
                }
                *known = Known {
                    ids,
                    version: etag,
                    stamp: None,
                };
                Ok(())
            }
        }
    }
}

/// The embedded ledger's folder (the queue's).
pub(super) fn ledger_dir(
    conn: &std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
) -> Result<std::path::PathBuf, LedgerError> {
    let conn = conn.lock().map_err(|e| LedgerError(e.to_string()))?;
    let db = conn
        .path()
        .ok_or_else(|| LedgerError("the ledger has no file".into()))?;
    Ok(std::path::Path::new(db)
        .parent()
        .map(std::path::Path::to_owned)
        .unwrap_or_default())
}

/// The embedded ledger's stamp file, beside its database.
fn stamp_path(
    conn: &std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
) -> Result<std::path::PathBuf, LedgerError> {
    Ok(ledger_dir(conn)?.join("cancelled.stamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_is_recorded_once_and_seen_by_a_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        // Another process's connection, as a worker would have.
        let worker = Ledger::local(dir.path()).unwrap();
        let mut known = Known::default();
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert!(!known.contains("a"));

        assert!(ledger.cancel("a").await.unwrap());
        assert!(
            !ledger.cancel("a").await.unwrap(),
            "a second cancel is not new"
        );
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert!(known.contains("a"));
        ledger.cancel("b").await.unwrap();
        worker.refresh_cancelled(&mut known).await.unwrap();
        assert!(known.contains("a") && known.contains("b"));
    }
}
