//! A TCP proxy between a client and the real PostgreSQL server that counts the
//! client's protocol messages, so a test can see exactly what one call sends.
//!
//! `pg_stat_statements` would need `shared_preload_libraries`, a server-wide
//! setting the tests must not change; the wire does not lie either. Counted, per
//! message type of the frontend protocol (after the startup message):
//! `Q` simple query, `P` parse, `B` bind, `D` describe, `E` execute, `S` sync.
//! A statement executed is an `E` or a `Q`. A sync point is a `S` or a `Q`: each is
//! answered by ReadyForQuery (`Z`). A round trip is a flight: the client sending
//! while it has no request unanswered, i.e. after every sync point it sent before
//! was answered. Without pipelining that is one per sync point; a client that
//! pipelines several sync points (sends them all before the first answer) makes
//! one round trip for all of them. So the proxy reads the server's answers too,
//! for their `Z`s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Message counts by frontend message type, and round trips (flights).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) messages: BTreeMap<char, u64>,
    pub(crate) flights: u64,
}

impl Counts {
    pub(crate) fn get(&self, kind: char) -> u64 {
        self.messages.get(&kind).copied().unwrap_or(0)
    }

    /// Statements executed: extended-protocol Executes plus simple Queries.
    pub(crate) fn statements(&self) -> u64 {
        self.get('E') + self.get('Q')
    }

    /// Sync points: Syncs plus simple Queries, each answered by ReadyForQuery.
    pub(crate) fn sync_points(&self) -> u64 {
        self.get('S') + self.get('Q')
    }

    /// Round trips: the times a client sent with none of its requests
    /// unanswered. Without pipelining, the same as [`sync_points`](Self::sync_points).
    pub(crate) fn round_trips(&self) -> u64 {
        self.flights
    }

    /// `self - before`, per message type.
    pub(crate) fn since(&self, before: &Counts) -> Counts {
        let mut delta = BTreeMap::new();
        for (kind, n) in &self.messages {
            let d = n - before.get(*kind);
            if d > 0 {
                delta.insert(*kind, d);
            }
        }
        Counts {
            messages: delta,
            flights: self.flights - before.flights,
        }
    }
}

/// One connection's requests in flight: sync points sent and not yet answered,
/// and whether anything sent is unanswered.
#[derive(Debug, Default)]
struct InFlight {
    unanswered_syncs: u64,
    busy: bool,
}

/// The running proxy; it stops with the test's runtime.
pub(crate) struct CountingProxy {
    pub(crate) addr: SocketAddr,
    counts: Arc<Mutex<Counts>>,
}

impl CountingProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        Self::start_with_latency(upstream, Duration::ZERO).await
    }

    /// Like [`start`](Self::start), and delivers every chunk `one_way` after it
    /// arrived, in each direction, as a network with that latency would: chunks
    /// that arrive together leave together (a delay line, not a delay per chunk
    /// in turn). Then a client that pipelines is seen to make one round trip even
    /// if its requests leave in several writes microseconds apart: the answer to
    /// the first reaches it only `2 × one_way` later.
    pub(crate) async fn start_with_latency(
        upstream: SocketAddr,
        one_way: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Mutex::new(Counts::default()));
        let shared = counts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = pump(client, server, counts, one_way).await;
                    }
                });
            }
        });
        Ok(Self { addr, counts })
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
    one_way: Duration,
) -> std::io::Result<()> {
    // As the client and the server themselves do: no Nagle delay on small
    // writes, which would hold a chunk back until the previous one is acknowledged.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, client_write) = client.into_split();
    let (mut server_read, server_write) = server.into_split();
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    // Client to server: counted as the client sends (when the proxy reads it),
    // then delivered after the latency.
    let (to_server, for_server) = mpsc::unbounded_channel();
    let upstream = {
        let in_flight = in_flight.clone();
        async move {
            let mut parser = Parser::default();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = client_read.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                for kind in parser.feed(&buf[..n]) {
                    let mut counts = counts.lock().unwrap();
                    let mut in_flight = in_flight.lock().unwrap();
                    if !in_flight.busy {
                        counts.flights += 1;
                        in_flight.busy = true;
                    }
                    if matches!(kind, 'S' | 'Q') {
                        in_flight.unanswered_syncs += 1;
                    }
                    *counts.messages.entry(kind).or_insert(0) += 1;
                }
                if to_server
                    .send((Instant::now() + one_way, buf[..n].to_vec()))
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
    };
    // Server to client: delivered after the latency; a ReadyForQuery counts as
    // answered when the client gets it.
    let (to_client, for_client) = mpsc::unbounded_channel();
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if to_client
                .send((Instant::now() + one_way, buf[..n].to_vec()))
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let deliver_to_server = deliver(for_server, server_write, |_| {});
    let deliver_to_client = {
        let mut parser = ServerParser::default();
        deliver(for_client, client_write, move |chunk| {
            for kind in parser.feed(chunk) {
                if kind == 'Z' {
                    let mut in_flight = in_flight.lock().unwrap();
                    in_flight.unanswered_syncs = in_flight.unanswered_syncs.saturating_sub(1);
                    if in_flight.unanswered_syncs == 0 {
                        in_flight.busy = false;
                    }
                }
            }
        })
    };
    let (up, down, to_s, to_c) =
        tokio::join!(upstream, downstream, deliver_to_server, deliver_to_client);
    up.and(down).and(to_s).and(to_c)
}

/// Writes each chunk at its time, in order (seeing it just before), then shuts
/// the write half down once the reading side has ended.
async fn deliver(
    mut chunks: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    mut to: OwnedWriteHalf,
    mut see: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    while let Some((at, chunk)) = chunks.recv().await {
        tokio::time::sleep_until(at).await;
        see(&chunk);
        to.write_all(&chunk).await?;
    }
    to.shutdown().await
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

/// Splits the server's byte stream into protocol messages: after the one-byte
/// answers to SSLRequest and GSSENCRequest (`N`, or `S`/`G` before encryption,
/// which the counting proxy's clients do not use), every message is typed.
#[derive(Default)]
struct ServerParser {
    buf: Vec<u8>,
    started: bool,
}

impl ServerParser {
    /// Appends bytes; returns the types of the messages completed.
    fn feed(&mut self, bytes: &[u8]) -> Vec<char> {
        self.buf.extend_from_slice(bytes);
        let mut kinds = Vec::new();
        loop {
            if !self.started {
                match self.buf.first() {
                    None => break,
                    Some(b'N' | b'S' | b'G') => {
                        self.buf.remove(0);
                        continue;
                    }
                    Some(_) => self.started = true,
                }
            }
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

    #[test]
    fn server_parser_skips_the_ssl_answer_and_finds_ready_for_query() {
        let mut stream = vec![b'N'];
        for kind in [b'R', b'S', b'Z', b'C', b'Z'] {
            stream.push(kind);
            stream.extend_from_slice(&6u32.to_be_bytes());
            stream.extend_from_slice(b"ab");
        }
        for split in 0..stream.len() {
            let mut parser = ServerParser::default();
            let mut kinds = parser.feed(&stream[..split]);
            kinds.extend(parser.feed(&stream[split..]));
            assert_eq!(kinds, vec!['R', 'S', 'Z', 'C', 'Z'], "split at {split}");
        }
    }
}
