//! The autoscaler: turns the data planes' load reports into scale decisions by the layout's
//! policy, with stabilization windows, hysteresis (enforced by spec validation) and a cooldown so
//! it never flaps.
//!
//! * scale out when any scale-out rule's per-data-plane value stays above its threshold for its
//!   window: to as many data planes as bring it back under the threshold (ceil(total / above)),
//!   at least one more, at most `max`;
//! * scale in when every scale-in rule's value stays below its threshold for its window: to as few
//!   data planes as keep each metric under its scale-in threshold (ceil(total / below)), at least
//!   `min`. Since below < above, the result never trips a scale-out rule;
//! * nothing within `cooldown` of the previous change (by the autoscaler or by hand).
//!
//! Pure logic over timestamps in milliseconds, so tests drive it without a clock.

use std::collections::{BTreeMap, VecDeque};

use dva_proto::spec::{AutoscaleSpec, Metric};

/// Load of the serving data planes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub serving: u32,
    pub pps: f64,
    pub cpu: f64,
    pub flows: f64,
}

impl Load {
    pub fn total(&self, m: Metric) -> f64 {
        match m {
            Metric::Pps => self.pps,
            Metric::Cpu => self.cpu,
            Metric::Flows => self.flows,
        }
    }
    pub fn per_dataplane(&self, m: Metric) -> f64 {
        self.total(m) / f64::from(self.serving.max(1))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub target: u32,
    pub reason: String,
}

// Clone: a reconciler pass plans on a copy and commits it only if the record did not change.
#[derive(Debug, Clone, Default)]
pub struct Autoscaler {
    /// Per data plane: (time, rx packets) samples of the last few seconds.
    rx: BTreeMap<u32, VecDeque<(u64, u64)>>,
    out_since: Vec<Option<u64>>,
    in_since: Vec<Option<u64>>,
    /// Last change of the data-plane count (by policy or by hand).
    pub last_change_ms: Option<u64>,
}

/// Packet rates are measured over this much history.
const RATE_WINDOW_MS: u64 = 2_000;

impl Autoscaler {
    /// Feed the reports of the serving data planes: (unit, rx packets, cpu %, open flows).
    pub fn observe(&mut self, now_ms: u64, dataplanes: &[(u32, u64, f64, u64)]) -> Load {
        let mut load = Load {
            serving: dataplanes.len() as u32,
            ..Default::default()
        };
        self.rx
            .retain(|id, _| dataplanes.iter().any(|d| d.0 == *id));
        for &(id, rx, cpu, flows) in dataplanes {
            let q = self.rx.entry(id).or_default();
            if q.back().is_none_or(|&(t, _)| now_ms > t) {
                q.push_back((now_ms, rx));
            }
            while q.len() > 2 && q.front().is_some_and(|&(t, _)| now_ms - t > RATE_WINDOW_MS) {
                q.pop_front();
            }
            if let (Some(&(t0, r0)), Some(&(t1, r1))) = (q.front(), q.back()) {
                if t1 > t0 {
                    load.pps += r1.saturating_sub(r0) as f64 * 1000.0 / (t1 - t0) as f64;
                }
            }
            load.cpu += cpu;
            load.flows += flows as f64;
        }
        load
    }

    /// The decision for `load` now, if any. `current` is the desired data-plane count.
    pub fn decide(
        &mut self,
        now_ms: u64,
        policy: &AutoscaleSpec,
        load: &Load,
        current: u32,
        min: u32,
        max: u32,
    ) -> Option<Decision> {
        self.out_since.resize(policy.scale_out.len(), None);
        self.in_since.resize(policy.scale_in.len(), None);
        if load.serving == 0 {
            return None;
        }
        // Track how long each rule has held, whatever the cooldown says, so a rule that kept
        // holding through the cooldown acts as soon as it ends.
        for (i, r) in policy.scale_out.iter().enumerate() {
            let holds = load.per_dataplane(r.metric) > r.above;
            self.out_since[i] = if holds {
                self.out_since[i].or(Some(now_ms))
            } else {
                None
            };
        }
        for (i, r) in policy.scale_in.iter().enumerate() {
            let holds = load.per_dataplane(r.metric) < r.below;
            self.in_since[i] = if holds {
                self.in_since[i].or(Some(now_ms))
            } else {
                None
            };
        }
        if self
            .last_change_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < policy.cooldown.ms())
        {
            return None;
        }
        let held = |since: Option<u64>, window: u64| since.is_some_and(|s| now_ms - s >= window);
        let mut out: Option<Decision> = None;
        for (i, r) in policy.scale_out.iter().enumerate() {
            if !held(self.out_since[i], r.window.ms()) {
                continue;
            }
            let needed = (load.total(r.metric) / r.above).ceil() as u32;
            let target = needed.max(current + 1).min(max);
            if target > current && out.as_ref().is_none_or(|d| target > d.target) {
                out = Some(Decision {
                    target,
                    reason: format!(
                        "{} per data plane {:.0} > {} for {} ms: {current} -> {target} data planes",
                        r.metric.as_str(),
                        load.per_dataplane(r.metric),
                        r.above,
                        r.window.ms()
                    ),
                });
            }
        }
        if out.is_some() {
            self.last_change_ms = Some(now_ms);
            return out;
        }
        if policy.scale_in.is_empty()
            || !policy
                .scale_in
                .iter()
                .enumerate()
                .all(|(i, r)| held(self.in_since[i], r.window.ms()))
        {
            return None;
        }
        let target = policy
            .scale_in
            .iter()
            .map(|r| {
                let total = load.total(r.metric);
                if r.below > 0.0 {
                    // Strictly below the threshold after the change.
                    (total / r.below).floor() as u32 + 1
                } else if total > 0.0 {
                    current
                } else {
                    min
                }
            })
            .max()
            .unwrap_or(current)
            .max(min);
        if target >= current {
            return None;
        }
        self.last_change_ms = Some(now_ms);
        let why: Vec<String> = policy
            .scale_in
            .iter()
            .map(|r| {
                format!(
                    "{} per data plane {:.0} < {} for {} ms",
                    r.metric.as_str(),
                    load.per_dataplane(r.metric),
                    r.below,
                    r.window.ms()
                )
            })
            .collect();
        Some(Decision {
            target,
            reason: format!("{}: {current} -> {target} data planes", why.join(", ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dva_proto::spec::{DurationSpec, ScaleInRule, ScaleOutRule};

    fn policy() -> AutoscaleSpec {
        AutoscaleSpec {
            scale_out: vec![ScaleOutRule {
                metric: Metric::Pps,
                above: 1000.0,
                window: DurationSpec(2000),
            }],
            scale_in: vec![ScaleInRule {
                metric: Metric::Pps,
                below: 300.0,
                window: DurationSpec(3000),
            }],
            cooldown: DurationSpec(5000),
        }
    }

    fn load(serving: u32, pps: f64) -> Load {
        Load {
            serving,
            pps,
            ..Default::default()
        }
    }

    #[test]
    fn scales_out_to_the_needed_count_after_the_window() {
        let mut a = Autoscaler::default();
        let p = policy();
        assert_eq!(a.decide(0, &p, &load(1, 3500.0), 1, 1, 8), None);
        assert_eq!(a.decide(1999, &p, &load(1, 3500.0), 1, 1, 8), None);
        let d = a
            .decide(2000, &p, &load(1, 3500.0), 1, 1, 8)
            .expect("decision");
        assert_eq!(d.target, 4);
        assert!(d.reason.contains("pps"), "{}", d.reason);
        // Bounded by max.
        let mut a = Autoscaler::default();
        a.decide(0, &p, &load(1, 50_000.0), 1, 1, 3);
        assert_eq!(
            a.decide(2000, &p, &load(1, 50_000.0), 1, 1, 3)
                .map(|d| d.target),
            Some(3)
        );
    }

    #[test]
    fn a_blip_shorter_than_the_window_does_nothing() {
        let mut a = Autoscaler::default();
        let p = policy();
        a.decide(0, &p, &load(1, 3500.0), 1, 1, 8);
        a.decide(1500, &p, &load(1, 500.0), 1, 1, 8);
        assert_eq!(a.decide(2500, &p, &load(1, 3500.0), 1, 1, 8), None);
    }

    #[test]
    fn cooldown_then_scale_in_to_min_without_flapping() {
        let mut a = Autoscaler::default();
        let p = policy();
        a.decide(0, &p, &load(1, 3500.0), 1, 1, 8);
        assert_eq!(
            a.decide(2000, &p, &load(1, 3500.0), 1, 1, 8)
                .map(|d| d.target),
            Some(4)
        );
        // Load gone right away: nothing during the cooldown...
        for t in (2100..7000).step_by(100) {
            assert_eq!(a.decide(t, &p, &load(4, 0.0), 4, 1, 8), None, "at {t}");
        }
        // ...then down to min once the scale-in window has passed.
        let d = a
            .decide(7000, &p, &load(4, 0.0), 4, 1, 8)
            .expect("scale in");
        assert_eq!(d.target, 1);
        // A moderate load keeps enough data planes that none trips the scale-out rule.
        let mut a = Autoscaler::default();
        a.decide(0, &p, &load(4, 800.0), 4, 1, 8);
        let d = a
            .decide(3000, &p, &load(4, 800.0), 4, 1, 8)
            .expect("scale in");
        assert_eq!(d.target, 3);
        assert!(800.0 / f64::from(d.target) < 1000.0);
    }

    #[test]
    fn rates_come_from_packet_counters() {
        let mut a = Autoscaler::default();
        a.observe(0, &[(1, 0, 10.0, 5), (2, 0, 20.0, 7)]);
        let l = a.observe(1000, &[(1, 1000, 10.0, 5), (2, 3000, 20.0, 7)]);
        assert_eq!(l.serving, 2);
        assert!((l.pps - 4000.0).abs() < 1e-6, "{l:?}");
        assert!((l.cpu - 30.0).abs() < 1e-6);
        assert!((l.flows - 12.0).abs() < 1e-6);
        assert!((l.per_dataplane(Metric::Pps) - 2000.0).abs() < 1e-6);
    }
}
