//! One `ringress run` per config file: an exclusive flock(2) on a lock file
//! derived from the config's path.
//!
//! The lock file is `DIR/NAME-HASH.lock`, where NAME is the config file's name
//! (characters other than ASCII letters, digits, `.`, `-` and `_` replaced by
//! `_`), HASH the FNV-1a 64-bit hash (hex) of its canonical path
//! (`realpath(3)`: symlinks and `..` resolved, so every spelling of one file gives
//! one lock), and DIR:
//! - `/run/ringress` when running as root (effective uid 0);
//! - otherwise `$RUNTIME_DIRECTORY` (set by systemd for `RuntimeDirectory=`; the
//!   shipped unit's `/run/ringress`, shared by its slots) when set;
//! - otherwise `$XDG_RUNTIME_DIR/ringress` when that is set;
//! - otherwise `/tmp/ringress-UID` (made with mode 0700; not used if another user
//!   owns it).
//!
//! The file holds the pid of the process that holds the lock. The lock is taken by
//! `run` before anything is bound and released by the kernel when the process
//! exits (however it exits). A second `run` of the same config is refused naming
//! the first one's pid.
//!
//! Binary upgrade (`run --takeover`), the one sanctioned way for two processes to
//! share listeners: the new process finds the lock held by the old one, goes on
//! (the takeover handshake itself proves that the old one agrees), and a thread
//! waits for the lock, which it gets when the old process exits after draining;
//! the file then names the new pid. Meanwhile a third `run` is refused naming the
//! old pid. Two users running one config get different lock directories and are
//! not kept apart.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A held instance lock: released when dropped (or when the process exits).
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

/// The lock is held by another process.
#[derive(Debug)]
pub struct Held {
    /// The lock file.
    pub path: PathBuf,
    /// The holder's pid, as written in the file (`None` if unreadable).
    pub pid: Option<u32>,
    file: File,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of config file `config` (see the module doc); `None` when no
/// directory for it can be found or made.
pub fn lock_path(config: &Path) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let dir = lock_dir()?;
    let name: String = canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let hash = fnv1a(canonical.as_os_str().as_encoded_bytes());
    Some(dir.join(format!("{name}-{hash:016x}.lock")))
}

/// FNV-1a, 64 bits: stable across builds, unlike std's hasher (two ringress
/// binaries of different builds must agree on the name during an upgrade).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The directory of lock files, made if missing.
fn lock_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let systemd = std::env::var("RUNTIME_DIRECTORY")
        .ok()
        .and_then(|v| v.split(':').next().map(PathBuf::from))
        .filter(|p| p.is_absolute());
    let (dir, mode) = if uid == 0 {
        (PathBuf::from("/run/ringress"), 0o755)
    } else if let Some(d) = systemd {
        (d, 0o755)
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        (PathBuf::from(x).join("ringress"), 0o700)
    } else {
        (PathBuf::from(format!("/tmp/ringress-{uid}")), 0o700)
    };
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(&dir);
    // Not a directory of someone else (a planted /tmp/ringress-UID, a symlink);
    // root trusts /run/ringress whoever owns it (only root can make it).
    let m = std::fs::symlink_metadata(&dir).ok()?;
    (m.is_dir() && (m.uid() == uid || uid == 0)).then_some(dir)
}

/// Takes the instance lock of config file `config` without waiting.
///
/// # Errors
/// `Ok(Err(Held))` when another process holds it; `Err` when no lock directory
/// can be made (`NotFound`) or the file cannot be opened, locked or written.
pub fn acquire(config: &Path) -> io::Result<Result<InstanceLock, Held>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(config).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no directory for the instance lock (/run/ringress, $XDG_RUNTIME_DIR or /tmp/ringress-UID)",
        )
    })?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => {
            write_pid(&mut file)?;
            Ok(Ok(InstanceLock { file, path }))
        }
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            Ok(Err(Held {
                pid: s.trim().parse().ok(),
                path,
                file,
            }))
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("flock {}: {e}", path.display()),
        )),
    }
}

impl Held {
    /// Waits on a thread of its own (holding no capability) until the holder
    /// releases the lock (it exits), then takes it for good: the file names this
    /// process from then on, and the lock lasts until this process exits. The
    /// thread ends once it has the lock.
    pub fn take_over_when_free(self) {
        let spawned = std::thread::Builder::new()
            .name("ringress-lock".into())
            .spawn(move || {
                let _ = crate::privs::drop_all();
                let Held {
                    path,
                    pid,
                    mut file,
                } = self;
                match flock(&file, libc::LOCK_EX) {
                    Ok(()) => {
                        let _ = write_pid(&mut file);
                        tracing::info!(lock = %path.display(), previous = ?pid,
                            "instance lock taken over from the previous process");
                        // Held until this process exits.
                        std::mem::forget(file);
                    }
                    Err(e) => {
                        tracing::warn!(lock = %path.display(), error = %e, "cannot wait for the instance lock")
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot wait for the instance lock");
        }
    }
}

impl InstanceLock {
    /// Keeps the lock until the process exits.
    pub fn hold_until_exit(self) {
        std::mem::forget(self.file);
    }
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock(2) on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Replaces the file's content with this process's pid and a newline.
fn write_pid(f: &mut File) -> io::Result<()> {
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_canonical_config_path() {
        let dir = std::env::temp_dir().join(format!("ringress-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("my config.toml");
        std::fs::write(&cfg, "").unwrap();
        let via_dotdot = dir
            .join("..")
            .join(dir.file_name().unwrap())
            .join("my config.toml");
        let a = lock_path(&cfg).unwrap();
        assert_eq!(a, lock_path(&via_dotdot).unwrap());
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("my_config.toml-") && name.ends_with(".lock"),
            "{name}"
        );
        assert_ne!(a, lock_path(&dir.join("other.toml")).unwrap());
        // flock locks belong to open file descriptions: a second open is refused.
        let first = acquire(&cfg).unwrap().unwrap();
        let held = acquire(&via_dotdot).unwrap().unwrap_err();
        assert_eq!(held.pid, Some(std::process::id()));
        assert_eq!(held.path, first.path());
        drop(held);
        drop(first);
        let again = acquire(&cfg).unwrap().unwrap();
        let p = again.path().to_path_buf();
        drop(again);
        let _ = std::fs::remove_file(p);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
