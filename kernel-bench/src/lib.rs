//! The real-kernel benchmark of the throttling modes: a workload that gives KSM something to
//! merge ([`pattern`], the `ksm-workload` binary) and a runner (`ksm-modes-bench`) that drives
//! each mode on the real `/sys/kernel/mm/ksm`, samples it ([`sample`]), and reports
//! ([`analysis`], [`report`], [`plot`]); [`harness`] is the skeleton it shares with
//! `ksm-vm-bench`. [`real_ksm`] and the guarded children of
//! `kata_ksm_throttler_test_support::child` make sure the machine is left as it was found.

pub mod analysis;
pub mod cpio;
pub mod daemon;
pub mod guest;
pub mod harness;
pub mod modes;
pub mod plot;
pub mod real_ksm;
pub mod report;
pub mod sample;
pub mod vm;

pub mod pattern;
