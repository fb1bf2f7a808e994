//! The one `LISTEN` connection of a backend, fanning release announcements out to
//! its [`ReleaseNotifier`].
//!
//! It is a plain tokio-postgres connection outside the pool: pooled connections'
//! notifications are dropped by deadpool, and a session that LISTENs must stay
//! open. When the connection fails (killed, server restart, network), the task
//! reconnects with capped exponential backoff and then wakes every waiter, since
//! announcements may have been missed meanwhile. Waiters poll anyway, so a missed
//! announcement costs latency, never correctness.

use std::time::Duration;

use distrlock_core::{LockKey, ReleaseNotifier};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_postgres::{AsyncMessage, Client, Connection};

use crate::connect::Connector;

/// How often an idle listening connection is checked, so a silently dead network
/// is noticed within about this long plus the connect timeout.
const PING_EVERY: Duration = Duration::from_secs(15);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) struct Listener {
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) connector: Connector,
    pub(crate) listen_sql: String,
    pub(crate) notifier: ReleaseNotifier,
    pub(crate) connect_timeout: Duration,
}

impl Listener {
    /// Starts the task; `ready` fires once the first `LISTEN` is in place.
    pub(crate) fn spawn(self) -> (tokio::task::AbortHandle, oneshot::Receiver<()>) {
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(self.run(ready_tx));
        (task.abort_handle(), ready_rx)
    }

    async fn run(self, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut listened_before = false;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut listening = false;
            let ended = match &self.connector {
                Connector::Plain => match self.connect(tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        self.session(
                            &client,
                            connection,
                            &mut listening,
                            listened_before,
                            &mut ready,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                },
                #[cfg(feature = "tls")]
                Connector::Rustls(tls) => match self.connect(tls.clone()).await {
                    Ok((client, connection)) => {
                        self.session(
                            &client,
                            connection,
                            &mut listening,
                            listened_before,
                            &mut ready,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                },
            };
            // Until listening again, releases go unannounced: waiters poll.
            self.notifier.set_complete(false);
            if listening {
                listened_before = true;
                backoff = FIRST_BACKOFF;
            }
            match ended {
                Ok(()) => tracing::debug!("release listener connection closed; reconnecting"),
                Err(error) => {
                    tracing::debug!(%error, "release listener connection failed; reconnecting")
                }
            }
            // Jittered (50–100 % of the backoff), so processes do not reconnect in step.
            let pause = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn connect<T>(
        &self,
        tls: T,
    ) -> Result<(Client, Connection<tokio_postgres::Socket, T::Stream>), String>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    {
        match tokio::time::timeout(self.connect_timeout, self.pg.connect(tls)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// Runs one connection until it fails. Sets `listening` once `LISTEN` succeeded.
    async fn session<S, T>(
        &self,
        client: &Client,
        connection: Connection<S, T>,
        listening: &mut bool,
        listened_before: bool,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let notifier = self.notifier.clone();
        let drive = drive(connection, notifier);
        let listen = async {
            client
                .batch_execute(&self.listen_sql)
                .await
                .map_err(|e| e.to_string())?;
            *listening = true;
            // From now on every release of the table is announced here.
            self.notifier.set_complete(true);
            if listened_before {
                // Releases announced while we were away are lost: wake everyone.
                self.notifier.notify_all();
            }
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            loop {
                tokio::time::sleep(PING_EVERY).await;
                match tokio::time::timeout(self.connect_timeout, client.simple_query("")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("listener ping timed out".to_owned()),
                }
            }
        };
        tokio::select! {
            ended = drive => ended,
            failed = listen => failed,
        }
    }
}

/// Polls the connection, turning notifications into announcements, until it ends.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    notifier: ReleaseNotifier,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(AsyncMessage::Notification(n))) => {
                // The payload is the released key; anything else is not ours.
                if let Ok(key) = LockKey::new(n.payload()) {
                    notifier.notify(&key);
                }
            }
            Some(Ok(_notice)) => {}
        }
    }
}
