//! `org.kata.KsmThrottler.Inspect`, on the throttler's object: which processes and Kata sandboxes
//! KSM saves memory for (`Sandboxes`), and what stands in its way (`Doctor`). Read-only, but what
//! merged in whose memory is what KSM's side channels leak, so both ask polkit
//! (`org.kata.KsmThrottler.inspect`). The /proc walk runs on a blocking thread, never on the
//! engine's, one walk at a time; its result serves every call for [`REUSE`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};
use zbus::interface;
use zbus::message::Header;

use crate::bus::authorize::{Action, Authority};
use crate::bus::error::BusError;
use crate::core::accounting::{saved_bytes, Host, Report, PROFIT_CAVEAT};
use crate::core::doctor::{self, DoctorAnswer, Facts, KsmKnobs};
use crate::engine::Status;
use crate::io::procwalk::{self, Roots};
use crate::io::sysfs::Ksm;

/// How long one walk's result answers every call: a flood of calls costs one walk a second and a half.
pub const REUSE: Duration = Duration::from_millis(1500);

pub struct Inspector {
    proc_root: PathBuf,
    roots: Roots,
    ksm: Ksm,
    page_size: u64,
    status: watch::Receiver<Status>,
    authority: Arc<Authority>,
    /// Held across a walk: a second caller waits for it and takes its result.
    last: Mutex<Option<(Instant, Arc<Report>)>>,
}

impl Inspector {
    pub fn new(
        proc_root: PathBuf,
        roots: Roots,
        ksm: Ksm,
        page_size: u64,
        status: watch::Receiver<Status>,
        authority: Arc<Authority>,
    ) -> Self {
        Inspector { proc_root, roots, ksm, page_size, status, authority, last: Mutex::new(None) }
    }

    async fn report(&self) -> Result<Arc<Report>, BusError> {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref() {
            if at.elapsed() < REUSE {
                return Ok(Arc::clone(report));
            }
        }
        let (proc_root, roots, page_size) = (self.proc_root.clone(), self.roots.clone(), self.page_size);
        let mut report = tokio::task::spawn_blocking(move || procwalk::walk(&proc_root, &roots, page_size))
            .await
            .map_err(|e| BusError::Inspect(format!("the /proc walk failed: {e}")))?;
        report.host = self.host(&report);
        let report = Arc::new(report);
        *last = Some((Instant::now(), Arc::clone(&report)));
        Ok(report)
    }

    /// The host's totals from sysfs beside the processes' sum.
    fn host(&self, report: &Report) -> Host {
        let counter = |name: &str| self.ksm.read_counter(name).ok().flatten();
        let pages_sharing = counter("pages_sharing").unwrap_or(0).max(0) as u64;
        let ksm_zero_pages = counter("ksm_zero_pages").unwrap_or(0).max(0) as u64;
        Host {
            pages_sharing,
            ksm_zero_pages,
            saved_bytes: saved_bytes(pages_sharing, ksm_zero_pages, self.page_size),
            general_profit: counter("general_profit"),
            process_profit_sum: report.processes.iter().filter_map(|p| p.ksm.process_profit).sum(),
            caveat: PROFIT_CAVEAT.into(),
        }
    }

    fn facts(&self, report: Report) -> Facts {
        let (mode, setting) = {
            let s = self.status.borrow();
            (s.mode.as_str().to_owned(), s.setting.as_str().to_owned())
        };
        let counter = |name: &str| self.ksm.read_counter(name).ok().flatten().map(|v| v.max(0) as u64);
        let ksm = self.ksm.read().ok().map(|k| KsmKnobs {
            run: u64::from(k.run),
            advisor_mode: k.advisor_mode,
            smart_scan: k.smart_scan.map(u64::from),
            use_zero_pages: counter("use_zero_pages"),
            max_page_sharing: counter("max_page_sharing"),
            merge_across_nodes: counter("merge_across_nodes"),
        });
        Facts { ksm, mode, setting, numa_nodes: procwalk::numa_nodes(), report }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, BusError> {
    serde_json::to_string(value).map_err(|e| BusError::Inspect(format!("encoding the answer: {e}")))
}

/// Which processes and Kata sandboxes KSM saves memory for, and why one saves nothing.
#[interface(name = "org.kata.KsmThrottler.Inspect", spawn = true)]
impl Inspector {
    /// Every process with mergeable memory and every sandbox's VMM, with the host's totals, as
    /// JSON (dbus/org.kata.KsmThrottler.xml documents it).
    #[zbus(out_args("report"))]
    async fn sandboxes(&self, #[zbus(header)] header: Header<'_>) -> Result<String, BusError> {
        self.authority.check(&header, Action::Inspect).await?;
        json(&*self.report().await?)
    }

    /// Findings with a severity, what was seen and what to do, as JSON.
    #[zbus(out_args("findings"))]
    async fn doctor(&self, #[zbus(header)] header: Header<'_>) -> Result<String, BusError> {
        self.authority.check(&header, Action::Inspect).await?;
        let report = (*self.report().await?).clone();
        let findings = doctor::diagnose(&self.facts(report));
        json(&DoctorAnswer { failed: doctor::failed(&findings), findings })
    }
}
