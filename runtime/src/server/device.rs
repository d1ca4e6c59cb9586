//! Who holds the device: generations (the engine worker) or a training (an `imagegen train`
//! child), never both at once. Two model copies, two sets of activations and an optimizer
//! on one GPU would run either out of memory, and each at a fraction of its speed.
//!
//! The policy: inference goes first. A training takes the device only when no generation
//! is queued or running, and holds it until it ends; meanwhile the worker starts no
//! generation (they are accepted and wait in the queue, within their deadlines). When the
//! training ends the worker takes the queue again.
//!
//! Both sides wait on one Condvar, notified whenever the device is given back. A waiter
//! also re-checks its condition every [`DeviceGate::RECHECK`]: what it depends on (the
//! generation queue) lives behind another lock that does not notify this one. Lock order:
//! the gate's lock, then (inside the caller's closures) a job table's; never the reverse.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// What holds the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Inference,
    Training,
}

#[derive(Default)]
struct State {
    holder: Option<Holder>,
    shut_down: bool,
}

/// The device's one-holder lock, shared by the engine worker and the trainer thread.
#[derive(Default)]
pub struct DeviceGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// The device, held until dropped.
#[must_use = "the device is given back when the guard is dropped"]
pub struct DeviceGuard<'a> {
    gate: &'a DeviceGate,
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        self.gate.lock().holder = None;
        self.gate.changed.notify_all();
    }
}

impl DeviceGate {
    /// How often a waiter re-checks conditions that do not notify the gate.
    pub const RECHECK: Duration = Duration::from_millis(50);

    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it must not stop the service with a poisoned lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device for generations: waits while a training holds it. None once shut down,
    /// or as soon as `give_up` says so (checked at least every [`Self::RECHECK`]; the worker
    /// gives up to answer a check of an uploaded LoRA rather than keep it waiting for a
    /// training).
    pub fn inference(&self, give_up: impl Fn() -> bool) -> Option<DeviceGuard<'_>> {
        self.acquire(Holder::Inference, || true, give_up)
    }

    /// The device for a training: waits until it is free and `may_start` holds (no
    /// generation queued: inference goes first; checked at least every
    /// [`Self::RECHECK`]). None once shut down.
    pub fn training(&self, may_start: impl Fn() -> bool) -> Option<DeviceGuard<'_>> {
        self.acquire(Holder::Training, may_start, || false)
    }

    fn acquire(
        &self,
        holder: Holder,
        may_start: impl Fn() -> bool,
        give_up: impl Fn() -> bool,
    ) -> Option<DeviceGuard<'_>> {
        let mut state = self.lock();
        loop {
            if state.shut_down || give_up() {
                return None;
            }
            if state.holder.is_none() && may_start() {
                state.holder = Some(holder);
                return Some(DeviceGuard { gate: self });
            }
            state = self
                .changed
                .wait_timeout(state, Self::RECHECK)
                .map(|(state, _)| state)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// What holds the device now.
    pub fn holder(&self) -> Option<Holder> {
        self.lock().holder
    }

    /// Wakes every waiter empty-handed, now and from now on; a holder keeps the device
    /// until it is done (the running job finishes, a training is stopped by its own
    /// shutdown).
    pub fn shut_down(&self) {
        self.lock().shut_down = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Instant;

    /// Long enough for a waiter that should not get the device to have had several
    /// re-checks; not a measure of speed.
    const SETTLE: Duration = Duration::from_millis(300);
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Runs `acquire` on another thread; its result arrives on the channel: whether it got
    /// the device (it gives the device back at once).
    fn waiter(
        gate: &Arc<DeviceGate>,
        acquire: impl FnOnce(&DeviceGate) -> bool + Send + 'static,
    ) -> mpsc::Receiver<bool> {
        let (tx, rx) = mpsc::channel();
        let gate = gate.clone();
        std::thread::spawn(move || {
            let _ = tx.send(acquire(&gate));
        });
        rx
    }

    #[test]
    fn a_training_waits_while_inference_is_busy() {
        let gate = Arc::new(DeviceGate::new());
        let queued = Arc::new(AtomicBool::new(false));
        let inference = gate.inference(|| false).expect("a free device");
        assert_eq!(gate.holder(), Some(Holder::Inference));
        let training = waiter(&gate, {
            let queued = queued.clone();
            move |g| g.training(|| !queued.load(Ordering::SeqCst)).is_some()
        });
        assert!(training.recv_timeout(SETTLE).is_err(), "inference holds it");
        // Given back with a generation still queued: the training keeps waiting.
        queued.store(true, Ordering::SeqCst);
        drop(inference);
        assert!(
            training.recv_timeout(SETTLE).is_err(),
            "a generation is queued"
        );
        // The queue empties without the gate being told: the re-check sees it.
        queued.store(false, Ordering::SeqCst);
        assert_eq!(training.recv_timeout(PATIENCE), Ok(true));
    }

    #[test]
    fn inference_waits_while_a_training_holds_the_device() {
        let gate = Arc::new(DeviceGate::new());
        let training = gate.training(|| true).expect("a free device");
        assert_eq!(gate.holder(), Some(Holder::Training));
        let inference = waiter(&gate, |g| g.inference(|| false).is_some());
        assert!(
            inference.recv_timeout(SETTLE).is_err(),
            "the training holds it"
        );
        let released = Instant::now();
        drop(training);
        assert_eq!(inference.recv_timeout(PATIENCE), Ok(true));
        assert!(released.elapsed() < PATIENCE);
        assert_eq!(gate.holder(), None);
        // A waiter that gives up (a LoRA to check) leaves without the device.
        let _training = gate.training(|| true).expect("a free device");
        let give_up = Arc::new(AtomicBool::new(false));
        let checking = waiter(&gate, {
            let give_up = give_up.clone();
            move |g| g.inference(|| give_up.load(Ordering::SeqCst)).is_some()
        });
        give_up.store(true, Ordering::SeqCst);
        assert_eq!(checking.recv_timeout(PATIENCE), Ok(false));
    }

    #[test]
    fn shutdown_wakes_both_kinds_of_waiter() {
        let gate = Arc::new(DeviceGate::new());
        let held = gate.inference(|| false).expect("a free device");
        let training = waiter(&gate, |g| g.training(|| true).is_some());
        let inference = waiter(&gate, |g| g.inference(|| false).is_some());
        assert!(training.recv_timeout(SETTLE).is_err());
        gate.shut_down();
        assert_eq!(training.recv_timeout(PATIENCE), Ok(false));
        assert_eq!(inference.recv_timeout(PATIENCE), Ok(false));
        // The holder keeps it until done; nobody gets it afterwards.
        assert_eq!(gate.holder(), Some(Holder::Inference));
        drop(held);
        assert!(gate.training(|| true).is_none());
        assert!(gate.inference(|| false).is_none());
    }
}
