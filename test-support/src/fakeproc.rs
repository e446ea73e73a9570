//! A fake `/proc`: one folder per pid with the files the Inspect interface's walk reads
//! (`comm`, `cmdline`, `ksm_stat`, `smaps`), on tmpfs like the real one.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::scratch::tmpfs_parent;

pub struct FakeProc {
    pub dir: TempDir,
}

/// A `ksm_stat` as Linux 6.8+ writes it.
pub fn ksm_stat(merging: u64, zero: u64, profit: i64, mergeable: bool) -> String {
    let yes = if mergeable { "yes" } else { "no" };
    format!(
        "ksm_rmap_items {}\nksm_zero_pages {zero}\nksm_merging_pages {merging}\nksm_process_profit {profit}\n\
         ksm_merge_any: no\nksm_mergeable: {yes}\n",
        merging + 1
    )
}

/// One `smaps` entry: `perms` such as `rw-p` or `rw-s`, `flags` the VmFlags (`mg`, `sh`, `ht`).
pub fn smaps_entry(start: u64, size: u64, perms: &str, flags: &str, path: &str) -> String {
    format!(
        "{start:x}-{:x} {perms} 00000000 00:00 0    {path}\nSize: {} kB\nRss: 0 kB\nKSM: 0 kB\nVmFlags: rd wr mr mw me {flags}\n",
        start + size,
        size / 1024
    )
}

impl FakeProc {
    pub fn new() -> FakeProc {
        let dir = tempfile::Builder::new().prefix("fake-proc-").tempdir_in(tmpfs_parent()).expect("fake /proc");
        FakeProc { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a process; `ksm_stat` `None` leaves the file out (a kernel before 6.1).
    pub fn add(&self, pid: u32, comm: &str, argv: &[&str], ksm_stat: Option<&str>, smaps: &str) -> PathBuf {
        let d = self.dir.path().join(pid.to_string());
        let write = |name: &str, text: &[u8]| {
            std::fs::write(d.join(name), text).unwrap_or_else(|e| panic!("writing {}/{name}: {e}", d.display()))
        };
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        write("comm", format!("{comm}\n").as_bytes());
        let mut cmdline = argv.join("\0");
        cmdline.push('\0');
        write("cmdline", cmdline.as_bytes());
        if let Some(s) = ksm_stat {
            write("ksm_stat", s.as_bytes());
        }
        write("smaps", smaps.as_bytes());
        d
    }
}

impl Default for FakeProc {
    fn default() -> Self {
        FakeProc::new()
    }
}
