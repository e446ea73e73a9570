//! Who KSM saves memory for, as plain data: what one process's `/proc/<pid>/ksm_stat` and
//! `smaps` say, the rows of `Sandboxes()` (the JSON the bus answers with and `ksmtctl` reads),
//! and the sums per Kata sandbox. No files are read here (`crate::io::procwalk` does that).

use serde::{Deserialize, Serialize};

/// `/proc/<pid>/ksm_stat` (Linux 6.1+), or `/proc/<pid>/ksm_merging_pages` alone on older kernels,
/// where every other field is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmStat {
    pub rmap_items: Option<u64>,
    pub zero_pages: Option<u64>,
    pub merging_pages: u64,
    /// Bytes, net of the rmap items' metadata: may be negative.
    pub process_profit: Option<i64>,
    /// `prctl(PR_SET_MEMORY_MERGE)`: the whole process is mergeable (6.4+).
    pub merge_any: Option<bool>,
    /// Some of its memory is mergeable (MADV_MERGEABLE or merge_any) (6.8+).
    pub mergeable: Option<bool>,
}

impl KsmStat {
    /// Parses `ksm_stat`: `name value` lines; `yes`/`no` for the flags. Unknown lines are ignored
    /// (later kernels add some); `None` when `ksm_merging_pages`, present in every version, is not.
    pub fn parse(text: &str) -> Option<KsmStat> {
        let mut stat = KsmStat::default();
        let mut merging = None;
        for line in text.lines() {
            // `ksm_rmap_items 12` and `ksm_merge_any: no` (a single-byte search: this runs for
            // every process on the host).
            let Some((key, value)) = line.split_once(' ') else { continue };
            let (key, value) = (key.strip_suffix(':').unwrap_or(key), value.trim());
            let flag = || match value {
                "yes" => Some(true),
                "no" => Some(false),
                _ => None,
            };
            match key {
                "ksm_rmap_items" => stat.rmap_items = value.parse().ok(),
                "ksm_zero_pages" => stat.zero_pages = value.parse().ok(),
                "ksm_merging_pages" => merging = value.parse().ok(),
                "ksm_process_profit" => stat.process_profit = value.parse().ok(),
                "ksm_merge_any" => stat.merge_any = flag(),
                "ksm_mergeable" => stat.mergeable = flag(),
                _ => {}
            }
        }
        stat.merging_pages = merging?;
        Some(stat)
    }

    /// From `/proc/<pid>/ksm_merging_pages` (Linux 5.19 to 6.0: the only per-process figure).
    pub fn from_merging_pages(text: &str) -> Option<KsmStat> {
        Some(KsmStat { merging_pages: text.trim().parse().ok()?, ..KsmStat::default() })
    }

    /// Pages KSM saves in this process: its merged pages and its pages merged with the zero page.
    pub fn saved_pages(&self) -> u64 {
        self.merging_pages.saturating_add(self.zero_pages.unwrap_or(0))
    }
}

/// One mapping of `smaps`, as far as KSM cares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub start: u64,
    pub size_bytes: u64,
    /// `mg` in VmFlags: MADV_MERGEABLE (or merge_any).
    pub mergeable: bool,
    /// `s` in the permissions or `sh` in VmFlags: KSM never merges a shared mapping.
    pub shared: bool,
    /// `ht` in VmFlags: hugetlbfs pages, which KSM cannot merge.
    pub hugetlb: bool,
    /// `hg` in VmFlags: MADV_HUGEPAGE; transparent huge pages are split before merging.
    pub thp_advised: bool,
    /// The mapped file (`/dev/shm/…`, `/memfd:… (deleted)`), empty for anonymous memory.
    pub path: String,
    /// Its `KSM:` line: how much of this mapping KSM merged.
    #[serde(default)]
    pub ksm_bytes: u64,
}

/// What `smaps` says about a process's memory and KSM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maps {
    /// The size of every mapping with `mg`.
    pub mergeable_bytes: u64,
    /// The sum of the `KSM:` lines: its pages that KSM merged.
    pub ksm_bytes: u64,
    /// The largest writable, not executable mapping: a VMM's guest RAM.
    pub largest: Option<Region>,
}

/// A Kata runtime's VMM process, as its command line names it (see `crate::core::sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    Qemu,
    CloudHypervisor,
    Firecracker,
    /// The runtime-rs shim (`containerd-shim-kata-v2 -id <id>`): with Dragonball, the VMM runs in
    /// it and it holds the guest RAM; with the other VMMs it holds none.
    Shim,
    /// Another process naming the sandbox's folder.
    Other,
}

impl Vmm {
    pub fn as_str(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::CloudHypervisor => "cloud-hypervisor",
            Vmm::Firecracker => "firecracker",
            Vmm::Shim => "shim",
            Vmm::Other => "other",
        }
    }
}

/// A process with mergeable memory, or a sandbox's VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// `comm`.
    pub name: String,
    pub sandbox: Option<String>,
    pub vmm: Option<Vmm>,
    pub ksm: KsmStat,
    /// `None` when smaps was not read (nothing mergeable) or could not be.
    pub maps: Option<Maps>,
    /// Bytes saved: (merging + zero pages) x page size.
    pub saved_bytes: u64,
    /// What could not be read of it, when something could not (its figures are then partial).
    #[serde(default)]
    pub note: Option<String>,
}

/// A process that could not be read (not one that exited mid-walk: those are left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub pid: u32,
    pub name: String,
    /// The file and the error, e.g. `ksm_stat: Permission denied (os error 13)`.
    pub reason: String,
}

/// One Kata sandbox: its folder and the sum of its processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRow {
    pub id: String,
    /// The folder it was found by (`/run/vc/sbs/<id>`, `/run/kata/<id>`).
    pub folder: String,
    /// The VMM's pid and kind; `None` when no process matches the sandbox.
    pub vmm_pid: Option<u32>,
    pub vmm: Option<Vmm>,
    pub pids: Vec<u32>,
    pub mergeable_bytes: u64,
    pub merging_pages: u64,
    pub zero_pages: u64,
    pub profit_bytes: i64,
    pub saved_bytes: u64,
    /// The VMM's largest writable mapping (its guest RAM), when smaps could be read.
    pub guest_ram: Option<Region>,
}

/// The host's own figures from `/sys/kernel/mm/ksm`, beside the per-process ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub pages_sharing: u64,
    pub ksm_zero_pages: u64,
    pub saved_bytes: u64,
    /// `None` before Linux 6.7.
    pub general_profit: Option<i64>,
    /// The sum of the listed processes' ksm_process_profit.
    pub process_profit_sum: i64,
    pub caveat: String,
}

/// The kernel's caveat (Documentation/admin-guide/mm/ksm.rst), shown beside the totals.
pub const PROFIT_CAVEAT: &str = "per-process profits may add up to about 20 % more than general_profit: \
     the kernel counts a KSM page's own rmap item in every process that shares it";

/// What the kernel offers per process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSupport {
    /// `/proc/<pid>/ksm_stat` exists (6.1+); otherwise only `ksm_merging_pages` is read.
    pub ksm_stat: bool,
    /// `ksm_mergeable` is in ksm_stat (6.8+); without it every readable process's smaps is read.
    pub mergeable_flag: bool,
}

/// Sandbox folders that could not be used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folders {
    /// Entries whose name is not a valid sandbox id (the first few), and how many in all.
    pub invalid: Vec<String>,
    pub invalid_count: u64,
    /// Folders beyond the bound, not listed.
    pub over_limit: u64,
    /// Roots that could not be read (other than missing), with the error.
    pub unreadable: Vec<String>,
}

/// The answer of `Sandboxes()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub page_size: u64,
    /// Sorted by saved bytes, most first.
    pub sandboxes: Vec<SandboxRow>,
    /// Sorted by saved bytes, most first.
    pub processes: Vec<Process>,
    pub skipped: Vec<Skipped>,
    /// Unreadable processes beyond those listed in `skipped`.
    pub skipped_more: u64,
    /// Process folders seen in the walk.
    pub walked: u64,
    pub kernel: KernelSupport,
    pub folders: Folders,
    pub host: Host,
    /// How long the walk took, in milliseconds.
    pub walk_ms: u64,
}

/// The sandbox rows from the processes: each sandbox's processes summed, its VMM the matched
/// process other than the shim (the shim itself when it is the only one: Dragonball).
pub fn sandbox_rows(folders: &[(String, String)], processes: &[Process]) -> Vec<SandboxRow> {
    let mut by_id: std::collections::HashMap<&str, Vec<&Process>> = std::collections::HashMap::new();
    for p in processes {
        if let Some(id) = &p.sandbox {
            by_id.entry(id.as_str()).or_default().push(p);
        }
    }
    let mut rows: Vec<SandboxRow> = folders
        .iter()
        .map(|(id, folder)| {
            let procs = by_id.get(id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            let vmm = procs
                .iter()
                .filter(|p| p.vmm != Some(Vmm::Shim))
                .max_by_key(|p| p.maps.as_ref().and_then(|m| m.largest.as_ref()).map_or(0, |r| r.size_bytes))
                .or_else(|| procs.first());
            SandboxRow {
                id: id.clone(),
                folder: folder.clone(),
                vmm_pid: vmm.map(|p| p.pid),
                vmm: vmm.and_then(|p| p.vmm),
                pids: procs.iter().map(|p| p.pid).collect(),
                mergeable_bytes: procs.iter().filter_map(|p| p.maps.as_ref()).map(|m| m.mergeable_bytes).sum(),
                merging_pages: procs.iter().map(|p| p.ksm.merging_pages).sum(),
                zero_pages: procs.iter().filter_map(|p| p.ksm.zero_pages).sum(),
                profit_bytes: procs.iter().filter_map(|p| p.ksm.process_profit).sum(),
                saved_bytes: procs.iter().map(|p| p.saved_bytes).sum(),
                guest_ram: vmm.and_then(|p| p.maps.as_ref()).and_then(|m| m.largest.clone()),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.saved_bytes.cmp(&a.saved_bytes).then_with(|| a.id.cmp(&b.id)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_6_18: &str = "ksm_rmap_items 120\nksm_zero_pages 3\nksm_merging_pages 100\n\
        ksm_process_profit 402560\nksm_merge_any: no\nksm_mergeable: yes\n";

    #[test]
    fn ksm_stat_of_a_recent_kernel() {
        let s = KsmStat::parse(STAT_6_18).expect("parses");
        assert_eq!(s.rmap_items, Some(120));
        assert_eq!(s.zero_pages, Some(3));
        assert_eq!(s.merging_pages, 100);
        assert_eq!(s.process_profit, Some(402_560));
        assert_eq!((s.merge_any, s.mergeable), (Some(false), Some(true)));
        assert_eq!(s.saved_pages(), 103);
    }

    #[test]
    fn ksm_stat_of_6_1_and_negative_profit_and_the_old_file() {
        let s = KsmStat::parse("ksm_rmap_items 9\nksm_process_profit -72\nksm_merging_pages 0\n").expect("6.1");
        assert_eq!((s.process_profit, s.mergeable, s.zero_pages), (Some(-72), None, None));
        assert_eq!(KsmStat::parse("ksm_rmap_items 9\n"), None, "no merging pages: not a ksm_stat");
        assert_eq!(KsmStat::parse(""), None);
        let old = KsmStat::from_merging_pages("42\n").expect("5.19");
        assert_eq!((old.merging_pages, old.rmap_items), (42, None));
        assert_eq!(KsmStat::from_merging_pages("x"), None);
    }

    fn proc(pid: u32, sandbox: Option<&str>, vmm: Option<Vmm>, merging: u64, ram: u64) -> Process {
        Process {
            pid,
            name: "p".into(),
            sandbox: sandbox.map(Into::into),
            vmm,
            ksm: KsmStat {
                merging_pages: merging,
                zero_pages: Some(1),
                process_profit: Some(10),
                ..KsmStat::default()
            },
            maps: Some(Maps {
                mergeable_bytes: ram,
                ksm_bytes: 0,
                largest: Some(Region { size_bytes: ram, ..Region::default() }),
            }),
            saved_bytes: (merging + 1) * 4096,
            note: None,
        }
    }

    #[test]
    fn sandboxes_sum_their_processes_and_sort_by_savings() {
        let folders = vec![
            ("a".to_owned(), "/run/vc/sbs/a".to_owned()),
            ("b".to_owned(), "/run/kata/b".to_owned()),
            ("idle".to_owned(), "/run/kata/idle".to_owned()),
        ];
        let procs = vec![
            proc(10, Some("a"), Some(Vmm::Qemu), 5, 1 << 30),
            proc(11, Some("a"), Some(Vmm::Other), 2, 1 << 20),
            proc(20, Some("b"), Some(Vmm::Shim), 50, 2 << 30),
            proc(30, None, None, 1000, 1),
        ];
        let rows = sandbox_rows(&folders, &procs);
        let ids: Vec<_> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["b", "a", "idle"]);
        let a = &rows[1];
        assert_eq!((a.vmm_pid, a.vmm, a.pids.clone()), (Some(10), Some(Vmm::Qemu), vec![10, 11]));
        assert_eq!((a.merging_pages, a.zero_pages, a.profit_bytes), (7, 2, 20));
        assert_eq!(a.saved_bytes, 9 * 4096);
        assert_eq!(a.guest_ram.as_ref().map(|r| r.size_bytes), Some(1 << 30));
        // Dragonball: the shim is the only process, so it is the VMM.
        assert_eq!((rows[0].vmm_pid, rows[0].vmm), (Some(20), Some(Vmm::Shim)));
        assert_eq!((rows[2].vmm_pid, rows[2].saved_bytes, rows[2].pids.len()), (None, 0, 0));
    }
}
