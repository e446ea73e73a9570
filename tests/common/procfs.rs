//! What /proc says about a process: memory, threads, context switches and CPU time. Shared by the
//! robustness tests and the benchmarks (`benches/throughput.rs` and `grpc-shim/benches/grpc.rs`
//! include this file).
#![allow(dead_code)]

use std::io;

/// Memory and threads of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    pub threads: u64,
}

pub fn footprint(pid: u32) -> io::Result<Footprint> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> io::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status has no {name}")))
    };
    Ok(Footprint { vm_rss_kib: field("VmRSS")?, vm_hwm_kib: field("VmHWM")?, threads: field("Threads")? })
}

/// Context switches of every thread of `pid`, summed: each time one of its threads went off the
/// CPU. Voluntary ones are the thread blocking (for an idle daemon, each is a wake-up to come);
/// involuntary ones are the scheduler preempting it while it ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    pub voluntary: u64,
    pub involuntary: u64,
}

impl Switches {
    pub fn total(self) -> u64 {
        self.voluntary + self.involuntary
    }

    pub fn since(self, before: Switches) -> Switches {
        Switches { voluntary: self.voluntary - before.voluntary, involuntary: self.involuntary - before.involuntary }
    }
}

pub fn context_switches(pid: u32) -> io::Result<Switches> {
    let mut sum = Switches::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = match std::fs::read_to_string(task?.path().join("status")) {
            Ok(s) => s,
            // A thread that ended between the listing and the read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in status.lines() {
            let (field, value) = if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                (&mut sum.voluntary, v)
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                (&mut sum.involuntary, v)
            } else {
                continue;
            };
            *field += value.trim().parse::<u64>().map_err(|e| io::Error::other(format!("{line:?}: {e}")))?;
        }
    }
    Ok(sum)
}

/// Nanoseconds `pid`'s threads have spent on a CPU (`/proc/<pid>/task/*/schedstat`, first field).
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    let mut sum = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = match std::fs::read_to_string(task?.path().join("schedstat")) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let first = text.split_whitespace().next().unwrap_or_default();
        sum += first.parse::<u64>().map_err(|e| io::Error::other(format!("schedstat {text:?}: {e}")))?;
    }
    Ok(sum)
}

/// Raises this process's open-file limit to its hard limit (1,000 clients need 1,000 sockets).
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        limit.current = Some(max);
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}
