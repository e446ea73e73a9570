//! The crash-safe record of the administrator's settings: written before the throttler first
//! changes a knob, removed once they are back. Finding it at start-up means the last instance
//! died mid-cycle.
//!
//! The record is kept twice in the folder (the record, then a backup, each written atomically):
//! one copy deleted or corrupted mid-cycle, then a crash, would otherwise make the successor
//! take the dead instance's aggressive knobs for the administrator's, for good.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::knobs::Knobs;
use crate::core::written::Written;

const FILE_NAME: &str = "initial-settings.json";
const BACKUP_FILE_NAME: &str = "initial-settings.backup.json";
const HANDOVER_FILE_NAME: &str = "handover.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct RecordFile {
    version: u32,
    knobs: Knobs,
    /// Absent in records of versions that did not keep it (and ignored by them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    written: Option<Written>,
}

/// What the record holds: the administrator's settings, and what the throttler wrote over them
/// in the cycle (`None` in a record from a version that did not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub knobs: Knobs,
    pub written: Option<Written>,
}

/// What an instance that exited on idle left for its successor, because a call that reached it
/// after it had released its bus name moved it (see the engine). The administrator's settings
/// stay in the main record; this says where the throttler was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub mode: String,
    pub setting: String,
    /// CLOCK_REALTIME microseconds of the next step down, 0 when none.
    pub next_step_down_us: u64,
}

#[derive(Serialize, Deserialize)]
struct HandoverRecord {
    version: u32,
    handover: Handover,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// Unreadable content; the file has been moved to `kept_as` for a human to look at.
    #[error("{} is corrupt ({reason}); kept as {}", path.display(), kept_as.display())]
    Corrupt { path: PathBuf, kept_as: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateFile { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The second copy of the record, read only when the record is missing or corrupt.
    pub fn backup_path(&self) -> PathBuf {
        self.dir.join(BACKUP_FILE_NAME)
    }

    /// Records `knobs` atomically (write a temporary file, fsync, rename over, fsync the
    /// folder), the record first and then its backup; with no word of what was written over
    /// them, as versions before [`Written`] recorded them: a successor puts every knob back.
    pub fn save(&self, knobs: &Knobs) -> Result<(), StateError> {
        self.save_record(knobs, None)
    }

    /// [`StateFile::save`], with what the throttler wrote (or is about to write) in the cycle.
    pub fn save_with(&self, knobs: &Knobs, written: &Written) -> Result<(), StateError> {
        self.save_record(knobs, Some(written))
    }

    fn save_record(&self, knobs: &Knobs, written: Option<&Written>) -> Result<(), StateError> {
        let record = RecordFile { version: FORMAT_VERSION, knobs: knobs.clone(), written: written.cloned() };
        let body = serde_json::to_vec(&record).map_err(|e| StateError::Io { path: self.path(), source: e.into() })?;
        self.write_atomic(&self.path(), &body)?;
        self.write_atomic(&self.backup_path(), &body)
    }

    fn write_atomic(&self, path: &Path, body: &[u8]) -> Result<(), StateError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        // One fixed temporary name per record (the folder is locked, so no one else writes
        // here): a kill mid-write leaves one file that the next write replaces, never a pile.
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(body).and_then(|()| f.sync_all()));
        written.map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))
    }

    pub fn handover_path(&self) -> PathBuf {
        self.dir.join(HANDOVER_FILE_NAME)
    }

    /// Leaves `handover` for the next instance, atomically like [`StateFile::save`].
    pub fn save_handover(&self, handover: &Handover) -> Result<(), StateError> {
        let path = self.handover_path();
        let body = serde_json::to_vec(&HandoverRecord { version: FORMAT_VERSION, handover: handover.clone() })
            .map_err(|e| StateError::Io { path: path.clone(), source: e.into() })?;
        self.write_atomic(&path, &body)
    }

    /// The hand-over a previous instance left, removed so it is used once. One that cannot be
    /// read is kept aside as `handover.json.corrupt`.
    pub fn take_handover(&self) -> Result<Option<Handover>, StateError> {
        let path = self.handover_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let reason = match serde_json::from_slice::<HandoverRecord>(&bytes) {
            Ok(r) if r.version != FORMAT_VERSION => format!("unknown format version {}", r.version),
            Ok(r) => {
                fs::remove_file(&path).map_err(|source| StateError::Io { path: path.clone(), source })?;
                return Ok(Some(r.handover));
            }
            Err(e) => e.to_string(),
        };
        let kept_as = self.dir.join(format!("{HANDOVER_FILE_NAME}.corrupt"));
        fs::rename(&path, &kept_as).map_err(|source| StateError::Io { path: path.clone(), source })?;
        Err(StateError::Corrupt { path, kept_as, reason })
    }

    /// The recorded settings, if a previous cycle did not finish. A file that cannot be trusted
    /// is moved aside rather than written into sysfs. The backup stands in for a record that is
    /// missing or corrupt (said loudly: someone or something removed or damaged it); a record
    /// and backup both present and different mean a kill between the two writes of a save, and
    /// the record, written first, is the newer.
    pub fn load(&self) -> Result<Option<Knobs>, StateError> {
        Ok(self.load_record()?.map(|r| r.knobs))
    }

    /// [`StateFile::load`], with what the throttler had written.
    pub fn load_record(&self) -> Result<Option<Record>, StateError> {
        let primary = Self::load_one(&self.path(), FILE_NAME, &self.dir);
        if let Ok(Some(knobs)) = primary {
            return Ok(Some(knobs));
        }
        if let Err(StateError::Io { .. }) = primary {
            return primary;
        }
        match Self::load_one(&self.backup_path(), BACKUP_FILE_NAME, &self.dir) {
            Ok(Some(knobs)) => {
                let why = match &primary {
                    Err(e) => e.to_string(),
                    _ => format!("{} is missing", self.path().display()),
                };
                tracing::error!(
                    backup = %self.backup_path().display(),
                    "{why}: the administrator's settings are taken from the backup of the record"
                );
                Ok(Some(knobs))
            }
            // No backup (nothing recorded, or a record from a version without one): what the
            // record said stands.
            Ok(None) => primary,
            Err(backup_err) => match primary {
                Err(e) => {
                    tracing::error!("{backup_err}");
                    Err(e)
                }
                Ok(_) => Err(backup_err),
            },
        }
    }

    fn load_one(path: &Path, name: &str, dir: &Path) -> Result<Option<Record>, StateError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path: path.to_owned(), source }),
        };
        let reason = match serde_json::from_slice::<RecordFile>(&bytes) {
            Ok(r) if r.version != FORMAT_VERSION => format!("unknown format version {}", r.version),
            Ok(r) => match r.knobs.validate() {
                Ok(()) => return Ok(Some(Record { knobs: r.knobs, written: r.written })),
                Err(why) => why,
            },
            Err(e) => e.to_string(),
        };
        let kept_as = dir.join(format!("{name}.corrupt"));
        fs::rename(path, &kept_as).map_err(|source| StateError::Io { path: path.to_owned(), source })?;
        Err(StateError::Corrupt { path: path.to_owned(), kept_as, reason })
    }

    /// Takes the folder's lock for the life of the returned file, so that two throttlers never
    /// drive (and record) the same KSM at once; `Ok(None)` if another process holds it.
    pub fn lock(&self) -> Result<Option<File>, StateError> {
        let path = self.dir.join("lock");
        let io_err = |source| StateError::Io { path: path.clone(), source };
        fs::create_dir_all(&self.dir).map_err(io_err)?;
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(io_err)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                self.remove_leftovers();
                Ok(Some(file))
            }
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io_err(e.into())),
        }
    }

    /// Temporary files a write killed half-way left (`*.tmp`, and `.tmpXXXXXX` from versions
    /// that named them at random); only ever called with the lock held.
    fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp") || name.ends_with(".json.tmp") {
                if let Err(e) = fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), "removing a leftover temporary file: {e}");
                }
            }
        }
    }

    /// Removes the backup, then the record: a kill between the two leaves the record, which
    /// is what a start after a kill at any other instant of the restore finds too.
    pub fn remove(&self) -> Result<(), StateError> {
        for path in [self.backup_path(), self.path()] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(StateError::Io { path, source: e }),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs() -> Knobs {
        Knobs {
            run: 0,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            advisor_mode: Some("none".into()),
            smart_scan: Some(1),
        }
    }

    #[test]
    fn a_record_from_before_smart_scan_was_managed_loads_and_leaves_it_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        let old = br#"{"version":1,"knobs":{"run":1,"pages_to_scan":100,"sleep_millisecs":20,"advisor_mode":null}}"#;
        fs::write(state.path(), old).expect("write");
        let knobs = state.load().expect("load").expect("a record");
        assert_eq!((knobs.run, knobs.smart_scan), (1, None));
    }

    /// Issue 30, item 1: the record says what was written over the knobs; one from a version
    /// that did not is read as not saying.
    #[test]
    fn the_record_keeps_what_was_written_and_old_ones_do_not_say() {
        use crate::core::plan::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        state.save(&knobs()).expect("save");
        assert_eq!(state.load_record().expect("load").expect("a record").written, None);
        let written = Written::default().with(&[Write::PagesToScan(5000), Write::SleepMillisecs(1)]);
        state.save_with(&knobs(), &written).expect("save");
        let record = state.load_record().expect("load").expect("a record");
        assert_eq!((record.knobs, record.written), (knobs(), Some(written)));
        let old = br#"{"version":1,"knobs":{"run":0,"pages_to_scan":100,"sleep_millisecs":20,"advisor_mode":null}}"#;
        fs::write(state.path(), old).expect("write");
        assert_eq!(state.load_record().expect("load").expect("a record").written, None);
    }

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path().join("sub"));
        assert_eq!(state.load().expect("load"), None);
        state.save(&knobs()).expect("save");
        assert_eq!(state.load().expect("load"), Some(knobs()));
        state.remove().expect("remove");
        assert_eq!(state.load().expect("load"), None);
        state.remove().expect("removing twice is fine");
        let left: Vec<_> = fs::read_dir(dir.path().join("sub")).expect("ls").collect();
        assert!(left.is_empty(), "no temporary files left: {left:?}");
    }

    #[test]
    fn a_handover_is_taken_once_and_a_bad_one_kept_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        assert_eq!(state.take_handover().expect("none"), None);
        let h = Handover { mode: "throttle".into(), setting: "standard".into(), next_step_down_us: 42 };
        state.save_handover(&h).expect("save");
        assert_eq!(state.take_handover().expect("take"), Some(h));
        assert_eq!(state.take_handover().expect("gone"), None, "used once");
        fs::write(state.handover_path(), b"{\"version\":1}").expect("write");
        assert!(matches!(state.take_handover(), Err(StateError::Corrupt { .. })));
        assert!(!state.handover_path().exists());
        assert!(dir.path().join("handover.json.corrupt").exists());
    }

    #[test]
    fn writes_killed_half_way_leave_nothing_that_piles_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        // What a kill during the write left, by this version and by earlier ones.
        std::fs::write(dir.path().join("initial-settings.json.tmp"), "{\"vers").expect("write");
        std::fs::write(dir.path().join(".tmpAbC123"), "{").expect("write");
        std::fs::write(dir.path().join("keep.me"), "").expect("write");
        let lock = state.lock().expect("lock").expect("free");
        let mut names: Vec<_> =
            std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        names.sort();
        assert_eq!(names, ["keep.me", "lock"]);
        for _ in 0..3 {
            state.save(&knobs()).expect("save");
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 4, "lock, keep.me, the record and its backup");
        drop(lock);
    }

    #[test]
    fn the_lock_is_exclusive_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        let held = state.lock().expect("lock").expect("free");
        assert!(state.lock().expect("lock").is_none(), "second lock refused while held");
        drop(held);
        assert!(state.lock().expect("lock").is_some());
    }

    #[test]
    fn corrupt_or_truncated_files_are_kept_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        state.save(&knobs()).expect("save");
        let good = fs::read(state.path()).expect("read");
        let bad_run = String::from_utf8(good.clone()).expect("utf8").replace("\"run\":0", "\"run\":7");
        for bad in [&good[..good.len() / 2], b"", b"\xff\xfe", bad_run.as_bytes()] {
            fs::write(state.path(), bad).expect("write");
            fs::write(state.backup_path(), bad).expect("write");
            match state.load() {
                Err(StateError::Corrupt { kept_as, .. }) => {
                    assert_eq!(fs::read(&kept_as).expect("kept"), bad);
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
            assert!(!state.path().exists());
            assert!(!state.backup_path().exists());
            assert_eq!(fs::read(dir.path().join("initial-settings.backup.json.corrupt")).expect("kept"), bad);
        }
    }

    /// Issue 14, item 4: one copy deleted or damaged mid-cycle still leaves the originals.
    #[test]
    fn the_backup_stands_in_for_a_record_deleted_or_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        state.save(&knobs()).expect("save");
        fs::remove_file(state.path()).expect("someone deletes the record");
        assert_eq!(state.load().expect("load"), Some(knobs()), "from the backup");

        state.save(&knobs()).expect("save");
        fs::write(state.path(), b"{\"version\":1,\"kn").expect("a damaged record");
        assert_eq!(state.load().expect("load"), Some(knobs()), "from the backup");
        assert!(dir.path().join("initial-settings.json.corrupt").exists(), "the damaged one kept aside");

        state.save(&knobs()).expect("save");
        fs::remove_file(state.backup_path()).expect("the backup deleted");
        assert_eq!(state.load().expect("load"), Some(knobs()), "the record alone");

        // A kill between the two writes of a save: the record is the newer.
        let mut newer = knobs();
        newer.pages_to_scan = 4242;
        state.save(&knobs()).expect("save");
        let old_backup = fs::read(state.backup_path()).expect("read");
        state.save(&newer).expect("save");
        fs::write(state.backup_path(), old_backup).expect("as if killed before the backup");
        assert_eq!(state.load().expect("load"), Some(newer));

        state.remove().expect("remove");
        assert!(!state.path().exists() && !state.backup_path().exists(), "both removed");
        assert_eq!(state.load().expect("load"), None);
    }
}
