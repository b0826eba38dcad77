//! Process lifecycle: turning signals into the one shutdown token.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGINT or SIGTERM. A second signal ends
/// the process at once, for an operator who will not wait for the drain.
pub fn cancel_on_signal(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        for round in 0..2 {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            if round == 0 {
                tracing::info!(signal = name, "Shutting down: finishing running jobs.");
                shutdown.cancel();
            } else {
                tracing::warn!(signal = name, "Second signal: exiting now.");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
