//! Counts writes into scratch sysfs files with real inotify. `IN_CLOSE_WRITE` marks one open for
//! writing closed (one `echo > knob`); `IN_MODIFY` each truncate or write(2) within it.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

pub struct WriteWatch {
    inotify: Inotify,
    names: BTreeMap<WatchDescriptor, String>,
    counts: Writes,
}

/// What was seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writes {
    /// Files opened for writing and closed, by file name.
    pub per_file: BTreeMap<String, u64>,
    pub modify_events: u64,
    /// The kernel's queue (16,384 events by default) overflowed: far too many writes to count.
    pub overflowed: bool,
}

impl Writes {
    pub fn files_written(&self) -> u64 {
        self.per_file.values().sum()
    }
}

impl WriteWatch {
    /// Watches every regular file directly in `dir`.
    pub fn new(dir: &Path) -> io::Result<WriteWatch> {
        let inotify = Inotify::init()?;
        let mut names = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let wd = inotify.watches().add(entry.path(), WatchMask::MODIFY | WatchMask::CLOSE_WRITE)?;
                names.insert(wd, entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(WriteWatch { inotify, names, counts: Writes::default() })
    }

    /// Everything seen since the watch began (reads what the kernel has queued, without waiting).
    pub fn writes(&mut self) -> io::Result<Writes> {
        let mut buf = [0u8; 4096];
        loop {
            let events = match self.inotify.read_events(&mut buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let mut any = false;
            for e in events {
                any = true;
                if e.mask.contains(EventMask::Q_OVERFLOW) {
                    self.counts.overflowed = true;
                }
                if e.mask.contains(EventMask::MODIFY) {
                    self.counts.modify_events += 1;
                }
                if e.mask.contains(EventMask::CLOSE_WRITE) {
                    let name = self.names.get(&e.wd).cloned().unwrap_or_else(|| "?".into());
                    *self.counts.per_file.entry(name).or_default() += 1;
                }
            }
            if !any {
                break;
            }
        }
        Ok(self.counts.clone())
    }
}
