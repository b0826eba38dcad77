//! What an array's tries cost, summed where every worker can read it (on
//! both backends), and the one claim that its budget was reached.
//!
//! Beside the embedded queue: a row per array, added to and claimed in one
//! transaction. On S3: one object per array (`PREFIX/QUEUE/arrays/ID/cost`)
//! read and written back with `If-Match` on the ETag read (`If-None-Match:
//! *` when new), read again when another writer got there first; so the
//! write that first takes the sum to the budget is the one claim.

use rusqlite::params;

use super::arrays::{RACE_BACKOFF, RACES};
use super::{Ledger, LedgerError};

/// The S3 ledger's cost object of an array.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Spent {
    usd: f64,
    /// Whether its budget was reached (claimed once).
    reached: bool,
}

impl Spent {
    /// Adds a try's cost; true when that reached `budget` first.
    fn add(&mut self, usd: f64, budget: f64) -> bool {
        self.usd += usd;
        let claims = self.usd >= budget && !self.reached;
        self.reached |= claims;
        claims
    }
}

fn cost_key(prefix: &str, array_id: &str) -> String {
    format!("{prefix}arrays/{array_id}/cost")
}

impl Ledger {
    /// Adds a try's cost to its array's; returns the array's cost, and
    /// whether this call is the one that reached `budget` (exactly one
    /// call, of every worker's, is).
    pub async fn add_cost(
        &self,
        array_id: &str,
        usd: f64,
        budget: f64,
    ) -> Result<(f64, bool), LedgerError> {
        match self {
            Ledger::Local(conn) => {
                let array_id = array_id.to_owned();
                Self::sql(conn, move |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let (total, reached): (f64, bool) = tx.query_row(
                        "INSERT INTO array_costs (array_id, usd, at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (array_id) DO UPDATE SET usd = usd + excluded.usd, at = excluded.at
                         RETURNING usd, reached",
                        params![array_id, usd, crate::sqlite::now_s()],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )?;
                    let claims = total >= budget && !reached;
                    if claims {
                        tx.execute(
                            "UPDATE array_costs SET reached = 1 WHERE array_id = ?1",
                            [&array_id],
                        )?;
                    }
                    tx.commit()?;
                    Ok((total, claims))
                })
                .await
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = cost_key(prefix, array_id);
                for race in 1..=RACES {
                    let (spent, etag) = Self::read_json::<Spent>(client, bucket, &key).await?;
                    let mut spent = spent.unwrap_or_default();
                    let claims = spent.add(usd, budget);
                    if Self::write_json_if(client, bucket, &key, &spent, etag).await? {
                        return Ok((spent.usd, claims));
                    }
                    tokio::time::sleep(RACE_BACKOFF.delay(race)).await;
                }
                Err(LedgerError(format!(
                    "{key}: lost {RACES} races to add a cost"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn costs_add_up_and_exactly_one_addition_reaches_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        let mut claims = 0;
        let mut last = 0.0;
        for _ in 0..10 {
            let (total, claimed) = ledger.add_cost("a", 0.25, 1.0).await.unwrap();
            assert!(total > last);
            last = total;
            claims += usize::from(claimed);
            if claimed {
                assert!((total - 1.0).abs() < 1e-9, "{total}");
            }
        }
        assert_eq!(claims, 1);
        assert!((last - 2.5).abs() < 1e-9);
        // Another array has its own sum.
        assert_eq!(ledger.add_cost("b", 0.5, 1.0).await.unwrap(), (0.5, false));
        let mut spent = Spent::default();
        assert!(!spent.add(0.5, 1.0));
        assert!(spent.add(0.5, 1.0));
        assert!(!spent.add(0.5, 1.0));
    }
}
