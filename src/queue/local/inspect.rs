//! What `queue stats`, `dlq list`, `dlq redrive` and a cancel do on the
//! embedded queue: counts, the dead letters read and put back, and the
//! deletion of a cancelled job's queued messages. Scans of the whole queue,
//! so each runs on a blocking thread.

use rusqlite::params;

use super::claim::text;
use super::db::{execute, query_row};
use super::{LocalQueue, now_ms, unavailable};
use crate::job::id::Id;
use crate::queue::{DeadLetter, QueueError, Redrive, Stats};

/// What a cancel found in the embedded queue.
#[derive(Debug, Default)]
pub struct Cancelled {
    /// Messages deleted unrun: (message id, body).
    pub queued: Vec<(String, String)>,
    /// Messages a worker holds.
    pub held: u32,
}

impl LocalQueue {
    pub async fn stats(&self) -> Result<Stats, QueueError> {
        self.inner
            .db
            .run_blocking(|conn| {
                query_row(
                    conn,
                    "SELECT
                    COUNT(*) FILTER (WHERE dead_at IS NULL AND visible_at <= ?1),
                    COUNT(*) FILTER (WHERE dead_at IS NULL AND visible_at > ?1),
                    COUNT(*) FILTER (WHERE dead_at IS NOT NULL)
                 FROM messages",
                    [now_ms()],
                    |row| {
                        let count = |i| row.get::<_, i64>(i).map(|n| n as u64);
                        Ok(Stats {
                            visible: count(0)?,
                            in_flight: count(1)?,
                            dead_lettered: count(2)?,
                        })
                    },
                )
                .map_err(unavailable)
            })
            .await
    }

    pub async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.inner
            .db
            .run_blocking(move |conn| {
                let mut stmt = conn
                    .prepare(
                        "SELECT id, receive_count, last_error FROM messages
                     WHERE dead_at IS NOT NULL ORDER BY dead_at, seq LIMIT ?1",
                    )
                    .map_err(unavailable)?;
                let rows = stmt
                    .query_map([limit as i64], |row| {
                        Ok(DeadLetter {
                            message_id: text(row.get_ref(0)?),
                            receive_count: row.get(1)?,
                            reason: row
                                .get::<_, Option<String>>(2)?
                                .unwrap_or_else(|| "no reason recorded".into()),
                        })
                    })
                    .map_err(unavailable)?;
                rows.collect::<Result<_, _>>().map_err(unavailable)
            })
            .await
    }

    /// Deletes the messages of a cancelled job (or of every child of a
    /// cancelled array) that no worker holds; returns them, and how many
    /// are held (running, or waiting out a retry's back-off), which their
    /// workers stop. `id` may name the job, its array, or one message (by
    /// the id the submit returned).
    pub async fn cancel_queued(&self, id: &Id) -> Result<Cancelled, QueueError> {
        let id = id.clone();
        self.inner
            .db
            .run_blocking(move |conn| {
                let tx = conn.transaction().map_err(unavailable)?;
                let now = now_ms();
                let mut cancelled = Cancelled::default();
                let mut chosen = Vec::new();
                {
                    // The id is a UUID: a message that is not it, and whose
                    // body does not contain it in any case, is not the
                    // job's, and is not parsed.
                    let mut stmt = tx
                        .prepare(
                            "SELECT seq, id, body, receipt IS NOT NULL AND visible_at > ?2
                             FROM messages WHERE dead_at IS NULL
                             AND (id = ?1 OR instr(lower(body), ?1) > 0)",
                        )
                        .map_err(unavailable)?;
                    let rows = stmt
                        .query_map(params![id.as_str(), now], |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                text(row.get_ref(1)?),
                                text(row.get_ref(2)?),
                                row.get::<_, bool>(3)?,
                            ))
                        })
                        .map_err(unavailable)?;
                    for row in rows {
                        let (seq, message_id, body, held) = row.map_err(unavailable)?;
                        let envelope = crate::job::Envelope::parse(&body, &message_id);
                        let named = id.is(&message_id)
                            || envelope.is_ok_and(|e| {
                                e.is_part_of(&id) || id.is(e.message_id(&message_id))
                            });
                        if !named {
                            continue;
                        }
                        if held {
                            cancelled.held += 1;
                        } else {
                            chosen.push(seq);
                            cancelled.queued.push((message_id, body));
                        }
                    }
                }
                for seq in chosen {
                    execute(&tx, "DELETE FROM messages WHERE seq = ?1", [seq])
                        .map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)?;
                Ok(cancelled)
            })
            .await
    }

    pub async fn dlq_redrive(&self, limit: usize, which: &Redrive) -> Result<usize, QueueError> {
        let which = which.clone();
        let moved = self
            .inner
            .db
            .run_blocking(move |conn| {
                let tx = conn.transaction().map_err(unavailable)?;
                let chosen: Vec<i64> = {
                    let mut stmt = tx
                        .prepare(
                            "SELECT seq, id, body FROM messages WHERE dead_at IS NOT NULL
                             ORDER BY dead_at, seq",
                        )
                        .map_err(unavailable)?;
                    let rows = stmt
                        .query_map([], |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                text(row.get_ref(1)?),
                                text(row.get_ref(2)?),
                            ))
                        })
                        .map_err(unavailable)?;
                    let mut chosen = Vec::new();
                    for row in rows {
                        let (seq, id, body) = row.map_err(unavailable)?;
                        if chosen.len() < limit && which.wants(&id, &body) {
                            chosen.push(seq);
                        }
                    }
                    chosen
                };
                for seq in &chosen {
                    execute(
                        &tx,
                        "UPDATE messages SET dead_at = NULL, receive_count = 0, receipt = NULL,
                            last_error = NULL, visible_at = ?2
                         WHERE seq = ?1",
                        params![seq, now_ms()],
                    )
                    .map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)?;
                Ok(chosen.len())
            })
            .await?;
        if moved > 0 {
            self.ring();
        }
        Ok(moved)
    }
}
