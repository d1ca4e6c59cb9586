//! Trainings (`POST /v1/trainings`): each runs `imagegen train` as a child process, one at a
//! time, its JSON-lines progress becoming the job's events. The LoRA it writes is stored as
//! the tenant's LoRA under the training's name.
//!
//! A training and the engine worker never use the device at once, and inference goes
//! first ([`super::device`]): a training stays `queued` until no generation is queued or
//! running, then holds the device until its child ends; generations submitted meanwhile
//! wait in their queue.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imagegen_crds::api::{codes, ErrorDetail, LoraInfo, LoraSource, TrainerEvent, TrainingResult};
use imagegen_crds::TrainingParams;

use super::jobs::{error_detail, now_rfc3339, Output, Running};
use super::Shared;

/// A training ready to run: its photos written to `dir/images`.
pub struct TrainingWork {
    /// The LoRA's name.
    pub name: String,
    pub params: TrainingParams,
    /// Scratch folder of this training (removed when it ends).
    pub dir: PathBuf,
}

impl Drop for TrainingWork {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs on the trainer thread until shutdown.
pub fn run(shared: Arc<Shared>) {
    // Trainings get no checks (`Pending::Control`): only a queued training wakes this.
    while shared.trainings.wait_pending().is_some() {
        // None: shutdown; the queue, drained by then, ends the loop.
        let Some(_device) = shared.device.training(|| shared.jobs.depth() == 0) else {
            continue;
        };
        // None: cancelled while it waited for the device.
        let Some(running) = shared.trainings.try_next() else {
            continue;
        };
        let key = running.key.clone();
        let outcome = train(&shared, &running);
        shared.trainings.finish(&key, outcome);
    }
}

/// The `imagegen train` command line of a training.
fn command(shared: &Shared, work: &TrainingWork) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("imagegen"));
    let mut cmd = Command::new(exe);
    // Its paths are local scratch folders: the service's store variable must not turn them
    // into store paths.
    cmd.env_remove("IMAGEGEN_STORE");
    let p = &work.params;
    cmd.arg("train")
        .arg("--model")
        .arg(&shared.config.model)
        .arg("--images")
        .arg(work.dir.join("images"))
        .arg("--instance-prompt")
        .arg(&p.instance_prompt)
        .arg("--out")
        .arg(work.dir.join("out"));
    if let Some(class) = &p.class_prompt {
        cmd.arg("--class-prompt").arg(class);
        if let Some(prior) = &p.prior_preservation {
            if let Some(n) = prior.class_images {
                cmd.arg("--class-images").arg(n.to_string());
            }
            if let Some(w) = prior.weight {
                cmd.arg("--prior-weight").arg(w.to_string());
            }
        }
    }
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            cmd.arg(name).arg(value);
        }
    };
    flag("--steps", p.steps.map(|v| v.to_string()));
    flag("--rank", p.rank.map(|v| v.to_string()));
    flag("--alpha", p.alpha.map(|v| v.to_string()));
    flag("--lr", p.learning_rate.map(|v| v.to_string()));
    flag("--resolution", p.resolution.map(|v| v.to_string()));
    flag("--seed", p.seed.map(|v| v.to_string()));
    flag("--device", shared.config.device.clone());
    if p.train_text_encoder == Some(true) {
        cmd.arg("--train-text-encoder");
    }
    cmd
}

fn train(shared: &Shared, running: &Running<TrainingWork>) -> Result<Output, ErrorDetail> {
    let work = &running.work;
    let internal = |message: String| error_detail(codes::INTERNAL, message, false);
    let stderr_path = work.dir.join("train.log");
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| internal(e.to_string()))?;
    let mut child = command(shared, work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| internal(format!("starting imagegen train: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| internal("no stdout".into()))?;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut done: Option<(u32, String, Option<f64>)> = None;
    let mut failed: Option<String> = None;
    let mut stopped = false;
    loop {
        // Checked between lines too: a fast trainer may never leave the channel idle.
        let cancelled = running.cancel.load(Ordering::SeqCst);
        if (cancelled || shared.trainings.is_shutting_down()) && !stopped {
            let _ = child.kill();
            stopped = true;
        }
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => match serde_json::from_str::<TrainerEvent>(&line) {
                Ok(TrainerEvent::Started { total, .. }) => {
                    shared.trainings.progress(&running.key, 0, total)
                }
                Ok(TrainerEvent::Step {
                    step, total, loss, ..
                }) => shared
                    .trainings
                    .progress_with_loss(&running.key, step, total, Some(loss)),
                Ok(TrainerEvent::Done {
                    step, output, loss, ..
                }) => done = Some((step, output, loss)),
                Ok(TrainerEvent::Failed { message }) => failed = Some(message),
                Ok(TrainerEvent::Checkpoint { .. }) => {}
                Err(_) => tracing::warn!(line = %line, "unexpected line from imagegen train"),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().map_err(|e| internal(e.to_string()))?;
    if running.cancel.load(Ordering::SeqCst) {
        return Err(shared.trainings.cancel_reason(&running.key));
    }
    if stopped {
        return Err(error_detail(
            codes::SHUTTING_DOWN,
            "the service shut down during the training; submit it again",
            true,
        ));
    }
    let Some((steps, output, loss)) = done.filter(|_| status.success()) else {
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let last = log.lines().last().unwrap_or("").to_string();
        return Err(internal(failed.unwrap_or_else(|| {
            format!("imagegen train ended with {status}: {last}")
        })));
    };
    let bytes = std::fs::read(&output).map_err(|e| internal(format!("{output}: {e}")))?;
    let sha256 = crate::store::hex_sha256(&bytes);
    let tenant = &running.key.0;
    let relative = imagegen_crds::api::lora_file(&work.name);
    let info = LoraInfo {
        name: work.name.clone(),
        size_bytes: bytes.len() as u64,
        sha256: sha256.clone(),
        created_at: now_rfc3339(),
        source: LoraSource::Training,
    };
    let store = &shared.store;
    shared
        .runtime
        .block_on(async {
            store
                .put(
                    &crate::store::lora_path(tenant, &work.name),
                    Bytes::from(bytes),
                )
                .await?;
            store
                .put(
                    &crate::store::info_path(tenant, &work.name),
                    Bytes::from(serde_json::to_vec(&info).unwrap_or_default()),
                )
                .await
        })
        .map_err(|e| error_detail(codes::INTERNAL, e.to_string(), true))?;
    Ok(Output::Training(TrainingResult {
        lora: work.name.clone(),
        path: relative,
        sha256,
        steps,
        loss,
    }))
}
