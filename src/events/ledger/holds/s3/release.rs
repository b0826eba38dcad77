//! Releases on the S3 ledger: the claim of a held object, its
//! `releasing/` marker, a parent unit's settle spending its edges, and the
//! sweep.
//!
//! Exactly once: a held object changes only by a conditional write
//! (`If-Match` on the ETag read). The write that spends its last wait (or
//! cancels it) moves it to `releasing` (`cancelling`) with a claim id, and
//! only that writer sends it. Its marker under `releasing/` names the claim
//! and is written before the claim lands: beside the read of the held
//! object when a parent unit's end spends it (the claim id made before the
//! read), else (the sweep, a hold by hand) after the read; a marker whose
//! claim then does not happen is deleted. After the send the marker is
//! deleted by its key.
//!
//! The sweep takes a marker older than the grace for a worker's that died
//! or stalled. Its claim landed: the held object was last written by the
//! claim (nothing writes a claimed one), so when that write too is older
//! than the grace, the sweep re-stamps the marker with `If-Match` (one
//! sweeper takes it) and sends what the claim freed. Not landed: the sweep
//! spends, under a claim of its own, the parent units of this queue that
//! ended and that the object still waits for (a worker that died between
//! its parent's end and its write, freeing or not). Another claim landed,
//! or the object is gone: the marker is deleted.
//!
//! A settle's calls: once the parent child's end is recorded and before its
//! message is settled, its reads ([`Ledger::s3_read_ends`]): the LIST of the unit's edges
//! (once this process has seen the parent have `same` dependants, beside
//! the LIST of its markers, `unit`, `whole` and other queues' (`foreign`);
//! before that, after it), then the held object's GET with its marker's
//! PUT; after the settle, the held object's conditional PUT
//! ([`Ledger::s3_spend_ends`]), the one write before the send; one that
//! lost a race reads again. The children a unit frees are
//! changed [`PUTS_AT_ONCE`] at a time. A released child costs a constant
//! number of calls, whatever the arrays' sizes: the markers' LIST, the
//! edges' LIST, the GET and PUT of the held object, the marker's PUT and,
//! after the send, its DELETE; a spend that leaves waits (a child waiting
//! for several units) the same but the LISTs.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};

use super::{
    Cond, Edge, Ends, HeldObject, HeldState, PUTS_AT_ONCE, RACE_BACKOFF, RACES, new_claim, stamp,
    unit_key, unit_label,
};
use crate::events::ledger::holds::{Ended, ForeignEnd, Freed};
use crate::events::ledger::{ChildState, Ledger, LedgerError};

/// When a change that frees a held object writes its `releasing/` marker
/// (always before the claim lands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    /// For a cancel only (a submit that sends at once needs none).
    Cancels,
    /// After the read, once the change is known to free it.
    AfterRead,
    /// Beside the read, with the claim id made first; deleted when the
    /// claim does not land (the change did not free it, or lost). A
    /// parent's end spends with it: its claim is then the one write after
    /// the read, and a reader that dies before its write leaves a marker
    /// for the sweep, whether or not its spend would have freed it.
    Ahead,
}

/// A held object as read, with the claim whose marker is written (if one
/// is).
#[derive(Debug)]
struct HeldRead {
    object: Option<(HeldObject, Option<String>)>,
    marked: Option<String>,
}

/// A parent unit's edge to spend, and its held object once read.
#[derive(Debug)]
pub(in crate::events::ledger::holds) struct Spend {
    index: Option<u32>,
    unit: String,
    label: String,
    state: ChildState,
    edge: Edge,
    mark: Mark,
    read: Option<HeldRead>,
}

/// What a parent's end will spend, read before anything is claimed (see
/// [`Ledger::s3_read_ends`]).
#[derive(Debug)]
pub(in crate::events::ledger::holds) struct S3Read {
    spends: Vec<Spend>,
    foreign: Option<ForeignEnd>,
    /// Read from kept edges ([`Ledger::s3_read_ahead`]), not listed.
    pub kept: bool,
}

/// Edges spent already, by unit (`None`: the whole), dependant and child.
pub(in crate::events::ledger::holds) type Spent = HashSet<(Option<u32>, String, u32)>;

impl S3Read {
    /// The edges this read will spend.
    pub fn spent(&self) -> Spent {
        (self.spends.iter())
            .map(|s| (s.index, s.edge.job_id.clone(), s.edge.child))
            .collect()
    }
}

impl Ledger {
    /// Changes a held object by `change` (`None`: no change; `Some(true)`:
    /// the change frees it), written only if nobody changed it since it was
    /// read; the freed row when this call freed it. `mark`: when its
    /// `releasing/` marker is written (see [`Mark`]).
    pub(super) async fn change_held(
        &self,
        job_id: &str,
        index: u32,
        mark: Mark,
        change: impl Fn(&mut HeldObject) -> Option<bool>,
    ) -> Result<Option<Freed>, LedgerError> {
        let read = self.read_held(job_id, index, mark, None).await?;
        self.write_held(job_id, index, mark, read, change).await
    }

    /// Reads a held object for [`Ledger::write_held`]; with [`Mark::Ahead`]
    /// and no marker yet, writes one beside the read.
    async fn read_held(
        &self,
        job_id: &str,
        index: u32,
        mark: Mark,
        marked: Option<String>,
    ) -> Result<HeldRead, LedgerError> {
        let key = self.held_key(job_id, index);
        let read = self.s3_get_json::<HeldObject>(&key);
        if mark == Mark::Ahead && marked.is_none() {
            let claim = new_claim();
            let (object, ()) = tokio::try_join!(read, self.put_marker(job_id, index, &claim))?;
            return Ok(HeldRead {
                object,
                marked: Some(claim),
            });
        }
        Ok(HeldRead {
            object: read.await?,
            marked,
        })
    }

    /// Changes a held object, as read, by `change`, written only if
    /// nobody changed it since; a lost race reads it again.
    async fn write_held(
        &self,
        job_id: &str,
        index: u32,
        mark: Mark,
        mut read: HeldRead,
        change: impl Fn(&mut HeldObject) -> Option<bool>,
    ) -> Result<Option<Freed>, LedgerError> {
        let key = self.held_key(job_id, index);
        for race in 1..=RACES {
            if race > 1 {
                tokio::time::sleep(RACE_BACKOFF.delay(race - 1)).await;
                read = self.read_held(job_id, index, mark, read.marked).await?;
            }
            let HeldRead { object, marked } = read;
            let changed =
                object.and_then(|(mut held, etag)| Some((change(&mut held)?, held, etag)));
            let Some((frees, mut held, etag)) = changed else {
                self.drop_marker(job_id, index, marked).await?;
                return Ok(None);
            };
            let mut marked = marked;
            if frees {
                if marked.is_none()
                    && (mark != Mark::Cancels || held.state == HeldState::Cancelling)
                {
                    let claim = new_claim();
                    self.put_marker(job_id, index, &claim).await?;
                    marked = Some(claim);
                }
                held.claim = Some(marked.clone().unwrap_or_else(new_claim));
            }
            let cond = etag.map_or(Cond::IfAbsent, Cond::IfMatch);
            if self.s3_put_json(&key, &held, cond).await? {
                if !frees {
                    self.drop_marker(job_id, index, marked).await?;
                }
                return Ok(frees.then(|| held.freed(job_id, index)));
            }
            // The claim whose marker is written is kept through lost races.
            read = HeldRead {
                object: None,
                marked,
            };
        }
        // A marker written stays: its claim never landed, so the sweep
        // deletes it.
        Err(LedgerError(format!(
            "{key}: lost {RACES} races to write it"
        )))
    }

    fn held_key(&self, job_id: &str, index: u32) -> String {
        self.deps_key(&format!("held/{job_id}/{index}"))
    }

    async fn put_marker(&self, job_id: &str, index: u32, claim: &str) -> Result<(), LedgerError> {
        self.s3_put(
            &self.marker_key(job_id, index, claim),
            stamp(),
            Cond::Always,
        )
        .await
        .map(drop)
    }

    /// Deletes the marker of a claim that did not land (if one was written).
    async fn drop_marker(
        &self,
        job_id: &str,
        index: u32,
        claim: Option<String>,
    ) -> Result<(), LedgerError> {
        match claim {
            Some(claim) => {
                self.s3_delete(&self.marker_key(job_id, index, &claim))
                    .await
            }
            None => Ok(()),
        }
    }

    pub(super) fn marker_key(&self, job_id: &str, index: u32, claim: &str) -> String {
        self.deps_key(&format!("releasing/{job_id}/{index}/{claim}"))
    }

    /// [`Ledger::units_ended`] on S3, but for the edges `spent` already.
    pub(in crate::events::ledger::holds) async fn s3_units_ended(
        &self,
        parent_id: &str,
        size: u32,
        indexes: Vec<u32>,
        state: ChildState,
        spent: &Spent,
    ) -> Result<Ended, LedgerError> {
        let read = self
            .s3_read_ends(parent_id, size, indexes, state, spent)
            .await?;
        self.s3_spend_ends(read).await
    }

    /// The reads of [`Ledger::units_ended`]: the parent's markers, the
    /// ended units' edges and their held objects (with the markers of
    /// likely releases). Nothing is claimed yet, so an array child's can
    /// run before its message is settled.
    pub(in crate::events::ledger::holds) async fn s3_read_ends(
        &self,
        parent_id: &str,
        size: u32,
        indexes: Vec<u32>,
        state: ChildState,
        spent: &Spent,
    ) -> Result<S3Read, LedgerError> {
        if size == 0 {
            let key = self.deps_key(&format!("ends/{parent_id}"));
            self.s3_put(&key, state.name().into(), Cond::IfAbsent)
                .await?;
        }
        let units = size > 0 && !indexes.is_empty();
        let list_units = || {
            futures_util::future::try_join_all(indexes.iter().map(|&index| async move {
                let edges = self.unit_edges(parent_id, Some(index)).await?;
                Ok::<_, LedgerError>((Some(index), state, edges))
            }))
        };
        // One LIST for the markers (`unit`, `whole`, other queues'): the
        // settle of a job nobody waits for costs only this. Once this
        // process has seen the parent have `same` dependants, its units'
        // edges are listed beside it.
        let root = self.deps_key(&format!("parents/{parent_id}/"));
        let (markers, listed) = if units && self.knows_parent(parent_id) {
            let (markers, listed) = tokio::try_join!(self.s3_list(&root), list_units())?;
            (markers, Some(listed))
        } else {
            (self.s3_list(&root).await?, None)
        };
        let has = |name: &str| markers.iter().any(|(rest, _, _)| rest == name);
        let (has_unit, has_whole) = (units && (listed.is_some() || has("unit")), has("whole"));
        let unit_edges = async {
            if !has_unit {
                return Ok(Vec::new());
            }
            match listed {
                Some(listed) => Ok(listed),
                None => {
                    let listed = self.first_unit_edges(parent_id, &indexes).await?;
                    Ok((indexes.iter().zip(listed))
                        .map(|(&index, edges)| (Some(index), state, edges))
                        .collect())
                }
            }
        };
        let whole_edges = async {
            if !has_whole {
                return Ok(Vec::new());
            }
            let whole = if size == 0 {
                self.s3_plain_end(parent_id).await?
            } else {
                Ends::Array(size, self.s3_children(parent_id).await?)
                    .unit(None)
                    .map(|(s, _)| s)
            };
            let Some(whole) = whole else {
                return Ok(Vec::new());
            };
            let edges = self.unit_edges(parent_id, None).await?;
            Ok(vec![(None, whole, edges)])
        };
        let (mut ended, whole) = tokio::try_join!(unit_edges, whole_edges)?;
        ended.extend(whole);
        // What a read from kept edges spent already.
        for (index, _, edges) in &mut ended {
            edges.retain(|edge| !spent.contains(&(*index, edge.job_id.clone(), edge.child)));
        }
        let (spends, foreign) = tokio::try_join!(
            self.read_spends(parent_id, ended),
            self.s3_foreign_end(parent_id, size, &indexes, state, &markers),
        )?;
        Ok(S3Read {
            spends,
            foreign,
            kept: false,
        })
    }

    /// The reads of [`Ledger::s3_read_ends`], from the edges this process
    /// keeps for the ended units (see `KnownParents`) where it keeps them:
    /// then with no LIST, the held objects' GETs (and markers) only. The
    /// spend of such a read is followed by a full one that skips what it
    /// spent ([`S3Read::spent`]), which lists the edges and markers once
    /// the end is recorded, as every settle must.
    pub(in crate::events::ledger::holds) async fn s3_read_ahead(
        &self,
        parent_id: &str,
        size: u32,
        indexes: &[u32],
        state: ChildState,
    ) -> Result<S3Read, LedgerError> {
        let Some(kept) = self.kept_edges(parent_id, indexes) else {
            let ends = indexes.to_vec();
            return (self.s3_read_ends(parent_id, size, ends, state, &Spent::new())).await;
        };
        let units = (indexes.iter().zip(kept))
            .map(|(&index, edges)| (Some(index), state, edges))
            .collect();
        Ok(S3Read {
            spends: self.read_spends(parent_id, units).await?,
            foreign: None,
            kept: true,
        })
    }

    /// Spends what [`Ledger::s3_read_ends`] read: each held object's
    /// conditional write, [`PUTS_AT_ONCE`] at a time (a lost race reads it
    /// again).
    pub(in crate::events::ledger::holds) async fn s3_spend_ends(
        &self,
        read: S3Read,
    ) -> Result<Ended, LedgerError> {
        let freed = self.write_spends(read.spends).await?;
        Ok(Ended {
            freed,
            foreign: read.foreign,
        })
    }

    /// Spends the edges of parent units (each: its index, how it ended,
    /// its edges); what that freed.
    pub(super) async fn spend_edges(
        &self,
        parent_id: &str,
        units: Vec<(Option<u32>, ChildState, Vec<Edge>)>,
    ) -> Result<Vec<Freed>, LedgerError> {
        let spends = self.read_spends(parent_id, units).await?;
        self.write_spends(spends).await
    }

    /// Reads the held object of every edge of parent units,
    /// [`PUTS_AT_ONCE`] at a time, each with its marker written beside the
    /// read, so that its claim is the one write after it.
    async fn read_spends(
        &self,
        parent_id: &str,
        units: Vec<(Option<u32>, ChildState, Vec<Edge>)>,
    ) -> Result<Vec<Spend>, LedgerError> {
        let spends = units.into_iter().flat_map(|(index, state, edges)| {
            let (unit, label) = (unit_key(parent_id, index), unit_label(parent_id, index));
            edges.into_iter().map(move |edge| Spend {
                index,
                mark: Mark::Ahead,
                unit: unit.clone(),
                label: label.clone(),
                state,
                edge,
                read: None,
            })
        });
        futures_util::stream::iter(spends)
            .map(|mut spend| async move {
                let read = self
                    .read_held(&spend.edge.job_id, spend.edge.child, spend.mark, None)
                    .await?;
                spend.read = Some(read);
                Ok::<_, LedgerError>(spend)
            })
            .buffered(PUTS_AT_ONCE)
            .try_collect()
            .await
    }

    async fn write_spends(&self, spends: Vec<Spend>) -> Result<Vec<Freed>, LedgerError> {
        let freed: Vec<Option<Freed>> = futures_util::stream::iter(spends)
            .map(|spend| async move {
                let Spend {
                    index: _,
                    unit,
                    label,
                    state,
                    edge,
                    mark,
                    read,
                } = spend;
                let read = match read {
                    Some(read) => read,
                    None => self.read_held(&edge.job_id, edge.child, mark, None).await?,
                };
                self.write_held(&edge.job_id, edge.child, mark, read, |h| {
                    h.spend(&unit, &label, state)
                })
                .await
            })
            .buffered(PUTS_AT_ONCE)
            .try_collect()
            .await?;
        Ok(freed.into_iter().flatten().collect())
    }

    /// Deletes the `releasing/` markers of rows sent (or cancelled): the
    /// one its claim names, else (a submit's cancel) those listed.
    pub(in crate::events::ledger::holds) async fn s3_holds_done(
        &self,
        rows: Vec<Freed>,
    ) -> Result<(), LedgerError> {
        let deletes = rows.into_iter().map(|row| async move {
            if let Some(claim) = &row.claim {
                return self
                    .s3_delete(&self.marker_key(&row.job_id, row.index, claim))
                    .await;
            }
            let root = self.deps_key(&format!("releasing/{}/{}/", row.job_id, row.index));
            for (claim, _, _) in self.s3_list(&root).await? {
                self.s3_delete(&format!("{root}{claim}")).await?;
            }
            Ok(())
        });
        futures_util::stream::iter(deletes)
            .buffer_unordered(PUTS_AT_ONCE)
            .try_collect()
            .await
    }

    /// The sweep: what workers left, from the `releasing/` markers older
    /// than `grace` (see the module's doc).
    pub(in crate::events::ledger::holds) async fn s3_stale_holds(
        &self,
        grace: Duration,
    ) -> Result<Vec<Freed>, LedgerError> {
        let cutoff = crate::sqlite::now_s() - grace.as_secs().max(1) as i64;
        let root = self.deps_key("releasing/");
        let mut freed = Vec::new();
        for (rest, at, etag) in self.s3_list(&root).await? {
            if at >= cutoff {
                continue;
            }
            let mut parts = rest.splitn(3, '/');
            let (Some(job_id), Some(Ok(index)), Some(claim)) = (
                parts.next(),
                parts.next().map(str::parse::<u32>),
                parts.next(),
            ) else {
                continue;
            };
            let key = format!("{root}{rest}");
            let held = (self.s3_read_json::<HeldObject>(&self.held_key(job_id, index))).await?;
            match held {
                // Its claim landed: its claimer sends it, unless the claim
                // is older than the grace too (the marker may be older than
                // its claim: it is written beside the read).
                Some(got)
                    if got.value.state != HeldState::Held
                        && got.value.claim.as_deref() == Some(claim) =>
                {
                    if got.written >= cutoff {
                        continue;
                    }
                    // One sweeper takes it: the one whose re-stamp wins.
                    let cond = etag.map_or(Cond::Always, Cond::IfMatch);
                    if self.s3_put(&key, stamp(), cond).await? {
                        freed.push(got.value.freed(job_id, index));
                    }
                }
                // Not claimed yet: its reader died before the claim, or is
                // slow. The sweep spends what ended of what it waits for,
                // under a claim (and marker) of its own; this marker goes
                // once another claim has landed.
                Some(got) if got.value.state == HeldState::Held => {
                    freed.extend(self.spend_ended_waits(job_id, index, &got.value).await?);
                }
                // Another claim won, or the row is gone.
                _ => self.s3_delete(&key).await?,
            }
        }
        Ok(freed)
    }

    /// Spends, once, the ended parent units of this queue that a held
    /// object still waits for; what that freed.
    async fn spend_ended_waits(
        &self,
        job_id: &str,
        index: u32,
        held: &HeldObject,
    ) -> Result<Option<Freed>, LedgerError> {
        let mut units: std::collections::BTreeMap<&str, Vec<Option<u32>>> = Default::default();
        for unit in held.waits.keys() {
            let (parent, name) = unit.rsplit_once('/').unwrap_or((unit, "whole"));
            // A parent on another queue: its sweep (`foreign`) reads it.
            if !held.queues.contains_key(parent) {
                units.entry(parent).or_default().push(name.parse().ok());
            }
        }
        let mut ended = Vec::new();
        for (parent, units) in units {
            for (unit, state) in self.s3_unit_ends(parent, units).await? {
                ended.push((unit_key(parent, unit), unit_label(parent, unit), state));
            }
        }
        if ended.is_empty() {
            return Ok(None);
        }
        self.change_held(job_id, index, Mark::AfterRead, |h| {
            (ended.iter())
                .filter_map(|(unit, label, state)| h.spend(unit, label, *state))
                .reduce(|a, b| a || b)
        })
        .await
    }
}
