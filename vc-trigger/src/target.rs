//! The pure part of the trigger: for one folder of sandboxes (e.g. `/run/vc/sbs`), which folder
//! to watch while it does not exist yet, and what an event on the watched folder means. The file
//! system is asked through a closure, so the rules are tested without one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// What happened in or to a watched folder, as inotify reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// An entry appeared in it (created or moved in).
    Entered { name: &'a OsStr, is_dir: bool },
    /// It was deleted, moved away or unmounted: its watch is of no more use.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meaning {
    /// A new sandbox folder.
    Sandbox(PathBuf),
    /// The way to the sandboxes folder changed: find the folder to watch again.
    Rearm,
    Nothing,
}

/// One folder whose subfolders are sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    sandboxes: PathBuf,
}

impl Target {
    /// `sandboxes` must be absolute, so that its ancestors end at `/`.
    pub fn new(sandboxes: PathBuf) -> Target {
        debug_assert!(sandboxes.is_absolute());
        Target { sandboxes }
    }

    pub fn sandboxes(&self) -> &Path {
        &self.sandboxes
    }

    /// The folder to watch: the sandboxes folder if it exists, else its deepest existing ancestor.
    pub fn folder_to_watch(&self, is_dir: impl Fn(&Path) -> bool) -> PathBuf {
        self.sandboxes.ancestors().find(|p| is_dir(p)).unwrap_or(Path::new("/")).to_owned()
    }

    /// Whether watching `dir` means watching the sandboxes themselves.
    pub fn is_sandboxes(&self, dir: &Path) -> bool {
        dir == self.sandboxes
    }

    /// What `change` in the watched folder `watched` means.
    pub fn meaning(&self, watched: &Path, change: Change<'_>) -> Meaning {
        match change {
            Change::Gone => Meaning::Rearm,
            Change::Entered { is_dir: false, .. } => Meaning::Nothing,
            Change::Entered { name, is_dir: true } => {
                let entered = watched.join(name);
                if self.is_sandboxes(watched) {
                    Meaning::Sandbox(entered)
                } else if self.sandboxes.starts_with(&entered) {
                    // The next folder on the way appeared (the sandboxes folder itself included).
                    Meaning::Rearm
                } else {
                    Meaning::Nothing
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entered(name: &str, is_dir: bool) -> Change<'_> {
        Change::Entered { name: OsStr::new(name), is_dir }
    }

    #[test]
    fn the_deepest_existing_folder_is_watched() {
        let t = Target::new("/run/vc/sbs".into());
        assert_eq!(t.folder_to_watch(|_| true), Path::new("/run/vc/sbs"));
        assert_eq!(t.folder_to_watch(|p| p != Path::new("/run/vc/sbs")), Path::new("/run/vc"));
        assert_eq!(t.folder_to_watch(|p| p == Path::new("/") || p == Path::new("/run")), Path::new("/run"));
        assert_eq!(t.folder_to_watch(|_| false), Path::new("/"));
    }

    #[test]
    fn new_subfolders_of_the_sandboxes_folder_are_sandboxes() {
        let t = Target::new("/run/vc/sbs".into());
        let sbs = Path::new("/run/vc/sbs");
        assert_eq!(t.meaning(sbs, entered("abc123", true)), Meaning::Sandbox("/run/vc/sbs/abc123".into()));
        assert_eq!(t.meaning(sbs, entered("abc123.lock", false)), Meaning::Nothing, "files are not sandboxes");
        assert_eq!(t.meaning(sbs, Change::Gone), Meaning::Rearm);
    }

    #[test]
    fn only_the_next_folder_on_the_way_matters_while_waiting() {
        let t = Target::new("/run/vc/sbs".into());
        assert_eq!(t.meaning(Path::new("/run"), entered("vc", true)), Meaning::Rearm);
        assert_eq!(t.meaning(Path::new("/run"), entered("vcx", true)), Meaning::Nothing);
        assert_eq!(t.meaning(Path::new("/run"), entered("vc", false)), Meaning::Nothing, "a file named vc");
        assert_eq!(t.meaning(Path::new("/run/vc"), entered("sbs", true)), Meaning::Rearm);
        assert_eq!(t.meaning(Path::new("/run/vc"), entered("vm", true)), Meaning::Nothing);
        assert_eq!(t.meaning(Path::new("/run/vc"), Change::Gone), Meaning::Rearm);
        assert!(!t.is_sandboxes(Path::new("/run/vc")));
    }

    #[test]
    fn kata_runtime_rs_sandboxes_are_direct_subfolders() {
        let t = Target::new("/run/kata".into());
        assert_eq!(t.meaning(Path::new("/run/kata"), entered("sb1", true)), Meaning::Sandbox("/run/kata/sb1".into()));
        assert_eq!(t.meaning(Path::new("/run"), entered("kata", true)), Meaning::Rearm);
    }
}
