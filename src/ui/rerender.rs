//! The array page's Re-render button: the frames selected in the grid (and
//! any typed as a spec) sent again through the submit half's
//! [`Submitter::rerender`], behind the same CSRF check as every other POST.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::CookieJar;

use super::Ui;
use super::auth::csrf_ok;
use crate::api::rerender::RerenderRequest;
use crate::api::submit::Submitter;

/// Longest form a re-render reads: a page's boxes, a spec, the ids.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// What the form sent: `csrf`, `job_id`, a `frame` per box ticked, and
/// `frames` (a spec, may be empty).
#[derive(Debug, Default, PartialEq)]
struct RerenderForm {
    csrf: String,
    job_id: String,
    frames: Vec<String>,
}

impl RerenderForm {
    fn parse(body: &[u8]) -> Self {
        let mut form = RerenderForm::default();
        for (key, value) in form_urlencoded::parse(body) {
            match key.as_ref() {
                "csrf" => form.csrf = value.into_owned(),
                "job_id" => form.job_id = value.into_owned(),
                "frame" | "frames" if !value.trim().is_empty() => {
                    form.frames.push(value.trim().to_owned())
                }
                _ => {}
            }
        }
        form
    }
}

pub(super) async fn rerender(
    State(ui): State<Ui>,
    jar: CookieJar,
    body: axum::body::Bytes,
) -> Response {
    if body.len() > MAX_FORM_BYTES {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let form = RerenderForm::parse(&body);
    if !csrf_ok(&jar, &form.csrf) {
        return super::forbidden();
    }
    let Some(submitter) = ui.rerender.as_ref() else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    if form.frames.is_empty() {
        return (StatusCode::BAD_REQUEST, "frames: select at least one frame").into_response();
    }
    let request = RerenderRequest {
        job_id: form.job_id,
        frames: form.frames.join(","),
    };
    match Submitter::rerender(submitter, request).await {
        Ok(done) => {
            tracing::info!(array_id = %done.job_id, revision = done.revision, frames = %done.frames, "Re-rendered from the monitor.");
            Redirect::to(&format!("/ui/jobs/{}", done.job_id)).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticked_boxes_and_a_typed_spec_make_one_list() {
        let form = RerenderForm::parse(b"csrf=t&job_id=a&frame=3&frame=7&frames=40-45&frames=");
        assert_eq!(
            form,
            RerenderForm {
                csrf: "t".into(),
                job_id: "a".into(),
                frames: vec!["3".into(), "7".into(), "40-45".into()],
            }
        );
    }
}
