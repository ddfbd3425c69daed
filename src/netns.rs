//! Naming and checking network namespaces.
//!
//! A namespace is named either by a bare name, resolved under `/run/netns` (where
//! `ip netns add NAME` bind-mounts it), or by an absolute path to any namespace
//! file such as `/proc/1234/ns/net`. Only the binder thread ever *enters* a
//! namespace (see [`crate::binder`]); this module only names and inspects them.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// Directory where `ip netns` keeps named namespaces (iproute2's `NETNS_RUN_DIR`).
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

/// `NSFS_MAGIC` from `linux/magic.h`: the `f_type` that `fstatfs(2)` reports for a
/// namespace file (nsfs, Linux 3.19).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// A network namespace as the user named it in the config or on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetnsRef {
    /// A name under the netns directory (default [`DEFAULT_NETNS_DIR`]).
    Named(String),
    /// An absolute path to a namespace file, e.g. `/proc/1234/ns/net`.
    Path(PathBuf),
    /// A glob over the names in the netns directory (`tenant-*`): the listener is a
    /// template, instantiated in every matching namespace, as they come and go.
    Glob(String),
}

impl NetnsRef {
    /// Parses a user-supplied namespace reference.
    ///
    /// An absolute path (starting with `/`) is taken as a path; anything else must be
    /// a plain name: non-empty, no `/`, not `.` or `..`, no NUL.
    ///
    /// # Errors
    /// A message saying why the name is not acceptable.
    pub fn parse(s: &str) -> Result<NetnsRef, String> {
        if s.starts_with('/') {
            if s.contains('\0') {
                return Err("namespace path contains a NUL byte".into());
            }
            return Ok(NetnsRef::Path(PathBuf::from(s)));
        }
        if s.is_empty() {
            return Err("namespace name is empty".into());
        }
        if s == "." || s == ".." || s.contains('/') || s.contains('\0') {
            return Err(format!(
                "invalid namespace name {s:?}: use a plain name under /run/netns or an absolute path"
            ));
        }
        if s.contains(['*', '?', '[']) {
            return glob::Pattern::new(s)
                .map(|_| NetnsRef::Glob(s.to_string()))
                .map_err(|e| format!("invalid namespace glob {s:?}: {e}"));
        }
        Ok(NetnsRef::Named(s.to_string()))
    }

    /// The namespace file this reference points to, with names resolved under `netns_dir`.
    /// For a glob this is the pattern joined to the directory, which names no file:
    /// templates are expanded before anything is bound.
    pub fn path_in(&self, netns_dir: &Path) -> PathBuf {
        match self {
            NetnsRef::Named(n) | NetnsRef::Glob(n) => netns_dir.join(n),
            NetnsRef::Path(p) => p.clone(),
        }
    }

    /// Whether this is a glob template ([`NetnsRef::Glob`]).
    pub fn is_glob(&self) -> bool {
        matches!(self, NetnsRef::Glob(_))
    }

    /// Whether namespace `name` (an entry of the netns directory) is this reference:
    /// equal to a name, or matched by a glob. Paths match nothing.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NetnsRef::Named(n) => n == name,
            NetnsRef::Glob(g) => glob::Pattern::new(g).is_ok_and(|p| p.matches(name)),
            NetnsRef::Path(_) => false,
        }
    }

    /// The namespace file, with names resolved under [`DEFAULT_NETNS_DIR`].
    pub fn path(&self) -> PathBuf {
        self.path_in(Path::new(DEFAULT_NETNS_DIR))
    }

    /// A short label for logs and instance names: the name, or the path as given.
    pub fn label(&self) -> String {
        match self {
            NetnsRef::Named(n) | NetnsRef::Glob(n) => n.clone(),
            NetnsRef::Path(p) => p.display().to_string(),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Opens a network namespace file safely and checks that it is one.
///
/// - Only a regular file is opened (nsfs files are regular; see namespaces(7)):
///   FIFOs, devices, sockets and directories are refused from `stat(2)` alone,
///   so opening a FIFO can never hang and no device is opened.
/// - A symbolic link is followed only when it is a namespace link of /proc
///   (`/proc/PID/ns/net`, whose target reads `net:[INODE]`); any other symlink
///   (e.g. one planted under `/run/netns`) is refused.
/// - The file is opened with `O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY`, must
///   be on nsfs (`fstatfs(2)`), and `ioctl(NS_GET_NSTYPE)` (Linux 4.11,
///   ioctl_ns(2)) must say `CLONE_NEWNET`: a uts or mount namespace file is refused.
///
/// # Errors
/// The `stat(2)`/`open(2)`/`fstatfs(2)` error (ENOENT when the file is missing),
/// or `InvalidInput` naming the path and what it is instead (not a regular file,
/// a symlink, not on nsfs — for example a name that `ip netns add` has created but
/// not yet bind-mounted —, or another kind of namespace).
pub fn open_netns(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let invalid = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} {what}", path.display()),
        )
    };
    let link = std::fs::symlink_metadata(path)?;
    if link.file_type().is_symlink() {
        let target = std::fs::read_link(path)?;
        // /proc/PID/ns/* links read `TYPE:[INODE]`; the type is checked below.
        let t = target.to_string_lossy();
        if !(t.contains(":[") && t.ends_with(']') && !t.contains('/')) {
            return Err(invalid(format!(
                "is a symbolic link to {} (not followed: name a namespace file directly)",
                target.display()
            )));
        }
    }
    let meta = std::fs::metadata(path)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(invalid(format!("is {kind}, not a namespace file")));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let st = nix::sys::statfs::fstatfs(f.as_fd()).map_err(io::Error::from)?;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(invalid("is not a namespace file".into()));
    }
    // NS_GET_NSTYPE = _IO(0xb7, 0x3), ioctl_ns(2).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an argument-less ioctl on a file we own; it returns a CLONE_NEW* flag.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if t < 0 {
        return Err(io::Error::last_os_error());
    }
    if t != libc::CLONE_NEWNET {
        return Err(invalid(
            "is a namespace file, but not of a network namespace".into(),
        ));
    }
    Ok(f)
}

/// A namespace's identity: the device and inode number of its nsfs inode
/// (`st_dev`, `st_ino` of `stat(2)` on any file naming it). namespaces(7): two
/// namespace files name the same namespace iff both numbers are equal, whatever
/// their spelling (`a`, `/run/netns/a`, a bind mount of it, `/proc/PID/ns/net` of
/// a process inside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsId {
    /// `st_dev` of the namespace inode (the nsfs device).
    pub dev: u64,
    /// `st_ino` of the namespace inode.
    pub ino: u64,
}

impl NsId {
    /// The identity of an open namespace file (`fstat(2)`).
    ///
    /// # Errors
    /// The `fstat(2)` error.
    pub fn of_file(f: &std::fs::File) -> io::Result<NsId> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        Ok(NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The identity of the namespace `path` names now (`stat(2)`, following a
    /// /proc namespace link). Does not check that it is a network namespace: use
    /// [`open_netns`] + [`NsId::of_file`] for untrusted paths.
    ///
    /// # Errors
    /// The `stat(2)` error (ENOENT when the file is missing).
    pub fn of_path(path: &Path) -> io::Result<NsId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The identity of the network namespace the process started in: that of its
    /// main thread, `/proc/self/ns/net` (the main thread never enters another).
    ///
    /// # Errors
    /// The `stat(2)` error, e.g. when /proc is not mounted.
    pub fn own() -> io::Result<NsId> {
        NsId::of_path(Path::new("/proc/self/ns/net"))
    }
}

impl fmt::Display for NsId {
    /// `dev D, inode I`, as `stat(2)` numbers them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {}, inode {}", self.dev, self.ino)
    }
}

/// Checks that `path` exists and is a namespace file; see [`open_netns`].
///
/// # Errors
/// As [`open_netns`].
pub fn check_netns(path: &Path) -> io::Result<()> {
    open_netns(path).map(drop)
}

/// The index of network interface `name` (`if_nametoindex(3)`) in the namespace
/// of file `ns` (`None`: the calling thread's). A namespace is entered by a
/// short-lived thread (setns(2) needs CAP_SYS_ADMIN), so the caller's thread
/// never changes namespace.
///
/// # Errors
/// The namespace cannot be opened ([`open_netns`]) or entered (EPERM), the
/// thread cannot be made, or there is no such interface (ENODEV).
pub fn if_index_in(ns: Option<&Path>, name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    let lookup = move || {
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        match unsafe { libc::if_nametoindex(c.as_ptr()) } {
            0 => Err(io::Error::last_os_error()),
            i => Ok(i),
        }
    };
    let Some(path) = ns else {
        return lookup();
    };
    let f = open_netns(path)?;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ringress-zone".into())
            .spawn_scoped(s, move || {
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                lookup()
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("interface lookup panicked")))
    })
}

/// The inode number of the network namespace of the calling thread
/// (`/proc/thread-self/ns/net`), which identifies the namespace (see namespaces(7)).
///
/// # Errors
/// The `stat(2)` error, e.g. when /proc is not mounted.
pub fn current_netns_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// The inode number of the network namespace of thread `tid` of this process.
///
/// # Errors
/// The `stat(2)` error (ENOENT once the thread has exited).
pub fn thread_netns_inode(tid: i32) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/self/task/{tid}/ns/net"))?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_paths() {
        assert_eq!(
            NetnsRef::parse("ns-a").unwrap(),
            NetnsRef::Named("ns-a".into())
        );
        assert_eq!(
            NetnsRef::parse("/proc/1/ns/net").unwrap(),
            NetnsRef::Path("/proc/1/ns/net".into())
        );
        assert!(NetnsRef::parse("").is_err());
        assert!(NetnsRef::parse("a/b").is_err());
        assert!(NetnsRef::parse("..").is_err());
        assert_eq!(
            NetnsRef::parse("x").unwrap().path(),
            PathBuf::from("/run/netns/x")
        );
        let g = NetnsRef::parse("tenant-*").unwrap();
        assert!(g.is_glob() && g.matches("tenant-7") && !g.matches("other"));
        assert!(NetnsRef::parse("a[").is_err());
        assert!(NetnsRef::Named("a".into()).matches("a"));
    }

    #[test]
    fn own_namespace_is_a_namespace() {
        check_netns(Path::new("/proc/self/ns/net")).unwrap();
        let e = check_netns(Path::new("/etc/hostname")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = check_netns(Path::new("/run/netns/does-not-exist-ringress")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    /// Whatever a path names, it is refused without hanging or opening a device
    /// unless it is a network namespace file.
    #[test]
    fn odd_files_are_refused_without_being_opened() {
        let dir = std::env::temp_dir().join(format!("ringress-nsodd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let sock = dir.join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink("/proc/self/ns/net", &link).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let cases: [(&Path, &str); 7] = [
            (&fifo, "is a FIFO"),
            (Path::new("/dev/null"), "is a device"),
            (&sock, "is a socket"),
            (&dir, "is a directory"),
            (&link, "is a symbolic link"),
            (&file, "is not a namespace file"),
            (Path::new("/proc/self/ns/uts"), "not of a network namespace"),
        ];
        for (p, want) in cases {
            let e = check_netns(p).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidInput,
                "{}: {e}",
                p.display()
            );
            assert!(e.to_string().contains(want), "{}: {e}", p.display());
        }
        // A /proc namespace link is followed.
        check_netns(Path::new("/proc/thread-self/ns/net")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A named network namespace that this process created with `ip netns add`, with its
/// loopback up; deleted (`ip netns del`) on drop. Used by `ringress demo` and the
/// tests. Needs CAP_SYS_ADMIN and iproute2's `ip`.
#[derive(Debug)]
pub struct TempNetns {
    name: String,
}

impl TempNetns {
    /// Creates namespace `name` under [`DEFAULT_NETNS_DIR`] and brings `lo` up in it.
    /// A stale namespace of the same name is deleted first.
    ///
    /// # Errors
    /// `ip` is missing or failed; the message includes its stderr.
    pub fn create(name: &str) -> io::Result<TempNetns> {
        if Path::new(DEFAULT_NETNS_DIR).join(name).exists() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        let ns = TempNetns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(DEFAULT_NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...` (for example to add an address).
    ///
    /// # Errors
    /// As [`TempNetns::create`].
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for TempNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete namespace");
        }
    }
}

/// Runs iproute2's `ip` with `args` and waits for it.
///
/// # Errors
/// `ip` could not be started, or exited non-zero (its stderr is in the message).
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `ip`: {e} (install iproute2)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The entries of the netns directory `dir` (names, sorted); empty if it is missing.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
