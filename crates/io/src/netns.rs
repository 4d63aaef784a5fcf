//! Named network namespaces (the `ip netns` convention: a bind mount at `/run/netns/<name>`).
//!
//! A network namespace is a per-thread attribute: [`enter`] moves only the calling thread,
//! and sockets keep the namespace they were created in for their whole life, whichever
//! thread later uses them. So a driver opened inside a namespace can be handed to any
//! thread afterwards.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::sys;
use crate::IoError;

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The handle path of namespace `name`, after checking it is a plain file name.
pub fn path(name: &str) -> Result<PathBuf, IoError> {
    let invalid = |reason| IoError::InvalidNetnsName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(invalid("not a plain file name"));
    }
    Ok(PathBuf::from(NETNS_RUN_DIR).join(name))
}

/// Whether namespace `name` exists (its handle under /run/netns does).
pub fn netns_exists(name: &str) -> bool {
    path(name).map(|p| p.exists()).unwrap_or(false)
}

/// Move the calling thread (only it, not the process) into network namespace `name`:
/// `setns(open("/run/netns/<name>"), CLONE_NEWNET)`. Sockets the thread opens afterwards live
/// in that namespace; sockets it opened before stay where they were.
pub fn enter(name: &str) -> Result<(), IoError> {
    let path = path(name)?;
    let handle =
        File::open(&path).map_err(|e| IoError::syscall("open", path.display().to_string(), e))?;
    // SAFETY: setns(2) takes an fd we own for the duration of the call and a flag; on failure
    // it returns -1 and leaves the thread where it was.
    sys::cvt(unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) })
        .map_err(|e| IoError::syscall("setns CLONE_NEWNET", format!("netns {name}"), e))?;
    Ok(())
}

/// Run `f` on a fresh thread that first enters namespace `name`, and return its result. The
/// calling thread's namespace is untouched. A panic in `f` is resumed on the caller.
pub fn in_netns<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> Result<R, IoError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, || {
                enter(name)?;
                Ok(f())
            })
            .map_err(|e| IoError::syscall("spawn thread", format!("netns {name}"), e))?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain_file_names() {
        assert!(path("lab-a").is_ok());
        for bad in ["", ".", "..", "a/b", "../etc"] {
            assert!(
                matches!(path(bad), Err(IoError::InvalidNetnsName { .. })),
                "{bad}"
            );
            assert!(!netns_exists(bad));
        }
    }

    #[test]
    fn missing_namespace_is_an_error_naming_it() {
        let err = in_netns("dva-no-such-netns", || 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/run/netns/dva-no-such-netns"), "{msg}");
        assert!(!netns_exists("dva-no-such-netns"));
    }
}
