//! A writer of the newc ("070701") cpio format, uncompressed: what the Linux kernel unpacks as an
//! initramfs. Directories, regular files and symlinks only (the guest's init mounts devtmpfs).
//! The output is deterministic (mtime 0, uid/gid 0, inodes counting up) so that the same inputs
//! give the same image byte for byte, on any machine.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// newc header: the magic and 13 fields of 8 hex digits.
const HEADER_LEN: usize = 6 + 13 * 8;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("bad archive path {0:?}: relative, no empty, `.` or `..` components, no NUL")]
    BadPath(String),
    #[error("{path}: {size} bytes is more than newc's 32-bit size field holds")]
    TooBig { path: String, size: u64 },
    #[error("{path}: expected {expected} bytes, got {got} (did it change while being read?)")]
    ShortRead { path: String, expected: u64, got: u64 },
}

/// Writes entries in the order given; parents must come before their children.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter { out, next_ino: 1, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.header(path, S_IFDIR | (perm & 0o7777), 2, 0)
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.file_from_reader(path, perm, data.len() as u64, data)
    }

    /// A regular file of exactly `size` bytes read from `reader`, streamed (not held in memory).
    pub fn file_from_reader(&mut self, path: &str, perm: u32, size: u64, reader: impl Read) -> Result<(), CpioError> {
        let size32 = u32::try_from(size).map_err(|_| CpioError::TooBig { path: path.to_owned(), size })?;
        self.header(path, S_IFREG | (perm & 0o7777), 1, size32)?;
        let got = io::copy(&mut reader.take(size), &mut self.out)
            .map_err(|source| CpioError::Read { path: path.to_owned(), source })?;
        if got != size {
            return Err(CpioError::ShortRead { path: path.to_owned(), expected: size, got });
        }
        self.written += size;
        self.pad()
    }

    /// The first `size` bytes of the host file `host` (its whole length if `None`).
    pub fn file_from_path(&mut self, path: &str, perm: u32, host: &Path, size: Option<u64>) -> Result<(), CpioError> {
        let read_err = |source| CpioError::Read { path: host.display().to_string(), source };
        let file = File::open(host).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        self.file_from_reader(path, perm, size.map_or(len, |s| s.min(len)), file)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::BadPath(target.to_owned()));
        }
        let size = target.len() as u64;
        let size32 = u32::try_from(size).map_err(|_| CpioError::TooBig { path: path.to_owned(), size })?;
        self.header(path, S_IFLNK | 0o777, 1, size32)?;
        self.out.write_all(target.as_bytes())?;
        self.written += size;
        self.pad()
    }

    /// Writes the `TRAILER!!!` entry and hands the output back, flushed.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.entry("TRAILER!!!", 0, 0, 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, path: &str, mode: u32, nlink: u32, size: u32) -> Result<(), CpioError> {
        check_path(path)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entry(path, ino, mode, nlink, size)
    }

    fn entry(&mut self, name: &str, ino: u32, mode: u32, nlink: u32, size: u32) -> Result<(), CpioError> {
        let namesize = u32::try_from(name.len() + 1).map_err(|_| CpioError::BadPath(name.to_owned()))?;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0];
        let mut header = String::with_capacity(HEADER_LEN);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (HEADER_LEN + name.len() + 1) as u64;
        self.pad()
    }

    /// Header+name and data each end on a 4-byte boundary.
    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - self.written % 4) % 4;
        self.out.write_all(&[0; 3][..n as usize])?;
        self.written += n;
        Ok(())
    }
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/tool", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("bin/sh", "tool").unwrap();
        w.dir("data", 0o700).unwrap();
        w.file("data/empty", 0o644, b"").unwrap();
        let big: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
        w.file("data/big", 0o600, &big).unwrap();
        w.finish().unwrap()
    }

    fn cpio(args: &[&str], dir: &Path, input: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn gnu_cpio_lists_every_entry_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let list = cpio(&["-it", "--quiet"], dir.path(), &sample());
        assert_eq!(list.lines().collect::<Vec<_>>(), ["bin", "bin/tool", "bin/sh", "data", "data/empty", "data/big"]);
    }

    #[test]
    fn gnu_cpio_extracts_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        cpio(&["-idv", "--quiet", "--no-absolute-filenames"], dir.path(), &sample());
        let p = dir.path();
        assert_eq!(std::fs::read(p.join("bin/tool")).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(std::fs::read_link(p.join("bin/sh")).unwrap(), Path::new("tool"));
        assert_eq!(std::fs::read(p.join("data/empty")).unwrap(), b"");
        let big: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(std::fs::read(p.join("data/big")).unwrap(), big);
        let mode = |f: &str| std::fs::symlink_metadata(p.join(f)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("data/big"), 0o600);
        assert_eq!(mode("data"), 0o700);
    }

    #[test]
    fn host_files_are_streamed_whole_or_cut_short() {
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), b"0123456789").unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.file_from_path("whole", 0o644, src.path(), None).unwrap();
        w.file_from_path("cut", 0o644, src.path(), Some(4)).unwrap();
        w.file_from_path("asked-too-much", 0o644, src.path(), Some(99)).unwrap();
        let archive = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        cpio(&["-id", "--quiet"], dir.path(), &archive);
        assert_eq!(std::fs::read(dir.path().join("whole")).unwrap(), b"0123456789");
        assert_eq!(std::fs::read(dir.path().join("cut")).unwrap(), b"0123");
        assert_eq!(std::fs::read(dir.path().join("asked-too-much")).unwrap(), b"0123456789");
    }

    #[test]
    fn output_is_deterministic_and_aligned() {
        let a = sample();
        assert_eq!(a, sample());
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        // The trailer: inode 0, nlink 1, name TRAILER!!!.
        let trailer = a.windows(10).rposition(|w| w == b"TRAILER!!!").unwrap();
        let header = std::str::from_utf8(&a[trailer - HEADER_LEN..trailer]).unwrap();
        assert_eq!(&header[..14], "07070100000000");
        // Inodes count up from 1 in the order written: "bin" is 1, "bin/tool" (after the
        // 4-byte-aligned header and name of "bin") is 2.
        assert_eq!(&a[..14], b"07070100000001");
        let second = (HEADER_LEN + "bin".len() + 1).next_multiple_of(4);
        assert_eq!(&a[second..second + 14], b"07070100000002");
    }

    #[test]
    fn bad_paths_and_short_reads_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/", "n\0ul"] {
            assert!(matches!(w.dir(bad, 0o755), Err(CpioError::BadPath(_))), "{bad:?}");
        }
        let short = w.file_from_reader("f", 0o644, 10, &b"abc"[..]);
        assert!(matches!(short, Err(CpioError::ShortRead { expected: 10, got: 3, .. })), "{short:?}");
    }
}
