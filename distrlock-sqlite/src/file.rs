//! The database file on the host: that the path still names the file the
//! connection has open, and that it lives on a filesystem SQLite's locking works
//! on.
//!
//! SQLite keeps its file open by descriptor. When the path is unlinked (a tmp
//! cleaner) or another file is renamed over it (a deploy shipping a fresh file,
//! a restored backup), the connection goes on reading and writing the old
//! inode, where no other process will ever look: the next process opens (or
//! creates) the new file and is granted every key at once, with fence 1, while
//! the old holder still renews its lease. So every operation first compares the
//! path's device and inode with the ones recorded when the file was opened, and
//! fails with [`Error::Unavailable`] when they differ: a guard's renewals then
//! fail, and it is lost by its local deadline, before the lease it believes it
//! has would have run out.

use std::path::{Path, PathBuf};

use distrlock_core::{Error, Result};

/// The identity of the opened database file, to recognise the path naming
/// another one later.
#[derive(Debug, Clone)]
pub(crate) struct FileIdentity {
    /// The path, made absolute when the file was opened (as SQLite does), so a
    /// later change of the working directory does not look like a replacement.
    path: PathBuf,
    /// The device and inode the path named when the file was opened, or `None`
    /// where they cannot be known (not Unix, or no file: an in-memory database).
    id: Option<(u64, u64)>,
}

impl FileIdentity {
    /// Records what `path` names now: call it right after SQLite opened it.
    pub(crate) fn record(path: &Path) -> Self {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let id = file_id(&path).ok();
        Self { path, id }
    }

    /// Fails with [`Error::Unavailable`] if the path no longer names the file
    /// that was opened: it was deleted, or another file took its place.
    pub(crate) fn check(&self) -> Result<()> {
        let Some(opened) = self.id else {
            return Ok(());
        };
        match file_id(&self.path) {
            Ok(now) if now == opened => Ok(()),
            Ok(_) => Err(Error::unavailable(
                format!(
                    "the SQLite database file {} was replaced by another file while it was open \
                     (a deploy shipping a fresh file, a restored backup?): other processes now \
                     use the new file, so locks in the open one exclude no one; nothing was \
                     changed, and this backend must be opened again",
                    self.path.display()
                ),
                None,
            )),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(Error::unavailable(
                format!(
                    "the SQLite database file {} was deleted while it was open (a tmp \
                         cleaner?): other processes will create a new file, so locks in the \
                         open one exclude no one; nothing was changed, and this backend must \
                         be opened again",
                    self.path.display()
                ),
                Some(error.into()),
            )),
            Err(error) => Err(Error::unavailable(
                format!(
                    "cannot check that the SQLite database file {} is still the one opened",
                    self.path.display()
                ),
                Some(error.into()),
            )),
        }
    }
}

#[cfg(unix)]
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_deleted_or_replaced_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        std::fs::write(&path, b"one").unwrap();
        let identity = FileIdentity::record(&path);
        identity.check().unwrap();
        // Rewriting in place keeps the inode: still the same file.
        std::fs::write(&path, b"two").unwrap();
        identity.check().unwrap();
        let other = dir.path().join("g.db");
        std::fs::write(&other, b"three").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let replaced = identity.check().unwrap_err().to_string();
        assert!(replaced.contains("replaced"), "{replaced}");
        std::fs::remove_file(&path).unwrap();
        let deleted = identity.check().unwrap_err().to_string();
        assert!(deleted.contains("deleted"), "{deleted}");
    }

    #[test]
    fn nothing_to_check_without_a_file() {
        FileIdentity::record(Path::new(":memory:")).check().unwrap();
    }
}
