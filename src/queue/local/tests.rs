use super::*;
use crate::queue::Stats;

async fn queue(dir: &tempfile::TempDir, max_receive_count: u32) -> LocalQueue {
    let config = LocalQueueConfig {
        path: dir.path().to_owned(),
        max_receive_count,
        input_buckets: None,
    };
    LocalQueue::open("test", &config).await.unwrap()
}

const VIS: Duration = Duration::from_secs(30);
const NO_WAIT: Duration = Duration::ZERO;
static NEVER: std::sync::LazyLock<CancellationToken> =
    std::sync::LazyLock::new(CancellationToken::new);

#[tokio::test]
async fn received_message_is_hidden_until_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    let id = q.send("hello").await.unwrap();
    let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    assert_eq!(
        (got.message_id.as_str(), got.body.as_str()),
        (id.as_str(), "hello")
    );
    assert_eq!(got.receive_count, 1);
    assert!(q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().is_none());
    q.delete(&got.receipt).await.unwrap();
    assert_eq!(
        q.stats().await.unwrap(),
        Stats {
            visible: 0,
            in_flight: 0,
            dead_lettered: 0
        }
    );
}

#[tokio::test]
async fn stale_receipt_is_refused_after_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 5).await;
    q.send("x").await.unwrap();
    let first = q
        .receive(NO_WAIT, Duration::from_millis(1), &NEVER)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    assert_eq!(second.receive_count, 2);
    assert!(matches!(
        q.delete(&first.receipt).await,
        Err(QueueError::StaleReceipt)
    ));
    q.delete(&second.receipt).await.unwrap();
}

#[tokio::test]
async fn long_poll_wakes_on_send() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    let receiver = {
        let q = q.clone();
        tokio::spawn(async move {
            q.receive(Duration::from_secs(20), VIS, &CancellationToken::new())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    q.send("wake").await.unwrap();
    let got = receiver.await.unwrap().unwrap().unwrap();
    assert_eq!(got.body, "wake");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn long_poll_wakes_on_send_from_another_handle() {
    // A second handle has its own connection and doorbell watcher, as a
    // second process would.
    let dir = tempfile::tempdir().unwrap();
    let receiver_side = queue(&dir, 3).await;
    let sender_side = queue(&dir, 3).await;
    let receiver = tokio::spawn(async move {
        receiver_side
            .receive(Duration::from_secs(20), VIS, &CancellationToken::new())
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    sender_side.send("across").await.unwrap();
    let got = receiver.await.unwrap().unwrap().unwrap();
    assert_eq!(got.body, "across");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn stop_ends_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    let stop = CancellationToken::new();
    let receiver = {
        let (q, stop) = (q.clone(), stop.clone());
        tokio::spawn(async move { q.receive(Duration::from_secs(20), VIS, &stop).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    stop.cancel();
    assert!(receiver.await.unwrap().unwrap().is_none());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn redrive_policy_dead_letters_after_max_receives() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 2).await;
    q.send("doomed").await.unwrap();
    // Two tries, and the receive after them (where a worker would find
    // the budget spent), all left undeleted.
    for attempt in 1..=3 {
        let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
        assert_eq!(got.receive_count, attempt);
        q.set_visibility(&got.receipt, Duration::ZERO, Some("boom"))
            .await
            .unwrap();
    }
    assert!(q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().is_none());
    let dead = q.dlq_list(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].receive_count, 3);
    assert!(dead[0].reason.contains("boom"), "{}", dead[0].reason);

    assert_eq!(
        q.dlq_redrive(10, &crate::queue::Redrive::All)
            .await
            .unwrap(),
        1
    );
    let back = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    assert_eq!((back.body.as_str(), back.receive_count), ("doomed", 1));
}

#[tokio::test]
async fn dead_letter_keeps_reason() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    q.send("bad").await.unwrap();
    let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    let note = DeadLetter {
        message_id: got.message_id.clone(),
        receive_count: 1,
        reason: "command `rm` is not allowed".into(),
    };
    q.dead_letter(&got.receipt, "bad", &note).await.unwrap();
    let dead = q.dlq_list(10).await.unwrap();
    assert_eq!(dead[0].reason, "command `rm` is not allowed");
    assert_eq!(q.stats().await.unwrap().dead_lettered, 1);
}

#[tokio::test]
async fn requeue_does_not_use_up_receives() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 1).await;
    q.send("v1").await.unwrap();
    let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    q.requeue(&got.receipt, "v2", Duration::ZERO).await.unwrap();
    let again = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    assert_eq!((again.body.as_str(), again.receive_count), ("v2", 1));
    assert_eq!(again.message_id, got.message_id);
}

#[tokio::test]
async fn undecodable_rows_are_dead_lettered_and_the_queue_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    {
        let conn = Connection::open(dir.path().join("queue.sqlite3")).unwrap();
        let insert = "INSERT INTO messages (id, body, sent_at, visible_at) VALUES (?1, ?2, 0, 0)";
        conn.execute(insert, params!["blob", b"\xff\xfe".to_vec()])
            .unwrap();
        conn.execute(insert, params![7, "later"]).unwrap();
        conn.execute(
            "INSERT INTO messages (id, body, sent_at, visible_at)
             VALUES ('bad-text', CAST(X'C328' AS TEXT), 0, 0)",
            [],
        )
        .unwrap();
    }
    let good = q.send("fine").await.unwrap();
    let first = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    assert_eq!(
        (first.message_id.as_str(), first.body.as_str()),
        ("7", "later")
    );
    let second = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    assert_eq!(second.message_id, good);
    let dead = q.dlq_list(10).await.unwrap();
    let ids: Vec<_> = dead.iter().map(|d| d.message_id.as_str()).collect();
    assert_eq!(ids, ["blob", "bad-text"]);
    assert!(
        dead.iter().all(|d| d.reason.contains("not valid UTF-8")),
        "{dead:?}"
    );
}

#[tokio::test]
async fn a_job_lost_on_its_last_try_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 2).await;
    q.send("x").await.unwrap();
    let got = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().unwrap();
    q.set_visibility(&got.receipt, Duration::ZERO, Some("exit 1"))
        .await
        .unwrap();
    // The workers of the second and third receives die: the message
    // times out each time.
    for _ in 2..=3 {
        q.receive(NO_WAIT, Duration::from_millis(1), &NEVER)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(q.receive(NO_WAIT, VIS, &NEVER).await.unwrap().is_none());
    let dead = q.dlq_list(10).await.unwrap();
    assert_eq!(
        dead[0].reason,
        "worker lost: receive 3 never reported back; the try before failed: exit 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_are_committed_together_and_all_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..500 {
        let q = q.clone();
        sends.spawn(async move { q.send(&format!("m{i}")).await });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(sent) = sends.join_next().await {
        assert!(ids.insert(sent.unwrap().unwrap()));
    }
    assert_eq!(q.stats().await.unwrap().visible, 500);
    let mut bodies = std::collections::HashSet::new();
    while let Some(got) = q.receive(NO_WAIT, VIS, &NEVER).await.unwrap() {
        assert!(ids.contains(&got.message_id));
        bodies.insert(got.body);
    }
    assert_eq!(bodies.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn work_meeting_another_processs_lock_waits_for_it_off_the_async_threads() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir, 3).await;
    // Another process's writer, holding the lock for 300 ms.
    let holder = crate::sqlite::open(&dir.path().join("queue.sqlite3"), SCHEMA).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        holder.execute_batch("COMMIT").unwrap();
    });
    // The one async thread stays free meanwhile: a timer on it fires
    // on time.
    let ticker = tokio::spawn(async {
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        started.elapsed()
    });
    let sender = q.clone();
    let started = Instant::now();
    let id = tokio::spawn(async move { sender.send("{}").await })
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(ticker.await.unwrap() < Duration::from_millis(200));
    release.join().unwrap();
    let got = q
        .receive(
            Duration::ZERO,
            Duration::from_secs(30),
            &CancellationToken::new(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message_id, id);
}

#[tokio::test]
async fn messages_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let id = queue(&dir, 3).await.send("durable").await.unwrap();
    let got = queue(&dir, 3)
        .await
        .receive(NO_WAIT, VIS, &NEVER)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message_id, id);
}
