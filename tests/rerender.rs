//! Names, owners and metadata (in events, the status table, `renderq
//! status` and the monitor's filtered lists), and re-rendering chosen
//! frames of an array as a new revision (issue 27, must-show 7), on both
//! backends; bad input refused naming the field.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AUDIT_AND_ASSETS, Backend, Farm, Settings};

scenarios!(
    rerendering_frames_3_and_7_of_a_finished_array_makes_revision_2,
    names_owners_and_metadata_travel_with_the_job,
    bad_names_and_rerenders_are_refused_naming_the_field,
);

const LONG: Duration = Duration::from_secs(60);

fn settings() -> Settings {
    Settings {
        extra_toml: AUDIT_AND_ASSETS.into(),
        queue_manager_toml: "max_name_bytes = 40\nmax_metadata_entries = 3".into(),
        ..Settings::default()
    }
}

/// The reply's error `data.field` and message, or the result.
fn refused(reply: &Value) -> (i64, String, String) {
    let error = &reply["error"];
    assert!(!error.is_null(), "not refused: {reply}");
    (
        error["code"].as_i64().unwrap(),
        error["data"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        error["message"].as_str().unwrap_or_default().to_owned(),
    )
}

fn of_array<'a>(events: &'a [Value], array_id: &str, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| {
            e["type"] == kind && (e["job_id"] == array_id || e["array"]["job_id"] == array_id)
        })
        .collect()
}

async fn get_page(farm: &Farm, path: &str) -> String {
    // With a CSRF cookie, as a browser that was here before has.
    let response = reqwest::Client::new()
        .get(format!("{}{path}", farm.url()))
        .header("cookie", "renderq_csrf=t0k3n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.text().await.unwrap()
}

/// The grid's cell of `frame`: its state and revision.
fn cell(page: &str, frame: i64) -> (String, String) {
    let at = page
        .find(&format!("data-frame=\"{frame}\" data-revision="))
        .unwrap_or_else(|| panic!("no cell of frame {frame} with a revision in {page}"));
    let before = &page[..at];
    let state = before.rsplit("data-state=\"").next().unwrap();
    let state = state[..state.find('"').unwrap()].to_owned();
    let after = &page[at..];
    let revision = after.split("data-revision=\"").nth(1).unwrap();
    (state, revision[..revision.find('"').unwrap()].to_owned())
}

async fn rerendering_frames_3_and_7_of_a_finished_array_makes_revision_2(backend: Backend) {
    let farm = Farm::new(backend, settings()).await;
    let _serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({
                "command": "render_demo",
                "parameters": {"width": 32, "height": 24, "samples": 1},
                "frames": "1-8",
                "name": "shot010_lighting_v3",
                "tasks": [{"name": "s3_upload", "config": {"bucket": "results",
                           "key": "shots/${job_id}/${frame}.${mime_ext}"}}],
            }),
        )
        .await;
    let array_id = reply["result"]["job_id"]
        .as_str()
        .expect("an array")
        .to_owned();
    let is_completion = |e: &Value| e["type"] == "ArrayJobCompleted" && e["job_id"] == array_id;
    farm.wait_for_events(is_completion, 1, LONG).await;
    let first_runs = of_array(&farm.events(), &array_id, "JobSucceeded").len();
    assert_eq!(first_runs, 8);

    let reply = farm
        .rpc(
            "queue_manager_rerender",
            json!({"job_id": array_id, "frames": "3,7"}),
        )
        .await;
    let result = &reply["result"];
    assert_eq!(result["revision"], 2, "{reply}");
    assert_eq!(result["frames"], "3,7");
    let message_ids: Vec<String> = result["message_ids"]
        .as_array()
        .expect("message ids")
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(message_ids.len(), 2);

    let completions = farm
        .wait_for_events(
            |e| is_completion(e) && e["detail"]["revision"] == 2,
            1,
            LONG,
        )
        .await;
    assert_eq!(completions[0]["detail"]["size"], 2);
    assert_eq!(completions[0]["detail"]["succeeded"], 2);
    assert_eq!(completions[0]["name"], "shot010_lighting_v3");
    // Two new runs, frames 3 and 7, with the array's own parameters.
    let events = farm.events();
    let again: Vec<&Value> = of_array(&events, &array_id, "JobSucceeded")
        .into_iter()
        .filter(|e| e["array"]["revision"] == 2)
        .collect();
    let mut frames: Vec<Value> = again.iter().map(|e| e["array"]["frames"].clone()).collect();
    frames.sort_by_key(|f| f[0].as_i64());
    assert_eq!(frames, [json!([3]), json!([7])]);
    assert_eq!(of_array(&events, &array_id, "JobSucceeded").len(), 10);
    for frame in [3, 7] {
        assert!(
            farm.object(&format!("shots/{array_id}/{frame}.png"))
                .await
                .is_some()
        );
    }

    // The status table: those frames' newest children are revision 2, and
    // the array is completed in its revision 2, every frame succeeded.
    for message_id in &message_ids {
        let status = farm.final_status(message_id).await;
        assert_eq!(status["result"]["revision"], 2, "{status}");
        assert_eq!(status["result"]["state"], "succeeded", "{status}");
    }
    let array = farm.final_status(&array_id).await;
    let array = &array["result"];
    assert_eq!(
        (
            &array["revision"],
            &array["completed"],
            &array["succeeded"],
            &array["size"]
        ),
        (&json!(2), &json!(true), &json!(8), &json!(8)),
        "{array}"
    );

    // The grid: frames 3 and 7 at revision 2, the others at 1.
    let page = get_page(&farm, &format!("ui/jobs/{array_id}")).await;
    for frame in 1..=8 {
        let revision = if frame == 3 || frame == 7 { "2" } else { "1" };
        assert_eq!(
            cell(&page, frame),
            ("succeeded".to_owned(), revision.to_owned()),
            "frame {frame}"
        );
    }
    assert!(page.contains("Re-render"), "{page}");

    // The monitor's button: frame 5 ticked, with the CSRF token.
    let form = format!("csrf=t0k3n&job_id={array_id}&frame=5");
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}ui/rerender", farm.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", "renderq_csrf=t0k3n")
        .body(form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    farm.wait_for_events(
        |e| is_completion(e) && e["detail"]["revision"] == 3,
        1,
        LONG,
    )
    .await;
    // Without the token's cookie nothing is sent.
    let forged = reqwest::Client::new()
        .post(format!("{}ui/rerender", farm.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let page = get_page(&farm, &format!("ui/jobs/{array_id}")).await;
    assert_eq!(cell(&page, 5).1, "3");
    farm.wait_until_drained(LONG).await;
    // Each revision completed exactly once.
    let events = farm.events();
    let mut revisions: Vec<i64> = of_array(&events, &array_id, "ArrayJobCompleted")
        .iter()
        .map(|e| e["detail"]["revision"].as_i64().unwrap_or(1))
        .collect();
    revisions.sort_unstable();
    assert_eq!(revisions, [1, 2, 3]);
}

async fn names_owners_and_metadata_travel_with_the_job(backend: Backend) {
    let farm = Farm::new(backend, settings()).await;
    let _serve = farm.serve(&[]).await;
    let labelled = farm
        .submit(json!({
            "command": "get_version",
            "name": "shot010_lighting_v3",
            "owner": "ana",
            "metadata": {"project": "orchard", "shot": "010"},
        }))
        .await;
    let other = farm
        .submit(
            json!({"command": "get_version", "name": "shot020_comp_v1", "owner": "ben",
                       "metadata": {"project": "harbour"}}),
        )
        .await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "sleep", "parameters": {"seconds": 0}, "frames": "1-3",
                   "name": "shot010_sim", "owner": "ana", "metadata": {"project": "orchard"}}),
        )
        .await;
    let array_id = reply["result"]["job_id"]
        .as_str()
        .expect("an array")
        .to_owned();
    farm.wait_for_events(
        |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == array_id,
        1,
        LONG,
    )
    .await;
    farm.wait_for_events(
        |e| {
            e["type"] == "JobSucceeded" && (e["message_id"] == labelled || e["message_id"] == other)
        },
        2,
        LONG,
    )
    .await;

    // Every event of the job names it.
    let events = farm.events();
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["message_id"] == labelled.as_str())
        .collect();
    let kinds: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in ["JobSubmitted", "JobStarted", "JobSucceeded"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    for event in &mine {
        assert_eq!(event["name"], "shot010_lighting_v3", "{event}");
        assert_eq!(event["owner"], "ana", "{event}");
        assert_eq!(
            event["metadata"],
            json!({"project": "orchard", "shot": "010"}),
            "{event}"
        );
    }
    for event in of_array(&events, &array_id, "JobSucceeded")
        .into_iter()
        .chain(of_array(&events, &array_id, "ArrayJobCompleted"))
    {
        assert_eq!(event["name"], "shot010_sim", "{event}");
    }

    // The status table, over JSON-RPC and `renderq status`.
    let status = farm
        .rpc("queue_manager_job_status", json!({"job_id": labelled}))
        .await;
    assert_eq!(status["result"]["name"], "shot010_lighting_v3", "{status}");
    assert_eq!(status["result"]["owner"], "ana");
    assert_eq!(status["result"]["metadata"]["shot"], "010");
    let (code, out, err) = farm.cli(&["status", &labelled]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("job shot010_lighting_v3\t"), "{out}");
    assert!(
        out.contains("owner=ana") && out.contains("project=orchard"),
        "{out}"
    );
    let (code, out, err) = farm.cli(&["status", &array_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("array shot010_sim\t"), "{out}");

    // The monitor's lists, filtered by name, owner and a metadata value;
    // names shown, not only ids.
    let list = |query: &'static str| get_page(&farm, query);
    let all = list("ui/jobs").await;
    assert!(all.contains("shot010_lighting_v3") && all.contains("shot020_comp_v1"));
    assert!(all.contains("shot010_sim"));
    let by_name = list("ui/jobs?name=shot010_lighting_v3").await;
    assert!(by_name.contains("shot010_lighting_v3"), "{by_name}");
    assert!(!by_name.contains("shot020_comp_v1") && !by_name.contains("shot010_sim"));
    let by_owner = list("ui/jobs?owner=ana").await;
    assert!(by_owner.contains("shot010_lighting_v3") && by_owner.contains("shot010_sim"));
    assert!(!by_owner.contains("shot020_comp_v1"), "{by_owner}");
    let by_value = list("ui/jobs?meta=project%3Dharbour").await;
    assert!(by_value.contains("shot020_comp_v1"), "{by_value}");
    assert!(!by_value.contains("shot010_lighting_v3") && !by_value.contains("shot010_sim"));
    let both = list("ui/jobs?owner=ana&meta=shot%3D010").await;
    assert!(
        both.contains("shot010_lighting_v3") && !both.contains("shot010_sim"),
        "{both}"
    );
}

async fn bad_names_and_rerenders_are_refused_naming_the_field(backend: Backend) {
    let farm = Farm::new(backend, settings()).await;
    let _serve = farm.serve(&[]).await;
    let submit = |extra: Value| {
        let mut job = json!({"command": "get_version"});
        job.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        farm.rpc("queue_manager_submit_job", job)
    };
    for (extra, field) in [
        (json!({"name": "n".repeat(41)}), "name"),
        (json!({"name": "two\nlines"}), "name"),
        (json!({"owner": ""}), "owner"),
        (
            json!({"metadata": {"a": "1", "b": "2", "c": "3", "d": "4"}}),
            "metadata",
        ),
        (
            json!({"metadata": {"shot": "v".repeat(41)}}),
            "metadata.shot",
        ),
        (json!({"metadata": {"shot": 10}}), "metadata.shot"),
    ] {
        let (code, named, message) = refused(&submit(extra.clone()).await);
        assert_eq!(
            (code, named.as_str()),
            (-32602, field),
            "{extra}: {message}"
        );
    }

    let plain = farm.submit(json!({"command": "get_version"})).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "sleep", "parameters": {"seconds": 0}, "frames": "1-10x3"}),
        )
        .await;
    let array_id = reply["result"]["job_id"].as_str().unwrap().to_owned();
    let rerender = |job_id: String, frames: &str| {
        farm.rpc(
            "queue_manager_rerender",
            json!({"job_id": job_id, "frames": frames}),
        )
    };
    // Once the status table knows the plain job, a re-render of it says
    // that it is no array.
    let deadline = std::time::Instant::now() + LONG;
    while farm
        .rpc("queue_manager_job_status", json!({"job_id": plain}))
        .await["result"]
        .is_null()
    {
        assert!(std::time::Instant::now() < deadline, "the job never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    for (job_id, frames, field, says) in [
        (unknown.clone(), "1", "job_id", unknown.as_str()),
        (plain.clone(), "1", "job_id", "is a job, not an array"),
        ("not-an-id".to_owned(), "1", "job_id", ""),
        (array_id.clone(), "4,5", "frames", "frame 5"),
        (array_id.clone(), "11", "frames", "frame 11"),
        (array_id.clone(), "x", "frames", ""),
    ] {
        let (code, named, message) = refused(&rerender(job_id, frames).await);
        assert_eq!(
            (code, named.as_str()),
            (-32602, field),
            "{frames}: {message}"
        );
        assert!(message.contains(says), "{message} names {says}");
    }
    // Nothing was sent for them: the array completes once, revision 1.
    farm.wait_until_drained(LONG).await;
    let completions = of_array(&farm.events(), &array_id, "ArrayJobCompleted").len();
    assert_eq!(completions, 1);
    let (code, _, err) = farm.cli(&["rerender", &array_id, "--frames", "4"]);
    assert_eq!(code, 0, "{err}");
    farm.wait_for_events(
        |e| {
            e["type"] == "ArrayJobCompleted"
                && e["job_id"] == array_id
                && e["detail"]["revision"] == 2
        },
        1,
        LONG,
    )
    .await;
}

/// On the embedded queue a cancel deletes the queued children of every
/// revision and counts each in its own revision: the submit's and the
/// re-render's each complete once, all cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn cancelling_an_array_with_a_queued_revision_completes_each_revision_once() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            // serve's own worker listens elsewhere: the children stay queued.
            worker_toml: "listen_queues = [\"idle\"]".into(),
            extra_toml: format!(
                "{AUDIT_AND_ASSETS}\n[queues.idle]\nbackend = \"local\"\npath = \"idle\"\n"
            ),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "sleep", "parameters": {"seconds": 0}, "frames": "1-4"}),
        )
        .await;
    let array_id = reply["result"]["job_id"].as_str().unwrap().to_owned();
    let reply = farm
        .rpc(
            "queue_manager_rerender",
            json!({"job_id": array_id, "frames": "2,4"}),
        )
        .await;
    assert_eq!(reply["result"]["revision"], 2, "{reply}");
    let (code, out, err) = farm.cli(&["cancel", &array_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&array_id), "{out}");
    let completions = farm
        .wait_for_events(
            |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == array_id,
            2,
            LONG,
        )
        .await;
    let mut details: Vec<(i64, i64, i64)> = completions
        .iter()
        .map(|e| {
            let d = &e["detail"];
            (
                d["revision"].as_i64().unwrap_or(1),
                d["size"].as_i64().unwrap(),
                d["cancelled"].as_i64().unwrap(),
            )
        })
        .collect();
    details.sort_unstable();
    assert_eq!(details, [(1, 4, 4), (2, 2, 2)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        of_array(&farm.events(), &array_id, "ArrayJobCompleted").len(),
        2
    );
}
