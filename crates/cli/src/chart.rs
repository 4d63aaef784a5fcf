//! SVG charts the benches write next to their tables (`--svg FILE`): a table of 24 ratios is
//! read faster as bars against the kernel's 1.0, and a run of kills as a timeline of recoveries.
//! Plain SVG 1.1 text, no script or external reference, so GitHub renders it inline from docs/.

use std::fmt::Write as _;

/// One bar of [`ratio_bars`]: a path's result on a workload, relative to the baseline's.
pub struct Bar {
    pub group: String,
    pub label: String,
    /// Result / baseline result (1.0: as good as the baseline).
    pub ratio: f64,
    /// The baseline itself (drawn grey).
    pub baseline: bool,
}

/// Text for SVG: the characters XML gives a meaning to, escaped.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];

/// Horizontal bars, grouped (a heading per group), with the baseline's 1.0 as a dashed line.
/// Bars of paths that are not the baseline take a colour per distinct label prefix (the path's
/// first word: `dva`, `HAProxy`, ...), so one product reads as one colour across groups.
pub fn ratio_bars(title: &str, bars: &[Bar]) -> String {
    const W: f64 = 860.0;
    const LEFT: f64 = 300.0;
    const RIGHT: f64 = 60.0;
    const BAR: f64 = 14.0;
    const GAP: f64 = 4.0;
    const HEAD: f64 = 22.0;
    let max = bars
        .iter()
        .map(|b| b.ratio)
        .filter(|r| r.is_finite())
        .fold(1.5f64, f64::max)
        .ceil();
    let x = |r: f64| LEFT + (W - LEFT - RIGHT) * (r.clamp(0.0, max) / max);
    let mut kinds: Vec<String> = Vec::new();
    let mut body = String::new();
    let mut y = 40.0;
    let mut group = None;
    for b in bars {
        if group != Some(&b.group) {
            y += 6.0;
            let _ = writeln!(
                body,
                "<text x='8' y='{:.1}' font-weight='bold'>{}</text>",
                y + 12.0,
                esc(&b.group)
            );
            y += HEAD;
            group = Some(&b.group);
        }
        let kind = b.label.split_whitespace().next().unwrap_or("").to_string();
        let color = if b.baseline {
            "#999"
        } else {
            let i = kinds.iter().position(|k| *k == kind).unwrap_or_else(|| {
                kinds.push(kind.clone());
                kinds.len() - 1
            });
            COLORS[i % COLORS.len()]
        };
        // A result that failed has no ratio: an empty bar saying so.
        let (r, text) = if b.ratio.is_finite() {
            (b.ratio, format!("{:.2}x", b.ratio))
        } else {
            (0.0, "-".to_string())
        };
        let _ = writeln!(
            body,
            "<text x='{:.1}' y='{:.1}' text-anchor='end'>{}</text>\
             <rect x='{LEFT}' y='{:.1}' width='{:.1}' height='{BAR}' fill='{color}'/>\
             <text x='{:.1}' y='{:.1}'>{text}</text>",
            LEFT - 6.0,
            y + BAR - 3.0,
            esc(&b.label),
            y,
            (x(r) - LEFT).max(0.5),
            x(r) + 4.0,
            y + BAR - 3.0,
        );
        y += BAR + GAP;
    }
    let h = y + 30.0;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{h:.0}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='8' y='20' font-size='14' font-weight='bold'>{}</text>\n",
        esc(title)
    );
    svg += &body;
    // The axis: 0, the baseline's 1.0 (dashed, across the whole chart), and each whole ratio.
    let _ = writeln!(
        svg,
        "<line x1='{LEFT}' y1='34' x2='{LEFT}' y2='{:.1}' stroke='#333'/>",
        y
    );
    let mut r = 0.0;
    while r <= max + 1e-9 {
        let _ = writeln!(
            svg,
            "<text x='{:.1}' y='{:.1}' text-anchor='middle' fill='#555'>{r:.1}x</text>",
            x(r),
            y + 16.0
        );
        r += if max > 4.0 { 1.0 } else { 0.5 };
    }
    let _ = writeln!(
        svg,
        "<line x1='{0:.1}' y1='34' x2='{0:.1}' y2='{1:.1}' stroke='#d62728' stroke-dasharray='4 3'/>\
         <text x='{2:.1}' y='32' fill='#d62728'>baseline 1.0x</text>",
        x(1.0),
        y,
        x(1.0) + 4.0
    );
    svg += "</svg>\n";
    svg
}

/// One kill of [`recovery_timeline`].
pub struct Recovery {
    /// Seconds into the run.
    pub at: f64,
    pub label: String,
    pub seconds: f64,
}

/// Kills along the run's time axis, each a bar as tall as its recovery took.
pub fn recovery_timeline(title: &str, subtitle: &str, run_secs: f64, kills: &[Recovery]) -> String {
    const W: f64 = 860.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 30.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 70.0;
    let span = kills
        .iter()
        .map(|k| k.at + k.seconds)
        .fold(run_secs.max(1.0), f64::max);
    let top = kills.iter().map(|k| k.seconds).fold(0.5f64, f64::max);
    let top = (top * 2.0).ceil() / 2.0;
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * (t / span);
    let y = |s: f64| H - BOTTOM - (H - TOP - BOTTOM) * (s / top);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='8' y='20' font-size='14' font-weight='bold'>{}</text>\n\
         <text x='8' y='38' fill='#555'>{}</text>\n\
         <line x1='{LEFT}' y1='{:.1}' x2='{:.1}' y2='{:.1}' stroke='#333'/>\n\
         <line x1='{LEFT}' y1='{TOP}' x2='{LEFT}' y2='{:.1}' stroke='#333'/>\n\
         <text x='12' y='{:.1}' transform='rotate(-90 12 {:.1})' text-anchor='middle'>recovery, s</text>\n",
        esc(title),
        esc(subtitle),
        y(0.0),
        W - RIGHT,
        y(0.0),
        y(0.0),
        (TOP + y(0.0)) / 2.0,
        (TOP + y(0.0)) / 2.0,
    );
    let mut s = 0.0;
    while s <= top + 1e-9 {
        let _ = writeln!(
            svg,
            "<text x='{:.1}' y='{:.1}' text-anchor='end' fill='#555'>{s:.1}</text>\
             <line x1='{LEFT}' y1='{2:.1}' x2='{3:.1}' y2='{2:.1}' stroke='#eee'/>",
            LEFT - 6.0,
            y(s) + 4.0,
            y(s),
            W - RIGHT
        );
        s += if top > 3.0 {
            1.0
        } else if top > 1.0 {
            0.5
        } else {
            0.1
        };
    }
    let step = if span > 60.0 { 10.0 } else { 5.0 };
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let _ = writeln!(
            svg,
            "<text x='{:.1}' y='{:.1}' text-anchor='middle' fill='#555'>{t:.0} s</text>",
            x(t),
            y(0.0) + 16.0
        );
        t += step;
    }
    let roles = ["dataplane", "dispatcher", "manager"];
    for k in kills {
        let role = roles
            .iter()
            .position(|r| k.label.starts_with(r))
            .unwrap_or(3);
        let color = COLORS[role % COLORS.len()];
        let w = (x(k.at + k.seconds) - x(k.at)).max(3.0);
        let _ = writeln!(
            svg,
            "<rect x='{:.1}' y='{:.1}' width='{w:.1}' height='{:.1}' fill='{color}'/>\
             <text x='{:.1}' y='{:.1}' text-anchor='middle'>{:.2} s</text>\
             <text x='{:.1}' y='{:.1}' text-anchor='middle' fill='{color}'>{}</text>",
            x(k.at),
            y(k.seconds),
            (y(0.0) - y(k.seconds)).max(1.0),
            x(k.at) + w / 2.0,
            y(k.seconds) - 4.0,
            k.seconds,
            x(k.at) + w / 2.0,
            y(0.0) + 34.0,
            esc(&k.label)
        );
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn well_formed(svg: &str) {
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        // Every element closes: as many `<` openings as closings/self-closings, roughly.
        let opens = svg.matches("<text").count();
        assert_eq!(opens, svg.matches("</text>").count(), "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn bars_scale_to_the_largest_ratio_and_escape_labels() {
        let bars = vec![
            Bar {
                group: "new TCP conn/s".into(),
                label: "kernel + nftables".into(),
                ratio: 1.0,
                baseline: true,
            },
            Bar {
                group: "new TCP conn/s".into(),
                label: "dva <2 DP> & more".into(),
                ratio: 2.4,
                baseline: false,
            },
            Bar {
                group: "UDP".into(),
                label: "HAProxy".into(),
                ratio: f64::NAN,
                baseline: false,
            },
        ];
        let svg = ratio_bars("dva vs the kernel", &bars);
        well_formed(&svg);
        assert!(svg.contains("dva &lt;2 DP&gt; &amp; more"), "{svg}");
        assert!(svg.contains("2.40x") && svg.contains("3.0x"), "{svg}");
        assert!(svg.contains("baseline 1.0x"));
        // The NaN bar is drawn empty, never as NaN coordinates.
        assert!(svg.contains("HAProxy"));
    }

    #[test]
    fn timeline_places_each_kill_at_its_time() {
        let kills = vec![
            Recovery {
                at: 3.0,
                label: "dispatcher 4".into(),
                seconds: 0.4,
            },
            Recovery {
                at: 18.0,
                label: "dataplane 6".into(),
                seconds: 1.3,
            },
        ];
        let svg = recovery_timeline("kills", "0 broken", 36.0, &kills);
        well_formed(&svg);
        assert!(svg.contains("0.40 s") && svg.contains("1.30 s"));
        assert!(svg.contains("dataplane 6") && svg.contains("35 s"));
    }
}
