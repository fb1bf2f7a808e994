//! [`GaleraCluster`]: a private MariaDB Galera cluster of local nodes, for tests
//! that kill nodes, lose quorum or skew one node's clock.

use std::fmt;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::throwaway::{ServerError, ServerOptions, ThrowawayServer};

/// The Galera provider library on Debian (package `galera-4`).
pub const GALERA_PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";

type Result<T> = std::result::Result<T, ServerError>;

/// A cluster of private MariaDB nodes replicating through Galera
/// (`wsrep_on=ON`), each a [`ThrowawayServer`] on free loopback ports: its SQL
/// port, its group-communication port (`gcomm`), its incremental state
/// transfer port and its state snapshot transfer port.
///
/// The first node bootstraps the cluster (`--wsrep-new-cluster`); the others
/// start with empty data directories and receive a full copy by `rsync` (a
/// state snapshot transfer, SST). A node restarted after a kill catches up by
/// an incremental transfer (IST) when the others' write-set cache still has
/// what it missed, else by a new SST. Node clocks can be set apart with
/// libfaketime ([`start_with_offsets`](Self::start_with_offsets)).
///
/// Dropping the cluster kills every node and deletes its directory. The calls
/// block; from async code run them in `tokio::task::spawn_blocking`.
pub struct GaleraCluster {
    nodes: Vec<ThrowawayServer>,
    gcomm_ports: Vec<u16>,
}

impl GaleraCluster {
    /// Starts a cluster of `n` nodes (at least 1) with agreeing clocks.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with_offsets(&vec![None; n])
    }

    /// Starts one node per entry of `offsets`: `None` runs on the machine's
    /// clock, `Some("+1.5s")` under libfaketime with that offset
    /// ([`ServerOptions::faketime`]).
    ///
    /// [`ServerError::MissingBinary`] when the Galera provider (`galera-4`),
    /// `rsync` (the state transfer) or libfaketime (`faketime`, only when an
    /// offset is asked for) is missing.
    pub fn start_with_offsets(offsets: &[Option<&str>]) -> Result<Self> {
        assert!(!offsets.is_empty(), "a cluster has at least one node");
        if !Path::new(GALERA_PROVIDER).is_file() {
            return Err(ServerError::MissingBinary {
                binary: "libgalera_smm.so",
                package: "galera-4",
            });
        }
        if !["/usr/bin/rsync", "/bin/rsync"]
            .iter()
            .any(|p| Path::new(p).is_file())
        {
            return Err(ServerError::MissingBinary {
                binary: "rsync",
                package: "rsync",
            });
        }
        let ports: Vec<[u16; 3]> = (0..offsets.len())
            .map(|_| Ok([free_port()?, free_port()?, free_port()?]))
            .collect::<Result<_>>()?;
        let gcomm_ports: Vec<u16> = ports.iter().map(|p| p[0]).collect();
        let address = gcomm_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes: Vec<ThrowawayServer> = Vec::with_capacity(offsets.len());
        for (i, (offset, [gcomm, ist, sst])) in offsets.iter().zip(&ports).enumerate() {
            let mut options = ServerOptions::new()
                .install_arg("--innodb-log-file-size=8M")
                .arg("--innodb-log-file-size=8M")
                .arg("--binlog-format=ROW")
                .arg("--innodb-autoinc-lock-mode=2")
                .arg("--wsrep-on=ON")
                .arg(format!("--wsrep-provider={GALERA_PROVIDER}"))
                .arg(format!("--wsrep-cluster-address=gcomm://{address}"))
                .arg("--wsrep-cluster-name=distrlock-test")
                .arg(format!("--wsrep-node-name=node{}", i + 1))
                .arg(format!("--wsrep-node-address=127.0.0.1:{gcomm}"))
                .arg(format!(
                    "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{gcomm};\
                     ist.recv_addr=127.0.0.1:{ist};gcache.size=32M;\
                     evs.suspect_timeout=PT3S;evs.inactive_timeout=PT6S"
                ))
                .arg(format!("--wsrep-sst-receive-address=127.0.0.1:{sst}"))
                .arg("--wsrep-sst-method=rsync");
            if let Some(offset) = offset {
                options = options.faketime(offset)?;
            }
            let node = if i == 0 {
                let mut node =
                    ThrowawayServer::mariadb_with(options.clone().arg("--wsrep-new-cluster"))?;
                // Restarts join the cluster like any other node.
                node.set_options(options);
                node
            } else {
                ThrowawayServer::mariadb_with(options.empty_data_dir())?
            };
            nodes.push(node);
            wait_synced(&nodes[i], Duration::from_secs(90))?;
        }
        let cluster = Self { nodes, gcomm_ports };
        let size = cluster.status(0, "wsrep_cluster_size")?;
        if size != offsets.len().to_string() {
            return Err(ServerError::Failed(format!(
                "the cluster has {size} nodes, expected {}",
                offsets.len()
            )));
        }
        Ok(cluster)
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: it starts with at least one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (from 0).
    pub fn node(&self, i: usize) -> &ThrowawayServer {
        &self.nodes[i]
    }

    /// Node `i` (from 0), to control it directly.
    pub fn node_mut(&mut self, i: usize) -> &mut ThrowawayServer {
        &mut self.nodes[i]
    }

    /// The SQL port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port()
    }

    /// The group-communication port of node `i`.
    pub fn gcomm_port(&self, i: usize) -> u16 {
        self.gcomm_ports[i]
    }

    /// A URL for the `test` database on node `i`:
    /// `mysql://root@127.0.0.1:PORT/test`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// One URL naming the nodes `order` in that order
    /// (`mysql://root@127.0.0.1:P1,127.0.0.1:P2/test`), the form a
    /// multi-host client accepts.
    pub fn multi_host_url(&self, order: &[usize]) -> String {
        let hosts: Vec<String> = order
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.port(i)))
            .collect();
        format!("mysql://root@{}/test", hosts.join(","))
    }

    /// Runs SQL on node `i` through the command-line client (see
    /// [`ThrowawayServer::sql`]).
    pub fn sql(&self, i: usize, sql: &str) -> Result<String> {
        self.nodes[i].sql(sql)
    }

    /// The value of a status variable on node `i` (`wsrep_cluster_size`,
    /// `wsrep_local_state_comment`, `wsrep_cluster_status`, …).
    pub fn status(&self, i: usize, variable: &str) -> Result<String> {
        status(&self.nodes[i], variable)
    }

    /// Kills node `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again after a kill or stop and waits (up to 90 s) until
    /// it has caught up (IST or SST) and is `Synced` with the cluster.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].start()?;
        wait_synced(&self.nodes[i], Duration::from_secs(90))
    }

    /// Makes node `i`, the survivor of a quorum loss, a primary component on
    /// its own again (`pc.bootstrap=YES`), so the others can rejoin it.
    pub fn bootstrap(&self, i: usize) -> Result<()> {
        self.sql(i, "SET GLOBAL wsrep_provider_options = 'pc.bootstrap=YES'")?;
        wait_synced(&self.nodes[i], Duration::from_secs(30))
    }

    /// Waits (up to `within`) until node `i` reports `wsrep_cluster_status`
    /// `non-Primary`, as after the others were killed.
    pub fn wait_non_primary(&self, i: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.status(i, "wsrep_cluster_status").ok().as_deref() == Some("non-Primary") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ServerError::Failed(format!(
                    "node {} did not lose its primary component within {within:?}",
                    i + 1
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl fmt::Debug for GaleraCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GaleraCluster")
            .field("nodes", &self.nodes)
            .field("gcomm_ports", &self.gcomm_ports)
            .finish()
    }
}

fn status(node: &ThrowawayServer, variable: &str) -> Result<String> {
    let row = node.sql(&format!("SHOW GLOBAL STATUS LIKE '{variable}'"))?;
    Ok(row
        .split_once('\t')
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default())
}

fn wait_synced(node: &ThrowawayServer, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let state = status(node, "wsrep_local_state_comment").unwrap_or_default();
        let ready = status(node, "wsrep_ready").unwrap_or_default();
        if state == "Synced" && ready == "ON" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ServerError::Failed(format!(
                "the Galera node on port {} is not Synced within {within:?} (state {state:?}); \
                 see {}",
                node.port(),
                node.dir().join("server.log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn free_port() -> Result<u16> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ServerError::Failed(format!("finding a free port: {e}")))
}
