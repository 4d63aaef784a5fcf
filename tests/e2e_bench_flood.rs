//! `dva bench flood --quick` end to end: both paths (the kernel with nftables, dva with 2 data
//! planes) are set up, flooded and probed, and the table has figures for each. A check that the
//! bench works, not a measurement: the real run is `dva bench flood` (docs/SECURITY.md).

mod common;

use std::process::Command;

use common::*;

/// The Markdown rows of `path` (`| path | flood | kpps | ... |`), split into trimmed cells.
fn rows<'a>(out: &'a str, path: &str) -> Vec<Vec<&'a str>> {
    out.lines()
        .filter(|l| l.starts_with(&format!("| {path}")))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

#[test]
fn quick_flood_bench_reports_both_paths() {
    let _serial = serial();
    let out = Command::new(dva_bin())
        .args([
            "bench",
            "flood",
            "--quick",
            "--markdown",
            "--prefix",
            "e2ebf-",
        ])
        .output()
        .expect("run dva bench flood");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dva bench flood --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for path in ["kernel + nftables fw", "dva edge-fw, 2 DP"] {
        let rows = rows(&stdout, path);
        assert_eq!(rows.len(), 2, "one row per flood for {path}:\n{stdout}");
        for r in rows {
            let kpps: f64 = r[2].parse().unwrap_or(0.0);
            assert!(kpps > 0.0, "flood rate of {r:?}:\n{stdout}");
            let during: Vec<u32> = r[7].split('/').filter_map(|n| n.parse().ok()).collect();
            assert!(
                during.len() == 2 && during[1] > 0,
                "probes during the flood of {r:?}:\n{stdout}"
            );
            assert!(r[5].parse::<f64>().is_ok(), "p99 of {r:?}:\n{stdout}");
        }
    }
    eprintln!("{stdout}");
}
