//! Running the lab's tools as subprocesses: finding them (and naming the Debian package when one
//! is missing), capturing their output, and bounding how long a client may run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::LabError;

/// Every external program the lab runs, and the Debian package that provides it.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("ethtool", "ethtool"),
    ("sysctl", "procps"),
    ("kill", "procps"),
    ("nginx", "nginx-light"),
    ("iperf3", "iperf3"),
    ("curl", "curl"),
    ("ping", "iputils-ping"),
    ("wrk", "wrk"),
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    ("timeout", "coreutils"),
    ("sleep", "coreutils"),
    ("bash", "bash"),
    ("sh", "dash"),
    ("setsid", "util-linux"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    ("etcd", "etcd-server"),
];

/// Searched after PATH: root's tools live in sbin, which a test runner's PATH may lack.
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The absolute path of `tool`, or an error naming the package to install.
pub(crate) fn tool(tool: &'static str) -> Result<PathBuf, LabError> {
    let package = TOOLS
        .iter()
        .find(|(t, _)| *t == tool)
        .map_or("(unknown)", |(_, p)| *p);
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or(LabError::MissingTool { tool, package })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `ip`, resolved when possible; a bare name otherwise so that the spawn error says what is missing.
pub(crate) fn ip_program() -> PathBuf {
    tool("ip").unwrap_or_else(|_| PathBuf::from("ip"))
}

/// The command line as a shell user would type it, for error messages.
pub(crate) fn show(cmd: &Command) -> String {
    let program = cmd.get_program().to_string_lossy();
    // Resolved tools are absolute paths; their base name reads better and is still unambiguous.
    let program = program.rsplit('/').next().unwrap_or(&program).to_string();
    std::iter::once(program)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn status_text(status: &ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

fn failed(command: String, output: &Output) -> LabError {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    let stderr = if stderr.is_empty() {
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    } else {
        stderr
    };
    LabError::CommandFailed {
        command,
        status: status_text(&output.status),
        stderr,
    }
}

/// Runs a short configuration command to completion; its stdout on success.
pub(crate) fn run(cmd: &mut Command) -> Result<String, LabError> {
    let command = show(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(failed(command, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a client that must finish within `timeout` (killed otherwise); its output whatever the
/// exit status, for callers that give exit codes a meaning.
pub(crate) fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, LabError> {
    let command = show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    // Both pipes are drained while the child runs, so a chatty child never blocks on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match wait_within(&mut child, timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::CommandTimeout { command, timeout });
        }
        Err(source) => return Err(LabError::Spawn { command, source }),
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`output_within`], but a non-zero exit is an error.
pub(crate) fn run_within(cmd: &mut Command, timeout: Duration) -> Result<Output, LabError> {
    let command = show(cmd);
    let output = output_within(cmd, timeout)?;
    if !output.status.success() {
        return Err(failed(command, &output));
    }
    Ok(output)
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// The child's exit status, or `None` if it is still running at the deadline.
pub(crate) fn wait_within(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    // Short commands finish in a few milliseconds: start polling fast, back off to 20 ms.
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        // A tool that exists nowhere still gets a clear message; known tools name their package.
        match tool("ping") {
            Ok(path) => assert!(path.ends_with("ping")),
            Err(e) => assert!(e.to_string().contains("iputils-ping"), "{e}"),
        }
        let e = LabError::MissingTool {
            tool: "ethtool",
            package: "ethtool",
        };
        assert!(e
            .to_string()
            .contains("install the Debian package `ethtool`"));
    }

    #[test]
    fn show_prints_base_name_and_args() {
        let mut cmd = Command::new("/usr/sbin/ip");
        cmd.args(["-n", "x", "link"]);
        assert_eq!(show(&cmd), "ip -n x link");
    }

    #[test]
    fn output_within_kills_a_slow_child() {
        let Ok(sleep) = tool("sleep") else { return };
        // A hung client.
        let mut cmd = Command::new(sleep);
        cmd.arg("10");
        let t0 = Instant::now();
        let err = output_within(&mut cmd, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, LabError::CommandTimeout { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_reports_exit_code_and_stderr() {
        let Ok(sh) = tool("sh") else { return };
        let mut cmd = Command::new(sh);
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        let err = run(&mut cmd).unwrap_err().to_string();
        assert!(err.contains("exit code 3") && err.contains("oops"), "{err}");
    }
}
