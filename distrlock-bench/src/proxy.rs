//! A loopback TCP proxy that counts the statements and round trips a client
//! sends to PostgreSQL or MariaDB, on a thread of its own (so its CPU time can be
//! told apart from the client's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which wire protocol to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    Postgres,
    MySql,
}

/// Counts of what clients sent through the proxy.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Statements executed: PostgreSQL Execute + Query messages; MySQL
    /// COM_QUERY + COM_STMT_EXECUTE commands.
    pub(crate) statements: AtomicU64,
    /// Round trips: PostgreSQL Sync + Query; MySQL commands (each is answered).
    pub(crate) round_trips: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) statements: u64,
    pub(crate) round_trips: u64,
}

impl Counts {
    pub(crate) fn since(self, before: Counts) -> Counts {
        Counts {
            statements: self.statements - before.statements,
            round_trips: self.round_trips - before.round_trips,
        }
    }
}

/// The running proxy; its thread lives until the process ends.
pub(crate) struct CountingProxy {
    pub(crate) addr: SocketAddr,
    counters: Arc<Counters>,
    /// The proxy thread's id, for its CPU time.
    pub(crate) tid: Option<u32>,
}

impl CountingProxy {
    /// Starts a proxy to `upstream` on a free loopback port.
    pub(crate) fn start(upstream: SocketAddr, wire: Wire) -> anyhow::Result<Self> {
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("counting-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener = match TcpListener::bind("127.0.0.1:0").await {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let addr = listener
                        .local_addr()
                        .map(|a| (a, crate::procstat::thread_id()));
                    let _ = ready_tx.send(addr);
                    while let Ok((client, _)) = listener.accept().await {
                        let counters = shared.clone();
                        tokio::spawn(async move {
                            if let Ok(server) = TcpStream::connect(upstream).await {
                                let _ = client.set_nodelay(true);
                                let _ = server.set_nodelay(true);
                                let _ = pump(client, server, counters, wire).await;
                            }
                        });
                    }
                });
            })?;
        let (addr, tid) = ready_rx.recv()??;
        Ok(Self {
            addr,
            counters,
            tid,
        })
    }

    pub(crate) fn counts(&self) -> Counts {
        Counts {
            statements: self.counters.statements.load(Ordering::Relaxed),
            round_trips: self.counters.round_trips.load(Ordering::Relaxed),
        }
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    counters: Arc<Counters>,
    wire: Wire,
) -> std::io::Result<()> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut parser = Parser::new(wire);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return server_write.shutdown().await;
            }
            let (statements, round_trips) = parser.feed(&buf[..n]);
            counters.statements.fetch_add(statements, Ordering::Relaxed);
            counters
                .round_trips
                .fetch_add(round_trips, Ordering::Relaxed);
            server_write.write_all(&buf[..n]).await?;
        }
    };
    let downstream = async move {
        tokio::io::copy(&mut server_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    let (up, down) = tokio::join!(upstream, downstream);
    up.and(down)
}

/// Splits a client's byte stream into protocol messages.
struct Parser {
    wire: Wire,
    buf: Vec<u8>,
    /// PostgreSQL: past the untyped startup messages.
    started: bool,
}

impl Parser {
    fn new(wire: Wire) -> Self {
        Self {
            wire,
            buf: Vec::new(),
            started: false,
        }
    }

    /// Appends bytes; returns the statements and round trips completed.
    fn feed(&mut self, bytes: &[u8]) -> (u64, u64) {
        self.buf.extend_from_slice(bytes);
        let (mut statements, mut round_trips) = (0, 0);
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            match self.wire {
                Wire::Postgres if !self.started => {
                    // Untyped: length (including itself), then a code.
                    if rest.len() < 8 {
                        break;
                    }
                    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    if rest.len() < len {
                        break;
                    }
                    let code = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
                    // SSLRequest / GSSENCRequest come before the startup message.
                    if code != 80_877_103 && code != 80_877_104 {
                        self.started = true;
                    }
                    at += len.max(8);
                }
                Wire::Postgres => {
                    if rest.len() < 5 {
                        break;
                    }
                    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                    if rest.len() < 1 + len {
                        break;
                    }
                    match rest[0] {
                        b'E' => statements += 1,
                        b'S' => round_trips += 1,
                        b'Q' => {
                            statements += 1;
                            round_trips += 1;
                        }
                        _ => {}
                    }
                    at += 1 + len;
                }
                Wire::MySql => {
                    // 3-byte little-endian length, sequence id, payload. A command
                    // starts a new exchange, so its sequence id is 0; the
                    // handshake response has sequence id 1.
                    if rest.len() < 4 {
                        break;
                    }
                    let len = usize::from(rest[0])
                        | usize::from(rest[1]) << 8
                        | usize::from(rest[2]) << 16;
                    if rest.len() < 4 + len {
                        break;
                    }
                    if rest[3] == 0 && len > 0 {
                        round_trips += 1;
                        // COM_QUERY, COM_STMT_EXECUTE.
                        if matches!(rest[4], 0x03 | 0x17) {
                            statements += 1;
                        }
                    }
                    at += 4 + len;
                }
            }
        }
        self.buf.drain(..at);
        (statements, round_trips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_messages_are_counted_however_split() {
        let mut stream = vec![0u8, 0, 0, 9, 0, 3, 0, 0, 0];
        for kind in [b'P', b'B', b'E', b'S', b'Q'] {
            stream.push(kind);
            stream.extend_from_slice(&6u32.to_be_bytes());
            stream.extend_from_slice(b"ab");
        }
        for split in 0..stream.len() {
            let mut parser = Parser::new(Wire::Postgres);
            let (s1, r1) = parser.feed(&stream[..split]);
            let (s2, r2) = parser.feed(&stream[split..]);
            assert_eq!((s1 + s2, r1 + r2), (2, 2), "split at {split}");
        }
    }

    #[test]
    fn mysql_commands_are_counted_and_the_handshake_is_not() {
        let mut stream = Vec::new();
        // Handshake response: sequence id 1.
        stream.extend_from_slice(&[3, 0, 0, 1, 0x03, 0, 0]);
        // COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_PING.
        for cmd in [0x03u8, 0x16, 0x17, 0x0e] {
            stream.extend_from_slice(&[2, 0, 0, 0, cmd, 1]);
        }
        for split in 0..stream.len() {
            let mut parser = Parser::new(Wire::MySql);
            let (s1, r1) = parser.feed(&stream[..split]);
            let (s2, r2) = parser.feed(&stream[split..]);
            assert_eq!((s1 + s2, r1 + r2), (2, 4), "split at {split}");
        }
    }
}
