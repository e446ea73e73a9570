//! Hostile HTTP clients for the exporter's test and benchmark (issue 30, item 6), on threads of
//! their own until stopped: connections held open saying nothing (reconnected as soon as the
//! server closes one, so the count holds), requests whose headers drip a byte at a time,
//! oversized requests (a megabyte request line, 64 KiB of headers, a body of gigabytes
//! announced) and fuzzed bytes (random, and valid requests with bytes flipped, from a seed).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How many of each.
#[derive(Debug, Clone, Copy)]
pub struct FirePlan {
    pub held: usize,
    pub drips: usize,
    /// A seed for the fuzzed requests.
    pub seed: u64,
}

/// What the fire did, for the report.
#[derive(Debug, Default)]
pub struct FireCounts {
    /// Held or dripping connections the server closed (and that were opened again).
    pub closed_by_server: AtomicU64,
    /// Oversized and fuzzed requests sent.
    pub hostile_requests: AtomicU64,
}

/// The running fire; [`Fire::stop`] (or dropping it) ends every client.
pub struct Fire {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counts: Arc<FireCounts>,
}

const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n";

fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// Whether the server closed `s` (read returns end of file or an error other than "nothing yet").
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

/// xorshift64*: small and seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Fire {
    pub fn start(addr: SocketAddr, plan: FirePlan) -> Fire {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FireCounts::default());
        let mut threads = vec![];
        let spawn = |f: Box<dyn FnOnce() + Send>| std::thread::spawn(f);

        // Held: open `held`, and keep them open.
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(spawn(Box::new(move || {
            let mut held: Vec<Option<TcpStream>> = (0..plan.held).map(|_| connect(addr)).collect();
            while !s.load(Ordering::Relaxed) {
                for slot in &mut held {
                    if slot.as_mut().is_none_or(closed) {
                        c.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        *slot = connect(addr);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })));

        // Drips: a header a byte every 100 ms, never ending.
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(spawn(Box::new(move || {
            let start = b"GET /metrics HTTP/1.1\r\nX-Drip: ";
            let mut drips: Vec<(Option<TcpStream>, usize)> = (0..plan.drips).map(|_| (connect(addr), 0)).collect();
            while !s.load(Ordering::Relaxed) {
                for (slot, sent) in &mut drips {
                    let byte = start.get(*sent).copied().unwrap_or(b'a');
                    let alive = slot.as_mut().is_some_and(|st| !closed(st) && st.write_all(&[byte]).is_ok());
                    if alive {
                        *sent += 1;
                    } else {
                        c.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        *slot = connect(addr);
                        *sent = 0;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })));

        // Oversized and fuzzed, one after another, each given a moment for its answer.
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(spawn(Box::new(move || {
            let mut rng = Rng(plan.seed | 1);
            let huge_line = [b"GET /".as_slice(), &vec![b'a'; 1024 * 1024], b" HTTP/1.1\r\n\r\n"].concat();
            let big_headers =
                [b"GET /metrics HTTP/1.1\r\n".as_slice(), &b"X-Big: aaaaaaaaaaaaaaaa\r\n".repeat(2800), b"\r\n"]
                    .concat();
            let big_body = b"POST /metrics HTTP/1.1\r\nContent-Length: 4000000000\r\n\r\n".to_vec();
            let many_headers = [b"GET /metrics HTTP/1.1\r\n".as_slice(), &b"A: b\r\n".repeat(1000), b"\r\n"].concat();
            let mut round = 0u64;
            while !s.load(Ordering::Relaxed) {
                let body: Vec<u8> = match round % 6 {
                    0 => huge_line.clone(),
                    1 => big_headers.clone(),
                    2 => [big_body.as_slice(), &vec![b'x'; 256 * 1024]].concat(),
                    3 => many_headers.clone(),
                    4 => (0..(rng.next() % 4096) as usize).map(|_| rng.next() as u8).collect(),
                    _ => {
                        let mut r = REQUEST.to_vec();
                        for _ in 0..1 + rng.next() % 4 {
                            let at = (rng.next() as usize) % r.len();
                            r[at] = rng.next() as u8;
                        }
                        r
                    }
                };
                round += 1;
                if let Ok(mut st) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    let _ = st.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = st.set_read_timeout(Some(Duration::from_millis(500)));
                    let _ = st.write_all(&body);
                    let mut sink = [0u8; 4096];
                    let _ = st.read(&mut sink);
                    c.hostile_requests.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })));
        Fire { stop, threads, counts }
    }

    /// Ends every client and waits for the threads.
    pub fn stop(mut self) -> Arc<FireCounts> {
        self.end();
        self.counts.clone()
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Fire {
    fn drop(&mut self) {
        self.end();
    }
}
