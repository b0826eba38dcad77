//! Array children's final states, and the one claim of an array's
//! completion.
//!
//! Beside the embedded queue: a row per child and a `completed` row, counted
//! and claimed in one transaction.
//!
//! On S3: one state object per array (`PREFIX/QUEUE/arrays/ID/state`), a
//! character per child, and whether the completion was claimed. Every
//! settle reads it and writes it back with `If-Match` on the ETag it read
//! (`If-None-Match: *` when it is new), and reads again when another writer
//! got there first. The settles that arrive in one process while a write
//! of the same array is under way go together in its next write. So a
//! child costs at most one `GET` and one `PUT` (and one more of each per
//! write that raced it), whatever the array's size; and the
//! write that makes the last child final is the one that marks the array
//! completed, so the claim is that same conditional write: no moment
//! exists where every child is final and nobody has claimed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use super::{Ledger, LedgerError};
use crate::job::ArrayPart;
use crate::retry::Backoff;

/// A child's final state, ranked: a later variant replaces an earlier one
/// (a redriven child that then succeeds), never the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChildState {
    /// The submit gave up sending it: it will never run.
    NotSent,
    /// Cancelled before it could finish (a success that races the cancel
    /// still wins).
    Cancelled,
    DeadLettered,
    Succeeded,
}

impl ChildState {
    const ALL: [Self; 4] = [
        Self::NotSent,
        Self::Cancelled,
        Self::DeadLettered,
        Self::Succeeded,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            ChildState::NotSent => "not_sent",
            ChildState::Cancelled => "cancelled",
            ChildState::DeadLettered => "dead_lettered",
            ChildState::Succeeded => "succeeded",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Its character in the S3 state object.
    fn mark(self) -> u8 {
        match self {
            ChildState::NotSent => b'n',
            ChildState::Cancelled => b'c',
            ChildState::DeadLettered => b'd',
            ChildState::Succeeded => b's',
        }
    }

    fn from_mark(mark: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.mark() == mark)
    }
}

/// An array's final counts, for `ArrayJobCompleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ArrayCounts {
    pub size: u32,
    pub succeeded: u32,
    pub dead_lettered: u32,
    pub cancelled: u32,
    /// Children the submit could not queue (it said which); absent when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub not_sent: u32,
    /// The re-render these counts are of (absent: the submit's children).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ArrayCounts {
    /// The counts from how many children are in each final state; and how
    /// many are final in all.
    fn tally(size: u32, states: impl IntoIterator<Item = (ChildState, u32)>) -> (u32, Self) {
        let mut counts = Self {
            size,
            succeeded: 0,
            dead_lettered: 0,
            cancelled: 0,
            not_sent: 0,
            revision: None,
        };
        let mut done = 0;
        for (state, n) in states {
            done += n;
            *match state {
                ChildState::Succeeded => &mut counts.succeeded,
                ChildState::DeadLettered => &mut counts.dead_lettered,
                ChildState::NotSent => &mut counts.not_sent,
                ChildState::Cancelled => &mut counts.cancelled,
            } += n;
        }
        (done, counts)
    }
}

/// The S3 ledger's object for one array.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ArrayState {
    size: u32,
    /// One character per child: `.` while it is not final, else its
    /// [`ChildState::mark`].
    children: String,
    completed: bool,
    /// The write that claimed the completion: a write whose answer was lost
    /// (its PUT landed, then the call failed or was retried and found its
    /// own ETag condition stale) finds its token here and still claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claimed_by: Option<String>,
}

/// A child not final yet, in [`ArrayState::children`].
const PENDING: u8 = b'.';

impl ArrayState {
    fn new(size: u32) -> Self {
        Self {
            size,
            children: String::from_utf8(vec![PENDING; size as usize]).expect("ASCII"),
            completed: false,
            claimed_by: None,
        }
    }

    /// Raises the children's states; true when that changed anything.
    /// Indexes past the end are ignored (the submit checked them).
    fn settle(&mut self, indexes: &[u32], state: ChildState) -> bool {
        let mut children = std::mem::take(&mut self.children).into_bytes();
        let mut changed = false;
        for &index in indexes {
            let Some(mark) = children.get_mut(index as usize) else {
                continue;
            };
            if ChildState::from_mark(*mark).is_none_or(|old| old < state) {
                *mark = state.mark();
                changed = true;
            }
        }
        self.children = String::from_utf8(children).expect("ASCII marks");
        changed
    }

    fn tally(&self) -> (u32, ArrayCounts) {
        let mut counts = std::collections::BTreeMap::new();
        for state in self.children.bytes().filter_map(ChildState::from_mark) {
            *counts.entry(state).or_insert(0) += 1;
        }
        ArrayCounts::tally(self.size, counts)
    }
}

/// One process's settles of array children waiting to be written, by
/// array: while one write of an array's state is under way, the settles
/// that arrive wait and go together in the next, so that a busy worker
/// makes one write per round, not one per child.
#[derive(Debug, Default, Clone)]
pub struct Writes(Arc<Mutex<HashMap<String, Waiting>>>);

/// An array's settles waiting for its writer.
#[derive(Debug, Default)]
struct Waiting {
    /// Whether a writer is running for the array (it takes `settles`
    /// before each write).
    writing: bool,
    settles: Vec<Settle>,
}

/// Removes an array's entry from [`Writes`] when its writer unwinds.
struct Leave<'a> {
    writes: &'a Writes,
    array_id: &'a str,
    armed: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut writes = self.writes.0.lock().unwrap_or_else(|e| e.into_inner());
            writes.remove(self.array_id);
        }
    }
}

/// Children to settle, and where their caller waits for the answer.
#[derive(Debug)]
struct Settle {
    indexes: Vec<u32>,
    state: ChildState,
    answer: tokio::sync::oneshot::Sender<Result<Option<ArrayCounts>, LedgerError>>,
}

/// The longest one write of an array's state (its reads and races
/// included) may take before its callers are told it failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes that may race one settle (another writer changed the state
/// between its read and its write) before it gives up.
pub(super) const RACES: u32 = 100;
/// The wait after a lost race, doubling: short, since the winner's write is
/// already done.
pub(super) const RACE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(5), Duration::from_millis(200));

impl Ledger {
    /// Records a child's final state. When that makes every child final
    /// and this call is the one that claims the array's completion, returns
    /// the counts; every other call returns `None`. A re-render's child is
    /// counted in its revision, which completes once of its own.
    pub async fn child_settled(
        &self,
        array: &ArrayPart,
        state: ChildState,
    ) -> Result<Option<ArrayCounts>, LedgerError> {
        let (id, size, index) = array.ledger_slot();
        let counts = self.children_settled(&id, size, vec![index], state).await?;
        Ok(counts.map(|counts| ArrayCounts {
            revision: array.revision.map(|r| r.number),
            ..counts
        }))
    }

    /// Records children's final state at once: ones the submit could not
    /// send (`NotSent`: so the array completes with the children that were
    /// sent), or ones a cancel deleted unrun. Returns the counts when that
    /// completed the array (and this call claimed it).
    pub async fn children_settled(
        &self,
        array_id: &str,
        size: u32,
        indexes: Vec<u32>,
        state: ChildState,
    ) -> Result<Option<ArrayCounts>, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let array_id = array_id.to_owned();
                Self::sql(conn, move |c| {
                    // One transaction: the count and the claim see the same
                    // rows, and only one process can hold the write lock.
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let now = crate::sqlite::now_s();
                    for index in indexes {
                        // A state replaces only a lower one (ChildState's
                        // order): a redriven child that then succeeds.
                        tx.execute(
                            "INSERT INTO children (array_id, idx, state, at) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (array_id, idx) DO UPDATE
                             SET state = excluded.state, at = excluded.at
                             WHERE excluded.state = 'succeeded'
                                OR (excluded.state = 'dead_lettered' AND state IN ('not_sent', 'cancelled'))
                                OR (excluded.state = 'cancelled' AND state = 'not_sent')",
                            params![array_id, index, state.name(), now],
                        )?;
                    }
                    let states = tx
                        .prepare_cached(
                            "SELECT state, COUNT(*) FROM children WHERE array_id = ?1 GROUP BY state",
                        )?
                        .query_map([&array_id], |row| {
                            Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
                        })?
                        .filter_map(|row| {
                            row.map(|(name, n)| ChildState::from_name(&name).map(|s| (s, n)))
                                .transpose()
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    let (done, counts) = ArrayCounts::tally(size, states);
                    let claimed = done >= size
                        && tx.execute(
                            "INSERT OR IGNORE INTO completed (array_id, at) VALUES (?1, ?2)",
                            params![array_id, now],
                        )? == 1;
                    tx.commit()?;
                    Ok(claimed.then_some(counts))
                })
                .await
            }
            Ledger::S3 { writes, .. } => {
                let (answer, answered) = tokio::sync::oneshot::channel();
                let lead = {
                    let mut writes = writes.0.lock().expect("not poisoned");
                    let waiting = writes.entry(array_id.to_owned()).or_default();
                    waiting.settles.push(Settle {
                        indexes,
                        state,
                        answer,
                    });
                    // The first to wait starts the writer; the others ride
                    // along in its next write.
                    !std::mem::replace(&mut waiting.writing, true)
                };
                if lead {
                    // Its own task: a caller given up on cannot strand the
                    // others' answers.
                    tokio::spawn(self.clone().write_waiting(array_id.to_owned(), size));
                }
                answered
                    .await
                    .map_err(|_| LedgerError("the array's state writer stopped".into()))?
            }
        }
    }

    /// Writes the settles waiting on an array, all at once, until none is
    /// left; each caller gets its answer (the counts go to the first caller
    /// of the write that completed the array).
    async fn write_waiting(self, array_id: String, size: u32) {
        let Ledger::S3 { writes, .. } = &self else {
            unreachable!("only the S3 ledger batches its writes")
        };
        // Should this task panic, the array is left to the next writer
        // (and the callers waiting on it get an error).
        let mut leave = Leave {
            writes,
            array_id: &array_id,
            armed: true,
        };
        loop {
            let batch = {
                let mut writes = writes.0.lock().expect("not poisoned");
                let Some(waiting) = writes.get_mut(&array_id) else {
                    leave.armed = false;
                    return;
                };
                if waiting.settles.is_empty() {
                    writes.remove(&array_id);
                    leave.armed = false;
                    return;
                }
                std::mem::take(&mut waiting.settles)
            };
            let claim = uuid::Uuid::new_v4().to_string();
            // A call that hangs must not hold every settle of the array.
            let write = self.write_state(&array_id, size, &batch, &claim);
            let result = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(claimed)) => Ok(claimed),
                Ok(Err(error)) => self.claimed_anyway(&array_id, &claim, error).await,
                Err(_) => {
                    let error = LedgerError(format!(
                        "array {array_id}: its state write took over {WRITE_TIMEOUT:?}"
                    ));
                    self.claimed_anyway(&array_id, &claim, error).await
                }
            };
            let answers = batch.into_iter().map(|settle| settle.answer);
            match result {
                Ok(mut claimed) => {
                    // The claim goes to a caller still waiting: one that
                    // gave up would take the array's completion with it.
                    for answer in answers {
                        if let Err(Ok(unheard)) = answer.send(Ok(claimed.take())) {
                            claimed = unheard;
                        }
                    }
                    if claimed.is_some() {
                        tracing::error!(
                            array_id,
                            "the write that completed the array has no caller left to announce it"
                        );
                    }
                }
                Err(error) => {
                    for answer in answers {
                        let _ = answer.send(Err(LedgerError(error.0.clone())));
                    }
                }
            }
        }
    }

    /// After a write failed or hung: whether its PUT landed anyway and
    /// claimed the completion (the state names `claim`), read once within
    /// [`WRITE_TIMEOUT`]. Otherwise the write's own error.
    async fn claimed_anyway(
        &self,
        array_id: &str,
        claim: &str,
        error: LedgerError,
    ) -> Result<Option<ArrayCounts>, LedgerError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.array_state(array_id)).await {
            Ok(Ok((Some(state), _))) if state.claimed_by.as_deref() == Some(claim) => {
                tracing::info!(array_id, "the array state write landed despite its error");
                Ok(Some(state.tally().1))
            }
            _ => Err(error),
        }
    }

    /// One read-change-write of an array's state with the settles of
    /// `batch`, read again whenever another writer got there first. The
    /// counts when this write (named `claim` in the state) claimed the
    /// array's completion.
    async fn write_state(
        &self,
        array_id: &str,
        size: u32,
        batch: &[Settle],
        claim: &str,
    ) -> Result<Option<ArrayCounts>, LedgerError> {
        for race in 1..=RACES {
            let (current, etag) = self.array_state(array_id).await?;
            if let Some(state) = &current
                && state.claimed_by.as_deref() == Some(claim)
            {
                // An earlier try of this write landed and claimed it (its
                // answer was lost, or a retry of the PUT found the ETag it
                // had itself replaced).
                return Ok(Some(state.tally().1));
            }
            let mut next = current.unwrap_or_else(|| ArrayState::new(size));
            let mut changed = false;
            for settle in batch {
                changed |= next.settle(&settle.indexes, settle.state);
            }
            let (done, counts) = next.tally();
            let claims = done >= next.size && !next.completed;
            if !changed && !claims {
                // Repeats (a child run twice): nothing to write.
                return Ok(None);
            }
            if claims {
                next.completed = true;
                next.claimed_by = Some(claim.to_owned());
            }
            if self.put_array_state(array_id, &next, etag).await? {
                return Ok(claims.then_some(counts));
            }
            tokio::time::sleep(RACE_BACKOFF.delay(race)).await;
        }
        Err(LedgerError(format!(
            "array {array_id}: lost {RACES} races to write its state"
        )))
    }

    /// Whether an array's completion was announced.
    pub async fn completed(&self, array_id: &str) -> Result<bool, LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let array_id = array_id.to_owned();
                Self::sql(conn, move |c| {
                    c.query_row(
                        "SELECT 1 FROM completed WHERE array_id = ?1",
                        [array_id],
                        |_| Ok(()),
                    )
                    .optional()
                    .map(|found| found.is_some())
                })
                .await
            }
            Ledger::S3 { .. } => Ok(self
                .array_state(array_id)
                .await?
                .0
                .is_some_and(|state| state.completed)),
        }
    }

    /// The S3 ledger's final states of an array's children (`None`: not
    /// final yet), as the state object has them; empty before any settled.
    pub(super) async fn s3_children(
        &self,
        array_id: &str,
    ) -> Result<Vec<Option<ChildState>>, LedgerError> {
        Ok(self
            .array_state(array_id)
            .await?
            .0
            .map(|state| state.children.bytes().map(ChildState::from_mark).collect())
            .unwrap_or_default())
    }

    /// The S3 ledger's state of an array and its ETag; `None` before its
    /// first child settled.
    async fn array_state(
        &self,
        array_id: &str,
    ) -> Result<(Option<ArrayState>, Option<String>), LedgerError> {
        let Ledger::S3 {
            client,
            bucket,
            prefix,
            ..
        } = self
        else {
            unreachable!("only the S3 ledger keeps state objects")
        };
        let key = state_key(prefix, array_id);
        let (state, etag) = Self::read_json::<ArrayState>(client, bucket, &key).await?;
        let Some(state) = state else {
            return Ok((None, None));
        };
        if state.children.len() != state.size as usize {
            return Err(LedgerError(format!(
                "{key}: {} children for an array of {}",
                state.children.len(),
                state.size
            )));
        }
        Ok((Some(state), etag))
    }

    /// Writes an array's state if it is still the one read (`etag`; `None`:
    /// if there is none yet). False when another writer changed it first.
    async fn put_array_state(
        &self,
        array_id: &str,
        state: &ArrayState,
        etag: Option<String>,
    ) -> Result<bool, LedgerError> {
        let Ledger::S3 {
            client,
            bucket,
            prefix,
            ..
        } = self
        else {
            unreachable!("only the S3 ledger keeps state objects")
        };
        Self::write_json_if(client, bucket, &state_key(prefix, array_id), state, etag).await
    }
}

/// Where the S3 ledger keeps an array's state.
fn state_key(prefix: &str, array_id: &str) -> String {
    format!("{prefix}arrays/{array_id}/state")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Child `index` of array "a".
    pub(in crate::events::ledger) fn part(index: u32, size: u32) -> ArrayPart {
        ArrayPart {
            job_id: "a".into(),
            index,
            size,
            frames: vec![index as i64],
            revision: None,
        }
    }

    #[tokio::test]
    async fn the_last_child_claims_completion_once() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        assert_eq!(
            ledger
                .child_settled(&part(0, 3), ChildState::Succeeded)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            ledger
                .child_settled(&part(1, 3), ChildState::DeadLettered)
                .await
                .unwrap(),
            None
        );
        let counts = ledger
            .child_settled(&part(2, 3), ChildState::Succeeded)
            .await
            .unwrap();
        assert_eq!(
            counts,
            Some(ArrayCounts {
                size: 3,
                succeeded: 2,
                dead_lettered: 1,
                cancelled: 0,
                not_sent: 0,
                revision: None,
            })
        );
        // A repeat (a child run twice) claims nothing more.
        assert_eq!(
            ledger
                .child_settled(&part(2, 3), ChildState::Succeeded)
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn racing_last_children_make_exactly_one_winner() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let first = Ledger::local(dir.path()).unwrap();
            // A second connection, as another process would have.
            let second = Ledger::local(dir.path()).unwrap();
            first
                .child_settled(&part(0, 3), ChildState::Succeeded)
                .await
                .unwrap();
            let (one, two) = (part(1, 3), part(2, 3));
            let (a, b) = tokio::join!(
                first.child_settled(&one, ChildState::Succeeded),
                second.child_settled(&two, ChildState::DeadLettered),
            );
            let winners = [a.unwrap(), b.unwrap()].into_iter().flatten().count();
            assert_eq!(winners, 1);
        }
    }

    #[tokio::test]
    async fn children_not_sent_let_the_array_complete_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        ledger
            .child_settled(&part(0, 4), ChildState::Succeeded)
            .await
            .unwrap();
        assert_eq!(
            ledger
                .children_settled("a", 4, vec![2, 3], ChildState::NotSent)
                .await
                .unwrap(),
            None
        );
        let counts = ledger
            .child_settled(&part(1, 4), ChildState::DeadLettered)
            .await
            .unwrap();
        assert_eq!(
            counts,
            Some(ArrayCounts {
                size: 4,
                succeeded: 1,
                dead_lettered: 1,
                cancelled: 0,
                not_sent: 2,
                revision: None,
            })
        );
        let json = serde_json::to_value(counts.unwrap()).unwrap();
        assert_eq!(json["not_sent"], 2);
    }

    #[test]
    fn the_s3_state_only_raises_a_child_and_counts_what_is_final() {
        let mut state = ArrayState::new(4);
        assert!(state.settle(&[2, 3], ChildState::NotSent));
        assert!(state.settle(&[0], ChildState::DeadLettered));
        // A lower state never replaces a higher one; past the end: ignored.
        assert!(!state.settle(&[0], ChildState::Cancelled));
        assert!(!state.settle(&[9], ChildState::Succeeded));
        assert!(state.settle(&[0], ChildState::Succeeded));
        assert_eq!(state.children, "s.nn");
        let (done, counts) = state.tally();
        assert_eq!(done, 3);
        assert_eq!((counts.succeeded, counts.not_sent), (1, 2));
        assert!(state.settle(&[1], ChildState::Cancelled));
        assert_eq!(state.tally().0, 4);
    }
}
