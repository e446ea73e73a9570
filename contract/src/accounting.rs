//! Who KSM saves memory for, as plain data: what one process's `/proc/<pid>/ksm_stat` and
//! `smaps` say and the rows of `Sandboxes()` (the JSON the bus answers with and `ksmtctl`
//! reads). The daemon's walk fills them in; clients parse them with [`parse_report`].

use serde::{Deserialize, Serialize};

/// Bytes KSM saves: its merged pages (`pages_sharing`) and the empty pages it merged with the
/// zero page (`ksm_zero_pages`), times the page size.
pub fn saved_bytes(pages_sharing: u64, ksm_zero_pages: u64, page_size: u64) -> u64 {
    pages_sharing.saturating_add(ksm_zero_pages).saturating_mul(page_size)
}

/// The answer of `Sandboxes()`, from its JSON.
pub fn parse_report(json: &str) -> Result<Report, String> {
    serde_json::from_str(json).map_err(|e| format!("the throttler's Sandboxes answer does not parse: {e}"))
}

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

/// A Kata runtime's VMM process, as its command line names it (the daemon's `core::sandbox` matches it).
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
