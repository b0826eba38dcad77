//! Edges on the S3 ledger: `waits/PARENT/UNIT/JOB/SPEC`, which children of
//! dependant JOB wait for a parent unit, named in the key so that a
//! settle's LIST alone gives them (no GET per edge).
//!
//! SPEC is `l` and the children as ranges (`l0-3.7`: children 0 to 3 and
//! 7; `m`, which earlier versions wrote for a unit that was not the
//! children's last wait, reads the same). A key that would be too long
//! keeps the children in its body only (`waits/PARENT/UNIT/JOB`, as ledgers
//! written before this layout do); every edge's body holds them too.
//!
//! Also here: the parents this process has seen to have `same` dependants,
//! whose settles list their units' edges beside their markers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::unit_name;
use crate::events::ledger::{Ledger, LedgerError};

/// Longest SPEC in a key (S3 keys hold 1,024 bytes).
const SPEC_MAX: usize = 400;

/// Most parents [`KnownParents`] remembers before it starts again.
const KNOWN_MAX: usize = 4096;

/// Most edges [`KnownParents`] keeps, over all parents (about 100 bytes
/// each).
const EDGES_MAX: usize = 200_000;

/// A dependant child waiting for a parent unit, as its edge names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Edge {
    pub(super) job_id: String,
    pub(super) child: u32,
}

/// The rest of an edge's key under its unit: `JOB/SPEC`, or `JOB` when
/// the children do not fit in a key.
pub(super) fn edge_name(job_id: &str, children: &[u32]) -> String {
    let mut sorted = children.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for child in sorted {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == child => *end = child,
            _ => runs.push((child, child)),
        }
    }
    let ranges: Vec<String> = runs
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    let spec = format!("l{}", ranges.join("."));
    if runs.is_empty() || spec.len() > SPEC_MAX {
        return job_id.to_owned();
    }
    format!("{job_id}/{spec}")
}

/// The edges a listed key (`JOB/SPEC`) names; `None` when its SPEC is
/// absent or unreadable (its body says).
fn parse_name(rest: &str) -> Option<Vec<Edge>> {
    let (job_id, spec) = rest.split_once('/')?;
    if !matches!(spec.as_bytes().first()?, b'l' | b'm') {
        return None;
    }
    let mut edges = Vec::new();
    for range in spec[1..].split('.') {
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = range.parse::<u32>().ok()?;
                (a, a)
            }
        };
        if b < a || b - a > u32::from(u16::MAX) {
            return None;
        }
        edges.extend((a..=b).map(|child| Edge {
            job_id: job_id.to_owned(),
            child,
        }));
    }
    Some(edges)
}

/// Parents this process saw `parents/P/unit` for (a marker is never
/// taken away, so what is known stays true), with their units' edges as
/// first listed: a hint that lets a later settle of the parent read its
/// dependants' held objects before any LIST (see `release`), whose LIST
/// after it finds any edge the hint lacks.
#[derive(Debug, Default, Clone)]
pub struct KnownParents(Arc<Mutex<Known>>);

#[derive(Debug, Default)]
struct Known {
    parents: HashMap<String, HashMap<u32, Vec<Edge>>>,
    /// Edges kept, over all parents.
    edges: usize,
}

impl KnownParents {
    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn knows(&self, parent_id: &str) -> bool {
        self.lock().parents.contains_key(parent_id)
    }

    /// Learns that `parent_id` has `same` dependants, keeping `units`'
    /// edges while fewer than [`EDGES_MAX`] are kept.
    fn learn(&self, parent_id: &str, units: HashMap<u32, Vec<Edge>>) {
        let mut known = self.lock();
        if known.parents.contains_key(parent_id) {
            return;
        }
        if known.parents.len() >= KNOWN_MAX {
            *known = Known::default();
        }
        let count: usize = units.values().map(Vec::len).sum();
        let units = if known.edges + count <= EDGES_MAX {
            known.edges += count;
            units
        } else {
            HashMap::new()
        };
        known.parents.insert(parent_id.to_owned(), units);
    }

    /// Takes the edges kept for unit `index` of `parent_id`.
    fn take(&self, parent_id: &str, index: u32) -> Option<Vec<Edge>> {
        let mut known = self.lock();
        let edges = known.parents.get_mut(parent_id)?.remove(&index)?;
        known.edges -= edges.len();
        Some(edges)
    }
}

impl Ledger {
    fn known_parents(&self) -> &KnownParents {
        match self {
            Ledger::S3 { parents, .. } => parents,
            Ledger::Local(_) => unreachable!("only the S3 ledger lists edges"),
        }
    }

    /// Whether this process saw parent `parent_id` have `same` dependants.
    pub(super) fn knows_parent(&self, parent_id: &str) -> bool {
        self.known_parents().knows(parent_id)
    }

    /// The edges of each of `indexes`, units of a parent this process did
    /// not know to have `same` dependants: one LIST of all its units'
    /// edges, whose other units' edges this process keeps for their
    /// settles (see [`Ledger::kept_edges`]).
    pub(super) async fn first_unit_edges(
        &self,
        parent_id: &str,
        indexes: &[u32],
    ) -> Result<Vec<Vec<Edge>>, LedgerError> {
        let root = self.deps_key(&format!("waits/{parent_id}/"));
        let mut units: HashMap<u32, Vec<Edge>> = HashMap::new();
        let mut unnamed = Vec::new();
        for (rest, _, _) in self.s3_list(&root).await? {
            let Some((Ok(index), name)) = rest.split_once('/').map(|(u, n)| (u.parse(), n)) else {
                continue; // `whole`
            };
            match parse_name(name) {
                Some(edges) => units.entry(index).or_default().extend(edges),
                // Its children are in its body: that unit is listed again.
                None => unnamed.push(index),
            }
        }
        for index in &unnamed {
            units.remove(index);
        }
        let mut listed = Vec::with_capacity(indexes.len());
        for &index in indexes {
            listed.push(match units.remove(&index) {
                Some(edges) => edges,
                None => self.unit_edges(parent_id, Some(index)).await?,
            });
        }
        self.known_parents().learn(parent_id, units);
        Ok(listed)
    }

    /// The edges this process keeps for each of `indexes` (see
    /// [`KnownParents`]), when it keeps them all.
    pub(super) fn kept_edges(&self, parent_id: &str, indexes: &[u32]) -> Option<Vec<Vec<Edge>>> {
        let known = self.known_parents();
        let kept: Vec<Vec<Edge>> = (indexes.iter())
            .map_while(|&index| known.take(parent_id, index))
            .collect();
        (kept.len() == indexes.len()).then_some(kept)
    }

    /// The edges of a parent unit: one LIST, and a GET for an edge whose
    /// key does not name its children.
    pub(super) async fn unit_edges(
        &self,
        parent_id: &str,
        index: Option<u32>,
    ) -> Result<Vec<Edge>, LedgerError> {
        let objects = self.unit_edge_objects(parent_id, index).await?;
        Ok(objects.into_iter().flat_map(|(_, edges)| edges).collect())
    }

    /// The edges of a parent unit by the key of the object that keeps them.
    pub(super) async fn unit_edge_objects(
        &self,
        parent_id: &str,
        index: Option<u32>,
    ) -> Result<Vec<(String, Vec<Edge>)>, LedgerError> {
        let root = self.deps_key(&format!("waits/{parent_id}/{}/", unit_name(index)));
        let listed = self.s3_list(&root).await?;
        let reads = listed.into_iter().map(|(rest, _, _)| {
            let root = &root;
            async move {
                let key = format!("{root}{rest}");
                if let Some(edges) = parse_name(&rest) {
                    return Ok((key, edges));
                }
                let job_id = rest.split('/').next().unwrap_or(&rest).to_owned();
                let children = self
                    .s3_get_json::<Vec<(u32, bool)>>(&key)
                    .await?
                    .map(|(children, _)| children)
                    .unwrap_or_default();
                let edges = children
                    .into_iter()
                    .map(|(child, _)| Edge {
                        job_id: job_id.clone(),
                        child,
                    })
                    .collect();
                Ok::<_, LedgerError>((key, edges))
            }
        });
        futures_util::future::try_join_all(reads).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(job: &str, children: &[u32]) -> Vec<Edge> {
        children
            .iter()
            .map(|&child| Edge {
                job_id: job.into(),
                child,
            })
            .collect()
    }

    #[test]
    fn an_edge_key_names_its_children_as_ranges() {
        assert_eq!(edge_name("j", &[7, 0, 1, 2, 3]), "j/l0-3.7");
        assert_eq!(edge_name("j", &[5]), "j/l5");
        assert_eq!(parse_name("j/l0-3.7"), Some(edges("j", &[0, 1, 2, 3, 7])));
        // Written by earlier versions.
        assert_eq!(parse_name("j/m5"), Some(edges("j", &[5])));
        let all: Vec<u32> = (0..10_000).collect();
        assert_eq!(edge_name("j", &all), "j/l0-9999");
        assert_eq!(parse_name("j/l0-9999").map(|e| e.len()), Some(10_000));
    }

    #[test]
    fn children_too_many_for_a_key_stay_in_its_body() {
        // Every other child: no ranges, too long a key.
        let scattered: Vec<u32> = (0..1_000).map(|i| i * 2).collect();
        assert_eq!(edge_name("j", &scattered), "j");
        // An old key, or one unreadable: read from its body.
        for rest in ["j", "j/", "j/x1", "j/l3-1", "j/l1-", "j/l0-99999999"] {
            assert_eq!(parse_name(rest), None, "{rest}");
        }
    }
}
