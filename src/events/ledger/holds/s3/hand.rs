//! Holds by hand on the S3 ledger (SQS queues): `deps/hand/ID` per job or
//! array held; the messages of a held job wait as held objects marked
//! `manual` (beside dependants, in `deps/held/`).
//!
//! SQS cannot take a queued message out by its id, so a hold catches its
//! messages at receive: a worker checks each message against the holds it
//! listed at most [`HAND_CACHE`] ago (one LIST a period per worker,
//! however many messages it receives) and parks a held one in the ledger,
//! without using a try. A hold therefore returns only after that period,
//! when every worker's next receive sees it.
//!
//! Exactly once: a release deletes the hold first, then frees each held
//! object of the job by a conditional write (the dependants' claim). A park
//! writes its object, then reads the hold again: gone, it races the
//! release for the object with the same conditional write, and whichever
//! loses leaves the message to the winner (the release sends it, or the
//! worker hands its message back).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Cond, HeldObject, HeldState, Mark, stamp};
use crate::events::ledger::holds::Freed;
use crate::events::ledger::{Ledger, LedgerError};

/// Longest a worker reuses its LIST of the holds.
pub(crate) const HAND_CACHE: Duration = Duration::from_secs(1);

/// When `deps/hand/` was listed, and the ids it held.
type Listed = (Instant, HashSet<String>);

/// This process's last LIST of `deps/hand/`.
#[derive(Debug, Default, Clone)]
pub struct HandCache(Arc<Mutex<Option<Listed>>>);

impl Ledger {
    fn hand_cache(&self) -> &HandCache {
        match self {
            Ledger::S3 { hands, .. } => hands,
            Ledger::Local(_) => unreachable!("only the S3 ledger caches its holds"),
        }
    }

    fn hand_key(&self, job_id: &str) -> String {
        self.deps_key(&format!("hand/{job_id}"))
    }

    /// Forgets the cached holds: this process's next receive lists them.
    async fn forget_hands(&self) {
        *self.hand_cache().0.lock().await = None;
    }

    pub(in crate::events::ledger::holds) async fn s3_hold_by_hand(
        &self,
        job_id: &str,
    ) -> Result<bool, LedgerError> {
        let new = self
            .s3_put(&self.hand_key(job_id), stamp(), Cond::IfAbsent)
            .await?;
        // Dependants already held stay held once their parents end.
        self.change_all_held(job_id, |h| {
            (!h.manual && h.state == HeldState::Held).then(|| {
                h.manual = true;
                false
            })
        })
        .await?;
        self.forget_hands().await;
        Ok(new)
    }

    pub(in crate::events::ledger::holds) async fn s3_park(
        &self,
        by: &str,
        job_id: &str,
        size: u32,
        index: u32,
        body: String,
    ) -> Result<bool, LedgerError> {
        let hand = self.hand_key(by);
        if self.s3_get(&hand).await?.is_none() {
            // Released since this process listed the holds.
            self.forget_hands().await;
            return Ok(false);
        }
        let held = HeldObject {
            size,
            body,
            waits: Default::default(),
            state: HeldState::Held,
            by: None,
            claim: None,
            manual: true,
            queues: Default::default(),
        };
        let key = self.deps_key(&format!("held/{job_id}/{index}"));
        self.s3_put_json(&key, &held, Cond::Always).await?;
        if self.s3_get(&hand).await?.is_some() {
            return Ok(true);
        }
        // Released meanwhile: the release may not have seen the object.
        // Whoever takes it back first sends it.
        let taken = self
            .change_held(job_id, index, Mark::Cancels, |h| {
                (h.state == HeldState::Held).then(|| {
                    h.manual = false;
                    h.state = HeldState::Releasing;
                    h.by = Some("hand".into());
                    true
                })
            })
            .await?;
        Ok(taken.is_none())
    }

    pub(in crate::events::ledger::holds) async fn s3_held_by_hand(
        &self,
        ids: Vec<String>,
    ) -> Result<Option<String>, LedgerError> {
        let mut cache = self.hand_cache().0.lock().await;
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < HAND_CACHE);
        if !fresh {
            let listed = self.s3_list(&self.deps_key("hand/")).await?;
            let held = listed.into_iter().map(|(id, _, _)| id).collect();
            *cache = Some((Instant::now(), held));
        }
        let held = cache.as_ref().map(|(_, held)| held);
        Ok(ids
            .into_iter()
            .find(|id| held.is_some_and(|h| h.contains(id))))
    }

    pub(in crate::events::ledger::holds) async fn s3_release_by_hand(
        &self,
        job_id: &str,
    ) -> Result<Option<Vec<Freed>>, LedgerError> {
        let hand = self.hand_key(job_id);
        if self.s3_get(&hand).await?.is_none() {
            return Ok(None);
        }
        self.s3_delete(&hand).await?;
        self.forget_hands().await;
        let freed = self
            .change_all_held(job_id, |h| {
                if !h.manual {
                    return None;
                }
                h.manual = false;
                let frees = h.state == HeldState::Held && h.waits.is_empty();
                if frees {
                    h.state = HeldState::Releasing;
                    h.by = Some("hand".into());
                }
                Some(frees)
            })
            .await?;
        Ok(Some(freed))
    }
}
