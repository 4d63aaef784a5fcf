//! Fault injection on the backplane (this kernel has no netem): a middleware device spliced into
//! one host's backplane link that drops, delays or reorders the frames crossing it, in both
//! directions, so tests can degrade or cut off a unit without killing it.
//!
//! In the fabric namespace the host's port `b-hostM` is taken off the backplane bridge, and a new
//! veth pair `ix-hM` (on the bridge) / `iy-hM` is added; a thread relays frames between `b-hostM`
//! and `iy-hM` with AF_PACKET rings (dva's own driver), applying the impairment. Dropping the
//! guard stops the relay and puts the host's port back on the bridge.

use std::collections::VecDeque;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dva_io::af_packet::{AfPacket, AfPacketConfig};
use dva_io::FrameIo;

use super::Xorshift;
use crate::{cmd, Lab, LabError};

/// What happens to each frame crossing the device.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Percent of frames dropped (100: the host is cut off).
    pub drop_pct: f64,
    /// Added one-way delay.
    pub delay: Duration,
    /// Percent of frames held back and sent after the next one.
    pub reorder_pct: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairStats {
    pub forwarded: u64,
    pub dropped: u64,
    pub reordered: u64,
}

pub struct Impaired {
    fabric: String,
    host_port: String,
    bridge_side: String,
    stop: Arc<AtomicBool>,
    settings: Arc<Mutex<Impairment>>,
    stats: Arc<Mutex<ImpairStats>>,
    thread: Option<JoinHandle<()>>,
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    cmd::run(Command::new(cmd::tool("ip")?).args(args)).map(drop)
}

impl Impaired {
    /// Splice the device into data-plane host `m`'s backplane link.
    pub fn start(lab: &Lab, m: usize, imp: Impairment) -> Result<Impaired, LabError> {
        let fabric = lab.fabric_ns();
        let host_port = format!("b-host{m}");
        let bridge_side = format!("ix-h{m}");
        let relay_side = format!("iy-h{m}");
        let _ = ip(&["-n", &fabric, "link", "del", &bridge_side]);
        ip(&[
            "-n",
            &fabric,
            "link",
            "add",
            &bridge_side,
            "mtu",
            "9000",
            "type",
            "veth",
            "peer",
            "name",
            &relay_side,
            "mtu",
            "9000",
        ])?;
        let ethtool = cmd::tool("ethtool")?;
        for dev in [&bridge_side, &relay_side] {
            cmd::run(
                Command::new(cmd::tool("ip")?)
                    .args(["netns", "exec", &fabric])
                    .arg(&ethtool)
                    .args([
                        "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
                    ]),
            )?;
        }
        ip(&["-n", &fabric, "link", "set", &relay_side, "up"])?;
        ip(&[
            "-n",
            &fabric,
            "link",
            "set",
            &bridge_side,
            "master",
            "br-bp",
            "up",
        ])?;
        let settings = Arc::new(Mutex::new(imp));
        let stats = Arc::new(Mutex::new(ImpairStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (fabric, host_port, relay_side) =
                (fabric.clone(), host_port.clone(), relay_side.clone());
            let (settings, stats, stop) = (settings.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || {
                let opened = dva_io::netns::enter(&fabric)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        let cfg = AfPacketConfig::default();
                        let a = AfPacket::open(&host_port, &cfg).map_err(|e| e.to_string())?;
                        let b = AfPacket::open(&relay_side, &cfg).map_err(|e| e.to_string())?;
                        Ok((a, b))
                    });
                match opened {
                    Ok((a, b)) => {
                        let _ = tx.send(Ok(()));
                        relay(a, b, &settings, &stats, &stop);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
        };
        let ready = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the relay did not start".to_string())
            .and_then(|r| r);
        let mut me = Impaired {
            fabric,
            host_port,
            bridge_side,
            stop,
            settings,
            stats,
            thread: Some(thread),
        };
        if let Err(e) = ready {
            me.restore();
            return Err(LabError::BadOutput {
                command: "backplane impairment relay".into(),
                reason: e,
            });
        }
        // Only now take the host's port off the bridge: frames start crossing the relay.
        if let Err(e) = ip(&["-n", &me.fabric, "link", "set", &me.host_port, "nomaster"]) {
            me.restore();
            return Err(e);
        }
        Ok(me)
    }

    /// Change the impairment on the fly.
    pub fn set(&self, imp: Impairment) {
        if let Ok(mut s) = self.settings.lock() {
            *s = imp;
        }
    }

    pub fn stats(&self) -> ImpairStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn restore(&mut self) {
        let _ = ip(&[
            "-n",
            &self.fabric,
            "link",
            "set",
            &self.host_port,
            "master",
            "br-bp",
        ]);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = ip(&["-n", &self.fabric, "link", "del", &self.bridge_side]);
    }
}

impl Drop for Impaired {
    fn drop(&mut self) {
        self.restore();
    }
}

fn relay(
    mut a: AfPacket,
    mut b: AfPacket,
    settings: &Mutex<Impairment>,
    stats: &Mutex<ImpairStats>,
    stop: &AtomicBool,
) {
    // Repeatable drop and reorder decisions.
    let mut rng = Xorshift::new(0x9e37_79b9_7f4a_7c15);
    // Frames waiting for their delay to pass: (due, to_b, frame).
    let mut queue: VecDeque<(Instant, bool, Vec<u8>)> = VecDeque::new();
    // A frame held back to be sent after the next one, per direction.
    let mut held: [Option<Vec<u8>>; 2] = [None, None];
    let mut poller = dva_io::poll::Poller::new(&[a.as_raw_fd(), b.as_raw_fd()]);
    while !stop.load(Ordering::Relaxed) {
        let imp = settings.lock().map(|s| *s).unwrap_or_default();
        let now = Instant::now();
        let mut incoming: Vec<(bool, Vec<u8>)> = Vec::new();
        let _ = a.rx_batch(64, |f, _| incoming.push((true, f.to_vec())));
        let _ = b.rx_batch(64, |f, _| incoming.push((false, f.to_vec())));
        let mut st = ImpairStats::default();
        for (to_b, f) in incoming {
            if rng.pct() < imp.drop_pct {
                st.dropped += 1;
                continue;
            }
            queue.push_back((now + imp.delay, to_b, f));
        }
        while queue.front().is_some_and(|(due, _, _)| *due <= now) {
            let Some((_, to_b, f)) = queue.pop_front() else {
                break;
            };
            let dir = usize::from(to_b);
            let port: &mut AfPacket = if to_b { &mut b } else { &mut a };
            if held[dir].is_none() && rng.pct() < imp.reorder_pct {
                held[dir] = Some(f);
                st.reordered += 1;
                continue;
            }
            let _ = port.tx(&f);
            st.forwarded += 1;
            if let Some(h) = held[dir].take() {
                let _ = port.tx(&h);
                st.forwarded += 1;
            }
        }
        if queue.is_empty() {
            // Nothing came after a held frame: it goes now (reordered only when there is a next).
            for (dir, h) in held.iter_mut().enumerate() {
                if let Some(f) = h.take() {
                    let port: &mut AfPacket = if dir == 1 { &mut b } else { &mut a };
                    let _ = port.tx(&f);
                    st.forwarded += 1;
                }
            }
        }
        let _ = a.flush();
        let _ = b.flush();
        if let Ok(mut s) = stats.lock() {
            s.forwarded += st.forwarded;
            s.dropped += st.dropped;
            s.reordered += st.reordered;
        }
        let wait = queue
            .front()
            .map(|(due, _, _)| due.saturating_duration_since(Instant::now()).as_millis() as i32)
            .unwrap_or(20)
            .clamp(0, 20);
        if wait > 0 {
            let _ = poller.wait(wait);
        }
    }
}
