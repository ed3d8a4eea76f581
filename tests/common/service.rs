//! A Service without session affinity, as kube-proxy is one: each new TCP connection goes to
//! the next backend in turn (one that refuses is skipped), bytes copied both ways until either
//! side closes. Agents connect here and spread over the replicas; when a replica stops, their
//! reconnections land on the others.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Service {
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    stop: CancellationToken,
}

impl Service {
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let stop = CancellationToken::new();
        let (b, st) = (backends.clone(), stop.clone());
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let (b, next, st) = (b.clone(), next.clone(), st.clone());
                tokio::spawn(async move {
                    let list = b.lock().clone();
                    for _ in 0..list.len() {
                        let i = next.fetch_add(1, Ordering::Relaxed) % list.len();
                        let connect = TcpStream::connect(list[i]);
                        let Ok(Ok(mut backend)) = tokio::time::timeout(Duration::from_secs(1), connect).await
                        else {
                            continue;
                        };
                        tokio::select! {
                            _ = st.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => {}
                        }
                        return;
                    }
                });
            }
        });
        Self { addr, backends, stop }
    }

    /// Replaces the backends (a replica replaced by one on another address).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock() = backends;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
