//! A TCP proxy the tests can cut, to make a database server unreachable on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub struct Proxy {
    port: u16,
    black_hole: Arc<AtomicBool>,
    /// Forwarding tasks of open connections (aborted by `black_hole`).
    forwarding: Arc<std::sync::Mutex<JoinSet<()>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `upstream`.
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy bind: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let black_hole = Arc::new(AtomicBool::new(false));
        let forwarding = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let acceptor = {
            let black_hole = black_hole.clone();
            let forwarding = forwarding.clone();
            tokio::spawn(async move {
                // Accepted but never answered while black-holed: kept here until the end.
                let mut swallowed = Vec::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    if black_hole.load(Ordering::Acquire) {
                        swallowed.push(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    if let Ok(mut tasks) = forwarding.lock() {
                        tasks.spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(&upstream).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                    }
                }
            })
        };
        Self {
            port,
            black_hole,
            forwarding,
            acceptor,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on the "server" is unreachable: open connections are cut (both sockets
    /// closed by the time this returns) and new ones are accepted but never answered
    /// (like a host that went away).
    pub async fn black_hole(&self) {
        self.black_hole.store(true, Ordering::Release);
        let mut cut = match self.forwarding.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(_) => return,
        };
        cut.abort_all();
        while cut.join_next().await.is_some() {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        if let Ok(mut tasks) = self.forwarding.lock() {
            tasks.abort_all();
        }
    }
}
