//! The machine's own `/sys/kernel/mm/ksm`: the lock that everything in this project that
//! touches it takes, so two never overlap, and the switch for machines without it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};

use crate::eventually::until_some_blocking;
use crate::switch::{skipped, SKIP_REAL_KSM};

pub const REAL_KSM: &str = "/sys/kernel/mm/ksm";
/// Taken (exclusively) by every test, benchmark and CI step that touches the real KSM.
pub const REAL_KSM_LOCK: &str = "/run/lock/kata-ksm-throttler-real-ksm.lock";

/// Whether a test that drives the real KSM should skip: [`SKIP_REAL_KSM`] set says so (and the
/// test says it skipped). Otherwise it must run, so the checks here fail a test without root or
/// without KSM rather than let it pass without having run.
pub fn skip_real_ksm(test: &str) -> bool {
    if std::env::var_os(SKIP_REAL_KSM).is_some() {
        skipped(test, &format!("{SKIP_REAL_KSM} is set: not touching the real KSM"));
        return true;
    }
    assert!(rustix::process::geteuid().is_root(), "{test} drives the real KSM: it needs root (or {SKIP_REAL_KSM}=1)");
    assert!(Path::new(REAL_KSM).join("run").exists(), "{test}: no KSM in this kernel (or {SKIP_REAL_KSM}=1)");
    false
}

/// Opens the lock file (creating it).
fn lock_file() -> io::Result<File> {
    File::options().create(true).truncate(false).write(true).open(REAL_KSM_LOCK)
}

/// Takes the real-KSM lock, waiting as long as it is held (saying so once).
pub fn lock() -> io::Result<File> {
    let file = lock_file()?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        eprintln!("waiting for {REAL_KSM_LOCK}: something else is using the real KSM");
        flock(&file, FlockOperation::LockExclusive)?;
    }
    Ok(file)
}

/// Takes the real-KSM lock, waiting at most `limit` (a long real-KSM benchmark holds it for
/// many minutes); panics if it stays held.
pub fn lock_within(limit: Duration) -> File {
    let file = lock_file().unwrap_or_else(|e| panic!("the real-KSM lock {REAL_KSM_LOCK}: {e}"));
    let what = || {
        format!("the real-KSM lock {REAL_KSM_LOCK}, held by another user of the real KSM; set {SKIP_REAL_KSM}=1 to run the rest without it")
    };
    until_some_blocking(limit, what, || flock(&file, FlockOperation::NonBlockingLockExclusive).ok())
        .unwrap_or_else(|e| panic!("{e}"));
    file
}
