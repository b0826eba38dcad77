//! The HTTP side of a process: the endpoint's router with its monitor,
//! a worker's metrics listener, and what every listener is put behind (the
//! `Host` and cross-site checks, the token where one is needed).

use anyhow::Context;

use super::App;
use crate::api::guard::{self, Hosts};
use crate::api::rpc::Rpc;
use crate::api::server;
use crate::config::{Invalid, UiMode, optional_secret};
use crate::fleet::lifecycle::Shutdown;
use crate::ui::Ui;
use crate::worker::health::SickFlag;

impl App {
    /// The HTTP router of the submit half.
    pub fn router(&self) -> anyhow::Result<axum::Router> {
        let server = &self.config.server;
        let token = self.token_for("server.listen", &server.listen)?;
        let ui = self.ui(server.ui, token.clone());
        let router = server::app(
            Rpc::new(self.submitter(), self.control(), self.status.clone()),
            Some(self.metrics.clone()),
            token,
            server.max_body_bytes,
        );
        Ok(match ui {
            Some(ui) => router.merge(ui.router()),
            None => router,
        })
    }

    /// The endpoint's token (`server.auth_token_env`), for a listener on
    /// `listen` (the config key `key`) that takes it; an error when that
    /// address is reachable from other machines and there is no token,
    /// unless `server.allow_anonymous` says so.
    fn token_for(&self, key: &str, listen: &str) -> anyhow::Result<Option<String>> {
        let server = &self.config.server;
        let loopback = listen
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or_else(|_| listen.starts_with("localhost:"));
        if !loopback && server.auth_token_env.is_none() && !server.allow_anonymous {
            return Err(self
                .config
                .locate(Invalid::new(
                    "server.auth_token_env",
                    format!(
                        "{key} = \"{listen}\" is reachable from other machines: set a token \
                         (auth_token_env), or server.allow_anonymous = true if anyone may submit"
                    ),
                ))
                .into());
        }
        Ok(optional_secret(
            &self.config,
            "server.auth_token_env",
            server.auth_token_env.as_deref(),
        )?)
    }

    /// The web monitor, as `mode` says (with buttons only when `On`).
    pub fn ui(&self, mode: UiMode, token: Option<String>) -> Option<Ui> {
        let control = match mode {
            UiMode::Off => return None,
            UiMode::ReadOnly => None,
            UiMode::On => Some(self.control()),
        };
        let server = &self.config.server;
        let ui = Ui::new(
            self.config.events.status.path(),
            self.queues.clone(),
            self.ledgers.clone(),
            control,
            token,
        );
        Some(
            ui.behind_tls(server.behind_tls)
                .max_live_streams(server.max_live_streams)
                .max_frames(self.config.queue_manager.max_frames)
                .with_rerender(self.submitter()),
        )
    }

    /// Serves `/metrics` and `/healthz` on `metrics.listen`, when set, and
    /// the monitor there when `metrics.ui` asks for it.
    pub(super) async fn serve_metrics(
        &self,
        shutdown: &Shutdown,
        sick: SickFlag,
    ) -> anyhow::Result<()> {
        let Some(listen) = &self.config.metrics.listen else {
            return Ok(());
        };
        let mut router = server::metrics_app(self.metrics.clone(), sick);
        // The monitor only when asked for, behind the endpoint's sign-in:
        // a metrics port is often open to a whole network.
        let mode = self.config.metrics.ui;
        if mode != UiMode::Off {
            let token = self.token_for("metrics.listen", listen)?;
            if let Some(ui) = self.ui(mode, token) {
                router = router.merge(ui.router());
            }
        }
        let (listener, router) = self.bind("metrics.listen", listen, router).await?;
        tracing::info!(address = %listener.local_addr()?, monitor = ?mode, "Serving /metrics.");
        tokio::spawn(server::serve(listener, router, shutdown.token().clone()));
        Ok(())
    }

    /// Binds `listen` (the config key `key`) and puts `router` behind the
    /// `Host` and cross-site checks for the address it got.
    pub(super) async fn bind(
        &self,
        key: &str,
        listen: &str,
        router: axum::Router,
    ) -> anyhow::Result<(tokio::net::TcpListener, axum::Router)> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} ({key})"))?;
        let hosts = Hosts::new(listen, listener.local_addr()?, &self.config.server.hosts);
        Ok((listener, guard::guarded(router, hosts)))
    }
}

/// Raises this process's open-file limit to its hard limit: every open
/// connection (a live page, a scrape) and every job's files take a
/// descriptor, and the usual soft limit (1,024) runs out long before the
/// hard one.
pub(super) fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| {
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        Ok((soft, hard))
    });
    match raised {
        Ok((soft, hard)) => tracing::debug!(from = soft, to = hard, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}
