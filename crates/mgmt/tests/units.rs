//! The management tool and the unit processes it tracks, without a lab: records are written
//! into the store as a crash or a reused pid would leave them, and stand-in processes play the
//! units (a unit is known by its command line: `unit ... --id N ... --control <socket>`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dva_mgmt::{Mgmt, MgmtOptions};
use serde_json::Value;

const LAB: &str = "unittest-nolab-";

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dva-unittest-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped when dropped (also when a test fails).
struct Proc(Child);

impl Proc {
    fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Wait (bounded) for it to exit; whether it did.
    fn exits_within(&mut self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn open(dir: &Path) -> Mgmt {
    let mut opts = MgmtOptions::new(dir.join("state"), LAB).expect("options");
    opts.run_root = dir.join("run");
    Mgmt::open(opts).expect("open mgmt")
}

fn spec() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/edge-firewall.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Add a unit record to the stored appliance (the management tool must be shut down).
fn store_unit(dir: &Path, id: u32, pid: Option<u32>) {
    let path = dir.join("state/appliances/edge-fw.json");
    let mut rec: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("record")).expect("JSON");
    rec["units"]
        .as_array_mut()
        .expect("units")
        .push(serde_json::json!({
            "id": id,
            "role": "dataplane",
            "host": "nowhere",
            "pid": pid,
            "addr": null,
            "state": "starting",
            "started_ms": 0,
        }));
    rec["next_unit_id"] = (id + 1).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&rec).expect("JSON")).expect("write");
}

/// A stand-in for unit `id` of edge-fw: a shell blocked reading its stdin, whose command line is
/// the unit's.
fn fake_unit(dir: &Path, id: u32) -> Proc {
    let control = dir
        .join("run")
        .join(format!("{LAB}edge-fw"))
        .join(format!("unit-{id}.sock"));
    let child = Command::new("sh")
        .args(["-c", "read x", "unit", "--role", "dataplane", "--id"])
        .arg(id.to_string())
        .args(["--manager", "/nonexistent", "--control"])
        .arg(control)
        .args(["--netns", "nowhere"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    Proc(child)
}

/// A unit record whose pid now belongs to an unrelated process: deleting the appliance must not
/// signal that process.
#[test]
fn delete_never_signals_a_process_that_reused_a_units_pid() {
    let dir = TempDir::new("reuse");
    let m = open(&dir.0);
    m.apply(&spec()).expect("apply");
    m.shutdown();
    let mut bystander = Proc(
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep"),
    );
    store_unit(&dir.0, 7, Some(bystander.0.id()));

    let m = open(&dir.0);
    m.delete("edge-fw").expect("delete");
    m.shutdown();
    // A SIGTERM would have ended it at once; nothing else ends it before 60 s.
    assert!(
        !bystander.exits_within(Duration::from_millis(300)),
        "the unrelated process was signalled: {:?}",
        bystander.0.try_wait()
    );
}

/// A crash between starting a unit and saving its pid: the restarted management tool finds the
/// running unit by its command line and adopts it; of two processes running one unit (left by
/// such crashes), the older is kept and the other stopped: one process per unit id.
#[test]
fn a_running_unit_without_a_recorded_pid_is_adopted_not_started_twice() {
    let dir = TempDir::new("adopt");
    let m = open(&dir.0);
    m.apply(&spec()).expect("apply");
    m.shutdown();
    let mut first = fake_unit(&dir.0, 7);
    // Start times are in clock ticks (10 ms): keep the two apart so "older" is well defined.
    std::thread::sleep(Duration::from_millis(50));
    let mut second = fake_unit(&dir.0, 7);
    let mut other = fake_unit(&dir.0, 8);
    store_unit(&dir.0, 7, None);

    let m = open(&dir.0);
    let units = m.units("edge-fw").expect("units");
    let pids: Vec<(u32, Option<u32>)> = units.iter().map(|u| (u.id, u.pid)).collect();
    assert_eq!(pids, [(7, Some(first.0.id()))], "{units:#?}");
    assert!(
        second.exits_within(Duration::from_secs(5)),
        "the duplicate of unit 7 still runs"
    );
    assert!(first.running(), "the adopted unit was stopped");
    assert!(other.running(), "unit 8 is no unit of the store: untouched");
    let reasons: Vec<String> = m
        .events("edge-fw")
        .expect("events")
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "unit-adopted")
            && reasons.iter().any(|r| r == "unit-duplicate"),
        "{reasons:?}"
    );

    // The adopted unit is the appliance's: deleting it stops it.
    m.delete("edge-fw").expect("delete");
    m.shutdown();
    assert!(
        first.exits_within(Duration::from_secs(5)),
        "delete left the unit running"
    );
    assert!(other.running());
}
