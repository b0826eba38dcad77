//! What happened, and who is told: [`publish`] delivers lifecycle events
//! to their targets through bounded buffers ([`buffer`]: in events for a
//! target, in bytes for the status table); [`observe`] is the one place a
//! job's end is logged, published and counted; [`metrics`] is `/metrics`;
//! [`status`] folds events into the job-status table, fed in-process or by
//! [`watch`]; [`ledger`] records reported tries and array children's final
//! states, so that exactly one `ArrayJobCompleted` is published.

pub mod buffer;
pub mod ledger;
pub mod metrics;
pub mod observe;
pub mod publish;
pub mod status;
pub mod watch;
