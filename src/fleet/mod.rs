//! The worker's place in a fleet: [`lifecycle`] is shutdown as a value
//! (reason and deadline) that signals and [`imds`] (spot and autoscaling
//! notices) feed; [`drain`] decides which running jobs can finish before
//! it; [`scaling`] keeps scale-in protection and the termination lifecycle
//! hook; [`gpu`] pins slots to GPUs.

pub mod drain;
pub mod gpu;
pub mod imds;
pub mod lifecycle;
pub mod scaling;
