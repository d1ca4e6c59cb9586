//! The trainer's progress: one JSON object per line on stdout, and optionally each one
//! POSTed to a URL (the operator's progress endpoint) from a background thread, so that a
//! slow or failing endpoint never slows or stops training.

use std::io::Write;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One line of `imagegen train`'s stdout: the API crate's type, which the operator parses.
pub use imagegen_crds::api::TrainerEvent;

/// The env variable holding the bearer token for `--progress-url`.
pub use imagegen_crds::api::PROGRESS_TOKEN_ENV;

/// How long one POST may take before it is abandoned (and logged).
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `finish` waits for queued POSTs to go out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes events to stdout as JSON lines and, with a URL, POSTs them in order.
pub struct ProgressReporter {
    poster: Option<(mpsc::Sender<String>, JoinHandle<()>)>,
}

impl ProgressReporter {
    /// `url`: where to POST each event (with `Authorization: Bearer $IMAGEGEN_PROGRESS_TOKEN`
    /// when that variable is set).
    pub fn new(url: Option<String>) -> Self {
        let poster = url.map(|url| {
            let token = std::env::var(PROGRESS_TOKEN_ENV).ok();
            let (tx, rx) = mpsc::channel::<String>();
            let handle = std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(POST_TIMEOUT).build();
                for body in rx {
                    let mut request = agent.post(&url).set("Content-Type", "application/json");
                    if let Some(token) = &token {
                        request = request.set("Authorization", &format!("Bearer {token}"));
                    }
                    if let Err(e) = request.send_string(&body) {
                        tracing::warn!(url = %url, error = %e, "posting training progress failed");
                    }
                }
            });
            (tx, handle)
        });
        ProgressReporter { poster }
    }

    /// Prints the event (one line, flushed) and queues its POST.
    pub fn emit(&self, event: &TrainerEvent) {
        let line = serde_json::to_string(event).expect("events serialize");
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop training.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        if let Some((tx, _)) = &self.poster {
            let _ = tx.send(line);
        }
    }

    /// Waits (bounded) for queued POSTs to be sent.
    pub fn finish(self) {
        if let Some((tx, handle)) = self.poster {
            drop(tx);
            let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
            while !handle.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                tracing::warn!("training progress POSTs still pending at exit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_the_contract_says() {
        let cases = [
            (
                TrainerEvent::Started {
                    total: 800,
                    seed: 42,
                },
                r#"{"event":"started","total":800,"seed":42}"#,
            ),
            (
                TrainerEvent::Checkpoint {
                    step: 200,
                    path: "d".into(),
                },
                r#"{"event":"checkpoint","step":200,"path":"d"}"#,
            ),
            (
                TrainerEvent::Failed {
                    message: "m".into(),
                },
                r#"{"event":"failed","message":"m"}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(serde_json::to_string(&event).unwrap(), json);
            assert_eq!(serde_json::from_str::<TrainerEvent>(json).unwrap(), event);
        }
        let step = TrainerEvent::Step {
            step: 10,
            total: 800,
            loss: 0.12,
            lr: 0.0001,
            elapsed: 12.5,
            eta: 987.5,
        };
        assert_eq!(
            serde_json::to_string(&step).unwrap(),
            r#"{"event":"step","step":10,"total":800,"loss":0.12,"lr":0.0001,"elapsed":12.5,"eta":987.5}"#
        );
    }
}
