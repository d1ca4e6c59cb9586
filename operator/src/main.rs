//! `imagegen-operator`: serves the health, metrics and progress endpoints on every replica,
//! competes for the leader Lease, and runs the three controllers only while it leads. A
//! replica that loses the Lease exits, so that it restarts as a standby and two replicas never
//! reconcile at once.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use futures::StreamExt;
use imagegen_crds::{DiffusionModel, ImageGeneration, LoraTraining};
use imagegen_operator::cli::{Args, Command};
use imagegen_operator::controller::{self, Context};
use imagegen_operator::leader::{campaign, LeaderElector, LEASE_DURATION};
use imagegen_operator::metrics::Metrics;
use imagegen_operator::runtime_client::HttpRuntime;
use imagegen_operator::server::{self, Health, KubeProgress, ServerState};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::Controller;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{error, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let result = match args.command {
        Some(Command::ReleaseFinalizers) => release_finalizers(args).await,
        None => run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "imagegen-operator stops");
            eprintln!("imagegen-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn log_result<T, E: std::fmt::Display>(kind: &'static str, result: Result<T, E>) {
    if let Err(e) = result {
        warn!(kind, error = %e, "controller");
    }
}

async fn run_controllers(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    slices_writer: Writer<EndpointSlice>,
    generations_writer: Writer<ImageGeneration>,
) {
    let client = ctx.client.clone();
    let all = watcher::Config::default();
    let managed_by_us = format!(
        "app.kubernetes.io/managed-by={}",
        imagegen_operator::FIELD_MANAGER
    );
    let ours = watcher::Config::default().labels(&managed_by_us);
    // The EndpointSlices that Kubernetes keeps for the models' Services (they carry the
    // Service's labels): which pod a generation goes to.
    let slices = watcher::Config::default().labels(&format!(
        "{managed_by_us},{}={}",
        imagegen_operator::runtime_pods::MANAGED_BY_LABEL,
        imagegen_operator::runtime_pods::MANAGED_BY_CONTROLLER
    ));
    let slices = reflector::reflector(
        slices_writer,
        watcher(api::<EndpointSlice>(&client, namespace), slices),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|result| log_result("EndpointSlice", result));
    let slices_ready = ctx.endpoint_slices.clone();
    // Every model's queue, for its autoscaler: the generations as a watch keeps them.
    let queues = reflector::reflector(
        generations_writer,
        watcher(api::<ImageGeneration>(&client, namespace), all.clone()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|result| log_result("ImageGeneration (queues)", result));
    let queues_ready = ctx.generations.clone();
    // A generation that arrives or finishes changes its model's queue. Progress reports
    // change nothing the autoscaler reads, and are left out; a second's debounce turns a
    // burst of arrivals into one decision.
    let models = Controller::new(api::<DiffusionModel>(&client, namespace), all.clone())
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(std::time::Duration::from_secs(1)),
        )
        .owns(api::<Deployment>(&client, namespace), ours.clone())
        .owns(api::<Service>(&client, namespace), ours.clone())
        .watches(
            api::<ImageGeneration>(&client, namespace),
            all.clone(),
            controller::model_of_queued_generation,
        )
        .run(
            controller::reconcile_model,
            controller::error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("DiffusionModel", result));
    // A model becoming Ready wakes what waits for it; a LoRA trained, the generations
    // that apply it.
    let trainings = Controller::new(api::<LoraTraining>(&client, namespace), all.clone());
    let training_store = trainings.store();
    let trainings = trainings
        .owns(api::<Job>(&client, namespace), ours)
        .watches(
            api::<DiffusionModel>(&client, namespace),
            all.clone(),
            move |model| controller::trainings_using_model(&training_store.state(), &model),
        )
        .run(
            controller::reconcile_training,
            controller::error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("LoraTraining", result));
    // Every status write comes back as a watch event: a second's debounce keeps a running
    // generation from polling its runtime at the speed of its own writes.
    let debounced = kube::runtime::controller::Config::default()
        .debounce(std::time::Duration::from_secs(1))
        .concurrency(16);
    let generations = Controller::new(api::<ImageGeneration>(&client, namespace), all.clone());
    let (by_model, by_lora) = (generations.store(), generations.store());
    let generations = generations
        .with_config(debounced)
        .watches(
            api::<DiffusionModel>(&client, namespace),
            all.clone(),
            move |model| controller::generations_using_model(&by_model.state(), &model),
        )
        .watches(
            api::<LoraTraining>(&client, namespace),
            all,
            move |training| controller::generations_using_lora(&by_lora.state(), &training),
        )
        .run(
            controller::reconcile_generation,
            controller::error_policy,
            ctx,
        )
        .for_each(|result| log_result("ImageGeneration", result));
    let controllers = async {
        // Before the first list of slices, every model would look as if it had no pod.
        if slices_ready.wait_until_ready().await.is_err() {
            error!("the EndpointSlice cache closed before its first list");
        }
        // Before the first list of generations, every queue would look empty.
        if queues_ready.wait_until_ready().await.is_err() {
            error!("the ImageGeneration cache closed before its first list");
        }
        futures::join!(models, trainings, generations);
    };
    futures::join!(slices, queues, controllers);
}

/// The namespace of the Lease and of the Secrets to copy: the pod's own.
fn own_namespace(client: &Client) -> String {
    std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string())
}

/// `release-finalizers` (see `imagegen_operator::uninstall`).
async fn release_finalizers(args: Args) -> Result<(), BoxError> {
    use imagegen_operator::uninstall::{self, STEP_DOWN_WAIT, UNINSTALL_HOLDER, UNINSTALL_LEASE};
    let client = Client::try_default().await?;
    let namespace = own_namespace(&client);
    uninstall::hold_lease(&client, &namespace, &args.lease_name).await?;
    println!(
        "holding the Lease {namespace}/{} as {UNINSTALL_HOLDER} for {}s; waiting {}s for every \
         replica to stop reconciling",
        args.lease_name,
        UNINSTALL_LEASE.as_secs(),
        STEP_DOWN_WAIT.as_secs()
    );
    tokio::time::sleep(STEP_DOWN_WAIT).await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: imagegen_operator::FIELD_MANAGER.into(),
            instance: Some(UNINSTALL_HOLDER.into()),
        },
    );
    let released =
        uninstall::release_finalizers(&client, &recorder, args.watch_namespace()).await?;
    for name in &released.generations {
        println!("released ImageGeneration {name}");
    }
    for name in &released.trainings {
        println!("released LoraTraining {name}");
    }
    println!(
        "released the finalizers of {} ImageGenerations and {} LoraTrainings; the objects stay, \
         and what they stored stays in the store",
        released.generations.len(),
        released.trainings.len()
    );
    Ok(())
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut config = args.config();
    let client = Client::try_default().await?;
    let metrics = Metrics::new()?;
    let health = Arc::new(Health::default());
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("imagegen-operator-{}", std::process::id()));
    let lease_namespace = own_namespace(&client);
    info!(%identity, %lease_namespace, lease = %args.lease_name, watch = ?args.watch_namespace(), "starting");
    // The Secrets to copy into the models' namespaces live beside the Lease.
    config.namespace = lease_namespace.clone();

    let state = ServerState {
        metrics: metrics.clone(),
        health: health.clone(),
        ready_max_age: LEASE_DURATION * 2,
        progress: Arc::new(KubeProgress::new(client.clone())),
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    info!(listen = %args.listen, "serving health, metrics and progress");
    let server = tokio::spawn(
        warp::serve(server::app(state))
            .incoming(listener)
            .graceful(shutdown_signal())
            .run(),
    );

    let (leading_tx, mut leading) = watch::channel(false);
    let elector = Arc::new(LeaderElector::new(
        client.clone(),
        &lease_namespace,
        &args.lease_name,
        &identity,
    ));
    let campaigning = tokio::spawn(campaign(elector.clone(), health.clone(), leading_tx));

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: imagegen_operator::FIELD_MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    let (endpoint_slices, slices_writer) = reflector::store();
    let (generations, generations_writer) = reflector::store();
    let ctx = Arc::new(Context::new(
        client,
        config,
        Arc::new(HttpRuntime::new()?),
        metrics,
        recorder,
        endpoint_slices,
        generations,
    ));

    tokio::select! {
        _ = shutdown_signal() => {
            info!("shutting down as a standby");
            let _ = server.await;
            return Ok(());
        }
        became = leading.wait_for(|leads| *leads) => { became?; }
    }
    info!(%identity, "leading: starting the controllers");
    tokio::select! {
        _ = run_controllers(ctx, args.watch_namespace(), slices_writer, generations_writer) => Ok(()),
        lost = leading.wait_for(|leads| !*leads) => {
            lost?;
            Err("lost the leader Lease; restarting as a standby".into())
        }
        _ = shutdown_signal() => {
            info!("shutting down: releasing the leader Lease");
            campaigning.abort();
            if let Err(e) = elector.release().await {
                warn!(error = %e, "cannot release the leader Lease; it expires by itself");
            }
            Ok(())
        }
    }
}
