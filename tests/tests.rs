//! Integration tests: the real `renderq` binary over real sockets, with a
//! real embedded queue on disk. One binary, one module per topic.

mod harness;

mod commands;
mod config_errors;
mod crash;
mod http_api;
mod processes;
mod scenarios;
mod sqs;
