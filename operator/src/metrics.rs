//! Prometheus metrics of the controllers: reconciles, errors and durations per kind.

use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The operator's metrics and the registry `/metrics` serves.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    durations: HistogramVec,
    dispatches: IntCounterVec,
    scalings: IntCounterVec,
}

impl Metrics {
    /// Registers the metrics in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "imagegen_operator_reconciles_total",
                "Reconciliations started, per kind",
            ),
            &["kind"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "imagegen_operator_reconcile_errors_total",
                "Reconciliations that failed, per kind and error",
            ),
            &["kind", "error"],
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "imagegen_operator_reconcile_duration_seconds",
                "Duration of reconciliations, per kind",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )?;
        let dispatches = IntCounterVec::new(
            Opts::new(
                "imagegen_operator_dispatches_total",
                "Generations submitted to a runtime pod, per reason the pod was chosen \
                 (lora_warm, least_loaded, spread, load_unknown)",
            ),
            &["reason"],
        )?;
        let scalings = IntCounterVec::new(
            Opts::new(
                "imagegen_operator_scalings_total",
                "Replica counts the queue autoscaler set, per direction (up, down, from_zero)",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(dispatches.clone()))?;
        registry.register(Box::new(scalings.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            durations,
            dispatches,
            scalings,
        })
    }

    /// Counts a generation submitted to a pod chosen for `reason`.
    pub fn dispatched(&self, reason: &str) {
        self.dispatches.with_label_values(&[reason]).inc();
    }

    /// Counts a replica count set by the queue autoscaler.
    pub fn scaled(&self, direction: &str) {
        self.scalings.with_label_values(&[direction]).inc();
    }

    /// Counts a reconciliation of `kind` and measures it until the guard drops.
    pub fn reconcile(&self, kind: &'static str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[kind]).inc();
        ReconcileTimer {
            histogram: self.durations.with_label_values(&[kind]),
            start: Instant::now(),
        }
    }

    /// Counts a failed reconciliation of `kind`.
    pub fn error(&self, kind: &str, error: &str) {
        self.errors.with_label_values(&[kind, error]).inc();
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a metric family that cannot be encoded is
        // left out rather than failing the scrape.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Observes the duration of one reconciliation when dropped.
pub struct ReconcileTimer {
    histogram: prometheus::Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders_per_kind() {
        let metrics = Metrics::new().unwrap();
        drop(metrics.reconcile("ImageGeneration"));
        drop(metrics.reconcile("ImageGeneration"));
        drop(metrics.reconcile("LoraTraining"));
        metrics.error("LoraTraining", "kube");
        let text = metrics.render();
        assert!(
            text.contains(r#"imagegen_operator_reconciles_total{kind="ImageGeneration"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"imagegen_operator_reconciles_total{kind="LoraTraining"} 1"#));
        assert!(text.contains(
            r#"imagegen_operator_reconcile_errors_total{error="kube",kind="LoraTraining"} 1"#
        ));
        assert!(text.contains(
            r#"imagegen_operator_reconcile_duration_seconds_count{kind="ImageGeneration"} 2"#
        ));
    }
}
