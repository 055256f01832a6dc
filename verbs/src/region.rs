//! Memory that can be registered for RDMA and that a pmgas node keeps its data in:
//! persistent memory as a devdax character device (`/dev/daxX.Y`) in production, or a
//! regular file on tmpfs/hugetlbfs in development.
//!
//! Everything else is refused with the reason, before any registration is tried:
//! fsdax (a filesystem mounted with `-o dax`, or the raw `/dev/pmemN` block device) because
//! the kernel refuses long-term pins of it (`ibv_reg_mr` fails with EOPNOTSUPP); files on
//! disk filesystems because they are neither persistent memory nor pinnable for RDMA on
//! current kernels; other devices because they are not memory.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What kind of memory backs a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// A devdax character device: real (or emulated) persistent memory.
    DevDax,
    /// A file on tmpfs or hugetlbfs: volatile, for development and tests.
    TmpfsFile,
}

/// A shared, read-write mapping of a devdax device or tmpfs file.
pub struct MappedRegion {
    map: MmapRaw,
    path: PathBuf,
    kind: RegionKind,
    _file: File,
}

fn refuse(path: &Path, reason: impl Into<String>) -> Error {
    Error::Region {
        path: path.display().to_string(),
        reason: reason.into(),
        source: None,
    }
}

fn io_err(path: &Path, what: &str, source: std::io::Error) -> Error {
    Error::Region {
        path: path.display().to_string(),
        reason: format!("{what}: {source}"),
        source: Some(source),
    }
}

/// Decides whether `path` may back a region, and what it is.
pub fn classify(path: &Path) -> Result<RegionKind> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, "cannot stat", e))?;
    let ft = meta.file_type();
    if ft.is_char_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let subsystem = fs::read_link(format!("/sys/dev/char/{major}:{minor}/subsystem"))
            .map_err(|e| io_err(path, "cannot read the device's sysfs subsystem", e))?;
        if subsystem.file_name().is_some_and(|n| n == "dax") {
            return Ok(RegionKind::DevDax);
        }
        return Err(refuse(
            path,
            "character device is not a devdax device (expected /dev/daxX.Y)",
        ));
    }
    if ft.is_block_device() {
        return Err(refuse(
            path,
            "is a block device (fsdax or raw pmem); RDMA cannot register fsdax memory (the kernel \
             refuses to pin it, EOPNOTSUPP). Reconfigure the namespace as devdax: \
             `ndctl create-namespace -f -e namespaceX.Y -m devdax`, then use /dev/daxX.Y",
        ));
    }
    if !ft.is_file() {
        return Err(refuse(
            path,
            "is neither a devdax device nor a regular file",
        ));
    }
    // SAFETY: statfs is plain old data; all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| refuse(path, "path contains a NUL byte"))?;
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(io_err(
            path,
            "statfs failed",
            std::io::Error::last_os_error(),
        ));
    }
    let fs_type = st.f_type as i64;
    if fs_type == TMPFS_MAGIC || fs_type == HUGETLBFS_MAGIC {
        return Ok(RegionKind::TmpfsFile);
    }
    if mount_has_dax(path) {
        return Err(refuse(
            path,
            "is on an fsdax filesystem (mounted with -o dax); RDMA cannot register fsdax memory \
             (the kernel refuses to pin it, EOPNOTSUPP). Use a devdax device /dev/daxX.Y",
        ));
    }
    Err(refuse(
        path,
        "is a file on a disk filesystem, which is neither persistent memory nor registrable for \
         RDMA; use a devdax device, or a file on tmpfs (e.g. /dev/shm) for development",
    ))
}

/// Whether the mount holding `path` has the `dax` option (fsdax).
fn mount_has_dax(path: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let mut best: Option<(usize, bool)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_dev), Some(mnt), Some(_fs), Some(opts)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if canon.starts_with(mnt) && best.is_none_or(|(len, _)| mnt.len() >= len) {
            let dax = opts.split(',').any(|o| o == "dax" || o == "dax=always");
            best = Some((mnt.len(), dax));
        }
    }
    best.is_some_and(|(_, dax)| dax)
}

/// Size in bytes of a devdax device, from sysfs (stat reports 0 for it).
fn devdax_size(path: &Path) -> Result<u64> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, "cannot stat", e))?;
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let size_path = format!("/sys/dev/char/{major}:{minor}/size");
    let text = fs::read_to_string(&size_path)
        .map_err(|e| io_err(path, "cannot read devdax size from sysfs", e))?;
    text.trim()
        .parse()
        .map_err(|_| refuse(path, format!("unparsable size {text:?} in {size_path}")))
}

impl MappedRegion {
    /// Maps a devdax device whole, or a tmpfs file (created or grown to `file_len` bytes
    /// when given; an existing file keeps its length otherwise).
    pub fn open(path: &Path, file_len: Option<u64>) -> Result<Self> {
        if file_len.is_some() && !path.exists() {
            File::create(path).map_err(|e| io_err(path, "cannot create", e))?;
        }
        let kind = classify(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "cannot open read-write", e))?;
        let len = match kind {
            RegionKind::DevDax => devdax_size(path)?,
            RegionKind::TmpfsFile => {
                let current = file
                    .metadata()
                    .map_err(|e| io_err(path, "cannot stat", e))?
                    .len();
                match file_len {
                    Some(want) if want > current => {
                        file.set_len(want)
                            .map_err(|e| io_err(path, "cannot grow", e))?;
                        want
                    }
                    _ => current,
                }
            }
        };
        if len == 0 {
            return Err(refuse(
                path,
                "has size 0; give a length for a new development file",
            ));
        }
        let len =
            usize::try_from(len).map_err(|_| refuse(path, "does not fit the address space"))?;
        let map = MmapOptions::new().len(len).map_raw(&file).map_err(|e| {
            io_err(
                path,
                "mmap failed (devdax needs a length that is a multiple of its alignment)",
                e,
            )
        })?;
        Ok(Self {
            map,
            path: path.to_owned(),
            kind,
            _file: file,
        })
    }

    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shm_path(tag: &str) -> PathBuf {
        PathBuf::from(format!(
            "/dev/shm/pmgas-region-test-{tag}-{}",
            std::process::id()
        ))
    }

    #[test]
    fn maps_a_tmpfs_file() {
        let p = shm_path("ok");
        let r = MappedRegion::open(&p, Some(1 << 20)).unwrap();
        assert_eq!(r.kind(), RegionKind::TmpfsFile);
        assert_eq!(r.len(), 1 << 20);
        drop(r);
        // Reopening without a length keeps the file's size.
        assert_eq!(MappedRegion::open(&p, None).unwrap().len(), 1 << 20);
        fs::remove_file(&p).unwrap();
    }

    #[test]
    fn refuses_non_memory_paths() {
        let err = classify(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(err.contains("not a devdax device"), "{err}");
        let err = classify(Path::new("/nonexistent/pmgas"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot stat"), "{err}");
        let err = classify(Path::new("/")).unwrap_err().to_string();
        assert!(
            err.contains("neither a devdax device nor a regular file"),
            "{err}"
        );
    }

    #[test]
    fn refuses_files_on_disk_filesystems() {
        // The crate's own manifest sits on the build disk, never on tmpfs.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        if classify(&manifest).is_ok() {
            panic!("{} classified as registrable memory", manifest.display());
        }
        let err = classify(&manifest).unwrap_err().to_string();
        assert!(
            err.contains("disk filesystem") || err.contains("fsdax"),
            "{err}"
        );
    }

    #[test]
    fn refuses_empty_tmpfs_file_without_length() {
        let p = shm_path("empty");
        File::create(&p).unwrap();
        let err = MappedRegion::open(&p, None).err().unwrap().to_string();
        assert!(err.contains("size 0"), "{err}");
        fs::remove_file(&p).unwrap();
    }
}
