//! `.ci/install-deps.sh`, the README's first command, on a machine whose nginx and HAProxy
//! services already run: it must install what is missing and leave them alone — never stop,
//! disable or restart a service it did not install (issue #15: it once did `systemctl disable
//! --now` on them). apt, dpkg-query and systemctl are replaced by shims on PATH that record
//! what the script asks of them; the script itself runs unmodified, and a real nginx started
//! here (as the user's service would be) must still answer afterwards.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shim(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write shim");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod shim");
}

/// A user's nginx, on a loopback port of its own, with its own config and pid file. One process
/// (`master_process off`): killing a master would orphan its worker, which then outlives the
/// test holding the test runner's inherited file descriptors.
struct UserNginx {
    child: std::process::Child,
    port: u16,
}

impl UserNginx {
    fn start(dir: &Path) -> Option<UserNginx> {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let port = l.local_addr().ok()?.port();
        drop(l);
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
                 events {{}}\n\
                 http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
                 fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 server {{ listen 127.0.0.1:{port}; return 200 'user service\\n'; }} }}\n",
                d = dir.display()
            ),
        )
        .ok()?;
        let child = Command::new(nginx)
            .args(["-c", &conf.to_string_lossy(), "-p", &dir.to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let n = UserNginx { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if n.answers() {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn answers(&self) -> bool {
        use std::io::Write;
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("user service")
    }
}

impl Drop for UserNginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn install_deps_leaves_running_services_alone() {
    let dir = std::env::temp_dir().join(format!("dva-install-deps-{}", std::process::id()));
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("temp dir");
    let log = dir.join("calls.log");
    let log_s = log.display().to_string();
    // nginx and haproxy are installed (and "running" as services); iperf3 and wrk are missing.
    shim(
        &bin,
        "dpkg-query",
        r#"for last; do :; done
case "$last" in iperf3|wrk|nginx-light) exit 1 ;; esac
printf 'install ok installed'"#,
    );
    shim(&bin, "apt-get", &format!("echo \"apt-get $*\" >> {log_s}"));
    shim(
        &bin,
        "apt-cache",
        "printf 'nginx-light:\\n  Candidate: (none)\\n'",
    );
    shim(&bin, "debconf-set-selections", "cat > /dev/null");
    shim(
        &bin,
        "systemctl",
        &format!("echo \"systemctl $*\" >> {log_s}"),
    );
    shim(&bin, "service", &format!("echo \"service $*\" >> {log_s}"));
    shim(
        &bin,
        "invoke-rc.d",
        &format!("echo \"invoke-rc.d $*\" >> {log_s}"),
    );

    let user = UserNginx::start(&dir);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(repo().join(".ci/install-deps.sh"))
        .env("PATH", path)
        .env("DVA_POLICY_RC_D", dir.join("policy-rc.d"))
        .output()
        .expect("run install-deps.sh");
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "install-deps failed: {stderr}\ncalls:\n{calls}"
    );
    // It installed what was missing...
    assert!(
        calls.contains("apt-get install") && calls.contains("iperf3") && calls.contains("wrk"),
        "calls:\n{calls}"
    );
    // ...kept its own install from starting services (the policy is gone again)...
    assert!(!dir.join("policy-rc.d").exists(), "policy-rc.d left behind");
    // ...and touched no service but the one of what it installed.
    for line in calls.lines().filter(|l| !l.starts_with("apt-get")) {
        assert_eq!(
            line, "systemctl disable iperf3.service",
            "a service call it must not make; calls:\n{calls}"
        );
    }
    for forbidden in ["stop", "--now", "restart", "nginx", "haproxy", "mask"] {
        assert!(
            !calls
                .lines()
                .filter(|l| !l.starts_with("apt-get"))
                .any(|l| l.contains(forbidden)),
            "{forbidden:?} in calls:\n{calls}"
        );
    }
    match user {
        Some(n) => assert!(n.answers(), "the user's nginx stopped answering"),
        None => panic!("could not start a user nginx to watch (nginx missing?)"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
