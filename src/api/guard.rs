//! Who may talk to a renderq HTTP listener at all, checked before any
//! route: the `Host` a request names must be this listener's (so a
//! DNS-rebinding page, whose `Host` is its own name, reads nothing), and a
//! POST must not come from another site's page (its `Origin` or
//! `Sec-Fetch-Site` says so; CLI clients send neither). A refusal is a 403
//! that names its reason, before anything is read or changed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

/// The host names a listener answers to.
#[derive(Debug, Clone)]
pub struct Hosts {
    /// The port the listener is bound to (`Host` must name it, unless the
    /// name is one of `names`).
    port: u16,
    /// The listen address's host as configured, lower case (`127.0.0.1`,
    /// `localhost`, `render-07.lan`).
    listen: String,
    /// Which other names the bound address implies.
    bound: Bound,
    /// `server.hosts`: names reached through a proxy, on any port.
    names: Vec<String>,
}

/// What the bound address says about the names a client may use for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// A loopback address: `localhost` and every loopback address.
    Loopback,
    /// `0.0.0.0` or `[::]`: any address of this machine, which cannot be
    /// known in advance (a pod's, an instance's), so any IP address; never
    /// a name (an IP address cannot be rebound to another site's page).
    Everywhere,
    /// One address: only it.
    One,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no Host header")]
    NoHost,
    #[error(
        "Host `{0}` is not this listener's address nor a name in server.hosts (refused: a \
         page on another site may have been pointed at this address)"
    )]
    ForeignHost(String),
    #[error("Origin `{0}` is another site: cross-site requests are refused")]
    ForeignOrigin(String),
    #[error("Sec-Fetch-Site: cross-site: requests from another site's page are refused")]
    CrossSite,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (StatusCode::FORBIDDEN, format!("{self}\n")).into_response()
    }
}

impl Hosts {
    /// The names a listener configured as `listen` (`host:port`) and bound
    /// to `bound` answers to, and `names` (`server.hosts`) besides.
    pub fn new(listen: &str, bound: SocketAddr, names: &[String]) -> Self {
        let listen = listen
            .parse::<Authority>()
            .map(|a| a.host().to_ascii_lowercase())
            .unwrap_or_default();
        let ip = bound.ip();
        Self {
            port: bound.port(),
            listen,
            bound: if ip.is_loopback() {
                Bound::Loopback
            } else if ip.is_unspecified() {
                Bound::Everywhere
            } else {
                Bound::One
            },
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether `host` (a `Host` header: `name[:port]`) names this listener.
    pub fn allows(&self, host: &str) -> bool {
        let Ok(authority) = host.parse::<Authority>() else {
            return false;
        };
        let name = authority.host().to_ascii_lowercase();
        if self.names.contains(&name) {
            return true;
        }
        // A browser leaves out port 80.
        if authority.port_u16().unwrap_or(80) != self.port {
            return false;
        }
        if name == self.listen {
            return true;
        }
        let ip = ip_of(&name);
        match self.bound {
            Bound::Loopback => name == "localhost" || ip.is_some_and(|ip| ip.is_loopback()),
            Bound::Everywhere => name == "localhost" || ip.is_some(),
            Bound::One => false,
        }
    }

    /// Whether a request may go on to its route. `host` is its `Host`
    /// header (or, in HTTP/2, its URI's authority).
    pub fn check(
        &self,
        method: &Method,
        host: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
        let host = host.ok_or(Refusal::NoHost)?;
        if !self.allows(host) {
            return Err(Refusal::ForeignHost(host.to_owned()));
        }
        if method.is_safe() {
            return Ok(());
        }
        if headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
        {
            return Err(Refusal::CrossSite);
        }
        match headers.get(header::ORIGIN) {
            None => Ok(()),
            Some(origin) => {
                let origin = origin.to_str().unwrap_or_default();
                if self.same_origin(origin, host) {
                    Ok(())
                } else {
                    Err(Refusal::ForeignOrigin(origin.to_owned()))
                }
            }
        }
    }

    /// Whether `origin` (`scheme://name[:port]`) is the page's own: the
    /// `Host` it was sent to, or a name in `server.hosts`. (Not any name
    /// `allows`: on `0.0.0.0` that is any IP address, an attacker's too.)
    fn same_origin(&self, origin: &str, host: &str) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let (Ok(origin), Ok(host)) = (rest.parse::<Authority>(), host.parse::<Authority>()) else {
            return false;
        };
        let name = origin.host().to_ascii_lowercase();
        if self.names.contains(&name) {
            return true;
        }
        name == host.host().to_ascii_lowercase()
            && match host.port_u16() {
                Some(port) => origin.port_u16().unwrap_or(default_port) == port,
                None => origin.port_u16().is_none(),
            }
    }
}

/// `name` as an IP address (`127.0.0.1`, `[::1]`).
fn ip_of(name: &str) -> Option<IpAddr> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    bare.parse().ok()
}

/// `router` behind the checks of `hosts`; every answer also says
/// `X-Content-Type-Options: nosniff`.
pub fn guarded(router: Router, hosts: Hosts) -> Router {
    router.layer(middleware::from_fn_with_state(Arc::new(hosts), guard))
}

async fn guard(State(hosts): State<Arc<Hosts>>, request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        Some(host) => Some(host.to_str().unwrap_or_default()),
        None => request.uri().authority().map(Authority::as_str),
    };
    if let Err(refusal) = hosts.check(request.method(), host, request.headers()) {
        tracing::warn!(
            %refusal,
            method = %request.method(),
            path = request.uri().path(),
            "refused a request"
        );
        return refusal.into_response();
    }
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests;
