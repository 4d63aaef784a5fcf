//! The durable store: one JSON document per appliance under `<state>/appliances/`, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so a `kill -9` at any
//! moment leaves either the old or the new record, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::model::ApplianceRecord;

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> anyhow::Result<Store> {
        let dir = state_dir.join("appliances");
        // The store holds the appliances' specs: root and our user only.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Store { dir })
    }

    /// Every stored appliance. A record that does not parse is reported, not silently dropped.
    pub fn load_all(&self) -> anyhow::Result<Vec<ApplianceRecord>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let rec: ApplianceRecord = serde_json::from_str(&text)
                .with_context(|| format!("store record {} is corrupt", path.display()))?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn save(&self, rec: &ApplianceRecord) -> anyhow::Result<()> {
        let path = self.path(&rec.name);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(rec)?;
        {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        // Names are validated by the spec (DNS-label-like), so they are safe as file names.
        self.dir.join(format!("{name}.json"))
    }
}
