//! The header rules, on addresses and through a router without a socket.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;

fn hosts(listen: &str, names: &[&str]) -> Hosts {
    let bound = match listen.parse::<SocketAddr>() {
        Ok(address) => address,
        // A name binds whatever it resolves to; here, loopback.
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 8080)),
    };
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    Hosts::new(listen, bound, &names)
}

#[test]
fn a_loopback_listener_answers_to_localhost_and_loopback_addresses_on_its_port() {
    let hosts = hosts("127.0.0.1:8080", &[]);
    for good in [
        "127.0.0.1:8080",
        "localhost:8080",
        "LOCALHOST:8080",
        "[::1]:8080",
        "127.0.0.2:8080",
    ] {
        assert!(hosts.allows(good), "{good}");
    }
    for bad in [
        "127.0.0.1:8081",
        "localhost",
        "evil.example:8080",
        "10.0.0.5:8080",
        "",
        "a b",
    ] {
        assert!(!hosts.allows(bad), "{bad}");
    }
}

#[test]
fn a_wildcard_listener_answers_to_addresses_and_listed_names_only() {
    let hosts = hosts("0.0.0.0:9464", &["renderq.studio.lan"]);
    for good in [
        "10.0.0.5:9464",
        "[fd00::5]:9464",
        "localhost:9464",
        "renderq.studio.lan",
        "RenderQ.Studio.LAN:443",
    ] {
        assert!(hosts.allows(good), "{good}");
    }
    for bad in [
        "10.0.0.5:80",
        "rebound.evil.example:9464",
        "studio.lan:9464",
    ] {
        assert!(!hosts.allows(bad), "{bad}");
    }
    let one = self::hosts("10.0.0.5:8080", &[]);
    assert!(one.allows("10.0.0.5:8080"));
    assert!(!one.allows("10.0.0.6:8080"));
    assert!(!one.allows("localhost:8080"));
}

#[test]
fn a_named_listener_answers_to_its_name() {
    let hosts = hosts("localhost:8080", &[]);
    assert!(hosts.allows("localhost:8080"));
    assert!(hosts.allows("127.0.0.1:8080"));
    assert!(!hosts.allows("evil.example:8080"));
}

#[test]
fn posts_from_other_sites_are_refused_and_say_why() {
    let hosts = hosts("127.0.0.1:8080", &["renderq.studio.lan"]);
    let check = |method: Method, host: &str, headers: &[(&str, &str)]| {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        hosts.check(&method, Some(host), &map)
    };
    let local = "127.0.0.1:8080";
    assert_eq!(check(Method::POST, local, &[]), Ok(()));
    assert_eq!(
        check(Method::POST, local, &[("origin", "http://127.0.0.1:8080")]),
        Ok(())
    );
    assert_eq!(
        check(
            Method::POST,
            "renderq.studio.lan",
            &[("origin", "https://renderq.studio.lan")]
        ),
        Ok(())
    );
    // Behind a proxy that sends its own Host.
    assert_eq!(
        check(
            Method::POST,
            local,
            &[("origin", "https://renderq.studio.lan")]
        ),
        Ok(())
    );
    assert_eq!(
        check(Method::POST, local, &[("sec-fetch-site", "same-origin")]),
        Ok(())
    );
    for origin in [
        "http://evil.example",
        "http://127.0.0.1:9999",
        "https://127.0.0.1:8080.evil.example",
        "null",
        "ftp://127.0.0.1:8080",
    ] {
        assert_eq!(
            check(Method::POST, local, &[("origin", origin)]),
            Err(Refusal::ForeignOrigin(origin.into())),
            "{origin}"
        );
    }
    assert_eq!(
        check(Method::POST, local, &[("sec-fetch-site", "cross-site")]),
        Err(Refusal::CrossSite)
    );
    // Reading is not a cross-site write; the Host rule still holds.
    assert_eq!(
        check(Method::GET, local, &[("origin", "http://evil.example")]),
        Ok(())
    );
    assert_eq!(
        check(Method::GET, "evil.example:8080", &[]),
        Err(Refusal::ForeignHost("evil.example:8080".into()))
    );
    let mut none = HeaderMap::new();
    none.insert(header::ORIGIN, HeaderValue::from_static("http://x"));
    assert_eq!(hosts.check(&Method::GET, None, &none), Err(Refusal::NoHost));
}

/// A router whose one POST route counts the requests that reach it.
fn counting() -> (Router, Arc<AtomicUsize>) {
    let reached = Arc::new(AtomicUsize::new(0));
    let seen = reached.clone();
    let router = Router::new().route(
        "/",
        post(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            async { "done" }
        }),
    );
    (guarded(router, hosts("127.0.0.1:8080", &[])), reached)
}

#[tokio::test]
async fn a_refused_request_never_reaches_its_route() {
    let (router, reached) = counting();
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("host", "rebound.evil.example:8080")], "Host"),
        (
            &[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ],
            "Origin",
        ),
        (
            &[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")],
            "cross-site",
        ),
    ];
    for (headers, reason) in cases {
        let mut request = Request::post("/");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{reason}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(reason), "{reason}: {body}");
    }
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    let request = Request::post("/")
        .header("host", "localhost:8080")
        .header("origin", "http://localhost:8080")
        .body(Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::X_CONTENT_TYPE_OPTIONS],
        "nosniff"
    );
    assert_eq!(reached.load(Ordering::SeqCst), 1);
}
