//! [`FaultProxy`]: a TCP proxy on loopback that breaks the network on command.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Sits between a client and a database server on loopback and, on command, cuts
/// connections, refuses new ones, freezes traffic or adds latency.
///
/// Point the backend at [`addr`](Self::addr) instead of the server. Every fault
/// lasts until [`heal`](Self::heal) (or the matching setter) undoes it. Dropping the
/// proxy closes its listener and every connection through it, as [`cut`](Self::cut)
/// does.
///
/// Each connection through the proxy is two TCP connections, client to proxy and
/// proxy to server, relayed chunk by chunk in both directions. Outside faults the
/// relay is transparent, half-closes included: when one side shuts down its
/// write half (or closes), the proxy forwards everything it sent and then shuts
/// down its own write half toward the other side, and keeps relaying the other
/// direction. A connection ends when both directions have ended, or at once
/// when the server resets it or stops taking bytes.
///
/// # Faults and their network semantics
///
/// - [`freeze`](Self::freeze) / [`thaw`](Self::thaw): a frozen path, packets
///   held, never dropped. See [`freeze`](Self::freeze).
/// - [`cut`](Self::cut): a crashed router or a failover; everything held is
///   dropped and both sides see the connection end.
/// - [`set_refuse`](Self::set_refuse): new connections are accepted and closed
///   at once.
/// - [`set_latency`](Self::set_latency): every chunk is delayed, each way.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    /// Where new connections go (see [`FaultProxy::set_upstream`]).
    upstream: Mutex<SocketAddr>,
    refuse: AtomicBool,
    /// Latency added to every chunk, in microseconds.
    latency_us: AtomicU64,
    /// `true` while the path is frozen.
    frozen: watch::Sender<bool>,
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
            upstream: Mutex::new(upstream),
            refuse: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            frozen: watch::channel(false).0,
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

    /// Sends new connections to `upstream` from now on, as a virtual IP or an
    /// HAProxy moved to another server after a failover would. Current
    /// connections stay with the old server; [`cut`](Self::cut) them to make
    /// every client reconnect.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = upstream;
    }

    /// Where new connections go.
    pub fn upstream(&self) -> SocketAddr {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes every current connection at once, as a crashed router or a failover
    /// would: whatever the proxy holds (a frozen path's traffic included) is
    /// dropped, never delivered, and both sides see their connection end. New
    /// connections still work.
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// While `on`, accepts new connections only to close them at once.
    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Freezes the network path of every connection, current and new, until
    /// [`thaw`](Self::thaw) (or [`heal`](Self::heal)): packets are held, never
    /// dropped, as in a router that stops forwarding but keeps its queues.
    ///
    /// While frozen:
    ///
    /// - nothing is forwarded in either direction, and nothing is closed: neither
    ///   side sees an answer, an error or an end of stream;
    /// - the proxy stops reading both sockets, so what either side writes waits
    ///   in the kernel's buffers; a writer blocks once they are full, as behind a
    ///   real path whose window has closed. A chunk the proxy had already read
    ///   when the freeze began is held too;
    /// - a client that closes its socket, or resets it, is not noticed: what it
    ///   wrote before, and its end of stream, wait like the rest;
    /// - new connections are accepted and connected to the server (TCP
    ///   handshakes complete), but their traffic is frozen too.
    ///
    /// A [`cut`](Self::cut), or dropping the proxy, during a freeze drops
    /// everything held instead.
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Thaws a [`freeze`](Self::freeze): everything held is delivered, in order,
    /// in both directions, and traffic flows again.
    ///
    /// For a client that closed (or reset) its socket during the freeze, that
    /// means: every byte it wrote before closing reaches the server, then a FIN
    /// (the proxy shuts down its write half toward the server; a reset reaches the
    /// server as a FIN too), exactly as late packets of a frozen path would. The
    /// proxy then keeps the server connection open until the server closes it,
    /// and discards whatever the server still sends, since the client is gone.
    /// Of a client that reset, only what its kernel had already sent arrives,
    /// as over a real network.
    ///
    /// A client that only half-closed (shut down its write half) still gets the
    /// server's replies.
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// [`freeze`](Self::freeze) while `on`, [`thaw`](Self::thaw) when not.
    pub fn set_stalled(&self, on: bool) {
        self.shared.frozen.send_replace(on);
    }

    /// Freezes all traffic for `duration`, then thaws it, with the semantics of
    /// [`freeze`](Self::freeze) and [`thaw`](Self::thaw). The thaw comes at the
    /// end of `duration` even if the path was thawed and frozen again meanwhile.
    pub fn stall_for(&self, duration: Duration) {
        self.freeze();
        let frozen = self.shared.frozen.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            frozen.send_replace(false);
        });
    }

    /// Delays every chunk of data, in each direction, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::SeqCst);
    }

    /// Undoes every fault: no refusing, no latency, and a [`thaw`](Self::thaw),
    /// which delivers everything a freeze held. Cut connections stay closed.
    pub fn heal(&self) {
        self.set_refuse(false);
        self.set_latency(Duration::ZERO);
        self.thaw();
    }

    /// Connections open through the proxy now: accepted, and not yet ended in
    /// both directions (a client gone while the server has yet to close counts).
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
        tokio::spawn(relay(client, shared.clone()));
    }
}

/// Connects `client` to the server and relays between them until both
/// directions end, the server fails, or a cut.
async fn relay(client: TcpStream, shared: Arc<Shared>) {
    // Subscribed first, so that a cut while connecting upstream counts.
    let mut cuts = shared.cuts.subscribe();
    cuts.borrow_and_update();
    let upstream = *shared
        .upstream
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    shared.open.fetch_add(1, Ordering::SeqCst);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let both = async {
        // An error is the server's failing, which ends both directions at once;
        // each side's end of stream ends only its own direction.
        tokio::try_join!(
            client_to_server(client_read, server_write, &shared),
            server_to_client(server_read, client_write, &shared),
        )
    };
    tokio::select! {
        // Drops both sockets and everything held.
        _ = cuts.changed() => {}
        _ = both => {}
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

/// Waits until the path is not frozen.
async fn thawed(frozen: &mut watch::Receiver<bool>) {
    // The sender lives in `Shared`, which outlives every relay.
    let _ = frozen.wait_for(|f| !*f).await;
}

/// Sleeps for the configured latency, if any.
async fn delay(shared: &Shared) {
    let latency = shared.latency_us.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_micros(latency)).await;
    }
}

/// Relays the client's bytes to the server, then its end of stream as a FIN.
/// Fails only when the server cannot take them.
async fn client_to_server(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
) -> io::Result<()> {
    let mut frozen = shared.frozen.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While frozen, read nothing: the client's writes (and its FIN or reset)
        // wait in the kernel, readable in order after the thaw.
        thawed(&mut frozen).await;
        // A reset ends the client's stream like a close: what its kernel had sent
        // before has been read by now.
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        delay(shared).await;
        // A chunk read just before a freeze is held until the thaw.
        thawed(&mut frozen).await;
        to.write_all(&buf[..n]).await?;
    }
    thawed(&mut frozen).await;
    // A half-close: the server may still answer, and a half-closed client
    // still gets the answer.
    to.shutdown().await
}

/// Relays the server's bytes to the client, then its end of stream as a FIN.
/// Once the client is gone, discards them, and keeps reading until the server
/// closes. Fails when the server resets the connection.
async fn server_to_client(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
) -> io::Result<()> {
    let mut frozen = shared.frozen.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    let mut client_gone = false;
    loop {
        thawed(&mut frozen).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        delay(shared).await;
        thawed(&mut frozen).await;
        // Failing to write the client must not end the connection: what the
        // client sent is still to be delivered the other way.
        if !client_gone && to.write_all(&buf[..n]).await.is_err() {
            client_gone = true;
        }
    }
    if !client_gone {
        let _ = to.shutdown().await;
    }
    Ok(())
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

    /// A server on loopback that greets every connection with `greeting`.
    async fn greeter(greeting: &'static [u8; 4]) -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(greeting).await;
                    // Held open until the client leaves.
                    let _ = s.read(&mut [0u8; 1]).await;
                });
            }
        });
        addr
    }

    async fn greeting(s: &mut TcpStream) -> [u8; 4] {
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn set_upstream_moves_new_connections_only() {
        let (first, second) = (greeter(b"one!").await, greeter(b"two!").await);
        let proxy = FaultProxy::start(first).await.unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(&greeting(&mut old).await, b"one!");
        proxy.set_upstream(second);
        assert_eq!(proxy.upstream(), second);
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(&greeting(&mut new).await, b"two!");
        // The old connection stays with the first server until a cut.
        assert_eq!(proxy.open_connections(), 2);
        proxy.cut();
        let mut after_cut = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(&greeting(&mut after_cut).await, b"two!");
    }
}
