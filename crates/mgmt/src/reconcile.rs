//! The reconciler (stub while the API is written).

use dva_proto::ApplianceSpec;

use crate::core::{Appliance, Inner};
use crate::model::*;

#[derive(Default)]
pub struct Runtime {}

pub(crate) fn run(inner: &Inner) {
    while !inner.stop.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub(crate) fn check_compiles(spec: &ApplianceSpec) -> Result<(), String> {
    spec.validate().map_err(|e| e.to_string())
}

pub(crate) fn view(_inner: &Inner, app: &Appliance) -> ApplianceView {
    let l = &app.spec.spec.layout.dataplanes;
    ApplianceView {
        name: app.rec.name.clone(),
        status: ApplianceStatus::Pending,
        generation: app.rec.generation,
        config_version: 0,
        dataplanes: DataplaneCounts {
            desired: app.rec.dataplanes,
            ready: 0,
            draining: 0,
            min: l.min,
            max: l.max,
        },
        units: Vec::new(),
        error: None,
        spec: app.rec.spec_text.clone(),
    }
}

pub(crate) fn delete(inner: &Inner, name: &str) -> anyhow::Result<()> {
    inner.lock().remove(name);
    inner.store.remove(name)
}
