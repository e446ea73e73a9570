//! ksmtctl, the operators' command line, as a library: its flags and exit codes ([`cli`], also
//! for the man page) and how it shows the Inspect answers ([`render`]). It builds on the bus
//! contract alone (`ksm-throttler-contract`), never on the daemon.

pub mod cli;
pub mod render;
