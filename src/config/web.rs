//! The tables that say who may reach renderq over HTTP: `[server]` (the
//! JSON-RPC endpoint and its monitor) and `[metrics]` (a worker's own
//! listener).

use serde::Deserialize;

use super::Invalid;

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the JSON-RPC endpoint binds to.
    pub listen: String,
    /// Name of an environment variable holding the bearer token every request
    /// must carry. The token itself never appears in the file.
    pub auth_token_env: Option<String>,
    /// Requests with a larger body are refused with HTTP 413 (a size:
    /// `"256KiB"` or a number of bytes).
    #[serde(deserialize_with = "crate::config::bytes::deserialize")]
    pub max_body_bytes: usize,
    /// Serve a non-loopback address without a token, on purpose (anyone who
    /// reaches the port can then fill the queue).
    pub allow_anonymous: bool,
    /// The web monitor at `/ui`.
    pub ui: UiMode,
    /// Host names (no port) this endpoint is reached by besides its listen
    /// address, e.g. `["renderq.studio.lan"]` behind a proxy. A request whose
    /// `Host` is neither gets 403, so a DNS-rebinding page cannot read it.
    pub hosts: Vec<String>,
    /// Clients reach this endpoint over HTTPS (through a proxy that ends
    /// TLS): the monitor's cookies are then marked `Secure`.
    pub behind_tls: bool,
    /// Open live-update streams (`/ui/live`) at most; one more gets 503.
    /// Each holds a connection, that is a file descriptor, while a page is
    /// open.
    pub max_live_streams: usize,
}

/// `server.ui`: whether the web monitor is served, and whether its
/// buttons (redrive, cancel) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UiMode {
    #[default]
    On,
    ReadOnly,
    Off,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            auth_token_env: None,
            max_body_bytes: 256 * 1024,
            allow_anonymous: false,
            ui: UiMode::On,
            hosts: Vec::new(),
            behind_tls: false,
            max_live_streams: 256,
        }
    }
}

impl ServerConfig {
    /// The checks within `[server]`.
    pub(super) fn check(&self) -> Result<(), Invalid> {
        if self.max_live_streams == 0 {
            return Err(Invalid::new(
                "server.max_live_streams",
                "must be at least 1",
            ));
        }
        if let Some(bad) = self.hosts.iter().find(|h| !is_host_name(h)) {
            return Err(Invalid::new(
                "server.hosts",
                format!(
                    "`{bad}` is not a host name: write a name or an address without a scheme, \
                     port or path (e.g. \"renderq.studio.lan\", \"10.0.0.5\", \"[::1]\")"
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `name` is a DNS name, an IPv4 address or a bracketed IPv6 one.
fn is_host_name(name: &str) -> bool {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address `renderq worker` serves `/metrics` and `/healthz` on, e.g.
    /// `127.0.0.1:9464` (`serve` has them on its endpoint anyway).
    pub listen: Option<String>,
    /// The web monitor on that listener too (`"read-only"` or `"on"`), behind
    /// the endpoint's sign-in (`server.auth_token_env`), `Host` rule
    /// (`server.hosts`) and stream cap. Off by default: a metrics port is
    /// often open to a whole network for scraping.
    #[serde(default = "metrics_ui_default")]
    pub ui: UiMode,
}

fn metrics_ui_default() -> UiMode {
    UiMode::Off
}

impl MetricsConfig {
    /// The checks within `[metrics]`.
    pub(super) fn check(&self) -> Result<(), Invalid> {
        if self.listen.is_none() && self.ui != UiMode::Off {
            return Err(Invalid::new(
                "metrics.ui",
                "needs metrics.listen, the address to serve the monitor on",
            ));
        }
        Ok(())
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            ui: metrics_ui_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_without_port_or_scheme() {
        for good in ["renderq.studio.lan", "10.0.0.5", "[::1]", "render-01"] {
            assert!(is_host_name(good), "{good}");
        }
        for bad in ["", "http://x", "x:8080", "a b", "[nope]", "x/y"] {
            assert!(!is_host_name(bad), "{bad}");
        }
    }

    fn load(extra: &str) -> Result<super::super::Config, String> {
        let text = format!(
            "[queue_manager]\nallow_commands = [\"get_version\"]\ndefault_queue = \"q\"\n\
             listen_queue = \"q\"\n[queues.q]\nbackend = \"local\"\npath = \"q\"\n{extra}"
        );
        let dir = tempfile::tempdir().unwrap();
        super::super::Config::from_toml(&text, dir.path()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_web_settings_are_checked_and_default_to_closed() {
        let config = load("").unwrap();
        assert_eq!(config.metrics.ui, UiMode::Off);
        assert_eq!(config.server.max_live_streams, 256);
        assert!(!config.server.behind_tls);
        let err = load("[server]\nhosts = [\"renderq.lan:8080\"]\n").unwrap_err();
        assert!(
            err.contains("`server.hosts`") && err.contains("renderq.lan:8080"),
            "{err}"
        );
        let err = load("[server]\nmax_live_streams = 0\n").unwrap_err();
        assert!(err.contains("`server.max_live_streams`"), "{err}");
        let err = load("[metrics]\nui = \"sometimes\"\n").unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
        let err = load("[metrics]\nui = \"on\"\n").unwrap_err();
        assert!(
            err.contains("`metrics.ui`") && err.contains("metrics.listen"),
            "{err}"
        );
        let config = load("[metrics]\nlisten = \"127.0.0.1:9464\"\nui = \"read-only\"\n");
        assert_eq!(config.unwrap().metrics.ui, UiMode::ReadOnly);
    }
}
