//! The S3 ledger of array children (on moto, through a proxy that counts
//! and fails its requests): a bounded number of calls per child whatever
//! the array's size, and one completion despite transient errors.
//! Holds by hand on the S3 ledger: a release racing parks sends each
//! message once, and a busy worker reads the holds once a second.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AUDIT_AND_ASSETS, AWS_ENV, Farm, Moto, Server, Settings};

const LONG: Duration = Duration::from_secs(60);

/// A new bucket on the shared moto: its client and name.
async fn shared_bucket(name: &str) -> (aws_sdk_s3::Client, String) {
    let (_, s3) = crate::harness::aws_clients(&Moto::shared().endpoint()).await;
    let bucket = format!("{name}-{}", uuid::Uuid::new_v4().simple());
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    (s3, bucket)
}

/// Asserts that queue `q`'s ledger in `bucket` holds no `releasing/`
/// marker.
async fn no_markers_left(s3: &aws_sdk_s3::Client, bucket: &str) {
    let left = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix("status/q/deps/releasing/")
        .send()
        .await
        .unwrap();
    assert_eq!(left.contents().len(), 0, "{:?}", left.contents());
}

/// A farm on moto whose ledger (the `results` bucket) is reached through
/// the counting proxy: requests whose path holds `needle` are counted, and
/// those after the first `skip` fail `fails` times (`mode`: the proxy's,
/// `slowdown` or `landed`). Returns the farm, the config for its workers and
/// the proxy's count file.
async fn counted_farm(
    moto: &Moto,
    needle: &str,
    skip: u32,
    fails: u32,
    mode: &str,
    slots: u32,
    dir: &Path,
) -> (Farm, std::path::PathBuf, std::path::PathBuf, Server) {
    let farm = Farm::on_moto(
        moto,
        Settings {
            extra_toml: AUDIT_AND_ASSETS.into(),
            worker_toml: format!("slots = {slots}"),
            ..Settings::default()
        },
    )
    .await;
    let count = dir.join("count.json");
    let (proxy, server) = Server::python(
        "tests/fixtures/s3_count_proxy.py",
        &[
            &moto.port.to_string(),
            needle,
            &skip.to_string(),
            &fails.to_string(),
            &count.to_string_lossy(),
            mode,
        ],
    );
    // The bucket's endpoint is the last `endpoint_url` of the config.
    let config = farm.config_variant("proxied", |text| {
        let at = text
            .rfind("endpoint_url = ")
            .expect("the bucket's endpoint");
        let end = at + text[at..].find('\n').unwrap();
        format!("{}endpoint_url = \"{proxy}\"{}", &text[..at], &text[end..])
    });
    (farm, config, count, server)
}

fn counted(count: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(count).unwrap_or_else(|_| "{}".into()))
        .expect("the proxy's count")
}

async fn submit_array(farm: &Farm, frames: &str) -> String {
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "frames": frames}),
        )
        .await;
    reply["result"]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_owned()
}

fn completions(farm: &Farm) -> Vec<Value> {
    farm.events()
        .into_iter()
        .filter(|e| e["type"] == "ArrayJobCompleted")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn four_workers_settle_2000_children_with_a_bounded_number_of_s3_calls_each() {
    const CHILDREN: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    // Its own moto: the other tests' traffic would slow it down (moto's
    // queues cost more with more messages in them).
    let moto = Moto::start_on(crate::harness::free_port());
    let (farm, config, count, _proxy) =
        counted_farm(&moto, "/arrays/", 0, 0, "slowdown", 4, dir.path()).await;
    let _serve = farm.serve_with(&AWS_ENV, &config).await;
    let job_id = submit_array(&farm, &format!("1-{CHILDREN}")).await;
    // serve runs a worker too: with these, four.
    let workers: Vec<_> = (0..3)
        .map(|_| farm.spawn_with("worker", &AWS_ENV, &config))
        .collect();
    // Progress every 10 s, for a run that is slow to finish.
    let mut done = completions(&farm);
    for _ in 0..60 {
        if !done.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let ended = farm
            .events()
            .iter()
            .filter(|e| e["type"] == "JobSucceeded")
            .count();
        println!(
            "children succeeded: {ended}; ledger calls: {}",
            counted(&count)
        );
        done = completions(&farm);
    }
    assert_eq!(done.len(), 1, "one ArrayJobCompleted");
    assert_eq!(done[0]["job_id"], job_id.as_str());
    assert_eq!(
        done[0]["detail"],
        json!({"size": CHILDREN, "succeeded": CHILDREN, "dead_lettered": 0, "cancelled": 0})
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(completions(&farm).len(), 1);
    drop(workers);

    let calls = counted(&count);
    let requests = calls["requests"].as_u64().unwrap();
    let per_child = requests as f64 / CHILDREN as f64;
    println!(
        "S3 ledger calls for {CHILDREN} children settled by 4 workers × 4 slots: {calls} ({per_child:.2} per child)"
    );
    // At most one GET and one PUT per child (settles that meet in one
    // worker share them), and one more of each for a write that lost a
    // race. Listing the array (a GET on the bucket, not under arrays/) was
    // what made it grow with the array's size.
    assert!(
        per_child <= 4.0,
        "{per_child:.2} calls per child (bound: 4)"
    );
}

/// A three-child array on one slot, its ledger requests failed by the
/// proxy (`skip`, `fails`, `mode`): it completes once, every injected
/// failure met, and no child ran twice.
async fn three_children_complete_once(skip: u32, fails: u32, mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (farm, config, count, _proxy) =
        counted_farm(Moto::shared(), "/arrays/", skip, fails, mode, 1, dir.path()).await;
    let _serve = farm.serve_with(&AWS_ENV, &config).await;
    let job_id = submit_array(&farm, "1-3").await;
    let _worker = farm.spawn_with("worker", &AWS_ENV, &config);
    let done = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert_eq!(done[0]["job_id"], job_id.as_str());
    assert_eq!(
        done[0]["detail"],
        json!({"size": 3, "succeeded": 3, "dead_lettered": 0, "cancelled": 0})
    );
    assert_eq!(
        counted(&count)["failed"],
        fails,
        "every injected failure was met"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(completions(&farm).len(), 1);
    let succeeded = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "JobSucceeded")
        .count();
    assert_eq!(succeeded, 3, "no child ran twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_childs_ledger_write_failing_twice_still_completes_the_array_once() {
    // After the first four ledger requests, the next six fail: two writes,
    // each failing all of the SDK's three attempts.
    three_children_complete_once(4, 6, "slowdown").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claiming_write_that_landed_but_answered_an_error_still_completes_the_array() {
    // The write that claims the completion reaches moto, but the worker is
    // answered 503: the SDK's retry finds the ETag it replaced itself.
    three_children_complete_once(0, 1, "landed").await;
}

/// A hold by hand on the S3 ledger, as three processes see it: messages
/// parked while two releasers race them are each sent exactly once, by a
/// release or by the worker that parked it (which then hands it back),
/// and none is left held. Five rounds, for the races to fall differently.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_racing_parks_on_s3_sends_each_message_once() {
    use renderq::events::ledger::Ledger;
    let (s3, bucket) = shared_bucket("holds").await;
    let ledger = || Ledger::s3(s3.clone(), bucket.clone(), "status", "q");
    let (a, b, c) = (ledger(), ledger(), ledger());
    for _ in 0..5 {
        let job = &uuid::Uuid::new_v4().to_string();
        assert!(a.hold_by_hand(job).await.unwrap());
        assert!(!b.hold_by_hand(job).await.unwrap());
        assert_eq!(
            b.held_by_hand(vec!["x".into(), job.clone()]).await.unwrap(),
            Some(job.clone())
        );
        for index in 0..10 {
            assert!(
                a.park(job, job, 40, index, format!("m{index}"))
                    .await
                    .unwrap()
            );
        }
        // Parks of 10..40, one every 2 ms, while two releasers race them.
        let parks = futures_util::future::join_all((10..40).map(|index| {
            let a = a.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2 * u64::from(index - 10))).await;
                (
                    index,
                    a.park(job, job, 40, index, format!("m{index}")).await,
                )
            }
        }));
        let release = |ledger: Ledger| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ledger.release_by_hand(job).await
        };
        let (parked, first, second) = tokio::join!(parks, release(b.clone()), release(c.clone()));
        let mut sent: Vec<u32> = [first.unwrap(), second.unwrap()]
            .into_iter()
            .flatten()
            .flatten()
            .map(|freed| {
                assert_eq!(freed.body, format!("m{}", freed.index));
                assert_eq!(freed.by, "hand");
                freed.index
            })
            .collect();
        // A park that says false leaves the message with its worker.
        sent.extend(
            parked
                .into_iter()
                .filter_map(|(index, parked)| (!parked.unwrap()).then_some(index)),
        );
        sent.sort_unstable();
        assert_eq!(sent, (0..40).collect::<Vec<u32>>(), "each message once");
        // Released: nothing is held any more, and a park now says so.
        assert_eq!(
            ledger().held_by_hand(vec![job.clone()]).await.unwrap(),
            None
        );
        assert!(!a.park(job, job, 40, 3, "m3".into()).await.unwrap());
        assert!(ledger().release_by_hand(job).await.unwrap().is_none());
    }
}

/// A busy worker checks each message it receives against the holds by
/// hand, on S3 through one LIST of `deps/hand/` a second (shared by its
/// slots), not a call per message.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_worker_reads_the_holds_once_a_second_not_once_a_message() {
    const CHILDREN: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let (farm, config, count, _proxy) =
        counted_farm(Moto::shared(), "hand", 0, 0, "slowdown", 4, dir.path()).await;
    let _serve = farm.serve_with(&AWS_ENV, &config).await;
    let started = std::time::Instant::now();
    submit_array(&farm, &format!("1-{CHILDREN}")).await;
    let deadline = started + Duration::from_secs(120);
    while completions(&farm).is_empty() {
        assert!(std::time::Instant::now() < deadline, "not completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests = counted(&count)["requests"].as_u64().unwrap_or(0);
    println!(
        "holds read for {CHILDREN} children by one worker × 4 slots in {seconds:.1} s: \
         {requests} S3 calls ({:.3} per child)",
        requests as f64 / CHILDREN as f64
    );
    assert!(requests >= 1, "the holds were never read");
    assert!(
        requests as f64 <= seconds.ceil() + 1.0,
        "{requests} calls in {seconds:.1} s"
    );
}

/// A `same` dependant released on the S3 ledger: the parent child's
/// settle finds the children in its edges' keys (no GET of an edge), and
/// after the send their markers are deleted by key (no LIST): six calls
/// per released child. A unit settled twice writes a spare marker beside
/// its read and deletes it; children too scattered for a key are read
/// from the edge's body; no marker is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_child_costs_six_s3_calls_one_after_its_parents_end_and_leaves_no_marker() {
    use renderq::events::ledger::{ChildState, Fate, Ledger, ToHold, Wait};
    const CHILDREN: u32 = 10;
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::shared();
    let count = dir.path().join("count.json");
    let (proxy, _server) = Server::python(
        "tests/fixtures/s3_count_proxy.py",
        &[
            &moto.port.to_string(),
            "deps",
            "0",
            "0",
            &count.to_string_lossy(),
            "slowdown",
        ],
    );
    let (_, s3) = crate::harness::aws_clients(&proxy).await;
    let bucket = format!("edges-{}", uuid::Uuid::new_v4().simple());
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let ledger = || Ledger::s3(s3.clone(), bucket.clone(), "status", "q");
    let (a, b) = (ledger(), ledger());
    let wait = |parent: &str, index| Wait {
        parent_id: parent.into(),
        index,
        on_finish: false,
        queue: None,
    };
    let entry = |index, waits| ToHold {
        index,
        body: format!("m{index}"),
        waits,
    };
    a.register_job("p", CHILDREN, Some(format!("1-{CHILDREN}")), 1)
        .await
        .unwrap();
    let entries = (0..CHILDREN)
        .map(|i| entry(i, vec![wait("p", Some(i))]))
        .collect();
    let fates = a.hold("d", CHILDREN, entries, false).await.unwrap();
    assert_eq!(fates, vec![Fate::Held(1); CHILDREN as usize]);
    let requests = || counted(&count)["requests"].as_u64().unwrap_or(0);
    let before = requests();
    for index in 0..CHILDREN {
        let ended = ChildState::Succeeded;
        a.children_settled("p", CHILDREN, vec![index], ended)
            .await
            .unwrap();
        // Read (and marked) while the parent child's message is settled;
        // after its end, one write (the claim) before the send.
        let read = a.read_ends("p", CHILDREN, vec![index], ended).await;
        let reads_done = requests();
        let (ended, full) = a.spend_ends(read).await.unwrap();
        assert_eq!(requests() - reads_done, 1, "S3 calls after the reads");
        let mut freed = ended.freed;
        // The first settle lists the parent's edges, and the ledger keeps
        // them: the later ones read from them, then list to find any
        // edge added since (none here).
        assert_eq!(full.is_some(), index > 0, "child {index}");
        if let Some(full) = full {
            let (more, again) = a.spend_ends(full).await.unwrap();
            assert!(more.freed.is_empty() && again.is_none(), "{more:?}");
            freed.extend(more.freed);
        }
        assert_eq!(freed.len(), 1, "{freed:?}");
        assert_eq!((freed[0].job_id.as_str(), freed[0].index), ("d", index));
        assert_eq!(freed[0].body, format!("m{index}"));
        a.holds_done(freed).await.unwrap();
    }
    let spent = requests() - before;
    assert!(
        spent <= 6 * u64::from(CHILDREN),
        "{spent} S3 calls for {CHILDREN} released children"
    );
    // The same units again, from another worker: nothing freed twice.
    for index in 0..CHILDREN {
        let again = b
            .units_ended("p", CHILDREN, vec![index], ChildState::Succeeded)
            .await
            .unwrap()
            .freed;
        assert!(again.is_empty(), "{again:?}");
    }
    // Every other child of `w` waits for plain job `j`: too scattered to
    // name in a key.
    a.register_job("j", 0, None, 1).await.unwrap();
    let entries = (0..300)
        .map(|i| entry(2 * i, vec![wait("j", None)]))
        .collect();
    a.hold("w", 600, entries, false).await.unwrap();
    let mut freed = a
        .units_ended("j", 0, Vec::new(), ChildState::Succeeded)
        .await
        .unwrap()
        .freed;
    freed.sort_by_key(|f| f.index);
    assert_eq!(
        freed.iter().map(|f| f.index).collect::<Vec<_>>(),
        (0..300).map(|i| 2 * i).collect::<Vec<_>>()
    );
    a.holds_done(freed).await.unwrap();
    no_markers_left(&s3, &bucket).await;
}

/// A settle reads from the edges its ledger keeps (listed by the parent's
/// first settle in this process) before any LIST; the full read after it
/// finds what was added since: a second `same` dependant and a `whole`
/// one, each released once.
#[tokio::test(flavor = "multi_thread")]
async fn dependants_submitted_after_a_parents_edges_were_kept_are_released_once() {
    use renderq::events::ledger::{ChildState, Fate, Ledger, ToHold, Wait};
    let (s3, bucket) = shared_bucket("kept").await;
    let ledger = Ledger::s3(s3.clone(), bucket.clone(), "status", "q");
    let wait = |index| Wait {
        parent_id: "p".into(),
        index,
        on_finish: false,
        queue: None,
    };
    let same = |job: &str| {
        let entries = (0..3)
            .map(|index| ToHold {
                index,
                body: format!("{job}{index}"),
                waits: vec![wait(Some(index))],
            })
            .collect();
        (job.to_owned(), entries)
    };
    ledger
        .register_job("p", 3, Some("1-3".into()), 1)
        .await
        .unwrap();
    let (job, entries) = same("d");
    let fates = ledger.hold(&job, 3, entries, false).await.unwrap();
    assert_eq!(fates, vec![Fate::Held(1); 3]);
    // Settles the way a worker does: reads, spends, and spends the full
    // read it is handed; the bodies it freed.
    let settle = |index: u32| {
        let ledger = &ledger;
        async move {
            let state = ChildState::Succeeded;
            ledger
                .children_settled("p", 3, vec![index], state)
                .await
                .unwrap();
            let mut next = Some(ledger.read_ends("p", 3, vec![index], state).await);
            let (mut bodies, mut spends) = (Vec::new(), 0);
            while let Some(read) = next.take() {
                let (ended, full) = ledger.spend_ends(read).await.unwrap();
                spends += 1;
                bodies.extend(ended.freed.iter().map(|f| f.body.clone()));
                ledger.holds_done(ended.freed).await.unwrap();
                next = full;
            }
            bodies.sort();
            (bodies, spends)
        }
    };
    assert_eq!(settle(0).await, (vec!["d0".to_owned()], 1), "listed");
    // Added after the ledger kept p's edges (its child 0 is sent at once:
    // its parent frame ended).
    let (job, entries) = same("e");
    let fates = ledger.hold(&job, 3, entries, false).await.unwrap();
    assert_eq!(fates, [Fate::Send, Fate::Held(1), Fate::Held(1)]);
    let whole = ToHold {
        index: 0,
        body: "w".into(),
        waits: vec![wait(None)],
    };
    ledger.hold("w", 0, vec![whole], false).await.unwrap();
    assert_eq!(settle(1).await, (vec!["d1".into(), "e1".into()], 2));
    assert_eq!(
        settle(2).await,
        (vec!["d2".into(), "e2".into(), "w".into()], 2)
    );
    // Nothing is freed twice.
    for index in 0..3 {
        assert!(settle(index).await.0.is_empty());
    }
}

/// The sweep on S3, against settles that stop part-way (as workers that
/// died or stalled): a reader that dropped its read after its marker was
/// written (died between its parent's end and the claim) has the sweep
/// release its dependant, also where its spend would not have freed it (a
/// child waiting for two units, the other spent since); a reader slower
/// than the grace loses its claim to the sweep; a claim that landed late is
/// not taken from its claimer until the claim itself is older than the
/// grace. Each dependant freed once, no marker left.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_releases_what_a_settle_left_before_or_after_its_claim_once() {
    use renderq::events::ledger::{ChildState, EndsRead, Ledger, ToHold, Wait};
    let (s3, bucket) = shared_bucket("swept").await;
    let ledger = Ledger::s3(s3.clone(), bucket.clone(), "status", "q");
    let grace = Duration::from_secs(1);
    // Markers' and claims' times are whole seconds: past the grace.
    let age = || tokio::time::sleep(Duration::from_millis(2_200));
    ledger
        .register_job("p", 5, Some("1-5".into()), 1)
        .await
        .unwrap();
    // Child 3 waits for parent children 3 and 4, the others for their own.
    let wait = |index| Wait {
        parent_id: "p".into(),
        index: Some(index),
        on_finish: false,
        queue: None,
    };
    let entries = (0..4)
        .map(|index| ToHold {
            index,
            body: format!("d{index}"),
            waits: if index == 3 {
                vec![wait(3), wait(4)]
            } else {
                vec![wait(index)]
            },
        })
        .collect();
    ledger.hold("d", 4, entries, false).await.unwrap();
    let mut reads = Vec::new();
    for index in 0..5 {
        let state = ChildState::Succeeded;
        (ledger.children_settled("p", 5, vec![index], state))
            .await
            .unwrap();
        reads.push(ledger.read_ends("p", 5, vec![index], state).await);
    }
    // Spends a read as a settle does; the indexes it freed.
    let spend = |read: EndsRead| {
        let ledger = &ledger;
        async move {
            let (mut next, mut freed) = (Some(read), Vec::new());
            while let Some(read) = next.take() {
                let (ended, full) = ledger.spend_ends(read).await.unwrap();
                freed.extend(ended.freed);
                next = full;
            }
            freed
        }
    };
    let indexes = |freed: &[renderq::events::ledger::Freed]| {
        let mut indexes: Vec<u32> = freed.iter().map(|f| f.index).collect();
        indexes.sort_unstable();
        indexes
    };
    // Parent child 4's settle spends one of child 3's waits; the reader
    // of parent child 3 died after its reads, as did child 0's.
    assert!(spend(reads.pop().unwrap()).await.is_empty());
    drop(reads.pop());
    let (late, slow) = (reads.pop().unwrap(), reads.pop().unwrap());
    drop(reads);
    age().await;
    // Child 2's claim lands now, its marker older than the grace.
    let claimed = spend(late).await;
    assert_eq!(indexes(&claimed), [2]);
    let swept = ledger.stale_holds(grace).await.unwrap();
    assert_eq!(indexes(&swept), [0, 1, 3], "{swept:?}");
    assert!(swept.iter().all(|f| f.body == format!("d{}", f.index)));
    // Child 1's slow reader lost its claim to the sweep.
    assert!(spend(slow).await.is_empty());
    ledger.holds_done(swept).await.unwrap();
    assert!(ledger.stale_holds(grace).await.unwrap().is_empty());
    // Child 2's claimer died before its send: once its claim is old.
    age().await;
    let swept = ledger.stale_holds(grace).await.unwrap();
    assert_eq!(indexes(&swept), [2], "{swept:?}");
    assert_eq!(swept[0].claim, claimed[0].claim);
    ledger.holds_done(swept).await.unwrap();
    assert!(ledger.stale_holds(grace).await.unwrap().is_empty());
    no_markers_left(&s3, &bucket).await;
}
