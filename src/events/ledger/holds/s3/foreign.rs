//! Dependants on another SQS queue, on the S3 ledger: the same design as
//! the embedded ledger's (see `holds::foreign`), as objects.
//!
//! - in the dependant queue B's prefix: the held objects and the edges
//!   (`waits/PARENT/UNIT/JOB`), as for a parent of B, each held object
//!   naming its parents' queues; and `foreign/QUEUE/PARENT`, written
//!   before any edge, for B's sweep;
//! - in the parent queue A's prefix: `parents/PARENT/foreign/B`, beside
//!   the `unit` and `whole` markers, so the LIST a settle makes anyway
//!   names the queues to tell (no call more for a parent nobody waits
//!   for on another queue).
//!
//! Exactly once: spent in B's ledger by the same `If-Match` claim of the
//! held object. A foreign unit's edge objects are deleted once spent, so
//! B's sweep lists only the units still waited for (and a parent's
//! `foreign/` marker goes once none is left).

use std::collections::BTreeSet;

use super::{Cond, Edge, Ends};
use crate::events::ledger::holds::{ForeignEnd, ForeignWait, Freed, ToHold};
use crate::events::ledger::{ChildState, Ledger, LedgerError};

/// How old (seconds) a `foreign/` marker with no edges left must be for
/// the sweep to delete it: its submit writes the edges right after it.
const MARKER_AGE: i64 = 600;

/// B's `foreign/QUEUE/PARENT` markers for a submit's parents on other
/// queues.
pub(super) fn markers(ledger: &Ledger, entries: &[ToHold]) -> Vec<(String, Vec<u8>)> {
    let parents: BTreeSet<(&str, &str)> = (entries.iter())
        .flat_map(|e| &e.waits)
        .filter_map(|w| Some((w.queue.as_deref()?, w.parent_id.as_str())))
        .collect();
    (parents.into_iter())
        .map(|(queue, parent)| {
            (
                ledger.deps_key(&format!("foreign/{queue}/{parent}")),
                Vec::new(),
            )
        })
        .collect()
}

impl Ledger {
    /// In A's ledger, at a settle: the queues `markers` (the LIST of
    /// `parents/PARENT/`) name, and the units that ended.
    pub(super) async fn s3_foreign_end(
        &self,
        parent_id: &str,
        size: u32,
        indexes: &[u32],
        state: ChildState,
        markers: &[(String, i64, Option<String>)],
    ) -> Result<Option<ForeignEnd>, LedgerError> {
        let queues: Vec<String> = (markers.iter())
            .filter_map(|(rest, _, _)| rest.strip_prefix("foreign/"))
            .map(str::to_owned)
            .collect();
        if queues.is_empty() {
            return Ok(None);
        }
        let whole = if size > 0 {
            Ends::Array(size, self.s3_children(parent_id).await?)
                .unit(None)
                .map(|(whole, _)| whole)
        } else {
            None
        };
        Ok(Some(ForeignEnd::new(
            parent_id, queues, size, indexes, state, whole,
        )))
    }

    pub(in crate::events::ledger::holds) async fn s3_note_foreign(
        &self,
        parent_id: &str,
        queue: &str,
    ) -> Result<(), LedgerError> {
        let key = self.deps_key(&format!("parents/{parent_id}/foreign/{queue}"));
        self.s3_put(&key, Vec::new(), Cond::Always).await.map(drop)
    }

    pub(in crate::events::ledger::holds) async fn s3_unit_ends(
        &self,
        parent_id: &str,
        units: Vec<Option<u32>>,
    ) -> Result<Vec<(Option<u32>, ChildState)>, LedgerError> {
        let ends = self.s3_ends(&[parent_id.to_owned()]).await?;
        let Some(ends) = ends.get(parent_id) else {
            return Ok(Vec::new());
        };
        Ok((units.into_iter())
            .filter_map(|unit| Some((unit, ends.unit(unit)?.0)))
            .collect())
    }

    pub(in crate::events::ledger::holds) async fn s3_spend_foreign(
        &self,
        parent_id: &str,
        units: Vec<(Option<u32>, ChildState)>,
    ) -> Result<Vec<Freed>, LedgerError> {
        let mut freed = Vec::new();
        for (unit, state) in units {
            let objects = self.unit_edge_objects(parent_id, unit).await?;
            let (keys, edges): (Vec<String>, Vec<Vec<Edge>>) = objects.into_iter().unzip();
            let edges = edges.into_iter().flatten().collect();
            freed.extend(
                self.spend_edges(parent_id, vec![(unit, state, edges)])
                    .await?,
            );
            // Spent: the sweep of foreign parents looks for edges left.
            for key in keys {
                self.s3_delete(&key).await?;
            }
        }
        Ok(freed)
    }

    pub(in crate::events::ledger::holds) async fn s3_foreign_parents(
        &self,
    ) -> Result<Vec<ForeignWait>, LedgerError> {
        let root = self.deps_key("foreign/");
        let mut parents = Vec::new();
        for (rest, at, _) in self.s3_list(&root).await? {
            let Some((queue, parent_id)) = rest.split_once('/') else {
                continue;
            };
            // Edges left: `UNIT/JOB` (spent ones are deleted).
            let edges = self.deps_key(&format!("waits/{parent_id}/"));
            let units: BTreeSet<Option<u32>> = (self.s3_list(&edges).await?.into_iter())
                .filter_map(|(key, _, _)| {
                    let (unit, _) = key.split_once('/')?;
                    Some(unit.parse().ok())
                })
                .collect();
            if units.is_empty() {
                // Written before its submit's edges: gone once it is old
                // enough that those would be there.
                if at < crate::sqlite::now_s() - MARKER_AGE {
                    self.s3_delete(&format!("{root}{rest}")).await?;
                }
                continue;
            }
            parents.push(ForeignWait {
                queue: queue.to_owned(),
                parent_id: parent_id.to_owned(),
                units: units.into_iter().collect(),
            });
        }
        Ok(parents)
    }
}
