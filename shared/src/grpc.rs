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
            shutdown: Some(shutdown_tx),
            task,
        })
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
