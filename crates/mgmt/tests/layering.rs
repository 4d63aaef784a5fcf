//! The management tool places units through a `Topology` it is handed; the lab is one such
//! topology and lives with the lab (`dva_lab::LabHosts`). Nothing in this crate may reach for the
//! lab again, or a real machine's `dva serve` would carry the lab's assumptions.

use std::path::Path;

#[test]
fn the_management_tool_does_not_depend_on_the_lab() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
    // Every dependency table ([dependencies], [target.*.dependencies]); dev-dependencies may.
    let mut table = String::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            table = line.to_string();
            continue;
        }
        let normal = table.ends_with("dependencies]") && !table.contains("dev-dependencies");
        assert!(
            !(normal && line.starts_with("dva-lab")),
            "{table} names dva-lab: {line}"
        );
    }
    let mut stack = vec![dir.join("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("src dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("source");
                // Code, not the comments that say where the lab's topology went.
                let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
                for line in code {
                    assert!(!line.contains("dva_lab"), "{}: {line}", p.display());
                }
            }
        }
    }
}
