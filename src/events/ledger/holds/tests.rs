use super::*;

fn wait(parent: &str, index: Option<u32>, on_finish: bool) -> Wait {
    Wait {
        parent_id: parent.into(),
        index,
        on_finish,
        queue: None,
    }
}

fn entry(index: u32, waits: Vec<Wait>) -> ToHold {
    ToHold {
        index,
        body: format!("body {index}"),
        waits,
    }
}

/// Array `parent` of `size` children, registered as a submit would.
async fn parent(ledger: &Ledger, id: &str, size: u32) {
    ledger
        .register_job(id, size, Some(format!("1-{size}")), 1)
        .await
        .unwrap();
}

/// Ends parent children the way a worker does: the child's state, then
/// its edges.
async fn end(ledger: &Ledger, id: &str, size: u32, index: u32, state: ChildState) -> Vec<Freed> {
    ledger
        .children_settled(id, size, vec![index], state)
        .await
        .unwrap();
    ledger
        .units_ended(id, size, vec![index], state)
        .await
        .unwrap()
        .freed
}

#[tokio::test]
async fn racing_last_parent_children_release_each_dependant_once() {
    for _ in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let first = Ledger::local(dir.path()).unwrap();
        let second = Ledger::local(dir.path()).unwrap();
        parent(&first, "p", 3).await;
        // d: child i waits for parent child i (`same`); w: one child
        // waiting for the whole parent (`all`).
        let entries = (0..3)
            .map(|i| entry(i, vec![wait("p", Some(i), false)]))
            .collect();
        let fates = first.hold("d", 3, entries, false).await.unwrap();
        assert_eq!(fates, vec![Fate::Held(1); 3]);
        let fates = (first.hold("w", 0, vec![entry(0, vec![wait("p", None, false)])], false))
            .await
            .unwrap();
        assert_eq!(fates, [Fate::Held(1)]);
        let freed = end(&first, "p", 3, 0, ChildState::Succeeded).await;
        assert_eq!(freed.len(), 1);
        assert_eq!((freed[0].job_id.as_str(), freed[0].index), ("d", 0));
        let (a, b) = tokio::join!(
            end(&first, "p", 3, 1, ChildState::Succeeded),
            end(&second, "p", 3, 2, ChildState::Succeeded),
        );
        let mut all: Vec<(String, u32)> = a
            .into_iter()
            .chain(b)
            .map(|f| (f.job_id, f.index))
            .collect();
        all.sort();
        assert_eq!(
            all,
            [("d".into(), 1), ("d".into(), 2), ("w".into(), 0)],
            "each dependant freed exactly once"
        );
        // A repeat (a child run twice) frees nothing more.
        assert!(
            end(&second, "p", 3, 2, ChildState::Succeeded)
                .await
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_failed_parent_child_cancels_exactly_its_dependants_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::local(dir.path()).unwrap();
    parent(&ledger, "p", 2).await;
    let entries = vec![
        entry(0, vec![wait("p", Some(0), false)]),
        entry(1, vec![wait("p", Some(1), false)]),
    ];
    ledger.hold("d", 2, entries, false).await.unwrap();
    let finish = vec![entry(0, vec![wait("p", Some(0), true)])];
    ledger.hold("f", 1, finish, false).await.unwrap();
    let freed = end(&ledger, "p", 2, 0, ChildState::DeadLettered).await;
    let mut freed: Vec<_> = freed
        .into_iter()
        .map(|f| (f.job_id, f.index, f.cancelled))
        .collect();
    freed.sort();
    assert_eq!(
        freed,
        [
            (
                "d".into(),
                0,
                Some("parent job p child 0 dead-lettered".into())
            ),
            ("f".into(), 0, None),
        ]
    );
    let freed = end(&ledger, "p", 2, 1, ChildState::Succeeded).await;
    assert_eq!(freed.len(), 1);
    assert_eq!((freed[0].index, freed[0].cancelled.as_deref()), (1, None));
}

#[tokio::test]
async fn a_dependant_of_an_ended_parent_is_sent_or_cancelled_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::local(dir.path()).unwrap();
    parent(&ledger, "p", 2).await;
    end(&ledger, "p", 2, 0, ChildState::Succeeded).await;
    end(&ledger, "p", 2, 1, ChildState::Cancelled).await;
    let entries = vec![
        entry(0, vec![wait("p", Some(0), false)]),
        entry(1, vec![wait("p", Some(1), false)]),
        entry(2, vec![wait("p", Some(1), true)]),
    ];
    let fates = ledger.hold("d", 3, entries, false).await.unwrap();
    assert_eq!(
        fates,
        [
            Fate::Send,
            Fate::Cancelled("parent job p child 1 cancelled".into()),
            Fate::Send
        ]
    );
    // A plain parent: its end is recorded by `units_ended`.
    ledger.register_job("j", 0, None, 1).await.unwrap();
    let held = ledger
        .hold("k", 0, vec![entry(0, vec![wait("j", None, false)])], false)
        .await
        .unwrap();
    assert_eq!(held, [Fate::Held(1)]);
    let freed = ledger
        .units_ended("j", 0, Vec::new(), ChildState::Succeeded)
        .await
        .unwrap()
        .freed;
    assert_eq!(freed.len(), 1);
    let after = ledger
        .hold("l", 0, vec![entry(0, vec![wait("j", None, false)])], false)
        .await
        .unwrap();
    assert_eq!(after, [Fate::Send]);
}

#[tokio::test]
async fn what_a_dead_worker_freed_is_swept_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::local(dir.path()).unwrap();
    let other = Ledger::local(dir.path()).unwrap();
    parent(&ledger, "p", 1).await;
    let entries = vec![entry(0, vec![wait("p", Some(0), false)])];
    ledger.hold("d", 1, entries, false).await.unwrap();
    // Freed, and never sent nor marked: the worker died.
    assert_eq!(
        end(&ledger, "p", 1, 0, ChildState::Succeeded).await.len(),
        1
    );
    let grace = std::time::Duration::from_secs(60);
    assert!(
        ledger.stale_holds(grace).await.unwrap().is_empty(),
        "within its grace"
    );
    // A minute later, two sweepers at once: one takes it.
    let Ledger::Local(conn) = &ledger else {
        unreachable!()
    };
    conn.lock()
        .unwrap()
        .execute("UPDATE held SET at = at - 61", [])
        .unwrap();
    let (a, b) = tokio::join!(ledger.stale_holds(grace), other.stale_holds(grace));
    let swept: Vec<Freed> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    assert_eq!(swept.len(), 1, "{swept:?}");
    assert_eq!(
        (swept[0].job_id.as_str(), swept[0].cancelled.as_ref()),
        ("d", None)
    );
    let none = std::time::Duration::ZERO;
    ledger.holds_done(swept).await.unwrap();
    assert!(ledger.stale_holds(none).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_hold_by_hand_keeps_rows_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::local(dir.path()).unwrap();
    assert!(ledger.hold_by_hand("a").await.unwrap());
    assert!(!ledger.hold_by_hand("a").await.unwrap());
    assert!(ledger.park("a", "a", 3, 1, "b1".into()).await.unwrap());
    assert_eq!(
        ledger
            .held_by_hand(vec!["x".into(), "a".into()])
            .await
            .unwrap(),
        Some("a".into())
    );
    let freed = ledger.release_by_hand("a").await.unwrap().unwrap();
    assert_eq!(freed.len(), 1);
    assert_eq!((freed[0].index, freed[0].body.as_str()), (1, "b1"));
    assert!(ledger.release_by_hand("a").await.unwrap().is_none());
    // Released: a park now refuses (the job goes back to the queue).
    assert!(!ledger.park("a", "a", 3, 2, "b2".into()).await.unwrap());
}

/// A dependant on queue B of a parent on queue A: held and counted in B's
/// ledger, told of by A's settles, spent once whoever spends it (A's
/// settling worker, B's sweep), and cancelled by a failed parent unit.
#[tokio::test]
async fn a_parent_on_another_queue_frees_its_dependants_once_from_either_side() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        Ledger::local(a_dir.path()).unwrap(),
        Ledger::local(b_dir.path()).unwrap(),
    );
    parent(&a, "p", 3).await;
    let foreign = |index| Wait {
        queue: Some("A".into()),
        ..wait("p", Some(index), false)
    };
    let entries = (0..3).map(|i| entry(i, vec![foreign(i)])).collect();
    assert_eq!(
        b.hold("d", 3, entries, false).await.unwrap(),
        vec![Fate::Held(1); 3],
        "its parent's ends are not read from B's ledger"
    );
    // An end before the note: A's settle tells nobody; B's sweep finds it.
    let ended = a.units_ended("p", 3, vec![0], ChildState::Succeeded).await;
    assert!(ended.unwrap().foreign.is_none());
    a.children_settled("p", 3, vec![0], ChildState::Succeeded)
        .await
        .unwrap();
    a.note_foreign_dependants("p", "B").await.unwrap();
    let parents = b.foreign_parents().await.unwrap();
    assert_eq!(
        parents,
        [ForeignWait {
            queue: "A".into(),
            parent_id: "p".into(),
            units: vec![Some(0), Some(1), Some(2)],
        }]
    );
    let ends = a.unit_ends("p", parents[0].units.clone()).await.unwrap();
    assert_eq!(ends, [(Some(0), ChildState::Succeeded)]);
    let freed = b.spend_foreign("p", ends.clone()).await.unwrap();
    assert_eq!(
        (freed.len(), freed[0].index, freed[0].cancelled.clone()),
        (1, 0, None)
    );
    // Spent again (a settling worker and the sweep both saw it): nothing.
    assert!(b.spend_foreign("p", ends).await.unwrap().is_empty());
    // After the note, A's settle names B and the unit; a failed unit
    // cancels its dependant with the reason.
    a.children_settled("p", 3, vec![1], ChildState::DeadLettered)
        .await
        .unwrap();
    let ended = a
        .units_ended("p", 3, vec![1], ChildState::DeadLettered)
        .await
        .unwrap();
    let told = ended.foreign.unwrap();
    assert_eq!(told.queues, ["B"]);
    assert_eq!(told.units, [(Some(1), ChildState::DeadLettered)]);
    let freed = b.spend_foreign("p", told.units).await.unwrap();
    assert_eq!(
        freed[0].cancelled.as_deref(),
        Some("parent job p child 1 dead-lettered")
    );
    assert_eq!(
        b.waiting_for("d", 10).await.unwrap(),
        [(2, "p".to_owned(), Some(2), Some("A".to_owned()))]
    );
    // The last unit: the whole parent ended too.
    a.children_settled("p", 3, vec![2], ChildState::Succeeded)
        .await
        .unwrap();
    let told = a
        .units_ended("p", 3, vec![2], ChildState::Succeeded)
        .await
        .unwrap()
        .foreign
        .unwrap();
    assert_eq!(
        told.units,
        [
            (Some(2), ChildState::Succeeded),
            (None, ChildState::DeadLettered)
        ]
    );
    assert_eq!(b.spend_foreign("p", told.units).await.unwrap().len(), 1);
    assert!(b.foreign_parents().await.unwrap().is_empty());
}
