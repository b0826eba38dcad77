//! What a held job (or array) still waits for, parent by parent: the
//! `waits_for` lines of `renderq status` and the monitor's job page.

use std::collections::{BTreeMap, BTreeSet};

use super::{Ledger, LedgerError};

/// Edges read for one job: enough for any page or line that shows them.
const SHOWN: u32 = 1000;

/// A parent that a held job still waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentWait {
    pub parent_id: String,
    /// The parent's queue.
    pub queue: String,
    /// The parent's children waited for; empty: the whole parent.
    pub children: Vec<u32>,
    /// How many of the job's children are held in this ledger.
    pub held_children: usize,
}

impl ParentWait {
    /// `the whole job`, or `children 0,4,7`.
    pub fn what(&self) -> String {
        if self.children.is_empty() {
            return "the whole job".into();
        }
        let list: Vec<String> = self.children.iter().map(u32::to_string).collect();
        format!("children {}", list.join(","))
    }
}

impl Ledger {
    /// The parents `job_id` still waits for in this ledger, that of queue
    /// `queue` (a parent on it unless its edge names another).
    pub async fn parent_waits(
        &self,
        job_id: &str,
        queue: &str,
    ) -> Result<Vec<ParentWait>, LedgerError> {
        let mut by_parent: BTreeMap<(String, String), (BTreeSet<u32>, bool)> = BTreeMap::new();
        let mut children = BTreeSet::new();
        for (child, parent, index, parent_queue) in self.waiting_for(job_id, SHOWN).await? {
            children.insert(child);
            let queue = parent_queue.unwrap_or_else(|| queue.to_owned());
            let entry = by_parent.entry((parent, queue)).or_default();
            match index {
                Some(index) => {
                    entry.0.insert(index);
                }
                None => entry.1 = true,
            }
        }
        Ok(by_parent
            .into_iter()
            .map(|((parent_id, queue), (indexes, whole))| ParentWait {
                parent_id,
                queue,
                children: if whole {
                    Vec::new()
                } else {
                    indexes.into_iter().collect()
                },
                held_children: children.len(),
            })
            .collect())
    }
}
