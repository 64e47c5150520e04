//! Blob bodies handed to the kernel with sendfile(2) on plain HTTP/1.1.
//!
//! Hyper keeps the HTTP framing (status line, headers, Content-Length,
//! keep-alive); only the body's bytes travel another way. The body is still
//! a stream of `Bytes`, each a read-only shared mapping of a window of the
//! blob, registered with its connection ([`Sendfile`]) for as long as it
//! lives, and never read. When hyper writes bytes that lie in a registered
//! window, the connection's socket wrapper (`conn::Watched`) sends the same
//! bytes from the file with sendfile instead: from the page cache to the
//! socket, with no copy through user space and no page mapped into the
//! process. Whatever did read such bytes would read the file through the
//! mapping: the trick changes how the bytes travel, never which bytes.
//!
//! Before a window is handed to hyper, a blocking thread checks that its
//! pages are in the page cache (`mincore`) and reads them in if not, so
//! that sendfile on an async worker does not wait for the disk (unless the
//! kernel evicts them in between).

use crate::store::fs::{page_size, BlobFile};
use bytes::Bytes;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes one sendfile call is asked for (Linux sends at most
/// 0x7ffff000 anyway).
const MAX_SEND: usize = 1 << 30;

/// The mapped windows of one connection's blob bodies in flight. A plain
/// HTTP/1.1 connection has one; handlers find it in the request's
/// extensions.
#[derive(Clone, Default)]
pub struct Sendfile(Arc<Mutex<Vec<Window>>>);

/// `len` bytes at address `addr` are the bytes of the file `fd` from
/// `offset` on.
#[derive(Clone, Copy)]
struct Window {
    addr: usize,
    len: usize,
    fd: RawFd,
    offset: u64,
}

/// Bytes about to be written, found in a file.
#[derive(Debug, PartialEq, Eq)]
pub struct FileSpan {
    fd: RawFd,
    offset: u64,
    len: usize,
}

impl Sendfile {
    /// The `len` (> 0) bytes of `file` at `offset`, registered with this
    /// connection until dropped, their pages in the page cache. Blocking.
    pub fn window(&self, file: &Arc<BlobFile>, offset: u64, len: usize) -> io::Result<Bytes> {
        let mapped = file.map(offset, len, false)?;
        ensure_cached(file, &mapped.map, mapped.file_start)?;
        self.windows().push(Window {
            addr: mapped.map.as_ptr() as usize,
            len: mapped.map.len(),
            fd: file.as_raw_fd(),
            offset: mapped.file_start,
        });
        let registered = Registered {
            map: mapped.map,
            windows: self.clone(),
            _file: Arc::clone(file),
        };
        Ok(Bytes::from_owner(registered).slice(mapped.skip..))
    }

    /// The first of `bufs` that lies in a registered window (its index,
    /// and where it is in its file).
    pub fn locate(&self, bufs: &[IoSlice<'_>]) -> Option<(usize, FileSpan)> {
        let windows = self.windows();
        if windows.is_empty() {
            return None;
        }
        bufs.iter().enumerate().find_map(|(i, buf)| {
            let addr = buf.as_ptr() as usize;
            let w = windows.iter().find(|w| {
                !buf.is_empty() && addr >= w.addr && addr + buf.len() <= w.addr + w.len
            })?;
            let span = FileSpan {
                fd: w.fd,
                offset: w.offset + (addr - w.addr) as u64,
                len: buf.len(),
            };
            Some((i, span))
        })
    }

    fn windows(&self) -> MutexGuard<'_, Vec<Window>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A registered window's mapping. Unregistered before it is unmapped and
/// before its file may close (fields drop after `drop`), so a registered
/// address always holds the file's bytes and its descriptor is open.
struct Registered {
    map: memmap2::Mmap,
    windows: Sendfile,
    _file: Arc<BlobFile>,
}

impl AsRef<[u8]> for Registered {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let addr = self.map.as_ptr() as usize;
        self.windows.windows().retain(|w| w.addr != addr);
    }
}

/// Brings the pages of `map` (the file's bytes from `file_start`) into the
/// page cache if any is missing, by reading the file, not the mapping
/// (which would map them into our RSS). Blocking.
fn ensure_cached(file: &BlobFile, map: &memmap2::Mmap, file_start: u64) -> io::Result<()> {
    let pages = map.len().div_ceil(page_size() as usize);
    let mut resident = vec![0u8; pages];
    // SAFETY: the range is a live mapping of ours, page-aligned at its
    // start; `resident` has a byte for each of its pages.
    let r = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            resident.as_mut_ptr(),
        )
    };
    if r == 0 && resident.iter().all(|b| b & 1 == 1) {
        return Ok(());
    }
    let mut buf = [0u8; 64 * 1024];
    let end = file_start + map.len() as u64;
    let mut pos = file_start;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Sends `span` from its file to `socket` with sendfile; how many bytes
/// went (maybe fewer than asked, as with write).
pub fn poll_send(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    span: &FileSpan,
) -> Poll<io::Result<usize>> {
    let mut offset = match libc::off_t::try_from(span.offset) {
        Ok(o) => o,
        Err(e) => return Poll::Ready(Err(io::Error::other(e))),
    };
    loop {
        ready!(socket.poll_write_ready(cx))?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            // SAFETY: both descriptors are open during the call: the socket
            // is borrowed, and the file's is held by the registered window
            // that the bytes being written belong to.
            let n = unsafe {
                libc::sendfile(
                    socket.as_raw_fd(),
                    span.fd,
                    &mut offset,
                    span.len.min(MAX_SEND),
                )
            };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        });
        match sent {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fs::BlobStore;

    /// Registered bytes are found at their place in the file while they
    /// live, and forgotten once dropped; other bytes are never found.
    #[test]
    fn windows_are_found_while_they_live() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        let digest = store.put(&data).unwrap();
        let file = Arc::new(store.open_blob(&digest).unwrap().unwrap());
        let sendfile = Sendfile::default();
        let bytes = sendfile.window(&file, 4100, 5000).unwrap();
        assert_eq!(&bytes[..], &data[4100..9100]);
        let other = vec![1u8; 10];
        let inner = bytes.slice(10..20);
        let bufs = [
            IoSlice::new(&other),
            IoSlice::new(&[]),
            IoSlice::new(&inner),
        ];
        let (i, span) = sendfile.locate(&bufs).unwrap();
        assert_eq!(i, 2);
        assert_eq!(span.offset, 4110);
        assert_eq!(span.len, 10);
        assert_eq!(span.fd, file.as_raw_fd());
        assert!(sendfile.locate(&[IoSlice::new(&other)]).is_none());
        drop(inner);
        drop(bytes);
        assert!(sendfile.windows().is_empty());
    }
}
