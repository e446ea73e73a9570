//! The doctor's rules: from the KSM knobs, the throttler's mode and a [`Report`] of the
//! processes, findings with a severity, what was seen and what to do. Pure: the caller reads
//! the files.

use crate::core::accounting::{Report, SandboxRow, Vmm};

pub use ksm_throttler_contract::doctor::{DoctorAnswer, Finding, Severity};

/// The KSM knobs the rules look at; `None` where this kernel does not have one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KsmKnobs {
    pub run: u64,
    /// The selected advisor (`none`, `scan-time`).
    pub advisor_mode: Option<String>,
    pub smart_scan: Option<u64>,
    pub use_zero_pages: Option<u64>,
    pub max_page_sharing: Option<u64>,
    pub merge_across_nodes: Option<u64>,
}

/// Everything the rules are given.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `None`: no /sys/kernel/mm/ksm.
    pub ksm: Option<KsmKnobs>,
    /// The throttler's mode and setting (`throttle`, `initial`, …).
    pub mode: String,
    pub setting: String,
    pub numa_nodes: u32,
    pub report: Report,
}

/// The default of max_page_sharing in every kernel since 4.13.
const MAX_PAGE_SHARING_DEFAULT: u64 = 256;
/// Below this the largest mapping of a VMM is not taken for its guest RAM.
const GUEST_RAM_MIN: u64 = 32 << 20;

fn finding(severity: Severity, code: &str, sandbox: Option<&str>, message: String, fix: &str) -> Finding {
    Finding { severity, code: code.into(), sandbox: sandbox.map(Into::into), message, fix: fix.into() }
}

/// The findings, errors first.
pub fn diagnose(facts: &Facts) -> Vec<Finding> {
    use Severity::*;
    let mut out = vec![];
    let Some(ksm) = &facts.ksm else {
        out.push(finding(
            Error,
            "ksm-missing",
            None,
            "this kernel has no KSM (/sys/kernel/mm/ksm is missing)".into(),
            "use a kernel built with CONFIG_KSM=y (every distribution kernel is)",
        ));
        return out;
    };
    let report = &facts.report;
    let anything_mergeable = report.processes.iter().any(|p| {
        p.ksm.mergeable == Some(true)
            || p.ksm.merge_any == Some(true)
            || p.maps.as_ref().is_some_and(|m| m.mergeable_bytes > 0)
    });

    match (ksm.run, facts.mode.as_str()) {
        (_, "off") => out.push(finding(
            Warning,
            "mode-off",
            None,
            "the throttler is in mode off: ksmd is kept stopped and merges nothing".into(),
            "ksmtctl set-mode throttle",
        )),
        (0, "initial") => out.push(finding(
            Warning,
            "run-0-never",
            None,
            "run=0 and the throttler is in mode initial, which ignores kicks: KSM never runs".into(),
            "ksmtctl set-mode throttle (KSM then scans while VMs start)",
        )),
        (0, _) if facts.setting == "initial" => out.push(finding(
            Info,
            "run-0-idle",
            None,
            "run=0: ksmd runs only during a throttler cycle, after a Kick (a sandbox starting)".into(),
            "",
        )),
        _ => {}
    }
    if ksm.run == 1 && !anything_mergeable {
        out.push(finding(
            Warning,
            "ksm-running-nothing-mergeable",
            None,
            "ksmd is running (run=1) but no process has mergeable memory: it spends CPU for nothing".into(),
            "make the VMs' memory mergeable (see the sandbox findings), or ksmtctl set-mode off",
        ));
    }
    if let Some(mode) = ksm.advisor_mode.as_deref().filter(|m| *m != "none") {
        out.push(finding(
            Info,
            "advisor-on",
            None,
            format!("advisor_mode={mode}: the kernel's advisor sets pages_to_scan itself, over the throttler's"),
            "echo none > /sys/kernel/mm/ksm/advisor_mode, to let the throttler decide",
        ));
    }
    if ksm.smart_scan == Some(1) {
        out.push(finding(
            Info,
            "smart-scan",
            None,
            "smart_scan=1: pages that did not merge are scanned less often (cheaper, merges later)".into(),
            "",
        ));
    }
    if ksm.use_zero_pages == Some(0) {
        out.push(finding(
            Info,
            "use-zero-pages-off",
            None,
            "use_zero_pages=0: a guest's empty pages merge into ordinary KSM pages, chained by max_page_sharing".into(),
            "echo 1 > /sys/kernel/mm/ksm/use_zero_pages merges them with the zero page instead \
             (no KSM metadata; cost: a write to such a page faults a fresh page in)",
        ));
    }
    if let Some(n) = ksm.max_page_sharing.filter(|n| *n != MAX_PAGE_SHARING_DEFAULT) {
        let (sev, why) = if n < 16 {
            (Warning, "few mappings per KSM page: identical guests save little")
        } else {
            (Info, "not the kernel's default of 256")
        };
        out.push(finding(
            sev,
            "max-page-sharing",
            None,
            format!("max_page_sharing={n}: {why}"),
            "256 is the default; higher saves more on many identical VMs, at the cost of longer rmap walks",
        ));
    }
    if ksm.merge_across_nodes == Some(1) && facts.numa_nodes > 1 {
        out.push(finding(
            Warning,
            "merge-across-nodes",
            None,
            format!(
                "merge_across_nodes=1 on a host with {} NUMA nodes: a merged page may live on another node than its VM",
                facts.numa_nodes
            ),
            "echo 0 > /sys/kernel/mm/ksm/merge_across_nodes while run=2 (unmerged), for NUMA-local merging; \
             cost: one copy per node, less saved",
        ));
    }
    if report.processes.is_empty() || !anything_mergeable {
        out.push(finding(
            Warning,
            "nothing-mergeable",
            None,
            "no process has mergeable memory (none madvised MADV_MERGEABLE or set PR_SET_MEMORY_MERGE)".into(),
            "KSM can save nothing here; see the sandbox findings for Kata VMs",
        ));
    }
    if !report.kernel.ksm_stat && report.walked > 0 {
        out.push(finding(
            Info,
            "no-ksm-stat",
            None,
            "this kernel has no /proc/<pid>/ksm_stat (before Linux 6.1): only merged pages per process are known, \
             not zero pages or profit"
                .into(),
            "",
        ));
    }
    if !report.skipped.is_empty() {
        let total = report.skipped.len() as u64 + report.skipped_more;
        let first = &report.skipped[0];
        out.push(finding(
            Warning,
            "processes-unreadable",
            None,
            format!("{total} process(es) could not be read, e.g. pid {} ({}): {}", first.pid, first.name, first.reason),
            "run as root with CAP_SYS_PTRACE (the shipped unit grants it); their savings are not counted",
        ));
    }
    let partial: Vec<_> = report.processes.iter().filter(|p| p.note.is_some()).collect();
    if let Some(first) = partial.first() {
        out.push(finding(
            Warning,
            "processes-partial",
            first.sandbox.as_deref().filter(|_| partial.len() == 1),
            format!(
                "{} process(es) only partly read, e.g. pid {} ({}): {}",
                partial.len(),
                first.pid,
                first.name,
                first.note.as_deref().unwrap_or_default()
            ),
            "another user's ksm_stat needs CAP_DAC_READ_SEARCH, which the shipped unit leaves out (its exposure \
             would pass 1.0); add it with a drop-in (CapabilityBoundingSet=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH) if \
             such VMMs' zero pages and profit matter",
        ));
    }
    let folders = &report.folders;
    if folders.invalid_count > 0 {
        out.push(finding(
            Info,
            "folder-not-a-sandbox",
            None,
            format!(
                "{} entr(y/ies) in the sandbox folders are not valid sandbox ids and were ignored, e.g. {:?}",
                folders.invalid_count,
                folders.invalid.first().map(String::as_str).unwrap_or("")
            ),
            "",
        ));
    }
    if folders.over_limit > 0 {
        out.push(finding(
            Warning,
            "too-many-folders",
            None,
            format!("{} sandbox folders beyond the limit were not looked at", folders.over_limit),
            "",
        ));
    }
    for root in &folders.unreadable {
        out.push(finding(Warning, "folder-unreadable", None, format!("sandbox root {root}"), ""));
    }
    for row in &report.sandboxes {
        sandbox(row, report.page_size, &mut out);
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

fn sandbox(row: &SandboxRow, page_size: u64, out: &mut Vec<Finding>) {
    use Severity::*;
    let id = Some(row.id.as_str());
    let short = &row.id[..row.id.len().min(12)];
    let Some(pid) = row.vmm_pid else {
        out.push(finding(
            Warning,
            "sandbox-no-vmm",
            id,
            format!("sandbox {short} ({}) has no VMM process that can be seen", row.folder),
            "it may be starting or stopping; a VMM of another user is invisible without CAP_SYS_PTRACE",
        ));
        return;
    };
    let vmm = row.vmm.map_or("vmm", Vmm::as_str);
    let Some(ram) = row.guest_ram.as_ref().filter(|r| r.size_bytes >= GUEST_RAM_MIN) else {
        out.push(finding(
            Warning,
            "sandbox-ram-unknown",
            id,
            format!("sandbox {short}: the memory map of its {vmm} (pid {pid}) could not be read or has no guest RAM"),
            "",
        ));
        return;
    };
    let mib = ram.size_bytes >> 20;
    let file = if ram.path.is_empty() { String::new() } else { format!(" ({})", ram.path) };
    if ram.shared {
        let fix = match row.vmm {
            Some(Vmm::CloudHypervisor) => {
                "Cloud Hypervisor needs shared memory for virtio-fs and refuses mergeable with shared \
                 (cloud-hypervisor PR #8126): use QEMU with shared_fs = \"virtio-9p\" or \"none\" for VMs that should merge"
            }
            Some(Vmm::Shim) => {
                "Dragonball: mem_type = \"anon\" with mem_merge = true in [hypervisor.dragonball] \
                 (kata PR #12894, not yet merged); cost: no shared-memory devices"
            }
            _ => {
                "in Kata's configuration.toml, [hypervisor.qemu] shared_fs = \"virtio-9p\" (or \"none\"), \
                 and no vhost-user store or VM templating (they force shared=on too); cost: virtio-9p is much \
                 slower than virtio-fs, none gives the containers no shared host folder"
            }
        };
        out.push(finding(
            Error,
            "sandbox-shared-memory",
            id,
            format!(
                "sandbox {short}: its {vmm} (pid {pid}) backs {mib} MiB of guest RAM with shared memory{file}; \
                 KSM never merges shared mappings (virtio-fs needs share=on)"
            ),
            fix,
        ));
    } else if ram.hugetlb {
        // MADV_HUGEPAGE (`hg`) is no obstacle: QEMU sets it on all guest RAM, and KSM splits a
        // transparent huge page to merge its pages. hugetlbfs pages it cannot merge at all.
        out.push(finding(
            Error,
            "sandbox-huge-pages",
            id,
            format!(
                "sandbox {short}: its {vmm} (pid {pid}) backs {mib} MiB of guest RAM with hugetlbfs pages{file}, \
                 which KSM cannot merge"
            ),
            "enable_hugepages = false in Kata's configuration.toml; cost: more TLB misses in the guest",
        ));
    } else if !ram.mergeable {
        out.push(finding(
            Error,
            "sandbox-not-madvised",
            id,
            format!("sandbox {short}: its {vmm} (pid {pid}) did not madvise its {mib} MiB of guest RAM MADV_MERGEABLE"),
            "QEMU: do not pass mem-merge=off (on is its default); Dragonball: mem_merge = true",
        ));
    } else {
        let saved = row.saved_bytes;
        out.push(finding(
            Info,
            "sandbox-mergeable",
            id,
            format!(
                "sandbox {short}: {mib} MiB of guest RAM mergeable, {} MiB saved ({} pages merged, {} zero pages, {} B/page)",
                saved >> 20,
                row.merging_pages,
                row.zero_pages,
                page_size
            ),
            "",
        ));
    }
}

/// Whether a run of the doctor should fail (an error was found).
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::accounting::{KsmStat, Maps, Process, Region};

    fn knobs() -> KsmKnobs {
        KsmKnobs {
            run: 0,
            advisor_mode: Some("none".into()),
            smart_scan: Some(0),
            use_zero_pages: Some(1),
            max_page_sharing: Some(256),
            merge_across_nodes: Some(1),
        }
    }

    fn vm(pid: u32, id: &str, ram: Region) -> (Process, SandboxRow) {
        let maps = Maps {
            mergeable_bytes: if ram.mergeable { ram.size_bytes } else { 0 },
            ksm_bytes: 0,
            largest: Some(ram.clone()),
        };
        let p = Process {
            pid,
            name: "qemu-system-x86".into(),
            sandbox: Some(id.into()),
            vmm: Some(Vmm::Qemu),
            ksm: KsmStat { mergeable: Some(maps.mergeable_bytes > 0), ..KsmStat::default() },
            maps: Some(maps),
            saved_bytes: 0,
            note: None,
        };
        let row = SandboxRow {
            id: id.into(),
            folder: format!("/run/vc/sbs/{id}"),
            vmm_pid: Some(pid),
            vmm: Some(Vmm::Qemu),
            pids: vec![pid],
            mergeable_bytes: 0,
            merging_pages: 0,
            zero_pages: 0,
            profit_bytes: 0,
            saved_bytes: 0,
            guest_ram: Some(ram),
        };
        (p, row)
    }

    fn codes(f: &[Finding]) -> Vec<(&str, Option<&str>)> {
        f.iter().map(|f| (f.code.as_str(), f.sandbox.as_deref())).collect()
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn no_ksm_is_an_error_and_nothing_else_is_said() {
        let f = diagnose(&Facts { ksm: None, ..Facts::default() });
        assert_eq!(codes(&f), [("ksm-missing", None)]);
        assert!(failed(&f));
    }

    #[test]
    fn the_shared_sandbox_is_named_and_the_private_one_is_not_blamed() {
        // MADV_HUGEPAGE as QEMU sets it on guest RAM: no obstacle to merging.
        let private = Region { size_bytes: GIB, mergeable: true, thp_advised: true, ..Region::default() };
        let (p1, r1) = vm(10, "private", private);
        let shared = Region { size_bytes: GIB, shared: true, path: "/memfd:mem (deleted)".into(), ..Region::default() };
        let (p2, r2) = vm(20, "shared", shared);
        let facts = Facts {
            ksm: Some(knobs()),
            mode: "throttle".into(),
            setting: "initial".into(),
            numa_nodes: 1,
            report: Report { processes: vec![p1, p2], sandboxes: vec![r1, r2], page_size: 4096, ..Report::default() },
        };
        let f = diagnose(&facts);
        let c = codes(&f);
        assert_eq!(c[0], ("sandbox-shared-memory", Some("shared")), "errors first: {c:?}");
        assert!(c.contains(&("sandbox-mergeable", Some("private"))), "{c:?}");
        assert!(c.contains(&("run-0-idle", None)), "{c:?}");
        assert!(!c.iter().any(|(code, s)| *s == Some("private") && *code != "sandbox-mergeable"), "{c:?}");
        assert!(!c.contains(&("nothing-mergeable", None)), "{c:?}");
        assert!(f[0].message.contains("memfd:mem"), "{}", f[0].message);
        assert!(f[0].fix.contains("shared_fs"), "{}", f[0].fix);
        assert!(failed(&f));
    }

    #[test]
    fn huge_pages_unmadvised_and_missing_vmms_each_have_their_finding() {
        let (p1, r1) = vm(1, "huge", Region { size_bytes: GIB, hugetlb: true, ..Region::default() });
        let (p2, r2) = vm(2, "plain", Region { size_bytes: GIB, ..Region::default() });
        let (_, mut r3) = vm(3, "gone", Region::default());
        r3.vmm_pid = None;
        let facts = Facts {
            ksm: Some(KsmKnobs { run: 1, ..knobs() }),
            mode: "throttle".into(),
            setting: "aggressive".into(),
            numa_nodes: 2,
            report: Report { processes: vec![p1, p2], sandboxes: vec![r1, r2, r3], ..Report::default() },
        };
        let f = diagnose(&facts);
        let c = codes(&f);
        for want in [
            ("sandbox-huge-pages", Some("huge")),
            ("sandbox-not-madvised", Some("plain")),
            ("sandbox-no-vmm", Some("gone")),
            ("ksm-running-nothing-mergeable", None),
            ("nothing-mergeable", None),
            ("merge-across-nodes", None),
        ] {
            assert!(c.contains(&want), "{want:?} in {c:?}");
        }
        let huge = f.iter().find(|f| f.code == "sandbox-huge-pages").expect("huge");
        assert!(huge.fix.contains("enable_hugepages"), "{}", huge.fix);
    }

    #[test]
    fn knob_findings() {
        let k = KsmKnobs {
            run: 0,
            advisor_mode: Some("scan-time".into()),
            smart_scan: Some(1),
            use_zero_pages: Some(0),
            max_page_sharing: Some(2),
            merge_across_nodes: Some(1),
        };
        let f = diagnose(&Facts { ksm: Some(k), mode: "initial".into(), numa_nodes: 1, ..Facts::default() });
        let c = codes(&f);
        for want in ["advisor-on", "smart-scan", "use-zero-pages-off", "max-page-sharing", "run-0-never"] {
            assert!(c.contains(&(want, None)), "{want} in {c:?}");
        }
        assert!(!c.contains(&("merge-across-nodes", None)), "one NUMA node: {c:?}");
        assert!(!failed(&f), "{c:?}");
        let off = diagnose(&Facts { ksm: Some(knobs()), mode: "off".into(), ..Facts::default() });
        assert!(codes(&off).contains(&("mode-off", None)));
    }
}
