//! The manager role: takes the appliance's desired state from the management tool, owns the
//! bucket table, compiles one config per unit and pushes it over each unit's channel, tracking
//! ACK/NACK per unit (Envoy xDS semantics).
//!
//! Ordering rules that keep traffic undisturbed while data planes come and go:
//! * a new data plane gets (and ACKs) a config listing it as a peer, but owning nothing, before
//!   the table gives it buckets;
//! * a table change goes to the data planes first; dispatchers get it only once every data plane
//!   ACKed it (or a timeout passed), so no packet reaches an owner that does not yet know the
//!   bucket's history to punt along;
//! * a previous owner leaves a bucket's history only once it reports no flows there, measured
//!   after every dispatcher switched to the table that moved the bucket.
//!
//! The state machine ([`State`]) is sans-IO: one thread here feeds it the readers' events
//! with the time, and writes what it asks to the connections, whose writers it owns; one reader
//! thread per connection does the handshake and reads.
//!
//! The manager is where a config push's two ends are both seen, so it times them
//! ([`crate::stats::Latencies`] in its stats): each unit's ACK from the version's first send to
//! it, and each table switch from the first push of the table that moved buckets to the last
//! dispatcher's ACK.
//!
//! The channel is TCP with mutual TLS ([`crate::tls`]): a peer must present a certificate of the
//! installation's CA naming a unit of this appliance or the management tool. A unit's hello must
//! name the unit its certificate names, and only the management tool may send desired state.
//! Anything else is closed and counted as `channel_peer_refused`. At most
//! [`MAX_HANDSHAKING`] connections may be mid-handshake at once, each for at most
//! [`tls::HANDSHAKE_TIMEOUT`].

#[cfg(test)]
mod conformance;
mod core;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use dva_flow::UnitId;
use dva_proto::channel::{self, ToManager};

use crate::stats::{StatsCell, UnitStats};
use crate::tls::{self, Credentials, Peer, TlsFiles, TlsWriter};

pub use self::core::may_send;
use self::core::{ConnId, Input, Output, State};

/// Connections still in their TLS handshake beyond this many are closed at once: unauthenticated
/// peers cannot pile up threads.
pub const MAX_HANDSHAKING: usize = 64;
/// A peer silent this long is gone (units report every 250 ms, the management tool sends its
/// desired state every second): its connection is closed, even if no FIN ever came.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ManagerArgs {
    pub unit: UnitId,
    /// The channel's TCP address (`tcp://ADDR:PORT` on the command line).
    pub listen: SocketAddr,
    /// The leader-election lock file.
    pub lock: PathBuf,
    /// This manager's certificate (naming it and `manager.APPLIANCE.dva`), key, and the CA.
    pub tls: TlsFiles,
    pub stop: Arc<AtomicBool>,
    pub stats: StatsCell,
    pub ready: Arc<AtomicBool>,
}

/// What a connection's reader thread tells the run loop.
enum Event {
    /// Handshake done: the writer half, and who the certificate names.
    Opened(ConnId, TlsWriter, Peer),
    Msg(ConnId, Box<ToManager>),
    Closed(ConnId),
}

/// Leader election among an appliance's managers: an exclusive `flock` on the lock file. The
/// kernel drops the lock when its holder dies, however it dies, so a standby blocked on it takes
/// over within its poll period. (One machine's filesystem is this election's store; managers on
/// several hosts would use the management tool's store, e.g. an etcd lease.)
fn acquire_leadership(args: &ManagerArgs) -> anyhow::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = &args.lock;
    if let Some(dir) = path.parent() {
        dva_io::local::create_private_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(dva_io::local::FILE_MODE)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut standby_published = false;
    while !args.stop.load(Ordering::Relaxed) {
        // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(file));
        }
        if !standby_published {
            standby_published = true;
            args.stats.try_publish(UnitStats {
                unit: args.unit,
                role: "manager".into(),
                counters: [("leader".to_string(), 0)].into_iter().collect(),
                ..Default::default()
            });
            // A standby is ready: it serves as soon as the leader goes.
            args.ready.store(true, Ordering::Release);
            tracing::info!("standby: another manager leads");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(None)
}

/// Whether a manager leads from the lock file at `path` (someone holds its lock).
pub fn leader_alive(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    // Dropping the file releases a lock we may just have taken.
    !free
}

/// Who may use the channel, and what each may say.
struct Admission {
    /// This manager's appliance (from its own certificate).
    appliance: String,
    refused: Arc<AtomicU64>,
    handshaking: AtomicUsize,
}

impl Admission {
    /// Whether a peer with this verified identity may connect at all.
    fn peer(&self, peer: &Peer) -> Result<(), String> {
        match peer {
            Peer::Mgmt => Ok(()),
            Peer::Unit { appliance, .. } if *appliance == self.appliance => Ok(()),
            Peer::Unit { appliance, id } => Err(format!(
                "unit {id} of appliance {appliance}, not of {}",
                self.appliance
            )),
        }
    }

    fn refuse(&self, why: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("channel peer refused: {why}");
    }
}

pub fn run(args: ManagerArgs) -> anyhow::Result<()> {
    let creds = Credentials::load(&args.tls).context("loading the manager's TLS credentials")?;
    let appliance = match creds.identity()? {
        Peer::Unit { appliance, id } if id == args.unit => appliance,
        other => anyhow::bail!(
            "the manager's certificate names {other:?}, not unit {} of an appliance",
            args.unit
        ),
    };
    let tls_config = creds.server_config()?;
    let Some(_lock) = acquire_leadership(&args)? else {
        return Ok(());
    };
    tracing::info!("leading");
    let listener = TcpListener::bind(args.listen)
        .with_context(|| format!("binding the manager channel on {}", args.listen))?;
    let (tx, rx) = mpsc::channel::<Event>();
    let refused = Arc::new(AtomicU64::new(0));
    let admission = Arc::new(Admission {
        appliance,
        refused: refused.clone(),
        handshaking: AtomicUsize::new(0),
    });
    {
        let (tx, admission) = (tx.clone(), admission.clone());
        thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, tls_config, tx, admission))?;
    }
    args.ready.store(true, Ordering::Release);
    let mut st = State::new(args.unit);
    let mut writers: BTreeMap<ConnId, TlsWriter> = BTreeMap::new();
    let mut publish = Instant::now();
    while !args.stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => feed(&mut st, &mut writers, ev),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // Drain whatever else is queued before stepping, so a burst of reports costs one step.
        while let Ok(ev) = rx.try_recv() {
            feed(&mut st, &mut writers, ev);
        }
        st.handle(Instant::now(), Input::Tick);
        write_outputs(&mut st, &mut writers, &admission);
        if publish.elapsed() >= Duration::from_millis(200) {
            publish = Instant::now();
            let mut counters: BTreeMap<String, u64> =
                [("leader".to_string(), 1)].into_iter().collect();
            let refused = refused.load(Ordering::Relaxed);
            if refused > 0 {
                counters.insert("channel_peer_refused".to_string(), refused);
            }
            args.stats.try_publish(UnitStats {
                unit: args.unit,
                role: "manager".into(),
                counters,
                config_version: st.version(),
                latency: st.latency(),
                appliance: st.appliance().unwrap_or_default().to_string(),
                ..Default::default()
            });
        }
    }
    Ok(())
}

/// Hand one reader event to the state machine, keeping the writer half of a new connection.
fn feed(st: &mut State, writers: &mut BTreeMap<ConnId, TlsWriter>, ev: Event) {
    let now = Instant::now();
    match ev {
        Event::Opened(id, writer, peer) => {
            writers.insert(id, writer);
            st.handle(now, Input::Opened(id, peer));
        }
        Event::Msg(id, msg) => st.handle(now, Input::Msg(id, msg)),
        Event::Closed(id) => {
            writers.remove(&id);
            st.handle(now, Input::Closed(id));
        }
    }
}

/// Write what the state machine asks for. A connection whose write fails is shut down (its
/// reader thread ends too) and the state machine hears at once that it closed.
fn write_outputs(st: &mut State, writers: &mut BTreeMap<ConnId, TlsWriter>, admission: &Admission) {
    let mut failed = Vec::new();
    for out in st.drain_outputs() {
        match out {
            Output::Send(id, msg) => {
                let Some(w) = writers.get_mut(&id) else {
                    continue;
                };
                if channel::send(w, &msg).is_err() {
                    w.shutdown();
                    writers.remove(&id);
                    failed.push(id);
                }
            }
            Output::Close(id, why) => {
                admission.refuse(&why);
                if let Some(w) = writers.remove(&id) {
                    w.shutdown();
                }
            }
        }
    }
    let now = Instant::now();
    for id in failed {
        st.handle(now, Input::Closed(id));
    }
}

fn accept_loop(
    listener: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    tx: Sender<Event>,
    admission: Arc<Admission>,
) {
    let mut next: ConnId = 1;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if admission.handshaking.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKING {
            admission.handshaking.fetch_sub(1, Ordering::AcqRel);
            admission.refuse("too many connections in their TLS handshake");
            continue;
        }
        let id = next;
        next += 1;
        let (tx, a, config) = (tx.clone(), admission.clone(), tls_config.clone());
        let spawned = thread::Builder::new()
            .name(format!("conn-{id}"))
            .spawn(move || serve_conn(id, conn, config, &tx, &a));
        if spawned.is_err() {
            admission.handshaking.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One connection: the handshake (bounded in time, counted in `handshaking`), the peer's
/// identity, then its messages, handed on with that identity's connection.
fn serve_conn(
    id: ConnId,
    mut sock: TcpStream,
    config: Arc<rustls::ServerConfig>,
    tx: &Sender<Event>,
    admission: &Admission,
) {
    let established = (|| -> Result<_, String> {
        let mut conn = rustls::Connection::Server(
            rustls::ServerConnection::new(config).map_err(|e| e.to_string())?,
        );
        let deadline = Instant::now() + tls::HANDSHAKE_TIMEOUT;
        tls::handshake(&mut conn, &mut sock, deadline).map_err(|e| format!("handshake: {e}"))?;
        let _ = sock.set_nodelay(true);
        let _ = sock.set_read_timeout(Some(IDLE_TIMEOUT));
        let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
        tls::split(conn, sock).map_err(|e| e.to_string())
    })();
    admission.handshaking.fetch_sub(1, Ordering::AcqRel);
    let (reader, writer) = match established {
        Ok(halves) => halves,
        Err(e) => return admission.refuse(&e),
    };
    let peer = match writer.peer().and_then(|p| admission.peer(&p).map(|()| p)) {
        Ok(p) => p,
        Err(e) => {
            writer.shutdown();
            return admission.refuse(&e);
        }
    };
    if tx.send(Event::Opened(id, writer, peer)).is_err() {
        return;
    }
    let mut r = BufReader::new(reader);
    // A peer speaking garbage is disconnected; one speaking out of turn is refused by the state
    // machine (see [`may_send`]), whose run loop shuts the connection down, ending this loop.
    while let Ok(Some(msg)) = channel::recv::<_, ToManager>(&mut r) {
        if tx.send(Event::Msg(id, Box::new(msg))).is_err() {
            return;
        }
    }
    let _ = tx.send(Event::Closed(id));
}
