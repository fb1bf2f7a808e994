//! `FaultProxy` freezes model a frozen network path: traffic is held, not dropped,
//! and a client that closes or resets its socket during the freeze still gets
//! what it sent, then its FIN, to the server once the path thaws. Checked against
//! plain TCP servers of the test's own on loopback.

use std::io;
use std::time::Duration;

use distrlock_testkit::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// How long held traffic may take to arrive after a thaw.
const DELIVERY: Duration = Duration::from_secs(5);

/// A proxy in front of a listener of the test's own, one client connected
/// through it, and the server's end of that connection.
async fn connected() -> (FaultProxy, TcpStream, TcpStream) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let proxy = FaultProxy::start(listener.local_addr().unwrap())
        .await
        .unwrap();
    let client = TcpStream::connect(proxy.addr()).await.unwrap();
    let (server, _) = tokio::time::timeout(DELIVERY, listener.accept())
        .await
        .expect("the proxy connects upstream")
        .unwrap();
    (proxy, client, server)
}

/// Asserts that nothing (neither bytes nor an end of stream) arrives on `s` for
/// a while.
async fn assert_quiet(s: &mut TcpStream, what: &str) {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(QUIET, s.read(&mut byte)).await;
    assert!(read.is_err(), "{what}: got {read:?} through a frozen path");
}

/// Everything `s` receives up to a clean end of stream (a FIN, not a reset).
async fn read_to_eof(s: &mut TcpStream, what: &str) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    match tokio::time::timeout(DELIVERY, s.read_to_end(&mut got)).await {
        Ok(Ok(_)) => Ok(got),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("{what}: {e} after {} bytes", got.len()),
        )),
        Err(_) => panic!(
            "{what}: no end of stream within {DELIVERY:?} ({} bytes)",
            got.len()
        ),
    }
}

/// The reviewer's case: a statement written into a frozen path, the socket
/// closed, the path thawed. The server gets every byte, then EOF.
#[tokio::test]
async fn bytes_and_fin_of_a_client_closed_during_a_freeze_reach_the_server() {
    let (proxy, mut client, mut server) = connected().await;
    client.write_all(b"hello ").await.unwrap();
    let mut hello = [0u8; 6];
    server.read_exact(&mut hello).await.unwrap();

    proxy.freeze();
    // Several writes, so that several segments are held.
    for part in [&b"INSERT "[..], b"INTO t ", b"VALUES (1);"] {
        client.write_all(part).await.unwrap();
    }
    drop(client);
    assert_quiet(&mut server, "frozen").await;

    proxy.thaw();
    let got = read_to_eof(&mut server, "after the thaw").await.unwrap();
    assert_eq!(got, b"INSERT INTO t VALUES (1);");
}

/// A client that resets its socket (SO_LINGER 0) during the freeze: what its
/// kernel had already sent was in flight and still arrives, then EOF.
#[tokio::test]
async fn bytes_of_a_client_reset_during_a_freeze_reach_the_server() {
    let (proxy, mut client, mut server) = connected().await;
    proxy.freeze();
    client.write_all(b"UPDATE t SET x = 2;").await.unwrap();
    client.set_zero_linger().unwrap();
    drop(client);
    assert_quiet(&mut server, "frozen").await;

    proxy.thaw();
    let got = read_to_eof(&mut server, "after the thaw").await.unwrap();
    assert_eq!(got, b"UPDATE t SET x = 2;");
}

/// Bytes from the server are held during a freeze too, and arrive on thaw.
#[tokio::test]
async fn server_bytes_are_held_during_a_freeze() {
    let (proxy, mut client, mut server) = connected().await;
    proxy.freeze();
    server.write_all(b"NOTIFY").await.unwrap();
    assert_quiet(&mut client, "frozen").await;
    proxy.thaw();
    let mut got = [0u8; 6];
    tokio::time::timeout(DELIVERY, client.read_exact(&mut got))
        .await
        .expect("held server bytes arrive after the thaw")
        .unwrap();
    assert_eq!(&got, b"NOTIFY");
}

/// The server talks to the client during the freeze (notifications, say) while
/// the client writes and then closes. On thaw the server's bytes meet a closed
/// client; that must not tear the upstream connection down before the client's
/// bytes and FIN are through. Repeated, because which direction the proxy
/// served first used to be a coin toss.
#[tokio::test]
async fn server_traffic_held_in_a_freeze_does_not_cut_off_the_clients_bytes() {
    for round in 0..20 {
        let (proxy, mut client, mut server) = connected().await;
        proxy.freeze();
        client.write_all(b"SELECT acquire();").await.unwrap();
        // More than one read's worth of the proxy, so that it writes the closed
        // client more than once.
        server.write_all(&vec![b'n'; 64 * 1024]).await.unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        proxy.thaw();
        let got = read_to_eof(&mut server, &format!("round {round}")).await;
        assert_eq!(
            got.as_deref().map_err(|e| e.to_string()),
            Ok(&b"SELECT acquire();"[..]),
            "round {round}: the client's bytes, then EOF"
        );
    }
}

/// A client that half-closes (shuts down its write side) during the freeze and
/// waits for the answer: the server gets the request and EOF after the thaw,
/// and its reply still reaches the client, as over a real path.
#[tokio::test]
async fn half_closed_client_gets_the_reply() {
    let (proxy, mut client, mut server) = connected().await;
    proxy.freeze();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    assert_quiet(&mut server, "frozen").await;

    proxy.thaw();
    let got = read_to_eof(&mut server, "after the thaw").await.unwrap();
    assert_eq!(got, b"request");
    server.write_all(b"reply").await.unwrap();
    drop(server);
    let reply = read_to_eof(&mut client, "the reply").await.unwrap();
    assert_eq!(reply, b"reply");
}

/// Dropping a frozen proxy (like `cut`) delivers nothing it held: the server
/// sees the connection end without a byte.
#[tokio::test]
async fn dropping_a_frozen_proxy_delivers_nothing() {
    let (proxy, mut client, mut server) = connected().await;
    proxy.freeze();
    client.write_all(b"DELETE FROM t;").await.unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(proxy);
    let mut got = Vec::new();
    let end = tokio::time::timeout(DELIVERY, server.read_to_end(&mut got))
        .await
        .expect("the connection ends");
    assert!(got.is_empty(), "delivered {got:?} ({end:?})");
}
