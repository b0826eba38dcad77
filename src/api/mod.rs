//! The submit half's front: the HTTP router ([`server`]) routes bytes to
//! JSON-RPC ([`rpc`], no HTTP in sight), whose submit method checks and
//! sends jobs ([`submit`]). Nothing here receives or deletes a message.

pub mod rpc;
pub mod server;
pub mod submit;
