//! Provisioners start and stop compute units on hosts.

use std::path::PathBuf;

pub trait Provisioner: Send + Sync {}

pub struct LocalProvisioner {
    #[allow(dead_code)]
    exe: PathBuf,
}

impl LocalProvisioner {
    pub fn new(exe: PathBuf) -> LocalProvisioner {
        LocalProvisioner { exe }
    }
}

impl Provisioner for LocalProvisioner {}
