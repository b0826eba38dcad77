//! Forgetting what `retention` allows: rows no event touched within it.
//! An array's children go with their array (every child's event touches
//! it), so an array that is kept keeps its cells and its counts true.

use super::{StatusError, StatusTable, failed};

impl StatusTable {
    /// Deletes the rows no event touched within `retention`; returns how
    /// many.
    pub fn prune(&self, retention: std::time::Duration) -> Result<u64, StatusError> {
        let cutoff = crate::sqlite::now_s() - retention.as_secs() as i64;
        let mut conn = self.conn.lock().map_err(failed)?;
        let tx = conn.transaction().map_err(failed)?;
        let mut deleted = 0;
        for sql in [
            "DELETE FROM seen WHERE at < ?1",
            "DELETE FROM jobs WHERE at < ?1 AND (array_id IS NULL
                OR NOT EXISTS (SELECT 1 FROM arrays WHERE arrays.job_id = jobs.array_id AND arrays.at >= ?1))",
            "DELETE FROM arrays WHERE at < ?1",
            "DELETE FROM workers WHERE at < ?1",
            "DELETE FROM labels WHERE at < ?1
                AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.job_id = labels.id)
                AND NOT EXISTS (SELECT 1 FROM arrays WHERE arrays.job_id = labels.id)",
        ] {
            deleted += tx.execute(sql, [cutoff]).map_err(failed)?;
        }
        tx.commit().map_err(failed)?;
        Ok(deleted as u64)
    }
}
