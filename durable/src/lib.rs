//! Crash-safe file primitives shared by every state-changing command.
//!
//! Invariants:
//! - [`write_atomic`]: a reader, or a process that starts after a crash (kill -9, power loss), sees
//!   either the old contents or the new, never a mix; concurrent writers never share a temporary file.
//! - [`Lock`]: an exclusive advisory lock on a file, held across processes until dropped; the kernel
//!   releases it when the holder dies, so a killed writer never leaves a stale lock behind.
//! - [`fault`]: test-only crash points. They do nothing unless the test-only environment variable
//!   `MOEVAL_TEST_FAULT` names them; no command-line flag reaches them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` through a synced, uniquely named temporary file in the same folder, a
/// rename, and a sync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })
}

/// Like [`write_atomic`], for writers that produce the file themselves (Parquet, safetensors): `write`
/// creates the temporary path it is given; it is synced, renamed into place and the folder synced.
/// `write` may fail with its own error type; the file-system steps' errors convert into it.
pub fn write_atomic_with<E: From<std::io::Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp)?.sync_all()?;
        Ok(std::fs::rename(&tmp, path)?)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    Ok(sync_dir(path.parent().unwrap_or(Path::new(".")))?)
}

/// A temporary name beside `path`, unique to this process and call, so concurrent writers (two
/// processes, or two threads of a server) never write into one file.
pub fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

/// Syncs a folder, so that renames and new files in it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Appends one line to a log file and syncs it before returning: the line is on disk before the
/// caller goes on to act on it.
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    let mut bytes = line.trim_end_matches('\n').as_bytes().to_vec();
    bytes.push(b'\n');
    f.write_all(&bytes)?;
    f.sync_all()
}

/// An exclusive cross-process lock on a lock file (created if missing; its contents are unused).
/// Released on drop, or by the kernel when the process dies.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// Waits for the lock.
    pub fn acquire(path: &Path) -> std::io::Result<Lock> {
        let file = open_lock_file(path)?;
        file.lock()?;
        Ok(Lock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// Takes the lock if nobody holds it; `Ok(None)` when another holder has it.
    pub fn try_acquire(path: &Path) -> std::io::Result<Option<Lock>> {
        let file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock {
                _file: file,
                path: path.to_path_buf(),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_lock_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// A folder written under a hidden name beside its destination and renamed into place when complete,
/// so a killed writer never leaves a half-written folder at the destination and a retry starts afresh.
/// One writer per destination at a time (a lock beside it).
#[derive(Debug)]
pub struct StagedDir {
    staging: PathBuf,
    dest: PathBuf,
    _lock: Lock,
}

impl StagedDir {
    /// Starts writing `dest`, which must not exist or be an empty folder. Removes what a killed
    /// writer of the same destination left.
    pub fn new(dest: &Path) -> std::io::Result<StagedDir> {
        use std::io::{Error, ErrorKind};
        if dest.exists() && std::fs::read_dir(dest)?.next().is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} already exists and is not empty; remove it or choose another output folder",
                    dest.display()
                ),
            ));
        }
        let name = dest
            .file_name()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "not a folder path"))?
            .to_string_lossy()
            .into_owned();
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)?;
        let lock = Lock::try_acquire(&parent.join(format!(".{name}.lock")))?.ok_or_else(|| {
            Error::new(
                ErrorKind::WouldBlock,
                format!("another command is writing {}", dest.display()),
            )
        })?;
        let staging = parent.join(format!(".{name}.partial"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        Ok(StagedDir {
            staging,
            dest: dest.to_path_buf(),
            _lock: lock,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Syncs every file and moves the folder into place.
    pub fn commit(self) -> std::io::Result<PathBuf> {
        sync_tree(&self.staging)?;
        fault::point("staged.commit");
        if self.dest.exists() {
            // Empty (checked in `new`): rename(2) cannot replace a folder otherwise.
            std::fs::remove_dir(&self.dest)?;
        }
        std::fs::rename(&self.staging, &self.dest)?;
        sync_dir(self.dest.parent().unwrap_or(Path::new(".")))?;
        Ok(self.dest)
    }
}

fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else {
            File::open(e.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Test-only crash points for fault-injection tests.
///
/// A state-changing command calls [`fault::point`] between its durable steps. When the environment
/// variable `MOEVAL_TEST_FAULT` is `NAME` (or `NAME@N`, the N-th time the point is reached, from 1),
/// the process dies there at once, without unwinding or flushing, as under kill -9. The variable is
/// read by tests only; it is not a documented option of any command.
pub mod fault {
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// The environment variable that arms one fault point.
    pub const VAR: &str = "MOEVAL_TEST_FAULT";

    /// Dies here if the armed fault point is `name` (and this is its N-th hit).
    pub fn point(name: &str) {
        let Ok(armed) = std::env::var(VAR) else {
            return;
        };
        let (armed_name, nth) = match armed.split_once('@') {
            Some((n, k)) => (n, k.parse::<u64>().unwrap_or(1)),
            None => (armed.as_str(), 1),
        };
        if armed_name != name {
            return;
        }
        static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
        let hit = {
            let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
            let count = hits
                .get_or_insert_with(HashMap::new)
                .entry(name.to_string())
                .or_insert(0);
            *count += 1;
            *count
        };
        if hit == nth {
            eprintln!("fault point {name} reached: dying as under kill -9");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn temp_names_are_unique() {
        let p = Path::new("/x/y.json");
        assert_ne!(temp_path(p), temp_path(p));
    }

    #[test]
    fn lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let held = Lock::acquire(&p).unwrap();
        assert!(Lock::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(Lock::try_acquire(&p).unwrap().is_some());
    }

    #[test]
    fn append_line_adds_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        append_line(&p, "a").unwrap();
        append_line(&p, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a\nb\n");
    }

    #[test]
    fn staged_dir_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let staged = StagedDir::new(&dest).unwrap();
        std::fs::write(staged.path().join("a"), b"1").unwrap();
        assert!(!dest.exists());
        // A second writer of the same destination is refused while the first holds it.
        assert!(StagedDir::new(&dest).is_err());
        staged.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"1");
        assert!(StagedDir::new(&dest).is_err(), "not empty");
        // A killed writer's leftovers are removed by the next one.
        let other = dir.path().join("other");
        std::fs::create_dir_all(dir.path().join(".other.partial")).unwrap();
        std::fs::write(dir.path().join(".other.partial/stale"), b"x").unwrap();
        let staged = StagedDir::new(&other).unwrap();
        assert!(!staged.path().join("stale").exists());
    }

    #[test]
    fn unarmed_fault_point_is_a_no_op() {
        fault::point("never-armed");
    }
}
