//! What the monitor tells browsers, its sign-in and its live streams,
//! without a socket.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;

use super::*;

/// A monitor with buttons, a token and `streams`.
fn monitor(setup: &Setup, behind_tls: bool, streams: Streams) -> Router {
    let mut ui = Ui::new(
        Some(&setup.status),
        setup.queues.clone(),
        Ledgers::default(),
        None,
        Some("s3cret".into()),
    )
    .behind_tls(behind_tls);
    ui.streams = streams;
    ui.router()
}

fn long_lived(max: usize) -> Streams {
    Streams::new(max, Duration::from_secs(3600))
}

/// Posts the sign-in form from `client`; the answer's status and cookie.
async fn sign_in(router: &Router, token: &str, client: [u8; 4]) -> (StatusCode, Option<String>) {
    let mut request = Request::post("/ui/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}")))
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((client, 40000))));
    let response = router.clone().oneshot(request).await.unwrap();
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status(), cookie)
}

#[tokio::test]
async fn pages_forbid_framing_inline_script_and_sniffing() {
    let setup = setup().await;
    let router = ui(&setup, true, None);
    for uri in ["/ui", "/ui/login", "/ui/jobs/not-a-job"] {
        let response = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let headers = response.headers();
        let policy = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(policy.contains("frame-ancestors 'none'"), "{uri}: {policy}");
        assert!(policy.contains("script-src 'self';"), "{policy}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let page = String::from_utf8_lossy(&body);
        // The one script is the served file: an inline one would be refused.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        assert!(page.contains(r#"<script src="/ui/live.js">"#), "{page}");
    }
    let (status, script, _) = get(&router, "/ui/live.js", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.contains("new EventSource('/ui/live')"), "{script}");
}

#[tokio::test]
async fn the_session_cookie_is_signed_ends_and_is_secure_behind_tls() {
    let setup = setup().await;
    for behind_tls in [false, true] {
        let router = monitor(&setup, behind_tls, long_lived(4));
        let (status, cookie) = sign_in(&router, "s3cret", [10, 0, 0, 1]).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let cookie = cookie.unwrap();
        assert!(!cookie.contains("s3cret"), "{cookie}");
        assert!(cookie.contains("Max-Age=43200"), "{cookie}");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert_eq!(cookie.contains("Secure"), behind_tls, "{cookie}");
        let session = cookie.split(';').next().unwrap();
        let (status, _, cookies) = get(&router, "/ui", Some(session)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            cookies
                .iter()
                .all(|c| c.contains("Secure") == behind_tls && c.contains("HttpOnly")),
            "{cookies:?}"
        );
        // The raw token is not a session, nor is an expiry moved later.
        let (value, signature) = session.split_once('.').unwrap();
        let later: u64 = value.trim_start_matches("renderq_ui=").parse().unwrap();
        for forged in [
            "renderq_ui=s3cret".to_owned(),
            format!("renderq_ui={}.{signature}", later + 1),
        ] {
            let (status, _, _) = get(&router, "/ui", Some(&forged)).await;
            assert_eq!(status, StatusCode::SEE_OTHER, "{forged}");
        }
    }
}

#[tokio::test]
async fn sign_in_attempts_are_limited_per_client_address() {
    let setup = setup().await;
    let router = monitor(&setup, false, long_lived(4));
    for _ in 0..auth::ATTEMPTS {
        let (status, _) = sign_in(&router, "guess", [10, 0, 0, 1]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Past the limit even the right token waits.
    let (status, cookie) = sign_in(&router, "s3cret", [10, 0, 0, 1]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(cookie.is_none());
    let (status, _) = sign_in(&router, "s3cret", [10, 0, 0, 2]).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "another address");
}

/// Opens `/ui/live` and returns the answer, its body unread.
async fn open_live(router: &Router, cookie: &str) -> Response {
    let request = Request::get("/ui/live")
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap();
    router.clone().oneshot(request).await.unwrap()
}

#[tokio::test]
async fn live_streams_are_capped_and_each_ends() {
    let setup = setup().await;
    let router = monitor(&setup, false, long_lived(2));
    let (_, cookie) = sign_in(&router, "s3cret", [10, 0, 0, 1]).await;
    let session = cookie.unwrap().split(';').next().unwrap().to_owned();
    let first = open_live(&router, &session).await;
    let second = open_live(&router, &session).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::OK);
    let third = open_live(&router, &session).await;
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.headers()[header::CONNECTION], "close");
    assert!(third.headers().contains_key(header::RETRY_AFTER));
    // A page that is gone frees its stream.
    drop(first);
    assert_eq!(open_live(&router, &session).await.status(), StatusCode::OK);
    // Signing in comes first: an anonymous client takes no stream.
    assert_eq!(open_live(&router, "").await.status(), StatusCode::SEE_OTHER);

    // A stream past its age ends (the browser reconnects) and frees its place.
    let router = monitor(&setup, false, Streams::new(1, Duration::from_millis(50)));
    let (_, cookie) = sign_in(&router, "s3cret", [10, 0, 0, 1]).await;
    let session = cookie.unwrap().split(';').next().unwrap().to_owned();
    let body = open_live(&router, &session).await.into_body();
    tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .expect("the stream ends")
        .unwrap();
    assert_eq!(open_live(&router, &session).await.status(), StatusCode::OK);
}
