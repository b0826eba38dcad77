//! The submit half's front: the HTTP router ([`server`], behind the
//! `Host` and cross-site checks of [`guard`]) routes bytes to
//! JSON-RPC ([`rpc`], no HTTP in sight), whose submit method checks and
//! sends jobs ([`submit`]; inputs are pinned first, in `pins`; an array's
//! children are planned, sized and sent in `children`); job control
//! ([`control`]) cancels and redrives; [`rerender`] sends chosen frames of
//! an array again, as its next revision. Nothing here receives a message, and
//! only a cancel on the embedded queue deletes any (the cancelled job's
//! messages that no worker holds).

mod children;
pub mod control;
mod depends;
pub mod guard;
pub mod holds;
mod pins;
pub mod rerender;
pub mod rpc;
pub mod server;
pub mod submit;
