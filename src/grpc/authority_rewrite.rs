//! The `:authority` gRPC clients send on a Unix socket, made acceptable to h2: a workaround for
//! hyperium/h2#487 (an open pull request, unmerged), named apart from the daemon's polkit
//! `Authority` (`kata_ksm_throttler::bus::authorize`), which it has nothing to do with.
//!
//! On a Unix socket the authority means nothing, and clients fill it in as they please: the
//! socket path (grpc-go with a custom dialer, as the original Kata clients dial
//! `/var/run/kata-ksm-throttler/ksm.sock`; grpc-java), or its percent-encoding (gRPC C-core
//! since 1.57: Python, C++, Ruby). h2 refuses both as malformed and resets every such call with
//! PROTOCOL_ERROR. So the client's side of the connection passes through this rewriter before h2
//! reads it: every frame goes through unchanged, except header blocks, which are decoded (HPACK,
//! with the client's dynamic table) and encoded again as plain literals with
//! `:authority: localhost` in place of an authority h2 would refuse. h2's own decoder then never
//! has a dynamic table entry, so the two tables cannot disagree.
//!
//! A connection whose first header block needs no rewriting (a client that sends `localhost`, as
//! tonic and newer grpc-go do) is not decoded again: that block and all that follow go to h2 as
//! they came, so h2's table is the client's. A client does not change its authority within a
//! connection; one that did would be refused by h2 for that call, as without this file. Decoding
//! is most of the work here (loona-hpack builds a Huffman table for each string it decodes, and
//! h2's encoder never indexes `:path`, so a tonic client sends one such string in every call).
//!
//! Pure: bytes in, bytes out. Anything that is not a well-formed HTTP/2 client stream is passed
//! through untouched from where it stops making sense, for h2 to refuse as it would have.
//!
//! # When this file can be deleted
//!
//! When h2 releases the fix for hyperium/h2#487 and the tonic this crate builds with picks it up:
//! a 0.4.x release of h2 is picked up by `cargo update -p h2` alone (tonic 0.14 and hyper 1 take
//! h2 0.4), a 0.5 needs the tonic release that moves to it. The fix must accept both forms these
//! clients send, the socket path and its percent-encoding (`acceptable_authorities_are_kept`
//! below lists both); the PR as last revised accepts a path that exists on the machine, which
//! covers grpc-go and grpc-java but not gRPC C-core. Then delete, together: this file, the
//! [`Rewriter`] pass in `conn.rs` (h2 reads the socket again), the `Bounds` it takes in
//! `server.rs` (`max_block`, `max_headers`), and the `loona-hpack` dependency. The proof stays in
//! `grpc-shim/tests/grpc.rs`: its byte-compat tests of the old Kata clients (the original Go
//! client's socket-path authority) must pass without this file, against the new h2.

use http::uri::Authority;
use loona_hpack::encoder::encode_integer;
use loona_hpack::Decoder;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What an acceptable authority replaces a malformed one with.
pub const REPLACEMENT: &str = "localhost";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("a header block over {0} bytes")]
    BlockTooLarge(usize),
    #[error("a header block decoding to over {0} bytes")]
    HeadersTooLarge(usize),
}

/// Bounds on what is held while a header block is re-encoded.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Frames larger than this are passed through for h2 to refuse (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame: usize,
    /// The encoded header block, HEADERS and CONTINUATION frames together.
    pub max_block: usize,
    /// The decoded header list (h2 answers larger ones itself, up to this).
    pub max_headers: usize,
}

enum State {
    Preface,
    Frames,
    /// Not an HTTP/2 client stream (any more): everything goes through as it comes.
    Passthrough,
}

/// What the connection's header blocks have been: it decides what is done with the next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocks {
    /// None complete yet.
    First,
    /// The first needed no rewriting and went through as it came: so does every frame after it
    /// (h2's table is the client's), HEADERS only counted.
    Untouched,
    /// One was encoded again: h2's table is empty, so every later block must be too.
    Reencoded,
}

/// A header block being collected: HEADERS, then CONTINUATION frames until END_HEADERS.
struct Block {
    stream: u32,
    /// END_STREAM, and the PRIORITY fields when present.
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as they came, in case the block must go through untouched after all.
    raw: Vec<u8>,
}

pub struct Rewriter {
    state: State,
    bounds: Bounds,
    decoder: Decoder<'static>,
    input: Vec<u8>,
    block: Option<Block>,
    /// How many `:authority` values were replaced.
    pub replaced: u64,
    /// How many HEADERS frames (requests, or trailers) came in: the connection's activity.
    pub headers_seen: u64,
    blocks: Blocks,
}

impl Rewriter {
    pub fn new(bounds: Bounds) -> Rewriter {
        let mut decoder = Decoder::new();
        // The client's encoder may use at most the table size h2 allows it: the default.
        decoder.set_max_allowed_table_size(4096);
        Rewriter {
            state: State::Preface,
            bounds,
            decoder,
            input: vec![],
            block: None,
            replaced: 0,
            headers_seen: 0,
            blocks: Blocks::First,
        }
    }

    /// Takes bytes read from the client; appends what h2 should read to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if matches!(self.state, State::Passthrough) {
            out.extend_from_slice(bytes);
            return Ok(());
        }
        self.input.extend_from_slice(bytes);
        loop {
            match self.state {
                State::Passthrough => {
                    out.append(&mut self.input);
                    return Ok(());
                }
                State::Preface => {
                    if self.input.len() < PREFACE.len() {
                        if !PREFACE.starts_with(&self.input) {
                            self.pass_through(out);
                        }
                        return Ok(());
                    }
                    if &self.input[..PREFACE.len()] != PREFACE {
                        self.pass_through(out);
                        continue;
                    }
                    out.extend(self.input.drain(..PREFACE.len()));
                    self.state = State::Frames;
                }
                State::Frames => {
                    // The length alone tells a frame too large, as h2 does, without waiting for more.
                    if self.input.len() < 3 {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
                    if len > self.bounds.max_frame {
                        self.pass_through(out);
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        return Ok(());
                    }
                    let frame: Vec<u8> = self.input.drain(..FRAME_HEADER_LEN + len).collect();
                    self.frame(frame, out)?;
                }
            }
        }
    }

    /// The stream ended: whatever is held goes to h2 as it came.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.pass_through(out);
    }

    /// From here on, nothing is rewritten.
    fn pass_through(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        out.append(&mut self.input);
        self.state = State::Passthrough;
    }

    fn frame(&mut self, frame: Vec<u8>, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        if self.blocks == Blocks::Untouched {
            self.headers_seen += u64::from(kind == HEADERS);
            out.extend_from_slice(&frame);
            return Ok(());
        }
        let payload = &frame[FRAME_HEADER_LEN..];
        match (kind, &mut self.block) {
            (HEADERS, None) => {
                self.headers_seen += 1;
                let Some((priority, fragment)) = headers_fragment(flags, payload) else {
                    // Malformed padding or priority: h2's to refuse.
                    self.input.splice(0..0, frame);
                    self.pass_through(out);
                    return Ok(());
                };
                let block = Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    raw: frame.clone(),
                };
                check_size(&block, &self.bounds)?;
                self.block = Some(block);
            }
            (CONTINUATION, Some(block)) if block.stream == stream => {
                block.fragment.extend_from_slice(payload);
                block.raw.extend_from_slice(&frame);
                check_size(block, &self.bounds)?;
            }
            (_, None) => {
                out.extend_from_slice(&frame);
                return Ok(());
            }
            // A frame other than the CONTINUATION the open block needs: a connection error
            // (RFC 9113 §6.10) that h2 reports.
            (_, Some(_)) => {
                self.input.splice(0..0, frame);
                self.pass_through(out);
                return Ok(());
            }
        }
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.reencode(block, out)?;
            }
        }
        Ok(())
    }

    fn reencode(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut decoded_size = 0usize;
        let mut replaced = false;
        let max = self.bounds.max_headers;
        let result = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            // RFC 9113 §6.5.2: each field counts its name, its value and 32.
            decoded_size += name.len() + value.len() + 32;
            if decoded_size > max {
                return;
            }
            let value: &[u8] = if &*name == b":authority" && Authority::try_from(&*value).is_err() {
                replaced = true;
                REPLACEMENT.as_bytes()
            } else {
                &value
            };
            literal(&mut encoded, &name, value);
        });
        if result.is_err() {
            // h2 will fail to decode it too (COMPRESSION_ERROR) and close the connection.
            self.block = Some(block);
            self.pass_through(out);
            return Ok(());
        }
        if decoded_size > max {
            return Err(RewriteError::HeadersTooLarge(max));
        }
        if !replaced && self.blocks == Blocks::First {
            out.extend_from_slice(&block.raw);
            self.blocks = Blocks::Untouched;
            return Ok(());
        }
        self.blocks = Blocks::Reencoded;
        self.replaced += u64::from(replaced);
        // HEADERS, then CONTINUATION frames, none over the frame size the client had to respect
        // (less the 5 bytes of priority fields a HEADERS frame may carry).
        let chunks: Vec<&[u8]> =
            if encoded.is_empty() { vec![&[]] } else { encoded.chunks(self.bounds.max_frame - 5).collect() };
        for (i, chunk) in chunks.iter().enumerate() {
            let mut flags = if i + 1 == chunks.len() { END_HEADERS } else { 0 };
            let mut payload = Vec::with_capacity(chunk.len() + 5);
            let kind = if i == 0 {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if let Some(p) = block.priority {
                    flags |= PRIORITY;
                    payload.extend_from_slice(&p);
                }
                HEADERS
            } else {
                CONTINUATION
            };
            payload.extend_from_slice(chunk);
            frame_header(out, payload.len(), kind, flags, block.stream);
            out.extend_from_slice(&payload);
        }
        Ok(())
    }
}

fn check_size(block: &Block, bounds: &Bounds) -> Result<(), RewriteError> {
    if block.fragment.len() > bounds.max_block {
        return Err(RewriteError::BlockTooLarge(bounds.max_block));
    }
    Ok(())
}

/// The priority fields and the header block fragment of a HEADERS frame's payload.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&len, r) = rest.split_first()?;
        pad = usize::from(len);
        rest = r;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let p: [u8; 5] = rest.get(..5)?.try_into().ok()?;
        priority = Some(p);
        rest = &rest[5..];
    }
    let end = rest.len().checked_sub(pad)?;
    Some((priority, &rest[..end]))
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// A literal header field without indexing, with a literal name, no Huffman coding (RFC 7541 §6.2.2).
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    string(out, name);
    string(out, value);
}

/// A string literal without Huffman coding (RFC 7541 §5.2): its length, an integer with a 7-bit
/// prefix and the H bit clear (loona-hpack's encoder, §5.1), then the bytes.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&encode_integer(s.len(), 7));
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds { max_frame: 16 * 1024, max_block: 64 * 1024, max_headers: 64 * 1024 };

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![];
        frame_header(&mut f, payload.len(), kind, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    /// A literal with incremental indexing and an indexed name, as grpc-go sends `:authority`.
    fn indexed_name_literal(index: u8, value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x40 | index];
        string(&mut b, value);
        b
    }

    /// A request's header block: POST, http, the path, and `authority` (indexed into the table).
    fn request_block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        b.extend(indexed_name_literal(4, b"/ksm.KSMThrottler/Kick"));
        b.extend(indexed_name_literal(1, authority));
        b.extend(indexed_name_literal(31, b"application/grpc"));
        b
    }

    /// The header lists of every block in `bytes` (after the preface), decoded as h2 would.
    fn decode_all(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = Decoder::new();
        let (mut blocks, mut fragment) = (vec![], vec![]);
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[9..9 + len];
            if kind == HEADERS {
                let (_, f) = headers_fragment(flags, payload).expect("well formed");
                fragment.extend_from_slice(f);
            } else if kind == CONTINUATION {
                fragment.extend_from_slice(payload);
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                let list = decoder.decode(&fragment).expect("h2 can decode what it is given");
                blocks.push(
                    list.into_iter()
                        .map(|(n, v)| (String::from_utf8(n).expect("utf-8"), String::from_utf8(v).expect("utf-8")))
                        .collect(),
                );
                fragment.clear();
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    fn authority(list: &[(String, String)]) -> &str {
        &list.iter().find(|(n, _)| n == ":authority").expect(":authority").1
    }

    fn run(input: &[u8], step: usize) -> (Vec<u8>, Rewriter) {
        let mut r = Rewriter::new(BOUNDS);
        let mut out = vec![];
        for chunk in input.chunks(step) {
            r.feed(chunk, &mut out).expect("feed");
        }
        (out, r)
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_in_this_and_later_blocks() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &request_block(b"/var/run/kata-ksm-throttler/ksm.sock")));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // The second call refers to the first call's entries by dynamic index: the authority is 63.
        let second = [0x83, 0x86, 0xbf, 0xbe, 0xc0];
        input.extend(frame(HEADERS, END_HEADERS, 3, &second));
        for step in [1, 7, input.len()] {
            let (out, r) = run(&input, step);
            let blocks = decode_all(&out);
            assert_eq!(blocks.len(), 2);
            for b in &blocks {
                assert_eq!(authority(b), REPLACEMENT, "{b:?}");
                assert!(b.contains(&(":path".into(), "/ksm.KSMThrottler/Kick".into())), "{b:?}");
                assert!(b.contains(&("content-type".into(), "application/grpc".into())), "{b:?}");
            }
            assert_eq!(r.replaced, 2);
            // SETTINGS and DATA went through byte for byte.
            assert!(out.windows(14).any(|w| w == frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]).as_slice()));
        }
    }

    #[test]
    fn literals_are_encoded_byte_for_byte_as_before() {
        // What the shim has always sent h2: 0x00, then each length on a 7-bit prefix (RFC 7541
        // §5.1: 127 and over take continuation bytes), then the bytes.
        let mut out = vec![];
        literal(&mut out, b":authority", b"localhost");
        assert_eq!(out, [&[0x00, 10][..], b":authority", &[9], b"localhost"].concat());
        for (len, prefix) in [(126, &[126][..]), (127, &[0x7f, 0]), (200, &[0x7f, 73]), (1337, &[0x7f, 0xba, 9])] {
            let value = vec![b'v'; len];
            let mut out = vec![];
            literal(&mut out, b"x", &value);
            assert_eq!(out, [&[0x00, 1][..], b"x", prefix, &value].concat(), "{len}");
        }
    }

    #[test]
    fn acceptable_authorities_are_kept() {
        for good in [&b"localhost"[..], b"localhost:50051", b"ksm.sock"] {
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &request_block(good)));
            let (out, r) = run(&input, input.len());
            assert_eq!(out, input, "a connection that needs no rewriting goes through as it came");
            assert_eq!(authority(&decode_all(&out)[0]), std::str::from_utf8(good).expect("utf-8"));
            assert_eq!(r.replaced, 0);
        }
        // gRPC C-core's percent-encoded path is refused by h2 too.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &request_block(b"run%2Fkata-ksm-throttler%2Fksm.sock")));
        assert_eq!(authority(&decode_all(&run(&input, 3).0)[0]), REPLACEMENT);
    }

    #[test]
    fn a_connection_whose_first_block_needs_nothing_goes_through_untouched_and_is_counted() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &request_block(b"localhost")));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // Later calls by dynamic index (authority 63), in HEADERS + CONTINUATION, then a block
        // with an authority h2 refuses: not rewritten (h2 resets that call, as without the file).
        let (a, b) = [0x83u8, 0x86, 0xbf, 0xbe, 0xc0].split_at(2);
        input.extend(frame(HEADERS, 0, 3, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        input.extend(frame(HEADERS, END_HEADERS, 5, &request_block(b"/x.sock")));
        for step in [1, 7, input.len()] {
            let (out, r) = run(&input, step);
            assert_eq!(out, input, "step {step}");
            assert_eq!((r.headers_seen, r.replaced), (3, 0), "step {step}");
            let blocks = decode_all(&out);
            assert_eq!(authority(&blocks[1]), "localhost");
            assert_eq!(authority(&blocks[2]), "/x.sock");
        }
    }

    #[test]
    fn continuation_padding_priority_and_end_stream_survive() {
        let block = request_block(b"/x.sock");
        let (a, b) = block.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend_from_slice(&[0x80, 0, 0, 1, 200]); // exclusive dependency on 1, weight 200
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let (out, _) = run(&input, 5);
        let first = &out[PREFACE.len()..];
        assert_eq!(first[3], HEADERS);
        assert_eq!(first[4], END_STREAM | PRIORITY | END_HEADERS);
        assert_eq!(&first[9..14], &[0x80, 0, 0, 1, 200]);
        assert_eq!(authority(&decode_all(&out)[0]), REPLACEMENT);
    }

    #[test]
    fn what_is_not_http2_goes_through_untouched() {
        let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
        assert_eq!(run(&garbage, 13).0, garbage);
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(run(&http1, 1).0, http1);
        // A frame over the maximum size: from its header on, h2 sees exactly what was sent.
        let mut big = PREFACE.to_vec();
        big.extend(frame(HEADERS, END_HEADERS, 1, &request_block(b"/a")));
        let at = big.len();
        big.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
        big.extend(vec![0u8; 100_000]);
        let (out, _) = run(&big, 4096);
        assert!(out.ends_with(&big[at..]));
        // ...as soon as its length is in, as h2 would tell.
        let (out, _) = run(&big[..at + 3], 1);
        assert!(out.ends_with(&big[at..at + 3]));
    }

    #[test]
    fn oversized_blocks_and_decoding_bombs_are_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0x00; 16 * 1024]));
        for _ in 0..4 {
            input.extend(frame(CONTINUATION, 0, 1, &vec![0x00; 16 * 1024]));
        }
        let mut r = Rewriter::new(BOUNDS);
        let err = r.feed(&input, &mut vec![]).expect_err("too large");
        assert_eq!(err, RewriteError::BlockTooLarge(64 * 1024));

        // One 4000-byte table entry, then 1000 one-byte references to it: 4 MB from 1 KB.
        let mut block = indexed_name_literal(1, &[b'a'; 4000]);
        block.extend(vec![0xbe; 1000]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let mut r = Rewriter::new(BOUNDS);
        assert_eq!(r.feed(&input, &mut vec![]).expect_err("bomb"), RewriteError::HeadersTooLarge(64 * 1024));
    }

    #[test]
    fn undecodable_blocks_go_to_h2_as_they_came() {
        let mut input = PREFACE.to_vec();
        // Indexed field 100: no such entry.
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 100]));
        input.extend(frame(0x0, 0, 1, b"after"));
        assert_eq!(run(&input, 2).0, input);
    }
}
