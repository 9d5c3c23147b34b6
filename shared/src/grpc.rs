//! gRPC server plumbing shared by both planes: health and reflection services, and a
//! server handle that binds, serves and shuts down.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

/// Adds `grpc.health.v1.Health` and server reflection (v1 and v1alpha, so that older
/// grpcurl versions work) to a plane's routes. Reflection lists `service_names` (the
/// plane's own services) and health. The returned reporter starts SERVING.
pub fn with_health_and_reflection(
    routes: Routes,
    service_names: &[&str],
) -> anyhow::Result<(Routes, HealthReporter)> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let builder = || {
        service_names
            .iter()
            .chain(["grpc.health.v1.Health"].iter())
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tenantry_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(*name),
            )
    };
    let reflection_v1 = builder().build_v1()?;
    let reflection_v1alpha = builder().build_v1alpha()?;
    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((routes, health_reporter))
}

/// Binds a listener, turning "address in use" into a message that says what to change.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot listen on {addr} for the {what}: {error}; pick another address \
             (flag or config) or stop whatever is using it"
        )
    })
}

/// A running gRPC server: its address, a way to stop it, and its task.
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    /// The plane's metrics, for a metrics endpoint to serve.
    pub metrics: Option<std::sync::Arc<dyn crate::metrics::MetricsSource>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    /// Spawns `serve(listener, shutdown_signal)` and returns its handle.
    pub fn spawn<F, Fut>(listener: TcpListener, serve: F) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let local_addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, shutdown_rx));
        Ok(Self {
            local_addr,
            metrics: None,
            shutdown: Some(shutdown_tx),
            task,
        })
    }

    /// Attaches the plane's metrics.
    pub fn with_metrics(
        mut self,
        metrics: std::sync::Arc<dyn crate::metrics::MetricsSource>,
    ) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Asks the server to stop taking calls and waits for calls in flight to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        (&mut self.task).await?
    }

    /// Waits until the server stops by itself (an error) or forever.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await?
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }
}

/// Turns a oneshot receiver into a shutdown future for tonic.
pub async fn shutdown_signal(receiver: oneshot::Receiver<()>) {
    let _ = receiver.await;
}

/// How a plane stops: first health says NOT_SERVING (every service), then after `grace`
/// (for load balancers to notice) the server stops taking new calls, and calls in flight
/// get up to `drain` to finish.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    pub grace: std::time::Duration,
    pub drain: std::time::Duration,
}

/// Serves until `shutdown` fires, then stops as `Drain` says. `serve` is tonic's
/// `serve_with_incoming_shutdown` given the future this passes it; `on_stop_accepting`
/// runs when new calls stop being taken (end long-lived streams there, or the drain waits
/// for them). Calls still running when the drain time is up are cut off, with a warning.
pub async fn serve_and_drain<S, Fut, E>(
    serve: S,
    shutdown: oneshot::Receiver<()>,
    health: HealthReporter,
    service_names: &'static [&'static str],
    drain: Drain,
    on_stop_accepting: impl FnOnce() + Send + 'static,
) -> Result<(), E>
where
    S: FnOnce(futures::future::BoxFuture<'static, ()>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let (draining_tx, draining_rx) = oneshot::channel::<()>();
    let signal = Box::pin(async move {
        shutdown_signal(shutdown).await;
        for name in service_names.iter().chain([&""]) {
            health
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        tracing::info!(
            grace_ms = drain.grace.as_millis() as u64,
            "health reports NOT_SERVING; stopping"
        );
        tokio::time::sleep(drain.grace).await;
        on_stop_accepting();
        let _ = draining_tx.send(());
    });
    let served = serve(signal);
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => result,
        () = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(drain.drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(drain_ms = drain.drain.as_millis() as u64, "calls still running after the drain time were cut off");
            Ok(())
        }
    }
}

/// The incoming-connection stream of a bound listener, with TCP_NODELAY set (gRPC calls
/// are small; Nagle's algorithm would add 40 ms to some of them).
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    let accepted = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio_stream::StreamExt::map(accepted, |accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}
