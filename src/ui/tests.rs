//! The monitor's routes, driven without a socket.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use super::*;
use crate::events::status::StatusTable;
use crate::job::event::{Event, EventType, JobRef};

mod security;

const JOB: &str = "6f2a3d8e-0000-4000-8000-000000000001";
const HOSTILE: &str = "<script>alert('x')</script>";

struct Setup {
    _dir: tempfile::TempDir,
    queues: Queues,
    status: std::path::PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::Config::from_toml(
        r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "q"
listen_queue = "q"
[queues.q]
backend = "local"
path = "q"
"#,
        dir.path(),
    )
    .unwrap();
    let queues = Queues::open(&config.queues).await.unwrap();
    let status = dir.path().join("status.sqlite3");
    let table = StatusTable::open(&status).unwrap();
    let job = JobRef {
        job_id: JOB.into(),
        message_id: JOB.into(),
        queue: "q".into(),
        command: "get_version".into(),
        attempt: 3,
        array: None,
        ..Default::default()
    };
    table
        .apply(&Event::new(
            EventType::JobDeadLettered,
            Some(job),
            json!({"reason": HOSTILE}),
        ))
        .unwrap();
    Setup {
        _dir: dir,
        queues,
        status,
    }
}

fn ui(setup: &Setup, buttons: bool, token: Option<&str>) -> Router {
    let control = buttons.then(|| {
        Control::new(
            setup.queues.clone(),
            Ledgers::default(),
            Default::default(),
            None,
            "q".into(),
            100,
        )
    });
    Ui::new(
        Some(&setup.status),
        setup.queues.clone(),
        Ledgers::default(),
        control,
        token.map(str::to_owned),
    )
    .router()
}

async fn get(
    router: &Router,
    uri: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, Vec<String>) {
    let mut request = Request::get(uri);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let cookies = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), cookies)
}

async fn post(router: &Router, uri: &str, form: &str, cookie: &str) -> StatusCode {
    let request = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::COOKIE, cookie)
        .body(Body::from(form.to_owned()))
        .unwrap();
    router.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn pages_answer_and_escape_what_they_show() {
    let setup = setup().await;
    let router = ui(&setup, true, None);
    for uri in [
        "/ui",
        "/ui/jobs",
        "/ui/dead",
        "/ui/jobs?state=%zz&&=&command",
    ] {
        let (status, _, _) = get(&router, uri, None).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
    }
    // Junk filters nothing.
    let (_, list, _) = get(&router, "/ui/jobs?%%%=&state", None).await;
    assert!(list.contains(JOB), "{list}");
    let (status, page, _) = get(&router, &format!("/ui/jobs/{JOB}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains(HOSTILE), "the reason is escaped");
    assert!(page.contains("&lt;script&gt;"), "{page}");
    let (status, page, _) = get(&router, "/ui/jobs/not-a-job", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("Not found"));
    let (status, _, _) = get(&router, "/ui/thumbnails/q/x/0.jpg", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_post_needs_the_csrf_token_of_its_cookie() {
    let setup = setup().await;
    let router = ui(&setup, true, None);
    let (_, page, cookies) = get(&router, "/ui/dead", None).await;
    let csrf = cookies
        .iter()
        .find_map(|c| c.strip_prefix("renderq_csrf="))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    assert!(
        cookies
            .iter()
            .any(|c| c.contains("HttpOnly") && c.contains("SameSite=Strict"))
    );
    let cookie = format!("renderq_csrf={csrf}");
    let queue = setup.queues.get("q").unwrap();
    queue.send("{}").await.unwrap();
    for form in ["queue=q", "queue=q&csrf=", "queue=q&csrf=wrong"] {
        assert_eq!(
            post(&router, "/ui/redrive", form, &cookie).await,
            StatusCode::FORBIDDEN,
            "{form}"
        );
        assert_eq!(
            post(
                &router,
                "/ui/cancel",
                &format!("job_id={JOB}&{form}"),
                &cookie
            )
            .await,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(queue.stats().await.unwrap().visible, 1, "nothing changed");
    assert!(page.contains("No dead letters."));
    let form = format!("queue=q&csrf={csrf}");
    assert_eq!(
        post(&router, "/ui/redrive", &form, &cookie).await,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn read_only_has_no_buttons_and_takes_no_posts() {
    let setup = setup().await;
    let router = ui(&setup, false, None);
    let (status, page, _) = get(&router, &format!("/ui/jobs/{JOB}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("<form method=\"post\""), "{page}");
    let status = post(&router, "/ui/redrive", "queue=q&csrf=x", "renderq_csrf=x").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn with_a_token_the_monitor_asks_for_it_once() {
    let setup = setup().await;
    let router = ui(&setup, true, Some("s3cret"));
    let (status, _, _) = get(&router, "/ui", None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = get(&router, "/ui", Some("renderq_ui=wrong")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let request = Request::post("/ui/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("token=s3cret"))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let value = cookie.split(';').next().unwrap();
    let (status, _, _) = get(&router, "/ui", Some(value)).await;
    assert_eq!(status, StatusCode::OK);
}
