//! [`FaultProxy`]: a TCP proxy on loopback that breaks the network on command.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Sits between a client and a database server on loopback and, on command, cuts
/// connections, refuses new ones, stalls traffic or adds latency.
///
/// Point the backend at [`addr`](Self::addr) instead of the server. Every fault
/// lasts until [`heal`](Self::heal) (or the matching setter) undoes it. Dropping the
/// proxy closes its listener and every connection through it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    refuse: AtomicBool,
    /// Latency added to every chunk, in microseconds.
    latency_us: AtomicU64,
    /// `true` while traffic is stalled.
    stalled: watch::Sender<bool>,
    /// Bumped to cut every current connection.
    cuts: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicUsize,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            refuse: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            stalled: watch::channel(false).0,
            cuts: watch::channel(0).0,
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients should connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every current connection at once, as a crashed router or a failover
    /// would. New connections still work.
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// While `on`, accepts new connections only to close them at once.
    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// While `on`, forwards nothing in either direction and never closes
    /// anything: a blackhole. Connections made meanwhile stall too.
    pub fn set_stalled(&self, on: bool) {
        self.shared.stalled.send_replace(on);
    }

    /// Freezes the network path: the same as `set_stalled(true)`.
    pub fn freeze(&self) {
        self.set_stalled(true);
    }

    /// Thaws a frozen path: the same as `set_stalled(false)`.
    pub fn thaw(&self) {
        self.set_stalled(false);
    }

    /// Stalls all traffic for `duration`, then resumes it.
    pub fn stall_for(&self, duration: Duration) {
        self.set_stalled(true);
        let stalled = self.shared.stalled.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stalled.send_replace(false);
        });
    }

    /// Delays every chunk of data, in each direction, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::SeqCst);
    }

    /// Undoes every fault: no refusing, no stall, no latency. Cut connections stay
    /// closed.
    pub fn heal(&self) {
        self.set_refuse(false);
        self.set_latency(Duration::ZERO);
        self.set_stalled(false);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded since the start.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.refuse.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(shared.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            shared.open.fetch_add(1, Ordering::SeqCst);
            let mut cuts = shared.cuts.subscribe();
            cuts.borrow_and_update();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(client_read, server_write, &shared);
            let down = pump(server_read, client_write, &shared);
            tokio::select! {
                _ = cuts.changed() => {}
                // Either side closing ends the connection.
                _ = up => {}
                _ = down => {}
            }
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Copies one direction chunk by chunk, honouring stalls and latency.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
) -> io::Result<()> {
    let mut stalled = shared.stalled.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While stalled, read nothing: the peer's writes back up in TCP buffers.
        let _ = stalled.wait_for(|s| !*s).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let latency = shared.latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        // Data read just before a stall is held back until it heals.
        let _ = stalled.wait_for(|s| !*s).await;
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream) -> io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_then_cuts_refuses_stalls_and_heals() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s).await.unwrap(), b"ping");

        proxy.cut();
        let after_cut = tokio::time::timeout(Duration::from_secs(2), round_trip(&mut s)).await;
        assert!(
            matches!(after_cut, Ok(Err(_))),
            "a cut connection fails: {after_cut:?}"
        );

        proxy.set_refuse(true);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(2), round_trip(&mut s)).await;
        assert!(
            matches!(refused, Ok(Err(_))),
            "a refused connection fails: {refused:?}"
        );
        proxy.heal();

        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s).await.unwrap(), b"ping");
        proxy.set_stalled(true);
        let stalled = tokio::time::timeout(Duration::from_millis(300), round_trip(&mut s)).await;
        assert!(stalled.is_err(), "a stalled connection answers nothing");
        proxy.heal();
        let mut buf = [0u8; 4];
        // The stalled ping arrives once healed.
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
            .await
            .expect("traffic resumes after heal")
            .unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn adds_latency_each_way() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s).await.unwrap();
        proxy.set_latency(Duration::from_millis(100));
        let started = std::time::Instant::now();
        round_trip(&mut s).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "100 ms each way"
        );
        assert_eq!(proxy.open_connections(), 1);
    }

    #[tokio::test]
    async fn stall_for_resumes_by_itself() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.stall_for(Duration::from_millis(200));
        let started = std::time::Instant::now();
        round_trip(&mut s).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(190));
    }
}
