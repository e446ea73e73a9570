//! Reading the small kernel files the throttler depends on (sysfs knobs, /proc/meminfo) with a
//! bound: at most [`LIMIT`] bytes, and never blocking on something that is not a regular file.
//! A FIFO put in place of a knob would otherwise hold the thread that reads it, and a huge file
//! would be read whole into the root daemon's memory.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Far more than any of them holds (/proc/meminfo is about 1.5 KiB).
pub const LIMIT: u64 = 64 * 1024;

/// The whole text of `path`, or an error if it is longer than [`LIMIT`] or not text.
pub fn read(path: &Path) -> io::Result<String> {
    // O_NONBLOCK: sysfs and procfs ignore it; a FIFO opens at once and reads as empty.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let mut text = String::new();
    let read = file.take(LIMIT + 1).read_to_string(&mut text);
    match read {
        Ok(n) if n as u64 > LIMIT => {
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("longer than {LIMIT} bytes")))
        }
        Ok(_) => Ok(text),
        // A FIFO with a writer that has written nothing yet.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(text),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_does_not_block_and_a_huge_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("run");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).expect("mkfifo");
        assert_eq!(read(&fifo).expect("a FIFO reads as empty"), "");

        let big = dir.path().join("meminfo");
        std::fs::write(&big, vec![b'x'; LIMIT as usize + 1]).expect("write");
        let err = read(&big).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        std::fs::write(&big, vec![b'x'; LIMIT as usize]).expect("write");
        assert_eq!(read(&big).expect("at the limit").len(), LIMIT as usize);
        assert!(read(Path::new("/proc/meminfo")).expect("procfs").contains("AnonPages"));
    }
}
