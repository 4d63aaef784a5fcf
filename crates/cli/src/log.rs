//! Structured logs for every dva process, through `tracing`: one line per event on stderr, with
//! a UTC timestamp and a level, as text (default) or JSON objects (`--log-format json` or
//! `DVA_LOG_FORMAT=json`, for Loki/Elastic/journald pipelines). The level filter is `DVA_LOG`
//! (EnvFilter syntax: `debug`, `dva_mgmt=debug,info`; default `info`).
//!
//! A unit process stamps every line with its appliance, unit id and role (`appliance=edge-fw
//! unit=3 role=dataplane`): they are process-wide, so they hold on every thread without each
//! thread entering a span, and `dva logs` output from several units stays attributable once
//! merged.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Who this process is, for the fields of every line (units only).
#[derive(Debug, Clone)]
pub struct Identity {
    pub appliance: Option<String>,
    pub unit: u32,
    pub role: &'static str,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();

/// The format asked for: the flag, else `DVA_LOG_FORMAT`, else text.
pub fn format_from(flag: Option<LogFormat>) -> LogFormat {
    flag.unwrap_or_else(|| match std::env::var("DVA_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    })
}

/// Install the process's subscriber. Child processes (units started by `dva serve`/`dva run`)
/// inherit the format through `DVA_LOG_FORMAT`, set here for them.
pub fn init(format: LogFormat, identity: Option<Identity>) {
    if let Some(id) = identity {
        let _ = IDENTITY.set(id);
    }
    if format == LogFormat::Json {
        // Called first thing in main, before any thread exists to read the environment.
        std::env::set_var("DVA_LOG_FORMAT", "json");
    }
    let filter = EnvFilter::try_from_env("DVA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Line {
            json: format == LogFormat::Json,
        })
        .try_init();
}

/// One line per event.
struct Line {
    json: bool,
}

/// An event's fields, `message` apart.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.rest.push((field.name(), format!("{value:?}").into()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.push((field.name(), value.into()));
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.rest.push((field.name(), value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.rest.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.rest.push((field.name(), value.into()));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.rest.push((field.name(), value.into()));
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut f = Fields::default();
        event.record(&mut f);
        let id = IDENTITY.get();
        if self.json {
            let mut o = serde_json::Map::new();
            o.insert("time".into(), time.into());
            o.insert("level".into(), meta.level().as_str().into());
            o.insert("target".into(), meta.target().into());
            if let Some(id) = id {
                if let Some(a) = &id.appliance {
                    o.insert("appliance".into(), a.clone().into());
                }
                o.insert("unit".into(), id.unit.into());
                o.insert("role".into(), id.role.into());
            }
            o.insert("message".into(), f.message.into());
            for (k, v) in f.rest {
                o.insert(k.into(), v);
            }
            let line = serde_json::to_string(&o).map_err(|_| fmt::Error)?;
            return writeln!(w, "{line}");
        }
        write!(w, "{time} {:>5}", meta.level().as_str())?;
        if let Some(id) = id {
            if let Some(a) = &id.appliance {
                write!(w, " appliance={a}")?;
            }
            write!(w, " unit={} role={}", id.unit, id.role)?;
        }
        write!(w, " {}: {}", meta.target(), f.message)?;
        for (k, v) in f.rest {
            match v {
                serde_json::Value::String(s) => write!(w, " {k}={s:?}")?,
                v => write!(w, " {k}={v}")?,
            }
        }
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::Line;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(json: bool, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .event_format(Line { json })
            .finish();
        tracing::subscriber::with_default(sub, f);
        let bytes = buf.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn json_lines_parse_and_carry_the_fields() {
        let out = capture(true, || {
            tracing::warn!(
                appliance = "edge\"fw",
                buckets = 3u64,
                "exporting \"state\""
            );
        });
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "exporting \"state\"");
        assert_eq!(v["appliance"], "edge\"fw");
        assert_eq!(v["buckets"], 3);
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    }

    #[test]
    fn text_lines_have_time_level_and_fields() {
        let out = capture(false, || tracing::info!(epoch = 4u64, "new bucket table"));
        assert!(out.contains(" INFO "), "{out}");
        assert!(out.contains("new bucket table epoch=4"), "{out}");
        assert_eq!(out.lines().count(), 1);
    }
}
