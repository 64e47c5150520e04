//! Gzip on every core, as pigz does it: the input is cut into fixed-size
//! chunks, each deflated on its own (no dictionary shared across chunks)
//! and ended with a sync flush so that it ends on a byte boundary; the
//! pieces are joined in order, an empty final stored block ends the
//! deflate stream, then the CRC-32 and length of the whole input follow.
//! The result is one ordinary gzip member.
//!
//! The bytes depend only on the input and the level: chunk boundaries are
//! fixed, each chunk's deflate is a pure function of it, and the thread
//! count only changes who computes it. Chunks that do not shrink (random
//! or already compressed data) are written as stored blocks, which costs
//! a copy instead of a deflate.

use flate2::{Compress, Compression, FlushCompress};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes of input deflated as one independent piece. Larger pieces lose
/// less to the dictionary restarting; 1 MiB loses about 0.1%.
pub const CHUNK: usize = 1 << 20;
/// A chunk whose byte entropy is above this (in bits per byte) is stored
/// without trying deflate: it would not shrink.
const STORE_ENTROPY: f64 = 7.99;
/// Bytes of a chunk whose entropy is measured, in four pieces spread over
/// it: enough to tell random data (7.997 bits at this size) from anything
/// deflate shrinks, at a sixteenth of the cost of counting the whole chunk.
/// Text in any piece pulls the figure well below the threshold.
const ENTROPY_SAMPLE: usize = 64 * 1024;
/// Largest stored block (its length field is 16 bits).
const MAX_STORED: usize = 0xffff;
/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
/// An empty stored block with BFINAL set, ending the deflate stream.
const FINAL_BLOCK: [u8; 5] = [1, 0, 0, 0xff, 0xff];

/// One compressed chunk, and its input buffer back for reuse.
struct Done {
    deflated: io::Result<Vec<u8>>,
    crc: crc32fast::Hasher,
    input: Vec<u8>,
}

struct Job {
    input: Vec<u8>,
    reply: SyncSender<Done>,
}

/// Compressor threads, started when the input outgrows one chunk.
struct Pool {
    jobs: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(threads: usize, level: u32) -> io::Result<Pool> {
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = Pool {
            jobs: Some(tx),
            threads: Vec::with_capacity(threads),
        };
        for _ in 0..threads {
            let rx = Arc::clone(&rx);
            let thread = std::thread::Builder::new()
                .name("pgzip".into())
                .spawn(move || worker(&rx, level))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the queue ends the workers once they finish their chunk.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, level: u32) {
    let mut compress = Compress::new(Compression::new(level), false);
    loop {
        // The lock is held only while waiting for the next job.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(Job { input, reply }) = job else {
            return;
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&input);
        let deflated = compress_chunk(&mut compress, &input);
        // The writer may have gone (an error elsewhere): nothing to do.
        let _ = reply.send(Done {
            deflated,
            crc,
            input,
        });
    }
}

/// One chunk as raw deflate blocks ending on a byte boundary, never the
/// final block: deflated, or stored when deflate would not shrink it.
fn compress_chunk(compress: &mut Compress, input: &[u8]) -> io::Result<Vec<u8>> {
    if sampled_entropy(input) > STORE_ENTROPY {
        return Ok(stored(input));
    }
    let deflated = deflate_sync(compress, input)?;
    if deflated.len() >= input.len() + stored_overhead(input.len()) {
        return Ok(stored(input));
    }
    Ok(deflated)
}

fn deflate_sync(compress: &mut Compress, input: &[u8]) -> io::Result<Vec<u8>> {
    compress.reset();
    let mut out = Vec::with_capacity(input.len() / 2 + 4096);
    let mut consumed = 0usize;
    loop {
        let before = compress.total_in();
        compress
            .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        consumed += (compress.total_in() - before) as usize;
        // Done once all input is in and the flush had room to complete.
        if consumed == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity().max(4096));
    }
}

fn stored_overhead(len: usize) -> usize {
    5 * len.div_ceil(MAX_STORED).max(1)
}

/// Non-final stored blocks holding `input` verbatim.
fn stored(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + stored_overhead(input.len()));
    for block in input.chunks(MAX_STORED) {
        let len = block.len() as u16;
        // BFINAL 0, BTYPE 00; the rest of the byte is padding.
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out
}

/// [`entropy`] of four pieces spread over `data`, or of all of it if small.
fn sampled_entropy(data: &[u8]) -> f64 {
    if data.len() <= ENTROPY_SAMPLE {
        return entropy(&[data]);
    }
    let piece = ENTROPY_SAMPLE / 4;
    let stride = data.len() / 4;
    let pieces: Vec<&[u8]> = (0..4)
        .map(|i| &data[i * stride..i * stride + piece])
        .collect();
    entropy(&pieces)
}

/// Shannon entropy of the byte values in `pieces`, in bits per byte.
fn entropy(pieces: &[&[u8]]) -> f64 {
    let mut counts = [0u64; 256];
    let mut total = 0usize;
    for piece in pieces {
        for &b in *piece {
            counts[usize::from(b)] += 1;
        }
        total += piece.len();
    }
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// A gzip writer that deflates on `threads` threads. Call
/// [`finish`](Self::finish) to write the end of the stream; dropping it
/// without finishing leaves an incomplete stream.
pub struct ParallelGzip<W: Write> {
    out: W,
    level: u32,
    threads: usize,
    /// The chunk being filled.
    chunk: Vec<u8>,
    /// Input buffers back from the workers.
    spare: Vec<Vec<u8>>,
    /// Replies of the chunks sent, oldest first.
    pending: VecDeque<Receiver<Done>>,
    pool: Option<Pool>,
    crc: crc32fast::Hasher,
    len: u64,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(out: W, level: u32, threads: usize) -> Self {
        ParallelGzip {
            out,
            level,
            threads: threads.max(1),
            chunk: Vec::new(),
            spare: Vec::new(),
            pending: VecDeque::new(),
            pool: None,
            crc: crc32fast::Hasher::new(),
            len: 0,
            header_written: false,
        }
    }

    /// Chunks in flight before the writer waits for the oldest: enough to
    /// keep every thread busy while the oldest is written out.
    fn max_pending(&self) -> usize {
        2 * self.threads
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.out.write_all(&HEADER)?;
            self.header_written = true;
        }
        Ok(())
    }

    fn take_done(&mut self, done: Done) -> io::Result<()> {
        let deflated = done.deflated?;
        self.write_header()?;
        self.out.write_all(&deflated)?;
        self.crc.combine(&done.crc);
        let mut input = done.input;
        input.clear();
        self.spare.push(input);
        Ok(())
    }

    /// Writes the oldest chunk in flight, waiting for it.
    fn wait_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let done = rx
                .recv()
                .map_err(|_| io::Error::other("a compressor thread failed"))?;
            self.take_done(done)?;
        }
        Ok(())
    }

    /// Hands the full chunk to the pool.
    fn dispatch(&mut self) -> io::Result<()> {
        while self.pending.len() >= self.max_pending() {
            self.wait_oldest()?;
        }
        let next = self.spare.pop().unwrap_or_default();
        let input = std::mem::replace(&mut self.chunk, next);
        let (reply, rx) = mpsc::sync_channel(1);
        if self.pool.is_none() {
            self.pool = Some(Pool::start(self.threads, self.level)?);
        }
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| io::Error::other("compressor pool missing"))?;
        pool.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("compressor pool closed"))?
            .send(Job { input, reply })
            .map_err(|_| io::Error::other("compressor threads ended"))?;
        self.pending.push_back(rx);
        // Write whatever is already done, so output keeps flowing.
        while let Some(Ok(done)) = self.pending.front().map(Receiver::try_recv) {
            self.pending.pop_front();
            self.take_done(done)?;
        }
        Ok(())
    }

    /// Compresses what is left, writes the end of the stream and returns
    /// the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.chunk.is_empty() {
            if self.pool.is_some() {
                self.dispatch()?;
            } else {
                // One chunk in all: no threads needed.
                let input = std::mem::take(&mut self.chunk);
                let mut crc = crc32fast::Hasher::new();
                crc.update(&input);
                let mut compress = Compress::new(Compression::new(self.level), false);
                let deflated = compress_chunk(&mut compress, &input);
                self.take_done(Done {
                    deflated,
                    crc,
                    input,
                })?;
            }
        }
        while !self.pending.is_empty() {
            self.wait_oldest()?;
        }
        self.pool = None;
        self.write_header()?;
        self.out.write_all(&FINAL_BLOCK)?;
        self.out
            .write_all(&self.crc.clone().finalize().to_le_bytes())?;
        // ISIZE is the length modulo 2^32.
        self.out.write_all(&(self.len as u32).to_le_bytes())?;
        self.out.flush()?;
        let ParallelGzip { out, .. } = self;
        Ok(out)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.chunk.capacity() == 0 {
            self.chunk.reserve_exact(CHUNK);
        }
        let n = buf.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        self.len += n as u64;
        if self.chunk.len() == CHUNK {
            self.dispatch()?;
        }
        Ok(n)
    }

    /// Chunks are compressed whole; flushing early would change the bytes.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    fn gzip(data: &[u8], level: u32, threads: usize) -> Vec<u8> {
        let mut w = ParallelGzip::new(Vec::new(), level, threads);
        // Odd-sized writes, so chunk boundaries fall inside writes.
        for piece in data.chunks(77_777) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut d = GzDecoder::new(gz);
        d.read_to_end(&mut out).unwrap();
        // One member, nothing after it.
        assert_eq!(d.into_inner().len(), 0);
        out
    }

    /// Text-like data (compressible) followed by pseudo-random bytes.
    fn mixed(len: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(len);
        let mut i = 0u64;
        while data.len() < len / 2 {
            data.extend_from_slice(format!("line {i} of some text {}\n", i % 97).as_bytes());
            i += 1;
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while data.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(len);
        data
    }

    #[test]
    fn round_trips_at_every_size_boundary() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12_345] {
            let data = mixed(len);
            let gz = gzip(&data, 2, 3);
            assert_eq!(gunzip(&gz), data, "length {len}");
            assert_eq!(&gz[..10], &HEADER);
        }
    }

    #[test]
    fn same_bytes_whatever_the_thread_count() {
        let data = mixed(5 * CHUNK + 999);
        let one = gzip(&data, 1, 1);
        for threads in [2, 3, 8] {
            assert_eq!(gzip(&data, 1, threads), one, "{threads} threads");
        }
        assert_eq!(gzip(&data, 1, 2), one, "a second run");
    }

    #[test]
    fn system_gzip_accepts_the_stream() {
        let data = mixed(2 * CHUNK + 5);
        let gz = gzip(&data, 2, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        std::fs::write(&path, &gz).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, data);
    }

    #[test]
    fn incompressible_chunks_are_stored_compressible_ones_deflated() {
        let data = mixed(4 * CHUNK);
        let gz = gzip(&data, 2, 2);
        // The random half costs its size plus block headers; the text half
        // shrinks a lot.
        let random_half = 2 * CHUNK;
        assert!(gz.len() > random_half);
        assert!(gz.len() < random_half + random_half / 5, "{}", gz.len());
        assert!(sampled_entropy(&data[3 * CHUNK..]) > STORE_ENTROPY);
        assert!(sampled_entropy(&data[..CHUNK]) < STORE_ENTROPY);
        // A quarter of text in a random chunk is noticed.
        let mut quarter_text = data[2 * CHUNK..3 * CHUNK].to_vec();
        quarter_text[..CHUNK / 4].copy_from_slice(&data[..CHUNK / 4]);
        assert!(sampled_entropy(&quarter_text) < STORE_ENTROPY);
        let s = stored(&data[3 * CHUNK..]);
        assert_eq!(s.len(), CHUNK + stored_overhead(CHUNK));
    }
}
