//! Integration tests: the real `renderq` binary over real sockets, with a
//! real embedded queue on disk. One binary, one module per topic.

/// Runs each scenario (an `async fn(Backend)` in the calling module) once
/// per backend, as `local::NAME` and `sqs::NAME`.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Backend::Local).await
                }
            )*
        }
        mod sqs {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Backend::Sqs).await
                }
            )*
        }
    };
}

mod harness;

mod adaptors;
mod bad_workers;
mod blender;
mod blender_addon;
mod cancels;
mod clients;
mod commands;
mod config_errors;
mod crash;
mod cross_queue;
mod deploy;
mod events;
mod failures;
mod first_hour;
mod fleet;
mod http_api;
mod input_rights;
mod inputs;
mod job_control;
mod job_user;
mod ledger;
mod limits;
mod monitor;
mod pipeline_example;
mod pipelines;
mod processes;
mod readme;
mod redrive;
mod rerender;
mod scenarios;
mod sqs;
mod storm;
mod thumbnails;
mod untrusted_inputs;
mod uploads;
mod usage;
