//! Local access: what dva creates on the machine (run directories, ring files, sockets, logs)
//! belongs to root and to the user dva runs as, and a local socket serves only them.
//!
//! Modes are set where a thing is created, never left to the umask: a ring carries traffic
//! (passwords included) and a control socket carries the appliance's state, so a local user
//! who may read one has gone around the firewall.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Mode of every directory dva creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file and socket dva creates.
pub const FILE_MODE: u32 = 0o600;

/// Set the process umask to 077: a backstop for anything created without an explicit mode.
/// Call it first thing in `main`, before any thread exists (the umask is per process).
pub fn restrict_umask() {
    // SAFETY: umask(2) takes an integer and cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Create `dir` and its missing parents, each with mode 0700. Directories that already exist
/// keep their mode: a parent may be shared (`/run`, `/tmp`, a home directory).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Give the socket just bound at `path` mode 0600. bind(2) creates the socket file with the
/// umask's mode, and connecting needs write permission on it.
pub fn restrict_socket(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
}

/// Whether the peer of `conn` may use a local socket of ours: root, or our own effective uid.
/// Read from SO_PEERCRED, the credentials the kernel recorded when the peer connected, so a
/// peer cannot claim to be someone else.
pub fn peer_allowed(conn: &UnixStream) -> io::Result<bool> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals; the kernel writes at most `len` bytes of a ucred.
    crate::sys::cvt(unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_PEERCRED returned {len} bytes"),
        ));
    }
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let me = unsafe { libc::geteuid() };
    Ok(uid_allowed(cred.uid, me))
}

/// Root always; otherwise only the user we run as.
fn uid_allowed(peer: libc::uid_t, me: libc::uid_t) -> bool {
    peer == 0 || peer == me
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixListener;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dva-local-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn new_directories_are_private_at_every_level() {
        let top = scratch("dirs");
        let leaf = top.join("a").join("b");
        create_private_dir_all(&leaf).unwrap();
        for d in [&top, &top.join("a"), &leaf] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        // Again on an existing tree: fine, nothing changes.
        create_private_dir_all(&leaf).unwrap();
        assert_eq!(mode(&leaf), 0o700);
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn bound_sockets_are_restricted_and_our_own_peer_is_allowed() {
        let top = scratch("sock");
        create_private_dir_all(&top).unwrap();
        let path = top.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        restrict_socket(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let _client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(peer_allowed(&server).unwrap());
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn only_root_and_our_own_user_are_allowed() {
        assert!(uid_allowed(0, 0));
        assert!(uid_allowed(0, 1000));
        assert!(uid_allowed(1000, 1000));
        assert!(!uid_allowed(65534, 0));
        assert!(!uid_allowed(65534, 1000));
    }
}
