//! The submit half's front: the HTTP router ([`server`]) routes bytes to
//! JSON-RPC ([`rpc`], no HTTP in sight), whose submit method checks and
//! sends jobs ([`submit`]; an array's children are planned, sized and sent
//! in `children`). Nothing here receives or deletes a message.

mod children;
pub mod rpc;
pub mod server;
pub mod submit;
