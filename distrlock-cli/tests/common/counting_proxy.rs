//! (A copy of distrlock-postgres's test proxy, counting connections too.)
//!
//! A TCP proxy between a client and the real PostgreSQL server that counts the
//! client's protocol messages, so a test can see exactly what one call sends.
//!
//! `pg_stat_statements` would need `shared_preload_libraries`, a server-wide
//! setting the tests must not change; the wire does not lie either. Counted, per
//! message type of the frontend protocol (after the startup message):
//! `Q` simple query, `P` parse, `B` bind, `D` describe, `E` execute, `S` sync.
//! A statement executed is an `E` or a `Q`; a round trip is a `S` or a `Q` (each is
//! answered by ReadyForQuery, which the client waits for).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Message counts by frontend message type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts(pub BTreeMap<char, u64>);

impl Counts {
    pub(crate) fn get(&self, kind: char) -> u64 {
        self.0.get(&kind).copied().unwrap_or(0)
    }

    /// Statements executed: extended-protocol Executes plus simple Queries.
    pub(crate) fn statements(&self) -> u64 {
        self.get('E') + self.get('Q')
    }

    /// Round trips: Syncs plus simple Queries.
    pub(crate) fn round_trips(&self) -> u64 {
        self.get('S') + self.get('Q')
    }

    /// `self - before`, per message type.
    pub(crate) fn since(&self, before: &Counts) -> Counts {
        let mut delta = BTreeMap::new();
        for (kind, n) in &self.0 {
            let d = n - before.get(*kind);
            if d > 0 {
                delta.insert(*kind, d);
            }
        }
        Counts(delta)
    }
}

/// The running proxy; it stops with the test's runtime.
pub(crate) struct CountingProxy {
    pub(crate) addr: SocketAddr,
    counts: Arc<Mutex<Counts>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Mutex::new(Counts::default()));
        let shared = counts.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let counts = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = pump(client, server, counts).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            counts,
            connections,
        })
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The counts so far.
    pub(crate) fn counts(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    counts: Arc<Mutex<Counts>>,
) -> std::io::Result<()> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut parser = Parser::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return server_write.shutdown().await;
            }
            for kind in parser.feed(&buf[..n]) {
                *counts.lock().unwrap().0.entry(kind).or_insert(0) += 1;
            }
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

/// Splits the client's byte stream into protocol messages.
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
    started: bool,
}

impl Parser {
    /// Appends bytes; returns the types of the typed messages completed.
    fn feed(&mut self, bytes: &[u8]) -> Vec<char> {
        self.buf.extend_from_slice(bytes);
        let mut kinds = Vec::new();
        loop {
            if !self.started {
                // Untyped: length (including itself), then a code.
                if self.buf.len() < 8 {
                    break;
                }
                let len = u32::from_be_bytes(self.buf[0..4].try_into().unwrap()) as usize;
                if self.buf.len() < len {
                    break;
                }
                let code = u32::from_be_bytes(self.buf[4..8].try_into().unwrap());
                // 80877103 SSLRequest, 80877104 GSSENCRequest: the startup message
                // follows. Anything else is the startup message itself.
                if code != 80877103 && code != 80877104 {
                    self.started = true;
                }
                self.buf.drain(..len);
            } else {
                if self.buf.len() < 5 {
                    break;
                }
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() < 1 + len {
                    break;
                }
                kinds.push(self.buf[0] as char);
                self.buf.drain(..1 + len);
            }
        }
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_counts_messages_split_anywhere() {
        let mut stream = Vec::new();
        // Startup: len 8 + "user\0x\0\0" would do; any code other than SSLRequest.
        let startup = [0u8, 0, 0, 9, 0, 3, 0, 0, 0];
        stream.extend_from_slice(&startup);
        for kind in [b'P', b'B', b'E', b'S'] {
            stream.push(kind);
            stream.extend_from_slice(&6u32.to_be_bytes());
            stream.extend_from_slice(b"ab");
        }
        for split in 0..stream.len() {
            let mut parser = Parser::default();
            let mut kinds = parser.feed(&stream[..split]);
            kinds.extend(parser.feed(&stream[split..]));
            assert_eq!(kinds, vec!['P', 'B', 'E', 'S'], "split at {split}");
        }
    }
}
