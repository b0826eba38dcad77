//! Held jobs on the S3 ledger (SQS queues): objects under
//! `PREFIX/QUEUE/deps/`.
//!
//! - `jobs/ID`: a submitted job's registration (size, frames, chunking);
//! - `ends/ID`: a plain job's end (an array's is its state object);
//! - `held/JOB/IDX`: a held job or child: its message, the parent units it
//!   still waits for (a set: a unit spent twice is spent once), its state;
//! - `waits/PARENT/UNIT/JOB/SPEC`: which children of dependant JOB wait
//!   for a parent unit (UNIT: a child's index, or `whole`), named in the
//!   key (see `edges`);
//! - `parents/PARENT/unit` and `…/whole`: PARENT has dependants at all, so
//!   the settle of a job nobody waits for costs one LIST; `…/foreign/Q`:
//!   queue Q's ledger keeps dependants of it (see `foreign`);
//! - `foreign/Q/PARENT`: held jobs here wait for PARENT of queue Q (for
//!   the sweep, see `foreign`);
//! - `releasing/JOB/IDX/CLAIM`: a held object claimed (to send or to
//!   cancel) and not done yet, or about to be; the sweep lists this prefix.
//!
//! Exactly once (a conditional write claims a held object), the calls a
//! settle makes before the send, and the sweep: see `release`.
//!
//! Order: a dependant's submit writes its held objects, then its edges and
//! the parent's marker, then reads the parents' ends again and spends what
//! ended meanwhile; a parent's settle writes its end first, then lists the
//! edges (and the markers). Whichever is second sees the other. A parent
//! on another queue is read from its own ledger instead, after the edges
//! and its note there (`holds::foreign`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::{Fate, Freed, Registered, ToHold, Wait, failed_reason, unit_label};
use crate::events::ledger::{ChildState, Ledger, LedgerError, failed};
use crate::retry::Backoff;

/// A held job or child, as its S3 object keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HeldObject {
    size: u32,
    body: String,
    /// Parent units still waited for ([`unit_key`]), each with whether it
    /// releases on finish.
    waits: BTreeMap<String, bool>,
    state: HeldState,
    /// What freed it (`parent P child N`), or the cancel's reason.
    by: Option<String>,
    /// The claim that freed it, naming its `releasing/` marker.
    claim: Option<String>,
    /// Held by hand too (see `hand`): its parents' ends do not free it.
    #[serde(default)]
    manual: bool,
    /// The queue of each parent on another queue (see `foreign`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    queues: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HeldState {
    Held,
    Releasing,
    Cancelling,
}

impl HeldObject {
    /// Spends parent unit `unit` (`label` for people) that ended in
    /// `state`: `None` when that changes nothing (not held, or spent
    /// already), else whether this freed it.
    fn spend(&mut self, unit: &str, label: &str, state: ChildState) -> Option<bool> {
        if self.state != HeldState::Held {
            return None;
        }
        let on_finish = self.waits.remove(unit)?;
        if state != ChildState::Succeeded && !on_finish {
            self.waits.clear();
            self.state = HeldState::Cancelling;
            self.by = Some(format!(
                "parent job {label} {}",
                state.name().replace('_', "-")
            ));
            return Some(true);
        }
        if self.waits.is_empty() && !self.manual {
            self.state = HeldState::Releasing;
            self.by = Some(label.to_owned());
            return Some(true);
        }
        Some(false)
    }

    fn freed(&self, job_id: &str, index: u32) -> Freed {
        let by = self.by.clone().unwrap_or_default();
        Freed {
            job_id: job_id.to_owned(),
            index,
            size: self.size,
            body: self.body.clone(),
            cancelled: (self.state == HeldState::Cancelling).then(|| by.clone()),
            by,
            claim: self.claim.clone(),
        }
    }
}

/// A parent unit in a held object's waits: `PARENT/INDEX`, `PARENT/whole`.
fn unit_key(parent_id: &str, index: Option<u32>) -> String {
    format!("{parent_id}/{}", unit_name(index))
}

fn unit_name(index: Option<u32>) -> String {
    index.map_or_else(|| "whole".to_owned(), |i| i.to_string())
}

/// How a parent's units ended, as read once for a submit.
#[derive(Debug)]
enum Ends {
    /// A plain job: its end, if it ended.
    Plain(Option<ChildState>),
    /// An array of `size`: its children's ends.
    Array(u32, Vec<Option<ChildState>>),
}

impl Ends {
    /// How a unit ended, and the child that did not succeed (for the
    /// reason).
    fn unit(&self, index: Option<u32>) -> Option<(ChildState, Option<String>)> {
        match (self, index) {
            (Ends::Plain(end), _) => end.map(|s| (s, None)),
            (Ends::Array(_, children), Some(i)) => children
                .get(i as usize)
                .copied()
                .flatten()
                .map(|s| (s, Some(format!("child {i}")))),
            (Ends::Array(size, children), None) => {
                if children.len() < *size as usize || children.iter().any(Option::is_none) {
                    return None;
                }
                Some(
                    match children
                        .iter()
                        .enumerate()
                        .find(|(_, s)| **s != Some(ChildState::Succeeded))
                    {
                        Some((i, s)) => (
                            s.unwrap_or(ChildState::Cancelled),
                            Some(format!("child {i}")),
                        ),
                        None => (ChildState::Succeeded, None),
                    },
                )
            }
        }
    }
}

/// Edges to write: (parent, unit) → [(child, on_finish)].
type Edges = BTreeMap<(String, Option<u32>), Vec<(u32, bool)>>;

/// An object as read: its value, its ETag, when it was last written
/// (seconds since the epoch, the server's clock).
struct Got<T> {
    value: T,
    etag: Option<String>,
    written: i64,
}

/// How a write is conditioned.
enum Cond {
    Always,
    IfAbsent,
    IfMatch(String),
}

/// Writes of one submit's held objects (or edges) under way at once.
const PUTS_AT_ONCE: usize = 32;

const RACES: u32 = 100;
const RACE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(200));

fn deps(prefix: &str) -> String {
    format!("{prefix}deps/")
}

impl Ledger {
    fn s3_parts(&self) -> (&aws_sdk_s3::Client, &str, &str) {
        match self {
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => (client, bucket, prefix),
            Ledger::Local(_) => unreachable!("only the S3 ledger keeps objects"),
        }
    }

    fn deps_key(&self, rest: &str) -> String {
        format!("{}{rest}", deps(self.s3_parts().2))
    }

    async fn s3_get(&self, key: &str) -> Result<Option<Got<Vec<u8>>>, LedgerError> {
        let (client, bucket, _) = self.s3_parts();
        match client.get_object().bucket(bucket).key(key).send().await {
            Ok(object) => {
                let etag = object.e_tag().map(str::to_owned);
                let written = object.last_modified().map_or(0, |t| t.secs());
                let body = object.body.collect().await.map_err(failed)?.into_bytes();
                Ok(Some(Got {
                    value: body.to_vec(),
                    etag,
                    written,
                }))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
        }
    }

    async fn s3_get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, Option<String>)>, LedgerError> {
        Ok(self
            .s3_read_json(key)
            .await?
            .map(|got| (got.value, got.etag)))
    }

    /// [`Ledger::s3_get`], parsed.
    async fn s3_read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Got<T>>, LedgerError> {
        let Some(got) = self.s3_get(key).await? else {
            return Ok(None);
        };
        let value =
            serde_json::from_slice(&got.value).map_err(|e| LedgerError(format!("{key}: {e}")))?;
        Ok(Some(Got {
            value,
            etag: got.etag,
            written: got.written,
        }))
    }

    /// Writes `key`; false when its condition failed.
    async fn s3_put(&self, key: &str, body: Vec<u8>, cond: Cond) -> Result<bool, LedgerError> {
        let (client, bucket, _) = self.s3_parts();
        let put = client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into());
        let put = match cond {
            Cond::Always => put,
            Cond::IfAbsent => put.if_none_match("*"),
            Cond::IfMatch(etag) => put.if_match(etag),
        };
        super::super::written_if(key, put.send().await)
    }

    /// Writes every `(key, body)`, [`PUTS_AT_ONCE`] at a time; returns once
    /// all are written.
    async fn s3_put_all(&self, writes: Vec<(String, Vec<u8>)>) -> Result<(), LedgerError> {
        let mut writes = writes.into_iter().peekable();
        while writes.peek().is_some() {
            let batch = writes
                .by_ref()
                .take(PUTS_AT_ONCE)
                .map(|(key, body)| async move { self.s3_put(&key, body, Cond::Always).await });
            futures_util::future::try_join_all(batch).await?;
        }
        Ok(())
    }

    async fn s3_put_json(
        &self,
        key: &str,
        value: &impl Serialize,
        cond: Cond,
    ) -> Result<bool, LedgerError> {
        self.s3_put(key, serde_json::to_vec(value).map_err(failed)?, cond)
            .await
    }

    async fn s3_delete(&self, key: &str) -> Result<(), LedgerError> {
        let (client, bucket, _) = self.s3_parts();
        client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map(drop)
            .map_err(|e| LedgerError(format!("{key}: {}", crate::aws::describe(&e))))
    }

    /// The objects under `root`: the rest of each key after `root`, when
    /// it was last written (seconds since the epoch), its ETag.
    async fn s3_list(&self, root: &str) -> Result<Vec<(String, i64, Option<String>)>, LedgerError> {
        let (client, bucket, _) = self.s3_parts();
        let mut found = Vec::new();
        let mut pages = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(root)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| LedgerError(format!("{root}: {}", crate::aws::describe(&e))))?;
            found.extend(page.contents().iter().filter_map(|o| {
                Some((
                    o.key()?.strip_prefix(root)?.to_owned(),
                    o.last_modified().map_or(0, |t| t.secs()),
                    o.e_tag().map(str::to_owned),
                ))
            }));
        }
        Ok(found)
    }

    pub(super) async fn s3_register(
        &self,
        job_id: &str,
        registered: Registered,
    ) -> Result<(), LedgerError> {
        let key = self.deps_key(&format!("jobs/{job_id}"));
        let value = serde_json::json!({
            "size": registered.size,
            "frames": registered.frames,
            "chunk_size": registered.chunk_size,
        });
        self.s3_put_json(&key, &value, Cond::IfAbsent)
            .await
            .map(drop)
    }

    pub(super) async fn s3_registered(
        &self,
        job_id: &str,
    ) -> Result<Option<Registered>, LedgerError> {
        #[derive(Deserialize)]
        struct Stored {
            size: u32,
            frames: Option<String>,
            chunk_size: u32,
        }
        let key = self.deps_key(&format!("jobs/{job_id}"));
        Ok(self
            .s3_get_json::<Stored>(&key)
            .await?
            .map(|(s, _)| Registered {
                size: s.size,
                frames: s.frames,
                chunk_size: s.chunk_size,
            }))
    }

    /// A plain job's recorded end.
    async fn s3_plain_end(&self, job_id: &str) -> Result<Option<ChildState>, LedgerError> {
        let key = self.deps_key(&format!("ends/{job_id}"));
        Ok(self
            .s3_get(&key)
            .await?
            .and_then(|got| ChildState::from_name(&String::from_utf8_lossy(&got.value))))
    }

    /// How the parents of `entries` ended so far, by parent.
    async fn s3_ends(&self, parents: &[String]) -> Result<HashMap<String, Ends>, LedgerError> {
        let mut ends = HashMap::new();
        for parent in parents {
            let size = self.s3_registered(parent).await?.map_or(0, |r| r.size);
            let end = if size == 0 {
                Ends::Plain(self.s3_plain_end(parent).await?)
            } else {
                Ends::Array(size, self.s3_children(parent).await?)
            };
            ends.insert(parent.clone(), end);
        }
        Ok(ends)
    }

    pub(super) async fn s3_hold(
        &self,
        job_id: &str,
        size: u32,
        entries: Vec<ToHold>,
        manual: bool,
    ) -> Result<Vec<Fate>, LedgerError> {
        // Parents of this queue: their ends are read here. One on another
        // queue is read from its own ledger, after the edges (`foreign`).
        let mut parents: Vec<String> = entries
            .iter()
            .flat_map(|e| e.waits.iter().filter(|w| w.queue.is_none()))
            .map(|w| w.parent_id.clone())
            .collect();
        parents.sort();
        parents.dedup();
        let before = self.s3_ends(&parents).await?;
        let ended = |ends: &HashMap<String, Ends>, wait: &Wait| {
            ends.get(&wait.parent_id).and_then(|e| e.unit(wait.index))
        };
        let mut fates = Vec::with_capacity(entries.len());
        let mut edges = Edges::new();
        // Written together, a few at a time: markers, then held objects.
        let (mut markers, mut objects) = (Vec::new(), Vec::new());
        let json = |held: &HeldObject| serde_json::to_vec(held).map_err(failed);
        let mut pending_of = Vec::with_capacity(entries.len());
        for entry in &entries {
            let mut held = HeldObject {
                size,
                body: entry.body.clone(),
                waits: BTreeMap::new(),
                state: HeldState::Held,
                by: None,
                claim: None,
                manual,
                queues: BTreeMap::new(),
            };
            let mut pending = Vec::new();
            for wait in &entry.waits {
                if let Some(queue) = &wait.queue {
                    held.queues.insert(wait.parent_id.clone(), queue.clone());
                }
                match ended(&before, wait) {
                    None => {
                        held.waits
                            .insert(unit_key(&wait.parent_id, wait.index), wait.on_finish);
                        pending.push(wait.clone());
                    }
                    Some((state, unit)) if state != ChildState::Succeeded && !wait.on_finish => {
                        held.by.get_or_insert_with(|| {
                            failed_reason(&wait.parent_id, unit.as_deref(), state.name())
                        });
                    }
                    Some(_) => {}
                }
            }
            let key = self.deps_key(&format!("held/{job_id}/{}", entry.index));
            let fate = if let Some(reason) = held.by.clone() {
                // Cancelling until its end is recorded: marked, so the
                // sweep finishes it should the submit die first.
                held.waits.clear();
                held.state = HeldState::Cancelling;
                let claim = new_claim();
                markers.push((self.marker_key(job_id, entry.index, &claim), stamp()));
                held.claim = Some(claim);
                objects.push((key, json(&held)?));
                pending.clear();
                Fate::Cancelled(reason)
            } else if pending.is_empty() && !manual {
                Fate::Send
            } else {
                objects.push((key, json(&held)?));
                for wait in &pending {
                    edges
                        .entry((wait.parent_id.clone(), wait.index))
                        .or_default()
                        .push((entry.index, wait.on_finish));
                }
                Fate::Held(pending.len() as u32)
            };
            fates.push(fate);
            pending_of.push(pending);
        }
        // Parents on other queues, for the sweep: before any edge.
        markers.extend(foreign::markers(self, &entries));
        self.s3_put_all(markers).await?;
        self.s3_put_all(objects).await?;
        if edges.is_empty() {
            return Ok(fates);
        }
        let mut writes = Vec::new();
        let mut marked = Vec::new();
        for ((parent, index), children) in &edges {
            let only: Vec<u32> = children.iter().map(|(child, _)| *child).collect();
            let name = edges::edge_name(job_id, &only);
            let key = self.deps_key(&format!("waits/{parent}/{}/{name}", unit_name(*index)));
            writes.push((key, serde_json::to_vec(children).map_err(failed)?));
            let marker = (
                parent.clone(),
                if index.is_some() { "unit" } else { "whole" },
            );
            if !marked.contains(&marker) {
                let key = self.deps_key(&format!("parents/{}/{}", marker.0, marker.1));
                writes.push((key, Vec::new()));
                marked.push(marker);
            }
        }
        self.s3_put_all(writes).await?;
        // What ended between the first read and the edges: spent here (a
        // settle that saw the edges may spend it too, harmlessly).
        let after = self.s3_ends(&parents).await?;
        for ((entry, pending), fate) in entries.iter().zip(&pending_of).zip(&mut fates) {
            for wait in pending {
                let Some((state, _)) = ended(&after, wait) else {
                    continue;
                };
                let (unit, label) = (
                    unit_key(&wait.parent_id, wait.index),
                    unit_label(&wait.parent_id, wait.index),
                );
                let freed = self
                    .change_held(job_id, entry.index, Mark::Cancels, |h| {
                        h.spend(&unit, &label, state)
                    })
                    .await?;
                if let Some(freed) = freed {
                    *fate = match freed.cancelled {
                        Some(reason) => Fate::Cancelled(reason),
                        None => Fate::Send,
                    };
                    break;
                }
            }
        }
        Ok(fates)
    }

    pub(super) async fn s3_cancel_held(
        &self,
        job_id: &str,
        reason: &str,
    ) -> Result<Vec<Freed>, LedgerError> {
        self.change_all_held(job_id, |h| {
            (h.state == HeldState::Held).then(|| {
                h.waits.clear();
                h.state = HeldState::Cancelling;
                h.by = Some(reason.to_owned());
                true
            })
        })
        .await
    }

    /// Changes every held object of `job_id` as [`Ledger::change_held`]
    /// does (marked after the read when freed), [`PUTS_AT_ONCE`] at a
    /// time; what that freed.
    async fn change_all_held(
        &self,
        job_id: &str,
        change: impl Fn(&mut HeldObject) -> Option<bool>,
    ) -> Result<Vec<Freed>, LedgerError> {
        let root = self.deps_key(&format!("held/{job_id}/"));
        let indexes = self
            .s3_list(&root)
            .await?
            .into_iter()
            .filter_map(|(index, _, _)| index.parse::<u32>().ok());
        let change = &change;
        let freed: Vec<Option<Freed>> = futures_util::stream::iter(indexes)
            .map(|index| self.change_held(job_id, index, Mark::AfterRead, change))
            .buffered(PUTS_AT_ONCE)
            .try_collect()
            .await?;
        Ok(freed.into_iter().flatten().collect())
    }

    pub(super) async fn s3_waiting_for(
        &self,
        job_id: &str,
        limit: u32,
    ) -> Result<Vec<(u32, String, Option<u32>, Option<String>)>, LedgerError> {
        let root = self.deps_key(&format!("held/{job_id}/"));
        let mut rows = Vec::new();
        for (index, _, _) in self.s3_list(&root).await? {
            let Ok(index) = index.parse::<u32>() else {
                continue;
            };
            let Some((held, _)) = self
                .s3_get_json::<HeldObject>(&format!("{root}{index}"))
                .await?
            else {
                continue;
            };
            if held.state != HeldState::Held {
                continue;
            }
            for unit in held.waits.keys() {
                let (parent, idx) = unit.rsplit_once('/').unwrap_or((unit, "whole"));
                let queue = held.queues.get(parent).cloned();
                rows.push((index, parent.to_owned(), idx.parse().ok(), queue));
            }
            if rows.len() >= limit as usize {
                break;
            }
        }
        rows.sort();
        rows.truncate(limit as usize);
        Ok(rows)
    }
}

mod edges;
mod foreign;
mod hand;
mod release;
use edges::Edge;
pub use edges::KnownParents;
pub(crate) use hand::HAND_CACHE;
pub use hand::HandCache;
use release::Mark;
pub(super) use release::{S3Read, Spent};

/// A marker's body: unique, so that a re-stamp changes its ETag.
fn stamp() -> Vec<u8> {
    new_claim().into_bytes()
}

/// A claim id (a marker's last key part).
fn new_claim() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(waits: &[(&str, bool)]) -> HeldObject {
        HeldObject {
            size: 2,
            body: "{}".into(),
            waits: waits.iter().map(|(u, f)| ((*u).to_owned(), *f)).collect(),
            state: HeldState::Held,
            by: None,
            claim: None,
            manual: false,
            queues: BTreeMap::new(),
        }
    }

    #[test]
    fn the_last_unit_spent_frees_a_held_child_once() {
        let mut h = held(&[("p/0", false), ("p/1", false)]);
        assert_eq!(
            h.spend("p/0", "p child 0", ChildState::Succeeded),
            Some(false)
        );
        // Spent twice (a submit and a settle both saw it): no change.
        assert_eq!(h.spend("p/0", "p child 0", ChildState::Succeeded), None);
        assert_eq!(
            h.spend("p/1", "p child 1", ChildState::Succeeded),
            Some(true)
        );
        assert_eq!(h.state, HeldState::Releasing);
        assert_eq!(h.freed("d", 1).by, "p child 1");
        assert_eq!(h.freed("d", 1).cancelled, None);
        // Freed: nothing spends it again.
        assert_eq!(h.spend("p/1", "p child 1", ChildState::Succeeded), None);
    }

    #[test]
    fn a_child_held_by_hand_stays_held_once_its_parents_ended() {
        let mut h = held(&[("p/0", false)]);
        h.manual = true;
        assert_eq!(
            h.spend("p/0", "p child 0", ChildState::Succeeded),
            Some(false)
        );
        assert_eq!(h.state, HeldState::Held);
        assert!(h.waits.is_empty());
        // A parent that failed still cancels it.
        let mut h = held(&[("p/0", false)]);
        h.manual = true;
        assert_eq!(
            h.spend("p/0", "p child 0", ChildState::DeadLettered),
            Some(true)
        );
        assert_eq!(h.state, HeldState::Cancelling);
    }

    #[test]
    fn a_failed_unit_cancels_on_success_and_releases_on_finish() {
        let mut h = held(&[("p/0", false), ("p/1", false)]);
        assert_eq!(
            h.spend("p/1", "p child 1", ChildState::DeadLettered),
            Some(true)
        );
        assert_eq!(
            h.freed("d", 0).cancelled.as_deref(),
            Some("parent job p child 1 dead-lettered")
        );
        let mut h = held(&[("p/whole", true)]);
        assert_eq!(
            h.spend("p/whole", "p", ChildState::DeadLettered),
            Some(true)
        );
        assert_eq!(h.state, HeldState::Releasing);
    }

    #[test]
    fn a_whole_array_ends_when_every_child_did_naming_one_that_failed() {
        use ChildState::*;
        let ends = Ends::Array(3, vec![Some(Succeeded), None, Some(Succeeded)]);
        assert_eq!(ends.unit(None), None);
        assert_eq!(ends.unit(Some(0)).map(|e| e.0), Some(Succeeded));
        assert_eq!(ends.unit(Some(1)), None);
        let ends = Ends::Array(3, vec![Some(Succeeded), Some(Cancelled), Some(Succeeded)]);
        assert_eq!(ends.unit(None), Some((Cancelled, Some("child 1".into()))));
        assert_eq!(Ends::Array(3, vec![]).unit(None), None);
        assert_eq!(
            Ends::Plain(Some(Succeeded)).unit(None),
            Some((Succeeded, None))
        );
        assert_eq!(unit_key("p", None), "p/whole");
        assert_eq!(unit_label("p", Some(4)), "p child 4");
    }
}
