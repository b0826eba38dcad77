//! Signing in to the monitor. With a token configured, the sign-in form
//! asks for it once (at most [`ATTEMPTS`] tries a minute per client
//! address) and sets a session cookie that holds an expiry and an
//! HMAC-SHA256 of it keyed by the token: never the token, so a leaked
//! cookie does not give the endpoint's token away, and it stops working
//! after [`SESSION_MAX_AGE`] or when the token changes. Every page also
//! gets a CSRF cookie that each POST must repeat in its form.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Form, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::{Ui, html, pages};

const AUTH_COOKIE: &str = "renderq_ui";
pub(super) const CSRF_COOKIE: &str = "renderq_csrf";
/// How long a sign-in lasts.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Sign-in attempts a client address may make per [`WINDOW`].
pub const ATTEMPTS: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tracked at once; when all of them tried within the
/// window, new ones wait for it to pass (memory stays bounded).
const TRACKED: usize = 4096;

/// What signing in needs: the token and the attempts counted so far.
#[derive(Debug)]
pub(super) struct SignIn {
    token: Arc<str>,
    attempts: Mutex<Attempts>,
}

impl SignIn {
    pub(super) fn new(token: String) -> Self {
        Self {
            token: token.into(),
            attempts: Mutex::new(Attempts::default()),
        }
    }

    /// The session cookie's value for a session ending at `expires` (Unix
    /// seconds): `EXPIRES.HMAC`.
    fn session(&self, expires: u64) -> String {
        format!(
            "{expires}.{}",
            hex::encode(self.mac(expires).finalize().into_bytes())
        )
    }

    fn mac(&self, expires: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.token.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(format!("renderq monitor session until {expires}").as_bytes());
        mac
    }

    /// Whether `cookie` is a session this token signed that has not ended
    /// by `now` (Unix seconds).
    fn valid(&self, cookie: &str, now: u64) -> bool {
        let Some((expires, signature)) = cookie.split_once('.') else {
            return false;
        };
        let (Ok(expires), Ok(signature)) = (expires.parse::<u64>(), hex::decode(signature)) else {
            return false;
        };
        expires > now && self.mac(expires).verify_slice(&signature).is_ok()
    }
}

/// Sign-in attempts per client address in the current window.
#[derive(Debug, Default)]
struct Attempts {
    seen: HashMap<IpAddr, (Instant, u32)>,
}

impl Attempts {
    /// Counts an attempt from `client` at `now`; `Err(wait)` when it is
    /// one too many.
    fn count(&mut self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.seen.contains_key(&client) && self.seen.len() >= TRACKED {
            self.seen.retain(|_, (start, _)| now < *start + WINDOW);
            if self.seen.len() >= TRACKED {
                return Err(WINDOW);
            }
        }
        let (start, count) = self.seen.entry(client).or_insert((now, 0));
        if now >= *start + WINDOW {
            (*start, *count) = (now, 0);
        }
        if *count >= ATTEMPTS {
            return Err(*start + WINDOW - now);
        }
        *count += 1;
        Ok(())
    }
}

/// The address attempts are counted by: IPv6 clients by their /64, which
/// one machine usually holds whole.
fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A cookie of the monitor's: for `/ui` only, never sent cross-site, out
/// of scripts' reach, and `Secure` behind TLS.
fn cookie(ui: &Ui, name: &'static str, value: String) -> Cookie<'static> {
    Cookie::build((name, value))
        .path("/ui")
        .same_site(SameSite::Strict)
        .http_only(true)
        .secure(ui.behind_tls)
        .build()
}

/// Lets a request through when no token is configured or its cookie holds
/// a live session; otherwise sends a page to the sign-in form (and refuses
/// a POST).
pub(super) async fn signed_in(
    State(ui): State<Ui>,
    jar: CookieJar,
    request: Request,
    next: Next,
) -> Response {
    if let Some(sign_in) = &ui.sign_in {
        let held = jar.get(AUTH_COOKIE).map(Cookie::value).unwrap_or_default();
        if !sign_in.valid(held, unix_now()) {
            return if request.method() == Method::GET {
                Redirect::to("/ui/login").into_response()
            } else {
                (StatusCode::UNAUTHORIZED, "sign in at /ui/login first\n").into_response()
            };
        }
    }
    // Every page hands out a CSRF cookie, for its forms.
    let jar = match jar.get(CSRF_COOKIE) {
        Some(_) => jar,
        None => jar.add(cookie(
            &ui,
            CSRF_COOKIE,
            uuid::Uuid::new_v4().simple().to_string(),
        )),
    };
    let mut request = request;
    // The handler sees the cookie it sets (for the page's forms).
    if let Some(cookie) = jar.get(CSRF_COOKIE) {
        let header = format!("{}={}", cookie.name(), cookie.value());
        if !request
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains(&header)))
            && let Ok(value) = header.parse()
        {
            request.headers_mut().append(header::COOKIE, value);
        }
    }
    (jar, next.run(request).await).into_response()
}

/// Whether a form's CSRF token is the cookie's.
pub(super) fn csrf_ok(jar: &CookieJar, sent: &str) -> bool {
    jar.get(CSRF_COOKIE).is_some_and(|c| {
        !sent.is_empty() && bool::from(c.value().as_bytes().ct_eq(sent.as_bytes()))
    })
}

pub(super) async fn login_form() -> Response {
    html(pages::login(false))
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

pub(super) async fn login(
    State(ui): State<Ui>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(sign_in) = &ui.sign_in else {
        return Redirect::to("/ui").into_response();
    };
    // Without a socket (tests) every attempt counts against one address.
    let address = client.map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.0.ip());
    let counted = match sign_in.attempts.lock() {
        Ok(mut attempts) => attempts.count(client_key(address), Instant::now()),
        Err(_) => Err(WINDOW),
    };
    if let Err(wait) = counted {
        tracing::warn!(client = %address, "too many sign-in attempts");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())],
            format!("too many sign-in attempts: {ATTEMPTS} a minute from one address\n"),
        )
            .into_response();
    }
    if !bool::from(form.token.as_bytes().ct_eq(sign_in.token.as_bytes())) {
        tracing::info!(client = %address, "monitor sign-in with a wrong token");
        return (StatusCode::UNAUTHORIZED, html(pages::login(true))).into_response();
    }
    let mut session = cookie(
        &ui,
        AUTH_COOKIE,
        sign_in.session(unix_now() + SESSION_MAX_AGE.as_secs()),
    );
    session.set_max_age(Some(
        SESSION_MAX_AGE
            .try_into()
            .expect("twelve hours fit a cookie's Max-Age"),
    ));
    (jar.add(session), Redirect::to("/ui")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_signed_by_the_token_and_ends() {
        let sign_in = SignIn::new("s3cret".into());
        let now = 1_800_000_000;
        let session = sign_in.session(now + 60);
        assert!(!session.contains("s3cret"));
        assert!(sign_in.valid(&session, now));
        assert!(!sign_in.valid(&session, now + 60), "ended");
        assert!(
            !SignIn::new("other".into()).valid(&session, now),
            "another token"
        );
        let (_, signature) = session.split_once('.').unwrap();
        let stretched = format!("{}.{signature}", now + 3600);
        assert!(!sign_in.valid(&stretched, now), "the expiry is signed");
        for junk in ["", "s3cret", "1.2", "x.y", &format!("{}.", now + 60)] {
            assert!(!sign_in.valid(junk, now), "{junk}");
        }
    }

    #[test]
    fn attempts_are_limited_per_address_per_window() {
        let mut attempts = Attempts::default();
        let start = Instant::now();
        let (one, two) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for _ in 0..ATTEMPTS {
            assert_eq!(attempts.count(one, start), Ok(()));
        }
        let later = start + Duration::from_secs(20);
        assert_eq!(attempts.count(one, later), Err(Duration::from_secs(40)));
        assert_eq!(attempts.count(two, later), Ok(()), "another address");
        assert_eq!(attempts.count(one, start + WINDOW), Ok(()), "a new window");
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_prefix() {
        let a: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::5".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn memory_for_attempts_is_bounded() {
        let mut attempts = Attempts::default();
        let start = Instant::now();
        for i in 0..TRACKED as u32 {
            assert_eq!(attempts.count(IpAddr::from(i.to_be_bytes()), start), Ok(()));
        }
        let stranger = IpAddr::from([255, 1, 2, 3]);
        assert_eq!(attempts.count(stranger, start), Err(WINDOW));
        assert_eq!(attempts.count(stranger, start + WINDOW), Ok(()));
        assert_eq!(attempts.seen.len(), 1, "the old window was forgotten");
    }
}
