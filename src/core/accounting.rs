//! The sums per Kata sandbox. The data (what one process's `ksm_stat` and `smaps` say, the rows
//! of `Sandboxes()`) is the bus contract's, re-exported here; no files are read here
//! (`crate::io::procwalk` does that).

pub use ksm_throttler_contract::accounting::{
    saved_bytes, Folders, Host, KernelSupport, KsmStat, Maps, Process, Region, Report, SandboxRow, Skipped, Vmm,
    PROFIT_CAVEAT,
};

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
