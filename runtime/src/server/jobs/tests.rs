//! The job table and queue, without a server.

use std::time::Duration;

use super::*;

fn submission(tenant: &str, id: &str, prompt: &str) -> Submission {
    Submission {
        tenant: tenant.into(),
        id: id.into(),
        fingerprint: prompt.into(),
        deadline: Instant::now() + Duration::from_secs(60),
        webhook: None,
        work: Work {
            params: GenerationParams {
                prompt: prompt.into(),
                ..Default::default()
            },
            image: None,
            mask: None,
            mask_prompt: None,
            loras: vec![],
            b64: false,
            mode: "text-to-image",
            batch_key: Some("k".into()),
            images: 1,
        },
    }
}

#[test]
fn queue_is_bounded_idempotent_and_per_tenant() {
    let jobs = Jobs::new(2);
    let (job, _, new) = jobs.submit(submission("a", "j1", "x")).unwrap();
    assert!(new && job.queue_position == Some(0));
    let (_, _, new) = jobs.submit(submission("a", "j1", "x")).unwrap();
    assert!(!new, "same id and body: the same job");
    assert_eq!(
        jobs.submit(submission("a", "j1", "y")).unwrap_err().status,
        warp::http::StatusCode::CONFLICT
    );
    jobs.submit(submission("b", "j1", "x")).unwrap();
    let full = jobs.submit(submission("a", "j3", "x")).unwrap_err();
    assert_eq!(full.status, warp::http::StatusCode::TOO_MANY_REQUESTS);
    assert!(full.retry_after.is_some());
    assert!(jobs.get("c", "j1").is_none());
    assert_eq!(jobs.get("b", "j1").unwrap().queue_position, Some(1));
}

#[test]
fn cancel_and_shutdown_finish_queued_jobs() {
    let jobs = Jobs::new(4);
    jobs.submit(submission("a", "1", "x")).unwrap();
    jobs.submit(submission("a", "2", "x")).unwrap();
    jobs.submit(submission("a", "3", "x")).unwrap();
    let job = jobs.cancel("a", "1", None).unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(jobs.get("a", "2").unwrap().queue_position, Some(0));
    let Some(Ok(running)) = jobs.next() else {
        panic!("a job to run")
    };
    assert_eq!(running.key.1, "2");
    jobs.cancel("a", "2", None).unwrap();
    assert!(running.cancel.load(Ordering::SeqCst));
    let failed = jobs.shut_down();
    assert_eq!(failed.len(), 1);
    let error = failed[0].error.clone().unwrap();
    assert_eq!(
        (error.code.as_str(), error.retryable),
        (codes::SHUTTING_DOWN, Some(true))
    );
    assert!(jobs.next().is_none());
    assert!(jobs.submit(submission("a", "4", "x")).is_err());
}

/// Every way a job ends reaches its webhook: finished by the worker, cancelled while
/// queued, expired in the queue, failed at shutdown; and it ends once.
#[test]
fn every_end_of_a_job_reaches_its_webhook() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = std::thread::spawn(move || {
        let mut received = Vec::new();
        for _ in 0..4 {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn);
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let job: Job = serde_json::from_slice(&body).unwrap();
            received.push((job.id, job.state));
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        }
        received.sort_by(|a, b| a.0.cmp(&b.0));
        received
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let jobs = Jobs::new(8).with_webhooks(Notifier::new(None, runtime.handle().clone()));
    let hooked = |id: &str| Submission {
        webhook: Some(url.clone()),
        ..submission("a", id, "x")
    };
    jobs.submit(hooked("1-finished")).unwrap();
    jobs.submit(hooked("2-cancelled")).unwrap();
    jobs.submit(Submission {
        deadline: Instant::now(),
        ..hooked("3-expired")
    })
    .unwrap();
    jobs.submit(hooked("4-shut-down")).unwrap();
    jobs.submit(submission("a", "5-no-webhook", "x")).unwrap();
    let Some(Ok(running)) = jobs.next() else {
        panic!("a job to run")
    };
    assert!(jobs.finish(&running.key, Err(deadline_error())).is_some());
    assert!(
        jobs.finish(&running.key, Err(deadline_error())).is_none(),
        "a job ends once"
    );
    jobs.cancel("a", "2-cancelled", None).unwrap();
    assert_eq!(jobs.expire_queued().len(), 1);
    assert_eq!(jobs.shut_down().len(), 2);
    let received = receiver.join().unwrap();
    assert_eq!(
        received,
        [
            ("1-finished".to_string(), JobState::Failed),
            ("2-cancelled".to_string(), JobState::Cancelled),
            ("3-expired".to_string(), JobState::Failed),
            ("4-shut-down".to_string(), JobState::Failed),
        ]
    );
    runtime.shutdown_timeout(Duration::from_secs(10));
}

#[test]
fn load_counts_every_tenant_and_lists_the_callers_own() {
    let jobs = Jobs::new(8);
    let lora = |path: &str| JobLora {
        file: PathBuf::from(format!("/store/{path}")),
        store_path: path.into(),
        weight: 1.0,
    };
    let with_loras = |tenant: &str, id: &str, paths: &[&str]| {
        let mut sub = submission(tenant, id, "x");
        sub.work.loras = paths.iter().map(|p| lora(p)).collect();
        sub
    };
    jobs.submit(with_loras("a", "run", &["loras/r"])).unwrap();
    jobs.submit(with_loras("a", "q1", &["loras/x", "loras/y"]))
        .unwrap();
    jobs.submit(with_loras("a", "q2", &["loras/y"])).unwrap();
    jobs.submit(with_loras("b", "q3", &["loras/z"])).unwrap();
    // Left queued by the wait, started by the take.
    assert!(matches!(jobs.wait_pending(), Some(Pending::Queued)));
    assert_eq!(jobs.depth(), 4);
    let running = jobs.try_next().unwrap();
    assert_eq!(running.key.1, "run");
    jobs.progress(&running.key, 2, 5);
    let a = jobs.load("a");
    assert_eq!((a.queued, a.running), (3, 1));
    assert_eq!(a.running_jobs.len(), 1);
    assert_eq!(
        (
            a.running_jobs[0].id.as_str(),
            a.running_jobs[0].progress.step
        ),
        ("run", 2)
    );
    assert_eq!(a.queued_loras, ["loras/x", "loras/y"]);
    let b = jobs.load("b");
    assert_eq!((b.queued, b.running), (3, 1));
    assert!(b.running_jobs.is_empty());
    assert_eq!(b.queued_loras, ["loras/z"]);
    jobs.finish(&running.key, Err(deadline_error()));
    jobs.cancel("a", "q1", None).unwrap();
    let a = jobs.load("a");
    assert_eq!(
        (a.queued, a.running, a.queued_loras),
        (2, 0, vec!["loras/y".into()])
    );
}

#[test]
fn compatible_jobs_are_taken_together() {
    let jobs = Jobs::new(8);
    for id in ["1", "2", "3", "4"] {
        jobs.submit(submission("a", id, "x")).unwrap();
    }
    let mut other = submission("a", "5", "x");
    other.work.batch_key = Some("other".into());
    jobs.submit(other).unwrap();
    let Some(Ok(first)) = jobs.next() else {
        panic!("a job")
    };
    let more = jobs.take_batch("k", 2);
    let ids: Vec<&str> = more.iter().map(|r| r.key.1.as_str()).collect();
    assert_eq!((first.key.1.as_str(), ids), ("1", vec!["2", "3"]));
    assert_eq!(jobs.get("a", "2").unwrap().state, JobState::Running);
    assert_eq!(jobs.get("a", "4").unwrap().queue_position, Some(0));
    assert_eq!(jobs.get("a", "5").unwrap().queue_position, Some(1));
}

/// The batching window: a compatible job submitted while the window is open joins the
/// batch; one that comes after it closes does not; a full batch does not wait at all.
#[test]
fn the_batching_window_gathers_what_arrives_in_time() {
    let jobs = Arc::new(Jobs::new(8));
    jobs.submit(submission("a", "first", "x")).unwrap();
    let Some(Ok(_first)) = jobs.next() else {
        panic!("a job to run")
    };
    let late_submitter = {
        let jobs = jobs.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            jobs.submit(submission("a", "in-time", "x")).unwrap();
        })
    };
    let started = Instant::now();
    let taken = jobs.take_batch_until("k", 3, started + Duration::from_secs(5));
    late_submitter.join().unwrap();
    // It waited for the second job, then for the rest of its room until the window closed.
    assert_eq!(
        taken.iter().map(|r| r.key.1.as_str()).collect::<Vec<_>>(),
        ["in-time"]
    );
    assert!(started.elapsed() >= Duration::from_secs(5));

    // A full batch returns at once, whatever the window.
    jobs.submit(submission("a", "second", "x")).unwrap();
    let started = Instant::now();
    let taken = jobs.take_batch_until("k", 1, started + Duration::from_secs(60));
    assert_eq!(taken.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(30));

    // A closed window takes only what is queued.
    let taken = jobs.take_batch_until("k", 4, Instant::now());
    assert!(taken.is_empty());
}
