//! The backplane keys of a role config, as the backplane's authentication takes them.

use std::collections::BTreeMap;

use dva_io::seal::{AuthStats, EpochKey};
use dva_proto::role::BackplaneAuth;

pub fn epoch_keys(auth: &BackplaneAuth) -> Vec<EpochKey> {
    auth.keys
        .iter()
        .map(|k| EpochKey {
            epoch: k.epoch,
            key: k.key,
        })
        .collect()
}

/// The authentication counters of a unit's receive side, by reason (their sum is the
/// `backplane-auth` drop count).
pub fn auth_counters(counters: &mut BTreeMap<String, u64>, a: &AuthStats) {
    counters.insert("backplane_auth_ok".into(), a.opened);
    counters.insert("backplane_auth_short".into(), a.short);
    counters.insert("backplane_auth_unknown_epoch".into(), a.unknown_epoch);
    counters.insert("backplane_auth_bad_tag".into(), a.bad_tag);
    counters.insert("backplane_auth_replayed".into(), a.replayed);
}
