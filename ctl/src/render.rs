//! How `ksmtctl sandboxes`, `top` and `doctor` show the Inspect interface's answers: the JSON
//! the bus contract documents, parsed into the contract's plain data.

use std::fmt::Write as _;

use ksm_throttler_contract::accounting::Report;
use ksm_throttler_contract::doctor::{DoctorAnswer, Severity};
use ksm_throttler_contract::status::mib;

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The table of `ksmtctl sandboxes`: sandboxes by savings, then the other processes with
/// mergeable memory, then the host's totals with the kernel's caveat.
pub fn render_sandboxes(r: &Report, processes: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12}  {:>7}  {:<16}  {:>10}  {:>10}  {:>8}  {:>8}  {:>10}  GUEST RAM",
        "SANDBOX", "PID", "VMM", "SAVED", "MERGEABLE", "MERGED", "ZERO", "PROFIT"
    );
    for s in &r.sandboxes {
        let ram = match &s.guest_ram {
            Some(g) if g.shared => format!("{} shared {}", mib(g.size_bytes as f64), g.path),
            Some(g) if g.hugetlb => format!("{} hugetlb", mib(g.size_bytes as f64)),
            Some(g) if g.mergeable => {
                format!("{} mergeable, {} merged", mib(g.size_bytes as f64), mib(g.ksm_bytes as f64))
            }
            Some(g) => format!("{} not madvised", mib(g.size_bytes as f64)),
            None if s.vmm_pid.is_none() => "no VMM process".to_owned(),
            None => "unknown".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<12}  {:>7}  {:<16}  {:>10}  {:>10}  {:>8}  {:>8}  {:>10}  {}",
            short(&s.id),
            s.vmm_pid.map_or("-".to_owned(), |p| p.to_string()),
            s.vmm.map_or("-", |v| v.as_str()),
            mib(s.saved_bytes as f64),
            mib(s.mergeable_bytes as f64),
            s.merging_pages,
            s.zero_pages,
            mib(s.profit_bytes as f64),
            ram,
        );
    }
    let others: Vec<_> = r.processes.iter().filter(|p| p.sandbox.is_none()).take(processes).collect();
    if !others.is_empty() {
        let _ = writeln!(out, "\nother processes with mergeable memory:");
        let _ = writeln!(
            out,
            "{:>7}  {:<16}  {:>10}  {:>10}  {:>8}  {:>8}  {:>10}",
            "PID", "NAME", "SAVED", "MERGEABLE", "MERGED", "ZERO", "PROFIT"
        );
        for p in others {
            let _ = writeln!(
                out,
                "{:>7}  {:<16}  {:>10}  {:>10}  {:>8}  {:>8}  {:>10}",
                p.pid,
                p.name,
                mib(p.saved_bytes as f64),
                p.maps.as_ref().map_or("?".to_owned(), |m| mib(m.mergeable_bytes as f64)),
                p.ksm.merging_pages,
                p.ksm.zero_pages.map_or("-".to_owned(), |z| z.to_string()),
                p.ksm.process_profit.map_or("-".to_owned(), |v| mib(v as f64)),
            );
        }
    }
    let h = &r.host;
    let general = h.general_profit.map_or("n/a (kernel before 6.7)".to_owned(), |g| mib(g as f64));
    let _ = writeln!(
        out,
        "\nhost: saved {} (pages_sharing {}, ksm_zero_pages {}); general_profit {}; listed processes' profit {}",
        mib(h.saved_bytes as f64),
        h.pages_sharing,
        h.ksm_zero_pages,
        general,
        mib(h.process_profit_sum as f64)
    );
    let _ = writeln!(out, "note: {}", h.caveat);
    if !r.skipped.is_empty() {
        let total = r.skipped.len() as u64 + r.skipped_more;
        let first = &r.skipped[0];
        let _ = writeln!(
            out,
            "skipped: {total} process(es) unreadable, e.g. pid {} ({}): {}",
            first.pid, first.name, first.reason
        );
    }
    for p in r.processes.iter().filter(|p| p.note.is_some()) {
        let _ = writeln!(out, "partial: pid {} ({}): {}", p.pid, p.name, p.note.as_deref().unwrap_or_default());
    }
    if !r.kernel.ksm_stat && r.walked > 0 {
        let _ = writeln!(out, "note: no /proc/<pid>/ksm_stat (kernel before 6.1): merged pages only");
    }
    let _ = writeln!(out, "walked {} processes in {} ms", r.walked, r.walk_ms);
    out
}

/// `ksmtctl doctor`: one block per finding, errors first.
pub fn render_doctor(d: &DoctorAnswer) -> String {
    let mut out = String::new();
    for f in &d.findings {
        let _ = writeln!(out, "{:<7} {}: {}", f.severity.as_str(), f.code, f.message);
        if !f.fix.is_empty() {
            let _ = writeln!(out, "        fix: {}", f.fix);
        }
    }
    let errors = d.findings.iter().filter(|f| f.severity == Severity::Error).count();
    let warnings = d.findings.iter().filter(|f| f.severity == Severity::Warning).count();
    let _ = writeln!(out, "{errors} error(s), {warnings} warning(s), {} finding(s)", d.findings.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksm_throttler_contract::accounting::{parse_report, Host, KsmStat, Process, Region, SandboxRow, Vmm};
    use ksm_throttler_contract::doctor::Finding;

    #[test]
    fn the_table_shows_each_sandbox_and_the_host_with_the_caveat() {
        let r = Report {
            sandboxes: vec![SandboxRow {
                id: "0123456789abcdef".into(),
                folder: "/run/vc/sbs/0123456789abcdef".into(),
                vmm_pid: Some(42),
                vmm: Some(Vmm::Qemu),
                pids: vec![42],
                mergeable_bytes: 256 << 20,
                merging_pages: 100,
                zero_pages: 0,
                profit_bytes: 300_000,
                saved_bytes: 400 << 10,
                guest_ram: Some(Region {
                    size_bytes: 256 << 20,
                    shared: true,
                    path: "/memfd:x".into(),
                    ..Region::default()
                }),
            }],
            processes: vec![Process {
                pid: 7,
                name: "ksm-workload".into(),
                sandbox: None,
                vmm: None,
                ksm: KsmStat { merging_pages: 9, ..KsmStat::default() },
                maps: None,
                saved_bytes: 9 * 4096,
                note: None,
            }],
            host: Host { caveat: "CAVEAT".into(), ..Default::default() },
            walked: 3,
            ..Report::default()
        };
        let text = render_sandboxes(&r, 10);
        assert!(text.contains("0123456789ab       42  qemu"), "{text}");
        assert!(text.contains("256.0 MiB shared /memfd:x"), "{text}");
        assert!(text.contains("ksm-workload"), "{text}");
        assert!(text.contains("general_profit n/a"), "{text}");
        assert!(text.contains("note: CAVEAT"), "{text}");
        let back = parse_report(&serde_json::to_string(&r).expect("json")).expect("parses");
        assert_eq!(back, r);
        assert!(parse_report("{").is_err());
    }

    #[test]
    fn the_doctor_shows_severity_code_message_and_fix() {
        let d = DoctorAnswer {
            failed: true,
            findings: vec![Finding {
                severity: Severity::Error,
                code: "sandbox-shared-memory".into(),
                sandbox: Some("x".into()),
                message: "shared".into(),
                fix: "shared_fs".into(),
            }],
        };
        let text = render_doctor(&d);
        assert!(text.starts_with("error   sandbox-shared-memory: shared\n        fix: shared_fs\n"), "{text}");
        assert!(text.contains("1 error(s), 0 warning(s)"), "{text}");
    }
}
