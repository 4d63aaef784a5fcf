//! The unit's end of its channel to the manager: connect (and reconnect, for as long as the unit
//! lives), say hello, receive config pushes, have the data path apply them, ACK or NACK, and send
//! a report every [`REPORT_INTERVAL_MS`].
//!
//! The data path never blocks on the manager: it polls for [`Update`]s between batches. A manager
//! that goes away leaves the unit serving its last config until a manager is back.
//!
//! The channel is TCP with mutual TLS: the unit presents its certificate and accepts only a
//! manager whose certificate chains to the installation's CA and names the manager of the
//! unit's own appliance (`manager.APPLIANCE.dva`, the appliance read from the unit's
//! certificate). Several addresses may be given (every host a manager may lead from): the unit
//! tries them in turn.

use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use dva_proto::channel::{self, FromManager, Running, ToManager, UnitReport, REPORT_INTERVAL_MS};
use dva_proto::RoleConfig;

use crate::stats::StatsCell;
use crate::tls::{self, Credentials, Peer, TlsFiles, TlsWriter};

/// A config for the data path to apply; it answers on `reply` (`Err`: the NACK's reason).
pub struct Update {
    pub config: RoleConfig,
    pub reply: Sender<Result<(), String>>,
}

/// How long the channel waits for the data path to apply a config before NACKing it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ChannelClient {
    /// The config the unit serves (for the hello after a reconnect).
    pub running: Arc<Mutex<Option<Running>>>,
}

pub struct ChannelArgs {
    /// Where a manager may listen (the leader is one of them).
    pub managers: Vec<SocketAddr>,
    pub tls: TlsFiles,
    pub unit: u32,
    pub role: &'static str,
    pub stats: StatsCell,
    pub stop: Arc<AtomicBool>,
}

impl ChannelClient {
    /// Start the channel thread; configs arrive on the returned receiver.
    pub fn start(args: ChannelArgs) -> std::io::Result<(ChannelClient, Receiver<Update>)> {
        if args.managers.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no manager address",
            ));
        }
        // Credentials are read once: a bad file is an error at start, not a reconnect loop.
        let creds = Credentials::load(&args.tls)?;
        let server_name = match creds.identity()? {
            Peer::Unit { appliance, id } if id == args.unit => tls::manager_server_name(&appliance),
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the unit's certificate names {other:?}, not unit {}",
                        args.unit
                    ),
                ))
            }
        };
        let config = creds.client_config()?;
        let (tx, rx) = mpsc::channel();
        let running = Arc::new(Mutex::new(None));
        let r = running.clone();
        thread::Builder::new()
            .name("channel".into())
            .spawn(move || {
                // The last round's outcome, so a manager that stays away is said once.
                let mut quiet = false;
                while !args.stop.load(Ordering::Relaxed) {
                    let result = match connect_any(&args.managers, &config, &server_name) {
                        Ok((addr, halves)) => {
                            quiet = false;
                            session(&args, halves, &tx, &r).map_err(|e| (Some(addr), e))
                        }
                        Err(e) => Err((None, e)),
                    };
                    if let Err((addr, e)) = result {
                        // Nobody listening (a manager starting or being replaced, standbys that
                        // do not listen) is routine: say it once, not every round.
                        let routine = addr.is_none();
                        let said = routine && quiet;
                        if !args.stop.load(Ordering::Relaxed) && !said {
                            match addr {
                                Some(addr) => tracing::warn!(
                                    %addr, error = %e, "manager channel broken; reconnecting"
                                ),
                                None => tracing::warn!(
                                    error = %e, "no manager answers at any address; retrying"
                                ),
                            }
                        }
                        quiet = routine;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            })?;
        Ok((ChannelClient { running }, rx))
    }
}

/// Connect to whichever of `addrs` answers first: the leading manager is at one of them (a
/// standby does not listen) and the others may be machines that are gone, which must not cost a
/// connect timeout each. The losers' connections are closed.
fn connect_any(
    addrs: &[SocketAddr],
    config: &Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<(SocketAddr, (tls::TlsReader, TlsWriter))> {
    let (tx, rx) = mpsc::channel();
    for &addr in addrs {
        let (tx, config, name) = (tx.clone(), config.clone(), server_name.to_string());
        let spawned = thread::Builder::new()
            .name("channel-connect".into())
            .spawn(move || {
                let r = tls::connect(addr, config, &name, tls::HANDSHAKE_TIMEOUT);
                // A loser's connection is dropped (closed) here once nobody receives it.
                let _ = tx.send((addr, r));
            });
        spawned?;
    }
    drop(tx);
    let mut last = None;
    for (addr, r) in rx {
        match r {
            Ok(halves) => return Ok((addr, halves)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no manager address")))
}

/// One connection to the manager, until it breaks.
fn session(
    args: &ChannelArgs,
    (stream, writer): (tls::TlsReader, TlsWriter),
    updates: &Sender<Update>,
    running: &Arc<Mutex<Option<Running>>>,
) -> std::io::Result<()> {
    writer.set_write_timeout(Some(Duration::from_secs(2)))?;
    let writer = Arc::new(Mutex::new(writer));
    let hello = ToManager::Hello {
        unit: args.unit,
        role: args.role.to_string(),
        pid: std::process::id(),
        running: running.lock().ok().and_then(|g| g.clone()),
    };
    send(&writer, &hello)?;
    // Reports go from their own thread so a slow config apply never delays the heartbeat.
    let alive = Arc::new(AtomicBool::new(true));
    {
        let (writer, alive, stats, stop) = (
            writer.clone(),
            alive.clone(),
            args.stats.clone(),
            args.stop.clone(),
        );
        thread::Builder::new()
            .name("report".into())
            .spawn(move || {
                let mut cpu = CpuMeter::new();
                while alive.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    let s = stats.snapshot();
                    let report = UnitReport {
                        version: s.config_version,
                        rx_packets: s.rx_packets,
                        tx_packets: s.tx_packets,
                        drops: s.total_drops(),
                        flows: s.flows,
                        active_flows: s.active_flows,
                        cpu_percent: cpu.sample(),
                        health: s.health,
                        bucket_flows: s.bucket_flows,
                    };
                    if send(&writer, &ToManager::Report(report)).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(REPORT_INTERVAL_MS));
                }
            })?;
    }
    // A manager says it is alive every report interval; silence means it (or its machine, or
    // the path to it) is gone: leave, and find a manager at the other addresses.
    stream.set_read_timeout(Some(Duration::from_millis(channel::MANAGER_SILENT_MS)))?;
    let result = (|| {
        let mut reader = BufReader::new(stream);
        loop {
            let Some(msg) = channel::recv::<_, FromManager>(&mut reader)? else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "manager closed the channel",
                ));
            };
            let FromManager::Config {
                version,
                nonce,
                config,
            } = msg
            else {
                continue;
            };
            let (table, backplane, backups) = match config.as_ref() {
                RoleConfig::Dispatcher(c) => (c.table.clone(), c.backplane.clone(), Vec::new()),
                RoleConfig::Dataplane(c) => {
                    (c.table.clone(), c.backplane.clone(), c.backups.clone())
                }
            };
            let (reply_tx, reply_rx) = mpsc::channel();
            let outcome = if updates
                .send(Update {
                    config: *config,
                    reply: reply_tx,
                })
                .is_err()
            {
                Err("the unit is shutting down".to_string())
            } else {
                reply_rx.recv_timeout(APPLY_TIMEOUT).unwrap_or_else(|_| {
                    Err("the data path did not apply the config in time".into())
                })
            };
            let answer = match outcome {
                Ok(()) => {
                    if let Ok(mut g) = running.lock() {
                        *g = Some(Running {
                            version,
                            table,
                            backplane,
                            backups,
                        });
                    }
                    ToManager::Ack { version, nonce }
                }
                Err(error) => ToManager::Nack {
                    version,
                    nonce,
                    error,
                },
            };
            send(&writer, &answer)?;
        }
    })();
    alive.store(false, Ordering::Relaxed);
    if let Ok(w) = writer.lock() {
        w.shutdown();
    }
    result
}

fn send(writer: &Arc<Mutex<TlsWriter>>, msg: &ToManager) -> std::io::Result<()> {
    let mut w = writer
        .lock()
        .map_err(|_| std::io::Error::other("channel writer poisoned"))?;
    channel::send(&mut *w, msg)
}

/// CPU used by this process between two samples, from /proc/self/stat (utime + stime).
struct CpuMeter {
    last: Option<(std::time::Instant, u64)>,
    ticks_per_sec: f64,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        // SAFETY: sysconf takes a constant and touches no memory of ours.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        CpuMeter {
            last: None,
            ticks_per_sec: if hz > 0 { hz as f64 } else { 100.0 },
        }
    }

    fn ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may contain spaces) start at state (field 3).
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after the state field.
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }

    /// Percent of one core since the previous sample (0 on the first).
    fn sample(&mut self) -> f64 {
        let now = std::time::Instant::now();
        let Some(t) = Self::ticks() else { return 0.0 };
        let pct = match self.last {
            Some((at, prev)) => {
                let wall = now.duration_since(at).as_secs_f64();
                if wall > 0.0 {
                    (t.saturating_sub(prev) as f64 / self.ticks_per_sec) / wall * 100.0
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, t));
        pct
    }
}
