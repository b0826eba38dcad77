//! Claiming the next visible message: one write transaction, taken only
//! once a read has seen something to claim. On the way, messages that no
//! worker can decode, or whose last try was never reported, are
//! dead-lettered with their reason.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::db::{execute, query_row};
use super::{now_ms, unavailable};
use crate::queue::{QueueError, Received};

pub(super) enum Claim {
    Got(Received),
    /// Nothing visible; the earliest `visible_at` of any live message.
    Empty(Option<i64>),
}

/// Claims the next visible message, dead-lettering on the way any that have
/// used up their receives (as an SQS redrive policy does on receive).
pub(super) fn claim(
    conn: &mut Connection,
    visibility: i64,
    max_receive_count: u32,
) -> Result<Claim, QueueError> {
    let now = now_ms();
    // A look without the write lock first. Waiting receivers mostly find
    // nothing, and taking the lock only to find nothing would line every
    // waiting worker up behind the senders. (A message sent after this look
    // rings the doorbell, which the caller listens to from before it.)
    let next_visible = |conn: &Connection| {
        query_row(
            conn,
            "SELECT MIN(visible_at) FROM messages WHERE dead_at IS NULL",
            [],
            |row| row.get::<_, Option<i64>>(0),
        )
        .map_err(unavailable)
    };
    match next_visible(conn)? {
        Some(at) if at <= now => {}
        later => return Ok(Claim::Empty(later)),
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    loop {
        let next = query_row(
            &tx,
            "SELECT seq, id, body, receive_count FROM messages
                 WHERE dead_at IS NULL AND visible_at <= ?1
                 ORDER BY visible_at, seq LIMIT 1",
            [now],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    text(row.get_ref(1)?),
                    body(row.get_ref(2)?),
                    row.get::<_, i64>(3)?.clamp(0, u32::MAX.into()) as u32,
                ))
            },
        )
        .optional()
        .map_err(unavailable)?;
        let Some((seq, message_id, body, count)) = next else {
            let later = next_visible(&tx)?;
            tx.commit().map_err(unavailable)?;
            return Ok(Claim::Empty(later));
        };
        // A message no worker can decode is its own problem, not the
        // queue's: it goes to the dead-letter queue and the claim goes on.
        let body = match body {
            Ok(body) => body,
            Err(reason) => {
                dead_letter_row(&tx, seq, &reason, now)?;
                tracing::warn!(%message_id, %reason, "Moved undecodable message to the dead-letter queue.");
                continue;
            }
        };
        // The backstop, like an SQS redrive policy set one above the budget:
        // a worker sees the receive after the last try (and dead-letters it
        // as lost, counting it for its array); only if that worker dies too
        // does the queue dead-letter it here.
        if count > max_receive_count {
            let reason = format!("worker lost: receive {count} never reported back");
            execute(
                &tx,
                "UPDATE messages SET dead_at = ?2, receipt = NULL,
                    last_error = ?3 || COALESCE('; the try before failed: ' || last_error, '')
                 WHERE seq = ?1",
                params![seq, now, reason],
            )
            .map_err(unavailable)?;
            tracing::info!(%message_id, receives = count, "Moved job to the dead-letter queue.");
            continue;
        }
        let receipt = uuid::Uuid::new_v4().to_string();
        execute(
            &tx,
            "UPDATE messages SET receipt = ?2, receive_count = receive_count + 1, visible_at = ?3
             WHERE seq = ?1",
            params![seq, receipt, now + visibility],
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        return Ok(Claim::Got(Received {
            message_id,
            receipt,
            body,
            receive_count: count + 1,
        }));
    }
}

pub(super) fn dead_letter_row(
    tx: &rusqlite::Transaction,
    seq: i64,
    reason: &str,
    now: i64,
) -> Result<(), QueueError> {
    execute(
        tx,
        "UPDATE messages SET dead_at = ?2, receipt = NULL, last_error = ?3 WHERE seq = ?1",
        params![seq, now, reason],
    )
    .map_err(unavailable)
    .map(drop)
}

/// Any column as text, for ids: rows may be written by hand.
pub(super) fn text(value: ValueRef) -> String {
    match value {
        ValueRef::Null => String::new(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(x) => x.to_string(),
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            String::from_utf8_lossy(bytes).into_owned()
        }
    }
}

/// A message body, which must be UTF-8 text (as SQS requires).
pub(super) fn body(value: ValueRef) -> Result<String, String> {
    match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("message body is not valid UTF-8 text: {}", e.utf8_error())),
        other => Ok(text(other)),
    }
}
