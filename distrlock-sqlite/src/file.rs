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

/// Fails with [`Error::InvalidConfig`] if the database at `path` (or, while it
/// does not exist yet, the directory it will be created in) is on a network or
/// cluster filesystem, or on FUSE: SQLite's file locks and WAL shared memory are
/// not reliable there, and processes on different hosts would not share a
/// clock. Nothing is refused where the filesystem cannot be told (not Linux, or
/// `statfs` fails: then opening the file reports the problem).
pub(crate) fn check_local_filesystem(path: &Path) -> Result<()> {
    let Some(magic) = filesystem_magic(path) else {
        return Ok(());
    };
    match network_filesystem(magic) {
        None => Ok(()),
        Some(name) => Err(Error::InvalidConfig {
            reason: format!(
                "the SQLite database {} is on a {name} filesystem (statfs type {magic:#x}):                  SQLite's file locking is not reliable there and hosts do not share a clock, so                  two holders could hold the same lock; put the file on a local filesystem, use                  PostgreSQL or MySQL to coordinate hosts, or, if only processes of this host                  use the file and the filesystem's locks are known to work, allow it                  explicitly (allow_network_filesystem(true), or                  ?allow_network_filesystem=true in the URL)",
                path.display()
            ),
        }),
    }
}

/// The `statfs` filesystem type of `path`, or of its nearest existing ancestor
/// directory while the file does not exist yet.
#[cfg(target_os = "linux")]
// `f_type`'s C type differs between targets: the casts are not useless on all.
#[allow(clippy::unnecessary_cast)]
fn filesystem_magic(path: &Path) -> Option<u32> {
    let path = std::path::absolute(path).ok()?;
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = nix::sys::statfs::statfs(existing).ok()?;
    // The magic numbers are 32 bits; on 32-bit targets `f_type` is signed, so
    // CIFS's 0xFF534D42 reads as negative: compare the low 32 bits.
    Some(stat.filesystem_type().0 as i64 as u32)
}

#[cfg(not(target_os = "linux"))]
fn filesystem_magic(_path: &Path) -> Option<u32> {
    None
}

/// The name of the network, cluster or FUSE filesystem with `statfs` type
/// `magic` (from `linux/magic.h` and the filesystems' sources), or `None` for
/// any other, local, filesystem.
pub(crate) fn network_filesystem(magic: u32) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF53_4D42 => "CIFS/SMB",
        0xFE53_4D42 => "SMB2/SMB3",
        // sshfs, s3fs, rclone, GlusterFS, virtiofs and every other FUSE mount:
        // most are remote, and none promises working POSIX locks.
        0x6573_5546 => "FUSE",
        0x00C3_6400 => "Ceph",
        0x5346_414F | 0x6B41_4653 => "AFS",
        0x7375_7245 => "Coda",
        0x564C => "NetWare (NCP)",
        0x0102_1997 => "9P",
        0x7461_636F => "OCFS2",
        0x0116_1970 => "GFS2",
        0x0BD0_0BD0 => "Lustre",
        0x4750_4653 => "GPFS",
        0x2003_0528 => "OrangeFS",
        0x1983_0326 => "BeeGFS",
        0x786F_4256 => "VirtualBox shared folder",
        _ => return None,
    })
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
    fn classifies_filesystems_by_statfs_magic() {
        for (magic, name) in [
            (0x6969, "NFS"),
            (0x517B, "SMB"),
            (0xFF53_4D42, "CIFS/SMB"),
            (0xFE53_4D42, "SMB2/SMB3"),
            (0x6573_5546, "FUSE"),
            (0x00C3_6400, "Ceph"),
            (0x0102_1997, "9P"),
        ] {
            assert_eq!(network_filesystem(magic), Some(name), "{magic:#x}");
        }
        // ext4, xfs, btrfs, tmpfs, overlayfs, zfs, f2fs: local.
        for magic in [
            0xEF53,
            0x5846_5342,
            0x9123_683E,
            0x0102_1994,
            0x794C_7630,
            0x2FC1_2FC1,
            0xF2F5_2010,
        ] {
            assert_eq!(network_filesystem(magic), None, "{magic:#x}");
        }
    }

    #[test]
    fn local_filesystems_are_allowed() {
        let dir = tempfile::tempdir().unwrap();
        check_local_filesystem(&dir.path().join("not-yet/created/locks.db")).unwrap();
        check_local_filesystem(dir.path()).unwrap();
        // /dev/shm is tmpfs wherever it exists.
        check_local_filesystem(Path::new("/dev/shm/locks.db")).unwrap();
    }

    #[test]
    fn nothing_to_check_without_a_file() {
        FileIdentity::record(Path::new(":memory:")).check().unwrap();
    }
}
