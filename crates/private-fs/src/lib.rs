//! Directories and files that hold kumo's state or secrets (the controller's
//! database and admin token, a host's identity and ledger, the CLI's
//! credentials) are their owner's alone: directories 0700, files 0600.
//!
//! The mode is given when a file or directory is created, never by a chmod
//! afterwards: anyone may open a file while it is readable, and a descriptor
//! opened then still reads after the chmod. [`tighten`] is only for what older
//! versions of kumo created too open (directories 0755, files 0644).

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of a directory holding state or secrets.
pub const DIR_MODE: u32 = 0o700;
/// The mode of a file holding state or secrets.
pub const FILE_MODE: u32 = 0o600;

/// What failed, on which path (std's I/O errors do not say).
#[derive(Debug, thiserror::Error)]
#[error("{action} {}", path.display())]
pub struct Error {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl Error {
    fn at<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Create the directory `path` and its missing parents, each 0700. A
/// directory that exists keeps its mode.
pub fn create_dir(path: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(Error::at("creating directory", path))
}

/// Create `path` empty and 0600 unless it exists, for a file another library
/// then opens and fills: SQLite gives its `-wal` and `-shm` files the mode of
/// the database file.
pub fn create_file(path: &Path) -> Result<(), Error> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::at("creating", path)(e)),
    }
}

/// Replace the file `path` with `bytes`, 0600, so that a crash leaves the old
/// or the new content, never a mix: temp file, fsync, rename, fsync of the
/// directory. One writer per path at a time: the temp file's name is fixed,
/// so one that a crash left behind is replaced by the next write.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let err = Error::at("writing", path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(err(io::ErrorKind::InvalidInput.into()));
    };
    // `parent` of a bare file name is "".
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    // A temp file left by a crash (maybe an older version's, 0644) would keep
    // its mode if opened again: remove it and create a new one.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Take from each path that exists the permissions its mode does not grant
/// (a 0644 file tightened to 0600 becomes 0600, a 0400 one stays 0400), and
/// log once what changed. For data directories older versions created
/// 0755 with 0644 files.
pub fn tighten(paths: &[(&Path, u32)]) -> Result<(), Error> {
    let mut changed = Vec::new();
    for &(path, mode) in paths {
        let err = Error::at("tightening the permissions of", path);
        let old = match std::fs::metadata(path) {
            Ok(m) => m.permissions().mode() & 0o7777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(e)),
        };
        let new = old & mode;
        if new != old {
            std::fs::set_permissions(path, Permissions::from_mode(new)).map_err(err)?;
            changed.push(format!("{} {old:04o} -> {new:04o}", path.display()));
        }
    }
    if !changed.is_empty() {
        tracing::info!(changed = %changed.join(", "), "made state and secrets owner-only");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn create_dir_makes_it_and_its_missing_parents_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data").join("vms");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&tmp.path().join("data")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        create_dir(&dir).unwrap();
    }

    #[test]
    fn create_file_makes_it_0600_and_keeps_an_existing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state.db");
        create_file(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::write(&path, "kept").unwrap();
        create_file(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "kept");
    }

    #[test]
    fn write_file_replaces_the_content_with_an_owner_only_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("identity.json");
        write_file(&path, b"one").unwrap();
        assert_eq!(mode(&path), 0o600);
        // An older version's file and temp file, both readable by all.
        chmod(&path, 0o644);
        let stale = tmp.path().join(".identity.json.tmp");
        std::fs::write(&stale, "stale").unwrap();
        chmod(&stale, 0o644);
        write_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(mode(&path), 0o600);
        assert!(!stale.exists());
    }

    #[test]
    fn write_file_says_where_it_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("missing").join("desired.json");
        let e = write_file(&path, b"x").unwrap_err();
        assert_eq!(e.to_string(), format!("writing {}", path.display()));
    }

    #[test]
    fn tighten_takes_away_what_the_mode_does_not_grant() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let open = dir.join("state.db");
        std::fs::write(&open, "").unwrap();
        chmod(&open, 0o644);
        let read_only = dir.join("admin-token");
        std::fs::write(&read_only, "").unwrap();
        chmod(&read_only, 0o400);
        tighten(&[
            (&dir, DIR_MODE),
            (&open, FILE_MODE),
            (&read_only, FILE_MODE),
            (&dir.join("state.db-wal"), FILE_MODE),
        ])
        .unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&open), 0o600);
        assert_eq!(mode(&read_only), 0o400, "never loosened");
    }
}
