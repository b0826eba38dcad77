use super::*;

#[tokio::test]
async fn a_folder_dropped_on_an_async_thread_goes_on_a_blocking_one() {
    let root = tempfile::tempdir().unwrap();
    let folder = Workspace::new(root.path()).temp_dir("job-").unwrap();
    let path = folder.path().to_owned();
    std::fs::write(path.join("frame.exr"), b"pixels").unwrap();
    drop(folder);
    for _ in 0..100 {
        if !path.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!path.exists());
    // With no runtime, at once.
    let folder = Workspace::new(root.path()).temp_dir("job-").unwrap();
    let path = folder.path().to_owned();
    std::thread::spawn(move || drop(folder)).join().unwrap();
    assert!(!path.exists());
}

#[test]
fn owner_names_round_trip_and_tell_the_living() {
    let me = Owner::current();
    assert!(me.start > 0);
    assert!(me.is_running());
    assert_eq!(Owner::from_dir_name(&me.dir_name()), Some(me));
    let ghost = Owner {
        pid: me.pid,
        start: me.start + 1,
    };
    assert!(!ghost.is_running());
    assert_eq!(Owner::from_dir_name("renderq-job-x1"), None);
}

#[test]
fn sweep_removes_only_folders_of_dead_owners() {
    let root = tempfile::tempdir().unwrap();
    let mine = Workspace::new(root.path());
    let job = mine.temp_dir("renderq-job-").unwrap();
    let dead = root.path().join("renderq-1-1");
    std::fs::create_dir_all(dead.join("renderq-job-abc")).unwrap();
    std::fs::create_dir_all(root.path().join("unrelated")).unwrap();

    let swept = sweep(root.path());
    assert_eq!(swept.folders, 1);
    assert!(!dead.exists());
    assert!(job.path().exists());
    assert!(root.path().join("unrelated").exists());
}

#[test]
fn sweep_kills_recorded_groups_of_dead_owners() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let root = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = Pid::from_raw(child.id() as i32);
    let leader = Owner::of(pgid.as_raw()).unwrap();
    let dead = root.path().join("renderq-1-1");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join(format!("group-{pgid}")), leader.start.to_string()).unwrap();

    assert_eq!(
        sweep(root.path()),
        Swept {
            folders: 1,
            groups: 1
        }
    );
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9));
}

#[test]
fn a_group_record_goes_with_its_guard() {
    let root = tempfile::tempdir().unwrap();
    let space = Workspace::new(root.path());
    let me = Pid::from_raw(std::process::id() as i32);
    let record = space.record_group(me).unwrap();
    let path = record.0.clone();
    assert!(path.exists());
    drop(record);
    assert!(!path.exists());
}
