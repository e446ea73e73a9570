//! The walk of `/proc` (or a fake one in tests) behind `Sandboxes()` and `Doctor()`: each
//! process's `ksm_stat` (or `ksm_merging_pages` on kernels before 6.1), its command line for the
//! Kata sandbox it runs, and, where it has mergeable memory or runs a sandbox, its `smaps`. The
//! sandbox ids come from the folders the trigger watches. Every read is bounded; a process that
//! exits mid-walk is left out, one that cannot be read becomes a [`Skipped`] row.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::core::accounting::{
    sandbox_rows, Folders, KernelSupport, KsmStat, Maps, Process, Region, Report, Skipped, Vmm,
};
use crate::core::sandbox::{match_process, valid_id, vmm_kind};

/// Sandbox folders looked at, in all; beyond it they are counted, not listed.
pub const FOLDERS_MAX: usize = 65_536;
/// Unreadable processes listed one by one; the rest are counted.
pub const SKIPPED_MAX: usize = 100;
/// Of a command line (the kernel shows at most a page of it anyway for a process that changed it).
const CMDLINE_LIMIT: u64 = 64 * 1024;
/// Of smaps: about 1 KiB a mapping, so some 16,000 mappings; beyond it the rest is not read.
const SMAPS_LIMIT: u64 = 16 << 20;
const INVALID_SHOWN: usize = 10;

/// The folders the trigger watches (the `[trigger]` keys of the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roots {
    /// The Go runtime's root: sandboxes in `DIR/sbs/<id>`.
    pub vc_root: Option<PathBuf>,
    /// runtime-rs's root: sandboxes in `DIR/<id>`.
    pub kata_root: Option<PathBuf>,
}

/// Sandbox ids and their folders, first seen first (an id in both roots is listed once).
pub fn list_sandboxes(roots: &Roots) -> (Vec<(String, String)>, Folders) {
    let mut folders = Folders::default();
    let mut found = vec![];
    let mut seen = HashSet::new();
    let dirs = [roots.vc_root.as_ref().map(|r| r.join("sbs")), roots.kata_root.clone()];
    for dir in dirs.into_iter().flatten() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                folders.unreadable.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| valid_id(n)) else {
                folders.invalid_count += 1;
                if folders.invalid.len() < INVALID_SHOWN {
                    folders.invalid.push(entry.file_name().to_string_lossy().chars().take(80).collect());
                }
                continue;
            };
            if found.len() >= FOLDERS_MAX {
                folders.over_limit += 1;
                continue;
            }
            if seen.insert(name.to_owned()) {
                found.push((name.to_owned(), entry.path().display().to_string()));
            }
        }
    }
    (found, folders)
}

/// NUMA nodes of this host (`/sys/devices/system/node/node<N>`); 1 where that cannot be read.
pub fn numa_nodes() -> u32 {
    let Ok(entries) = std::fs::read_dir("/sys/devices/system/node") else { return 1 };
    let n = entries
        .flatten()
        .filter(|e| {
            e.file_name().to_str().and_then(|n| n.strip_prefix("node")).is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

/// Opens a proc file without blocking on a FIFO (a fake /proc in a test may hold one).
fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

/// At most `limit` bytes of `path`.
fn read_prefix(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = vec![];
    match open(path)?.take(limit).read_to_end(&mut out) {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(out),
    }
}

/// A small proc file in one read(2) into `buf`: a single-value procfs file (and a regular file
/// shorter than `buf`) gives its whole text in the first read, so a short read is the end. Three
/// system calls instead of read_to_end's five (a probe read and a read of 0): the walk makes two
/// such reads for every process on the host.
fn read_small<'b>(path: &Path, buf: &'b mut [u8]) -> io::Result<std::borrow::Cow<'b, str>> {
    let mut file = open(path)?;
    let n = match file.read(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        other => other?,
    };
    Ok(String::from_utf8_lossy(&buf[..n]))
}

/// The process is gone (or its folder never held it): not worth a row.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// `smaps`, summed as [`Maps`]; at most `SMAPS_LIMIT` bytes are read.
pub fn parse_smaps(reader: impl BufRead) -> io::Result<Maps> {
    let mut maps = Maps::default();
    let mut current: Option<(Region, bool)> = None;
    let mut line = String::new();
    let mut reader = reader;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        // Field lines start with a capital (`Size:`, `KSM:`, `VmFlags:`), headers with a hex
        // digit; only three kinds of line matter, so the rest are passed over at once (a VMM's
        // smaps has thousands of lines).
        let first = line.as_bytes().first().copied().unwrap_or(b' ');
        if first.is_ascii_uppercase() && !line.starts_with("KSM:") && !line.starts_with("VmFlags:") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            let Some((mut region, writable)) = current.take() else { continue };
            for flag in rest.split_whitespace() {
                match flag {
                    "mg" => region.mergeable = true,
                    "sh" => region.shared = true,
                    "ht" => region.hugetlb = true,
                    "hg" => region.thp_advised = true,
                    _ => {}
                }
            }
            if region.mergeable {
                maps.mergeable_bytes = maps.mergeable_bytes.saturating_add(region.size_bytes);
            }
            let larger = maps.largest.as_ref().is_none_or(|l| region.size_bytes > l.size_bytes);
            if writable && larger {
                maps.largest = Some(region);
            }
        } else if let Some(rest) = line.strip_prefix("KSM:") {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            let bytes = kb.saturating_mul(1024);
            maps.ksm_bytes = maps.ksm_bytes.saturating_add(bytes);
            if let Some((region, _)) = current.as_mut() {
                region.ksm_bytes = bytes;
            }
        } else if let Some(header) = mapping_header(&line) {
            current = Some(header);
        }
    }
    Ok(maps)
}

/// `start-end perms offset dev inode [path]`: the region and whether it can be guest RAM.
fn mapping_header(line: &str) -> Option<(Region, bool)> {
    // Single spaces between the first five fields; the path, after padding, is the rest of the
    // line (it may hold spaces).
    let mut fields = line.trim_end_matches('\n').splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?.as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    // Guest RAM is writable and never executable on the host: under TCG, QEMU's translation
    // buffer (1 GiB, rwx) is larger than a small guest's RAM.
    let candidate = perms[1] == b'w' && perms[2] != b'x';
    // Only a candidate's path is ever shown: the others are not copied.
    let path = match fields.next() {
        Some(rest) if candidate => rest.trim().chars().take(200).collect(),
        _ => String::new(),
    };
    let region =
        Region { start, size_bytes: end.saturating_sub(start), shared: perms[3] == b's', path, ..Region::default() };
    Some((region, candidate))
}

fn read_smaps(path: &Path) -> io::Result<Maps> {
    parse_smaps(BufReader::new(open(path)?.take(SMAPS_LIMIT)))
}

/// What one process folder gave.
enum Seen {
    Listed(Box<Process>),
    /// Nothing mergeable, not a sandbox's: not listed.
    Quiet,
    Vanished,
    Unreadable(Skipped),
}

/// Walks `proc_root` for the processes with mergeable memory and the VMMs of the sandboxes in
/// `roots`. `page_size` turns pages into bytes. The host totals are the caller's.
pub fn walk(proc_root: &Path, roots: &Roots, page_size: u64) -> Report {
    let start = Instant::now();
    let (folders, folder_report) = list_sandboxes(roots);
    let ids: HashSet<String> = folders.iter().map(|(id, _)| id.clone()).collect();
    let mut report = Report { page_size, folders: folder_report, ..Report::default() };
    let entries = match std::fs::read_dir(proc_root) {
        Ok(e) => e,
        Err(e) => {
            report.skipped.push(Skipped {
                pid: 0,
                name: String::new(),
                reason: format!("{}: {e}", proc_root.display()),
            });
            return report;
        }
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        report.walked += 1;
        match one(&entry.path(), pid, &ids, page_size, &mut report.kernel) {
            Seen::Listed(p) => report.processes.push(*p),
            Seen::Quiet | Seen::Vanished => {}
            Seen::Unreadable(s) if report.skipped.len() < SKIPPED_MAX => report.skipped.push(s),
            Seen::Unreadable(_) => report.skipped_more += 1,
        }
    }
    report.processes.sort_by(|a, b| b.saved_bytes.cmp(&a.saved_bytes).then(a.pid.cmp(&b.pid)));
    report.sandboxes = sandbox_rows(&folders, &report.processes);
    report.walk_ms = start.elapsed().as_millis() as u64;
    report
}

fn one(dir: &Path, pid: u32, ids: &HashSet<String>, page_size: u64, kernel: &mut KernelSupport) -> Seen {
    let mut buf = [0u8; 4096];
    let name = match read_small(&dir.join("comm"), &mut buf[..256]) {
        Ok(n) => n.trim_end().to_owned(),
        Err(e) if vanished(&e) => return Seen::Vanished,
        Err(e) => return Seen::Unreadable(Skipped { pid, name: String::new(), reason: format!("comm: {e}") }),
    };
    let skipped = |what: &str, e: io::Error| {
        Seen::Unreadable(Skipped { pid, name: name.clone(), reason: format!("{what}: {e}") })
    };
    // ksm_stat is mode 0400, owned by the process's user: another user's needs
    // CAP_DAC_READ_SEARCH, which the unit does not grant (see systemd/kata-ksm-throttler.service);
    // smaps (ptrace-read, CAP_SYS_PTRACE) still gives its merged pages.
    let mut denied = None;
    let stat = match read_small(&dir.join("ksm_stat"), &mut buf) {
        Ok(text) => {
            kernel.ksm_stat = true;
            kernel.mergeable_flag |= text.contains("ksm_mergeable");
            // A kernel thread has no mm: its ksm_stat is empty.
            KsmStat::parse(&text)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.join("comm").exists() => {
            match read_small(&dir.join("ksm_merging_pages"), &mut buf[..64]) {
                Ok(text) => KsmStat::from_merging_pages(&text),
                Err(e) if e.kind() == io::ErrorKind::NotFound && dir.join("comm").exists() => None,
                Err(e) if vanished(&e) => return Seen::Vanished,
                Err(e) => return skipped("ksm_merging_pages", e),
            }
        }
        Err(e) if vanished(&e) => return Seen::Vanished,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            denied = Some(e);
            None
        }
        Err(e) => return skipped("ksm_stat", e),
    };
    // Most processes have nothing mergeable and are no VMM by their name: their command line is
    // not read (a third of the reads on a host of 10,000 such processes).
    let maybe_mergeable = |s: &KsmStat| s.mergeable.unwrap_or(true) || s.merge_any == Some(true) || s.saved_pages() > 0;
    let interesting = denied.is_some() || stat.as_ref().is_none_or(maybe_mergeable) || vmm_kind(&name) != Vmm::Other;
    if !interesting || (stat.is_none() && denied.is_none() && vmm_kind(&name) == Vmm::Other && ids.is_empty()) {
        return Seen::Quiet;
    }
    let cmdline = match read_prefix(&dir.join("cmdline"), CMDLINE_LIMIT) {
        Ok(c) => c,
        Err(e) if vanished(&e) => return Seen::Vanished,
        Err(e) => return skipped("cmdline", e),
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let argv: Vec<&str> = cmdline.split('\0').filter(|a| !a.is_empty()).collect();
    let matched = match_process(&argv, &name, ids);
    let Some(mut ksm) = stat.or_else(|| (matched.is_some() || denied.is_some()).then(KsmStat::default)) else {
        return Seen::Quiet;
    };
    // Without ksm_mergeable (before 6.8) only smaps can tell whether anything is mergeable.
    if matched.is_none() && !maybe_mergeable(&ksm) && denied.is_none() {
        return Seen::Quiet;
    }
    let mut note = None;
    let maps = match read_smaps(&dir.join("smaps")) {
        Ok(m) => Some(m),
        Err(e) if vanished(&e) => return Seen::Vanished,
        Err(e) if matched.is_none() => {
            return match denied {
                Some(d) => skipped("ksm_stat", d),
                None => skipped("smaps", e),
            }
        }
        // A sandbox's VMM is listed even so: the doctor says its memory map could not be read.
        Err(e) => {
            note = Some(format!("smaps: {e}"));
            None
        }
    };
    if let Some(e) = denied {
        match &maps {
            Some(m) => {
                ksm.merging_pages = m.ksm_bytes / page_size.max(1);
                note =
                    Some(format!("ksm_stat: {e}: merged pages from smaps' KSM: lines; zero pages and profit unknown"));
            }
            None => note = Some(format!("ksm_stat: {e}; {}", note.unwrap_or_default())),
        }
    }
    let mergeable =
        maps.as_ref().is_some_and(|m| m.mergeable_bytes > 0) || ksm.merge_any == Some(true) || ksm.saved_pages() > 0;
    if matched.is_none() && !mergeable {
        return Seen::Quiet;
    }
    let saved_bytes = ksm.saved_pages().saturating_mul(page_size);
    let (sandbox, vmm): (Option<String>, Option<Vmm>) = match matched {
        Some((id, vmm)) => (Some(id.to_owned()), Some(vmm)),
        None => (None, None),
    };
    Seen::Listed(Box::new(Process { pid, name, sandbox, vmm, ksm, maps, saved_bytes, note }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 123   /usr/bin/qemu-system-x86_64
Size:                  4 kB
KSM:                   0 kB
VmFlags: rd mr mw me
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
KSM:               40960 kB
VmFlags: rd wr mr mw me ac mg
7f1000000000-7f1008000000 rw-s 00000000 00:01 77    /memfd:mem (deleted)
Size:             131072 kB
KSM:                   0 kB
VmFlags: rd wr sh mr mw me ms
7f2000000000-7f2000200000 rw-p 00000000 00:00 0
Size:               2048 kB
VmFlags: rd wr mr mw me ac hg mg
7f3000000000-7f3080000000 rwxp 00000000 00:00 0
Size:            2097152 kB
VmFlags: rd wr ex mr mw me ac hg
";

    #[test]
    fn smaps_sums_mergeable_and_merged_memory_and_finds_the_guest_ram() {
        let maps = parse_smaps(SMAPS.as_bytes()).expect("parses");
        assert_eq!(maps.mergeable_bytes, (1 << 30) + (2 << 20));
        assert_eq!(maps.ksm_bytes, 40960 * 1024);
        let ram = maps.largest.expect("a writable mapping");
        assert_eq!((ram.start, ram.size_bytes, ram.mergeable, ram.shared), (0x7f00_0000_0000, 1 << 30, true, false));
        assert_eq!(ram.ksm_bytes, 40960 * 1024, "its own KSM: line");
    }

    #[test]
    fn a_shared_memfd_is_the_guest_ram_when_it_is_the_largest() {
        let text = SMAPS.replace("7f0000000000-7f0040000000", "7f0000000000-7f0000100000");
        let ram = parse_smaps(text.as_bytes()).expect("parses").largest.expect("largest");
        assert_eq!((ram.shared, ram.mergeable, ram.path.as_str()), (true, false, "/memfd:mem (deleted)"));
        assert_eq!(ram.size_bytes, 128 << 20);
        assert_eq!(parse_smaps("garbage\n\nVmFlags: mg\n".as_bytes()).expect("parses"), Maps::default());
    }

    /// A fake /proc: one folder per pid with the files the walk reads.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> FakeProc {
            FakeProc { dir: tempfile::tempdir().expect("tempdir") }
        }

        fn add(&self, pid: u32, comm: &str, argv: &[&str], ksm_stat: Option<&str>, smaps: &str) -> PathBuf {
            let d = self.dir.path().join(pid.to_string());
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("comm"), format!("{comm}\n")).expect("comm");
            let mut cmd = argv.join("\0");
            cmd.push('\0');
            std::fs::write(d.join("cmdline"), cmd).expect("cmdline");
            if let Some(s) = ksm_stat {
                std::fs::write(d.join("ksm_stat"), s).expect("ksm_stat");
            }
            std::fs::write(d.join("smaps"), smaps).expect("smaps");
            d
        }
    }

    const ID: &str = "3f2c9a0b1d4e";

    fn stat(merging: u64) -> String {
        format!(
            "ksm_rmap_items 10\nksm_zero_pages 2\nksm_merging_pages {merging}\nksm_process_profit 100\n\
             ksm_merge_any: no\nksm_mergeable: yes\n"
        )
    }

    #[test]
    fn the_walk_lists_mergeable_processes_and_the_sandbox_vmm_and_skips_the_rest() {
        let proc = FakeProc::new();
        let roots_dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(roots_dir.path().join("vc/sbs").join(ID)).expect("sandbox folder");
        std::fs::create_dir_all(roots_dir.path().join("vc/sbs/not a valid id")).expect("bad folder");
        std::fs::create_dir_all(roots_dir.path().join("kata/lonely")).expect("runtime-rs folder");
        let roots =
            Roots { vc_root: Some(roots_dir.path().join("vc")), kata_root: Some(roots_dir.path().join("kata")) };

        let name = format!("sandbox-{ID}");
        proc.add(100, "qemu-system-x86", &["/usr/bin/qemu-system-x86_64", "-name", &name], Some(&stat(500)), SMAPS);
        let quiet = "ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\nksm_merge_any: no\nksm_mergeable: no\n";
        proc.add(200, "bash", &["bash"], Some(quiet), SMAPS);
        proc.add(300, "ksm-workload", &["ksm-workload"], Some(&stat(7)), SMAPS);
        proc.add(2, "kthreadd", &[], Some(""), "");
        // Unreadable: its ksm_stat is a folder (EISDIR), as an EACCES would be reported.
        let bad = proc.add(400, "secret", &["secret"], None, "");
        std::fs::create_dir(bad.join("ksm_stat")).expect("mkdir");
        // Old kernel: ksm_merging_pages only.
        let old = proc.add(500, "old", &["old"], None, SMAPS);
        std::fs::write(old.join("ksm_merging_pages"), "3\n").expect("write");
        std::fs::create_dir(proc.dir.path().join("self")).expect("not a pid");

        let r = walk(proc.dir.path(), &roots, 4096);
        assert_eq!(r.walked, 6);
        let pids: Vec<u32> = r.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [100, 300, 500], "sorted by savings; bash and the kernel thread are not listed");
        let qemu = &r.processes[0];
        assert_eq!((qemu.sandbox.as_deref(), qemu.vmm), (Some(ID), Some(Vmm::Qemu)));
        assert_eq!(qemu.saved_bytes, 502 * 4096);
        assert_eq!(qemu.ksm.process_profit, Some(100));
        assert_eq!(r.processes[2].ksm.merging_pages, 3);
        assert_eq!(r.processes[2].ksm.zero_pages, None);
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].pid, 400);
        assert!(r.skipped[0].reason.starts_with("ksm_stat: "), "{}", r.skipped[0].reason);
        assert!(r.kernel.ksm_stat && r.kernel.mergeable_flag);

        let ids: Vec<&str> = r.sandboxes.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [ID, "lonely"]);
        assert_eq!(r.sandboxes[0].vmm_pid, Some(100));
        assert_eq!(r.sandboxes[0].guest_ram.as_ref().map(|g| g.size_bytes), Some(1 << 30));
        assert_eq!(r.sandboxes[1].vmm_pid, None);
        assert_eq!((r.folders.invalid_count, r.folders.invalid.clone()), (1, vec!["not a valid id".to_owned()]));
    }

    #[test]
    fn a_vanished_process_is_left_out_and_a_missing_proc_is_one_skipped_row() {
        let proc = FakeProc::new();
        // A folder with nothing in it: the process exited between readdir and the reads.
        std::fs::create_dir(proc.dir.path().join("77")).expect("mkdir");
        let r = walk(proc.dir.path(), &Roots::default(), 4096);
        assert_eq!((r.walked, r.processes.len(), r.skipped.len()), (1, 0, 0));
        let r = walk(Path::new("/nonexistent/proc"), &Roots::default(), 4096);
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].reason.contains("/nonexistent/proc"), "{:?}", r.skipped);
    }

    #[test]
    fn ten_thousand_sandbox_folders_are_listed() {
        // On tmpfs, like /run: 10,000 mkdirs on this disk take seconds.
        let parent = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        for i in 0..10_000 {
            std::fs::create_dir_all(dir.path().join(format!("sb{i:05}"))).expect("mkdir");
        }
        let (found, folders) = list_sandboxes(&Roots { vc_root: None, kata_root: Some(dir.path().into()) });
        assert_eq!(found.len(), 10_000);
        assert_eq!((folders.invalid_count, folders.over_limit), (0, 0));
    }

    #[test]
    fn the_real_proc_lists_this_process_when_it_has_mergeable_memory() {
        let r = walk(Path::new("/proc"), &Roots::default(), 4096);
        assert!(r.walked > 1, "{r:?}");
        assert!(r.processes.iter().all(|p| p.pid > 0));
    }
}
