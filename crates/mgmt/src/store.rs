//! The durable store of appliance records: the [`Store`] trait, chosen with `dva serve --store`
//! ([`StoreConfig`]), and its default backend [`FileStore`]. The other backend keeps the records
//! in etcd, for several `dva serve` replicas ([`crate::etcd::EtcdStore`]).
//!
//! [`FileStore`]: one JSON document per appliance under `<state>/appliances/`, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so a `kill -9` at any
//! moment leaves either the old or the new record, never a torn one. A record that is unusable all
//! the same (disk trouble, a hand edit) is set aside and reported, and the others load.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::hosts::{HostRecord, JoinTokenRecord};
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

/// Where appliance records live: `--store file:DIR` (the default, `DIR` = `--state`) or
/// `--store etcd://HOST:PORT[,HOST:PORT...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    File(PathBuf),
    /// Client endpoints (`HOST:PORT`) of one etcd cluster.
    Etcd(Vec<String>),
}

impl StoreConfig {
    /// Parse `--store`: `file:DIR` or `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(text: &str) -> Result<StoreConfig, String> {
        if let Some(dir) = text.strip_prefix("file:") {
            if dir.is_empty() {
                return Err(format!("--store {text:?}: file: needs a directory"));
            }
            return Ok(StoreConfig::File(PathBuf::from(dir)));
        }
        if let Some(list) = text.strip_prefix("etcd://") {
            let endpoints: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
            for e in &endpoints {
                // A port is required: etcd has no well-known one clients can assume here.
                let ok = e
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !ok {
                    return Err(format!("--store {text:?}: endpoint {e:?} is not HOST:PORT"));
                }
            }
            return Ok(StoreConfig::Etcd(endpoints));
        }
        Err(format!(
            "--store {text:?}: expected file:DIR or etcd://HOST:PORT[,HOST:PORT...]"
        ))
    }
}

/// TLS towards etcd (`dva serve --etcd-cafile/--etcd-certfile/--etcd-keyfile`, the names
/// kube-apiserver uses): the CA that signed the members' certificates, and this client's own
/// certificate and key for a cluster that runs with `--client-cert-auth` (as it should: whoever
/// can write to etcd can rewrite every appliance's spec).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    /// Certificate and key, PEM; both or neither.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A durable home for appliance records. Every write is whole (a record is replaced, never
/// torn) and done before the caller acts on it, so a crash loses nothing that was accepted.
pub trait Store: Send + Sync {
    /// Every record that reads and parses, and the ones that do not (set aside, see
    /// [`FileStore::load_all`]).
    fn load_all(&self) -> anyhow::Result<Loaded>;
    /// Move the record of `name` out of the way (kept for a human, not deleted) because of `why`.
    fn set_aside(&self, name: &str, why: &str) -> CorruptRecord;
    fn save(&self, rec: &ApplianceRecord) -> anyhow::Result<()>;
    /// Forget `name` (no error when it is not there).
    fn remove(&self, name: &str) -> anyhow::Result<()>;
    /// The registered hosts (agents).
    fn load_hosts(&self) -> anyhow::Result<Vec<HostRecord>>;
    fn save_host(&self, host: &HostRecord) -> anyhow::Result<()>;
    fn remove_host(&self, name: &str) -> anyhow::Result<()>;
    /// Keep a one-time join token, by its hash.
    fn save_join_token(&self, hash: &str, token: &JoinTokenRecord) -> anyhow::Result<()>;
    /// Remove the join token with this hash and return it: a second use finds nothing.
    fn take_join_token(&self, hash: &str) -> anyhow::Result<Option<JoinTokenRecord>>;
}

pub struct FileStore {
    dir: PathBuf,
    /// `<state>/hosts/NAME.json`.
    hosts: PathBuf,
    /// `<state>/join-tokens/HASH.json`.
    tokens: PathBuf,
}

/// Write `bytes` to `path` through a temporary file and a rename (0600), then sync the directory.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> anyhow::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow::Error::from(e).context(format!("removing {}", path.display()))),
    }
}

impl FileStore {
    pub fn open(state_dir: &Path) -> anyhow::Result<FileStore> {
        let dir = state_dir.join("appliances");
        let hosts = state_dir.join("hosts");
        let tokens = state_dir.join("join-tokens");
        // The store holds the appliances' specs: root and our user only.
        for d in [&dir, &hosts, &tokens] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(FileStore { dir, hosts, tokens })
    }

    fn path(&self, name: &str) -> PathBuf {
        // Names are validated by the spec (DNS-label-like), so they are safe as file names.
        self.dir.join(format!("{name}.json"))
    }
}

impl Store for FileStore {
    /// Every stored appliance that reads and parses, and the records that do not. Those are set
    /// aside (renamed `NAME.json.corrupt-<unix ms>`, kept for a human to look at) so that one bad
    /// file neither stops the management tool nor is overwritten by a later apply.
    fn load_all(&self) -> anyhow::Result<Loaded> {
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

    /// Renamed `NAME.json.corrupt-<unix ms>` beside the others.
    fn set_aside(&self, name: &str, why: &str) -> CorruptRecord {
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

    fn save(&self, rec: &ApplianceRecord) -> anyhow::Result<()> {
        replace_file(&self.path(&rec.name), &serde_json::to_vec_pretty(rec)?)
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    fn load_hosts(&self) -> anyhow::Result<Vec<HostRecord>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.hosts)
            .with_context(|| format!("reading {}", self.hosts.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| Ok(serde_json::from_str::<HostRecord>(&t)?));
            match parsed {
                Ok(h) => out.push(h),
                // One unreadable host record must not hide the others.
                Err(e) => tracing::warn!("host record {}: {e:#}; ignored", path.display()),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn save_host(&self, host: &HostRecord) -> anyhow::Result<()> {
        let path = self.hosts.join(format!("{}.json", host.name));
        replace_file(&path, &serde_json::to_vec_pretty(host)?)
    }

    fn remove_host(&self, name: &str) -> anyhow::Result<()> {
        remove_file(&self.hosts.join(format!("{name}.json"))).map(|_| ())
    }

    fn save_join_token(&self, hash: &str, token: &JoinTokenRecord) -> anyhow::Result<()> {
        let path = self.tokens.join(format!("{hash}.json"));
        replace_file(&path, &serde_json::to_vec(token)?)
    }

    fn take_join_token(&self, hash: &str) -> anyhow::Result<Option<JoinTokenRecord>> {
        let path = self.tokens.join(format!("{hash}.json"));
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(None);
        };
        // Whoever removes the file used the token: one process, one use.
        if !remove_file(&path)? {
            return Ok(None);
        }
        Ok(serde_json::from_str(&text).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flags_parse() {
        assert_eq!(
            StoreConfig::parse("file:/var/lib/dva"),
            Ok(StoreConfig::File("/var/lib/dva".into()))
        );
        assert_eq!(
            StoreConfig::parse("etcd://127.0.0.1:2379,10.0.0.2:2379"),
            Ok(StoreConfig::Etcd(vec![
                "127.0.0.1:2379".into(),
                "10.0.0.2:2379".into()
            ]))
        );
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://:2379",
            "file:",
            "redis://x:1",
            "",
        ] {
            assert!(StoreConfig::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
