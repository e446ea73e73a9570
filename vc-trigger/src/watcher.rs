//! inotify on the way to each sandboxes folder: one watch per target, on the folder itself or,
//! while it does not exist, on its deepest existing ancestor; moved down as folders appear and up
//! again when they are removed. Targets waiting on the same folder share its watch.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::target::{Change, Meaning, Target};

/// What the trigger acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A new sandbox folder.
    Sandbox(PathBuf),
    /// A sandboxes folder appeared (first created, or created again): sandboxes may already be in it.
    Appeared(PathBuf),
    /// The kernel dropped events (queue overflow): some sandboxes may have gone unseen.
    Overflow,
}

/// The watched folder itself went away.
const GONE: EventMask =
    EventMask::DELETE_SELF.union(EventMask::MOVE_SELF).union(EventMask::IGNORED).union(EventMask::UNMOUNT);

/// ...and the kernel has removed its watch (it keeps it on a folder moved elsewhere).
const REMOVED_BY_KERNEL: EventMask = EventMask::DELETE_SELF.union(EventMask::IGNORED).union(EventMask::UNMOUNT);

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Re-resolving stops after this many folders vanish under it in a row (someone is looping
/// mkdir/rmdir); the next event on the folder it ends up on tries again.
const MAX_RACES: usize = 64;

struct Armed {
    target: Target,
    dir: PathBuf,
    wd: Option<WatchDescriptor>,
}

pub struct Watcher {
    events: EventStream<Vec<u8>>,
    watches: Watches,
    armed: Vec<Armed>,
    /// How many targets use each watch.
    users: HashMap<WatchDescriptor, usize>,
}

impl Watcher {
    /// Watches for each of `sandboxes` (absolute paths), waiting for those that do not exist yet.
    pub fn new(sandboxes: &[PathBuf]) -> io::Result<Watcher> {
        let events = Inotify::init()?.into_event_stream(vec![0u8; 16 * 1024])?;
        let watches = events.watches();
        let armed =
            sandboxes.iter().map(|s| Armed { target: Target::new(s.clone()), dir: PathBuf::new(), wd: None }).collect();
        let mut watcher = Watcher { events, watches, armed, users: HashMap::new() };
        for i in 0..watcher.armed.len() {
            watcher.arm(i)?;
        }
        Ok(watcher)
    }

    /// Waits for the next inotify event and says what it means; often nothing.
    pub async fn next(&mut self) -> io::Result<Vec<Found>> {
        let event = match self.events.next().await {
            Some(event) => event?,
            None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the inotify descriptor closed")),
        };
        let mut found = vec![];
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!("inotify queue overflow: events were lost; kicking and looking again");
            found.push(Found::Overflow);
            for i in 0..self.armed.len() {
                found.extend(self.arm(i)?);
            }
            return Ok(found);
        }
        let change = if event.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            match &event.name {
                Some(name) => Change::Entered { name, is_dir: event.mask.contains(EventMask::ISDIR) },
                None => return Ok(found),
            }
        } else if event.mask.intersects(GONE) {
            Change::Gone
        } else {
            return Ok(found);
        };
        let affected: Vec<usize> =
            (0..self.armed.len()).filter(|&i| self.armed[i].wd.as_ref() == Some(&event.wd)).collect();
        if event.mask.intersects(REMOVED_BY_KERNEL) {
            // Forgotten without being removed again.
            self.users.remove(&event.wd);
            for &i in &affected {
                self.armed[i].wd = None;
            }
        }
        for i in affected {
            match self.armed[i].target.meaning(&self.armed[i].dir, change) {
                Meaning::Sandbox(path) => found.push(Found::Sandbox(path)),
                Meaning::Rearm => found.extend(self.arm(i)?),
                Meaning::Nothing => {}
            }
        }
        Ok(found)
    }

    /// Drops target `i`'s use of its watch, removing the watch when no target uses it any more.
    fn release(&mut self, i: usize) {
        let Some(wd) = self.armed[i].wd.take() else { return };
        if let Some(n) = self.users.get_mut(&wd) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&wd);
                // Fails harmlessly when the kernel has already removed it.
                let _ = self.watches.remove(wd);
            }
        }
    }

    /// Puts target `i`'s watch on the deepest existing folder on its way; `Appeared` if that is
    /// now the sandboxes folder and was not before.
    fn arm(&mut self, i: usize) -> io::Result<Option<Found>> {
        // The watch that was on the sandboxes folder, if one was: the same one again means the
        // same folder (inotify gives one inode one watch), anything else a new folder.
        let before = self.armed[i].wd.clone().filter(|_| self.armed[i].target.is_sandboxes(&self.armed[i].dir));
        let first = self.armed[i].dir.as_os_str().is_empty();
        for _ in 0..MAX_RACES {
            let dir = self.armed[i].target.folder_to_watch(Path::is_dir);
            let wd = match self.watches.add(&dir, MASK) {
                Ok(wd) => wd,
                // Gone (or replaced by a file, or by a symlink that loops) between the look and
                // the watch: look again.
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("watching {}: {e}", dir.display()))),
            };
            if self.armed[i].wd.as_ref() != Some(&wd) {
                self.release(i);
                *self.users.entry(wd.clone()).or_default() += 1;
                self.armed[i].wd = Some(wd);
            }
            self.armed[i].dir = dir.clone();
            // A deeper folder may have appeared before the watch was in place, unseen.
            if self.armed[i].target.folder_to_watch(Path::is_dir) != dir {
                continue;
            }
            let sandboxes = self.armed[i].target.sandboxes().to_owned();
            if self.armed[i].target.is_sandboxes(&dir) {
                tracing::info!(folder = %sandboxes.display(), "watching for new sandboxes");
                let same = before.is_some() && before == self.armed[i].wd;
                return Ok((!first && !same).then_some(Found::Appeared(sandboxes)));
            }
            tracing::info!(folder = %sandboxes.display(), watching = %dir.display(), "waiting for the sandboxes folder");
            return Ok(None);
        }
        tracing::warn!(folder = %self.armed[i].target.sandboxes().display(), "folders keep vanishing; watching where it stopped");
        Ok(None)
    }
}

/// An error of `inotify_add_watch` that means the folder is no longer there as a folder.
fn vanished(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) || e.raw_os_error() == Some(libc::ELOOP)
}
