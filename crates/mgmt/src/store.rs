//! The durable store: one JSON document per appliance under `<state>/appliances/`, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so a `kill -9` at any
//! moment leaves either the old or the new record, never a torn one. A record that is unusable all
//! the same (disk trouble, a hand edit) is set aside and reported, and the others load.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::model::ApplianceRecord;

/// What [`Store::load_all`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<ApplianceRecord>,
    pub corrupt: Vec<CorruptRecord>,
}

/// A record that could not be used, by the name of its file.
#[derive(Debug, Clone)]
pub struct CorruptRecord {
    pub name: String,
    /// What was wrong, and where the file went.
    pub reason: String,
}

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

    /// Every stored appliance that reads and parses, and the records that do not. Those are set
    /// aside (renamed `NAME.json.corrupt-<unix ms>`, kept for a human to look at) so that one bad
    /// file neither stops the management tool nor is overwritten by a later apply.
    pub fn load_all(&self) -> anyhow::Result<Loaded> {
        let mut out = Loaded::default();
        let entries =
            fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed = fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|text| Ok(serde_json::from_str::<ApplianceRecord>(&text)?));
            match parsed {
                Ok(rec) if rec.name == name => out.records.push(rec),
                Ok(rec) => {
                    let why = format!("it holds appliance {:?}, not {name:?}", rec.name);
                    out.corrupt.push(self.set_aside(&name, &why));
                }
                Err(e) => out.corrupt.push(self.set_aside(&name, &format!("{e:#}"))),
            }
        }
        out.records.sort_by(|a, b| a.name.cmp(&b.name));
        out.corrupt.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Move the record of `name` out of the way (renamed, not deleted) because of `why`.
    pub fn set_aside(&self, name: &str, why: &str) -> CorruptRecord {
        let path = self.path(name);
        let aside = self
            .dir
            .join(format!("{name}.json.corrupt-{}", crate::model::now_ms()));
        let moved = fs::rename(&path, &aside)
            .and_then(|()| File::open(&self.dir)?.sync_all())
            .map(|()| aside.clone());
        let reason = match &moved {
            Ok(aside) => format!(
                "stored record {} is unusable ({why}); set aside as {}",
                path.display(),
                aside.display()
            ),
            Err(e) => format!(
                "stored record {} is unusable ({why}); setting it aside failed: {e}",
                path.display()
            ),
        };
        CorruptRecord {
            name: name.to_string(),
            reason,
        }
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
