//! The API does not wait on a reconciler pass's I/O: with a provisioner that blocks inside
//! `alive` (a stand-in for an agent that does not answer), `list`, `get` and `scale` still
//! answer. Before the pass was split into plan and execute, the pass held the appliances' lock
//! through that call and they waited with it.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dva_mgmt::provision::{Provisioner, UnitLaunch, UnitProcess};
use dva_mgmt::{Mgmt, MgmtOptions, ScaleRequest};

/// Holds every `alive` call while closed.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Calls held right now.
    held: AtomicU32,
}

/// Starts nothing (hands out made-up pids); its units are alive, once the gate lets it say so.
struct Stuck {
    gate: Arc<Gate>,
    next_pid: AtomicU32,
}

impl Provisioner for Stuck {
    fn start(&self, _: &UnitLaunch) -> anyhow::Result<UnitProcess> {
        Ok(UnitProcess {
            pid: 4_000_000 + self.next_pid.fetch_add(1, Ordering::Relaxed),
            start: Some(1),
        })
    }
    fn stop(&self, _: UnitProcess, _: &UnitLaunch) {}
    fn kill(&self, _: UnitProcess, _: &UnitLaunch) {}
    fn alive(&self, _: UnitProcess, _: &UnitLaunch) -> bool {
        let g = &self.gate;
        let mut closed = g.closed.lock().unwrap_or_else(|e| e.into_inner());
        g.held.fetch_add(1, Ordering::SeqCst);
        while *closed {
            closed = g.opened.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
        g.held.fetch_sub(1, Ordering::SeqCst);
        true
    }
    fn find(&self, _: &UnitLaunch) -> Vec<UnitProcess> {
        Vec::new()
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_api_answers_while_a_pass_waits_on_the_provisioner() {
    let dir = std::env::temp_dir().join(format!("dva-stuck-pass-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = MgmtOptions::local(dir.join("state")).expect("options");
    opts.run_root = dir.join("run");
    let gate = Arc::new(Gate::default());
    let stuck = Stuck {
        gate: gate.clone(),
        next_pid: AtomicU32::new(0),
    };
    let m = Mgmt::open_with(opts, Box::new(stuck), None).expect("open mgmt");
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/edge-firewall.yaml");
    m.apply(&std::fs::read_to_string(spec).expect("spec"))
        .expect("apply");
    wait_until("units are started", || {
        m.get("edge-fw")
            .is_ok_and(|v| v.units.iter().any(|u| u.pid.is_some()))
    });

    *gate.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
    wait_until("a pass is inside the provisioner", || {
        gate.held.load(Ordering::SeqCst) > 0
    });
    let (tx, rx) = mpsc::channel();
    {
        let m = m.clone();
        std::thread::spawn(move || {
            let listed = m.list().len();
            let got = m.get("edge-fw").is_ok();
            let req = ScaleRequest {
                dataplanes: 3,
                drain_deadline: None,
            };
            let scaled = m.scale("edge-fw", &req).map(|v| v.dataplanes.desired);
            let _ = tx.send((listed, got, scaled));
        });
    }
    // Generous: the calls take milliseconds; only a pass holding the lock makes them wait.
    let answer = rx.recv_timeout(Duration::from_secs(10));
    *gate.closed.lock().unwrap_or_else(|e| e.into_inner()) = false;
    gate.opened.notify_all();
    let (listed, got, scaled) =
        answer.expect("the API waited on a reconciler pass blocked in the provisioner");
    assert_eq!(listed, 1);
    assert!(got);
    assert_eq!(scaled.ok(), Some(3));
    m.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
