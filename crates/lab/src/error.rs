use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong building the lab or running an app in it. Each message names
/// the command, namespace, value or package involved, so it can be acted on as printed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        prefix: String,
        reason: &'static str,
    },

    #[error("invalid lab shape: {what} = {value}, at most {max} fit the lab's address plan")]
    InvalidShape {
        what: &'static str,
        value: usize,
        max: usize,
    },

    #[error("invalid {what}: {value} ({reason})")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("`{tool}` not found in PATH, /usr/sbin, /sbin, /usr/bin or /bin: install the Debian package `{package}` (.ci/install-deps.sh installs everything the lab needs)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },

    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("`{command}` did not finish within {timeout:?}; killed it")]
    CommandTimeout { command: String, timeout: Duration },

    #[error("unexpected output from `{command}`: {reason}")]
    BadOutput { command: String, reason: String },

    #[error("lab {prefix} has no host {name:?}; its hosts: {hosts}")]
    UnknownHost {
        prefix: String,
        name: String,
        hosts: String,
    },

    #[error("lab {prefix} has no control host ({prefix}ctl): build it with `dva lab up --machines --prefix {prefix}`")]
    NoControlHost { prefix: String },

    #[error("lab {prefix} does not match its plan: {problem}")]
    Mismatch { prefix: String, problem: String },

    #[error("processes {pids:?} in namespace {ns} are still there after SIGKILL")]
    Unkillable { ns: String, pids: Vec<u32> },

    #[error("{what} in namespace {ns} exited before it was ready ({status}); its log:\n{log}")]
    Exited {
        what: &'static str,
        ns: String,
        status: String,
        log: String,
    },

    #[error("{what} in namespace {ns} was not ready within {timeout:?}; its log:\n{log}")]
    NotReady {
        what: &'static str,
        ns: String,
        timeout: Duration,
        log: String,
    },

    #[error("curl {url} in namespace {ns} failed (exit code {code:?}): {stderr}")]
    Curl {
        ns: String,
        url: String,
        code: Option<i32>,
        stderr: String,
    },

    #[error("iperf3 to {server} port {port} from namespace {ns} failed: {message}")]
    Iperf3 {
        ns: String,
        server: IpAddr,
        port: u16,
        message: String,
    },

    #[error("raw frames on {dev} in namespace {ns}: {source}")]
    Frames {
        ns: String,
        dev: String,
        #[source]
        source: dva_io::IoError,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
