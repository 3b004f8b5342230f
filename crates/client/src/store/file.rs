//! The `file` store: append-only JSON Lines segments in one directory.
//!
//! ```text
//! <dir>/lock                       held (flock) while a client uses the directory
//! <dir>/00000000000000000007.jsonl one event per line, exactly the JSON that is published
//! <dir>/00000000000000000008.jsonl the segment being written
//! <dir>/cursor                     "<segment> <byte offset>": where the next drain starts
//! <dir>/dead-letters.jsonl         lines that are not valid events, with the reason
//! ```
//!
//! A segment is closed past `segment_bytes`, and deleted once the cursor has passed it; when
//! the store becomes empty the writer starts a fresh segment, so an empty store holds no
//! bytes. A line that does not decode as a valid event (a torn write, a disk error, an
//! edit by hand) is copied to `dead-letters.jsonl` and passed, so it never blocks the lines
//! behind it. The cursor is written after every drained batch but not fsynced: losing it
//! re-publishes a batch, which deduplication absorbs.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;

use super::{Pending, decode_stored};
use crate::config::{FileParams, Fsync};
use crate::error::StoreError;

/// A position in the segments: a segment number and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    seg: u64,
    off: u64,
}

struct Segment {
    seq: u64,
    size: u64,
}

pub(crate) struct FileStore {
    dir: PathBuf,
    params: FileParams,
    prefix: String,
    max_event_bytes: usize,
    _lock: File,
    /// Oldest first; the last one is being written.
    segments: VecDeque<Segment>,
    writer: File,
    /// A write failed part-way: the next write starts with a newline, so a torn line can
    /// never run into the next event.
    torn: bool,
    read: Pos,
    /// For each event of the last peek: where it ends, and how many lines the cursor passes
    /// up to there (corrupt lines before it included).
    peeked: Vec<(Pos, u64)>,
    /// Corrupt lines up to here are already in the dead-letter file.
    dead_through: Pos,
    lines: u64,
    bytes: u64,
    unsynced_since: Option<Instant>,
    pub(crate) dead_lettered: u64,
}

impl FileStore {
    pub(crate) fn open(
        params: FileParams,
        prefix: String,
        max_event_bytes: usize,
    ) -> Result<FileStore, StoreError> {
        let dir = params.dir.clone();
        let at = |what: &str| format!("{what} in {}", dir.display());
        fs::create_dir_all(&dir).map_err(StoreError::io(at("creating the directory")))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(StoreError::io(at("opening the lock file")))?;
        if let Err(e) = lock.try_lock() {
            let source = match e {
                fs::TryLockError::WouldBlock => std::io::Error::other(
                    "another client (in this or another process) uses this directory",
                ),
                fs::TryLockError::Error(e) => e,
            };
            return Err(StoreError::io(at("locking the directory"))(source));
        }

        let mut seqs = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(at("listing segments")))? {
            let entry = entry.map_err(StoreError::io(at("listing segments")))?;
            let name = entry.file_name();
            if let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<u64>().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();

        let cursor = read_cursor(&dir);
        let read = match cursor {
            Some(c) if seqs.contains(&c.seg) => c,
            // The cursor's segment is gone (fully drained), or there is no cursor yet.
            Some(c) => Pos {
                seg: seqs
                    .iter()
                    .copied()
                    .find(|&s| s > c.seg)
                    .unwrap_or(c.seg + 1),
                off: 0,
            },
            None => Pos {
                seg: seqs.first().copied().unwrap_or(1),
                off: 0,
            },
        };
        let mut segments = VecDeque::new();
        for seq in seqs {
            let path = segment_path(&dir, seq);
            if seq < read.seg {
                // Drained before a crash that came between the cursor and the delete.
                fs::remove_file(&path).map_err(StoreError::io(at("deleting a drained segment")))?;
                continue;
            }
            let size = fs::metadata(&path)
                .map_err(StoreError::io(at("reading a segment's size")))?
                .len();
            segments.push_back(Segment { seq, size });
        }
        if segments.is_empty() {
            File::create_new(segment_path(&dir, read.seg))
                .map_err(StoreError::io(at("creating a segment")))?;
            segments.push_back(Segment {
                seq: read.seg,
                size: 0,
            });
        }
        let last = segments.back().expect("at least one segment");
        let writer = OpenOptions::new()
            .append(true)
            .read(true)
            .open(segment_path(&dir, last.seq))
            .map_err(StoreError::io(at("opening the segment to write")))?;

        let mut store = FileStore {
            read: Pos {
                seg: read.seg,
                off: read.off.min(segments[0].size),
            },
            dead_through: Pos { seg: 0, off: 0 },
            bytes: segments.iter().map(|s| s.size).sum(),
            lines: 0,
            segments,
            writer,
            torn: false,
            peeked: Vec::new(),
            unsynced_since: None,
            dead_lettered: 0,
            _lock: lock,
            dir,
            params,
            prefix,
            max_event_bytes,
        };
        store.end_torn_tail()?;
        store.lines = store.count_lines()?;
        Ok(store)
    }

    /// A crash in the middle of a write can leave the last line without its newline; end it,
    /// so it stays one (corrupt) line instead of swallowing the next event.
    fn end_torn_tail(&mut self) -> Result<(), StoreError> {
        let last = self.segments.back().expect("at least one segment");
        if last.size == 0 {
            return Ok(());
        }
        let mut byte = [0u8];
        self.writer
            .seek(SeekFrom::Start(last.size - 1))
            .and_then(|_| self.writer.read_exact(&mut byte))
            .map_err(StoreError::io("reading the end of the last segment"))?;
        if byte[0] != b'\n' {
            self.write(b"\n")?;
        }
        Ok(())
    }

    fn count_lines(&self) -> Result<u64, StoreError> {
        let mut lines = 0;
        let mut buf = vec![0u8; 64 * 1024];
        for s in &self.segments {
            let mut file = File::open(self.segment_path(s.seq))
                .map_err(StoreError::io("opening a segment to count its lines"))?;
            if s.seq == self.read.seg {
                file.seek(SeekFrom::Start(self.read.off))
                    .map_err(StoreError::io("seeking in a segment"))?;
            }
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(StoreError::io("counting a segment's lines"))?;
                if n == 0 {
                    break;
                }
                lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            }
        }
        Ok(lines)
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        segment_path(&self.dir, seq)
    }

    /// Writes to the current segment, keeping the size accounting right even on failure.
    fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let result = self.writer.write_all(data);
        let last = self.segments.back_mut().expect("at least one segment");
        let before = last.size;
        last.size = match &result {
            Ok(()) => before + data.len() as u64,
            // Part of it may have been written.
            Err(_) => self.writer.metadata().map(|m| m.len()).unwrap_or(before),
        };
        self.bytes = self.bytes + last.size - before;
        if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        result.map_err(|e| {
            self.torn = true;
            StoreError::io(format!("writing to {}", self.dir.display()))(e)
        })
    }

    pub(crate) fn append(&mut self, events: &[Pending]) -> Result<usize, StoreError> {
        if self.torn {
            self.write(b"\n")?;
            self.torn = false;
        }
        let mut taken = 0;
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.payload.len() + 1).sum());
        for e in events {
            let line = e.payload.len() as u64 + 1;
            if self.bytes + buf.len() as u64 + line > self.params.max_bytes {
                break;
            }
            let size = self.segments.back().expect("at least one segment").size;
            if size + buf.len() as u64 > 0
                && size + buf.len() as u64 + line > self.params.segment_bytes
            {
                self.write(&buf)?;
                buf.clear();
                self.rotate()?;
            }
            buf.extend_from_slice(&e.payload);
            buf.push(b'\n');
            taken += 1;
        }
        if !buf.is_empty() {
            self.write(&buf)?;
        }
        if self.params.fsync == Fsync::Always && taken > 0 {
            self.sync()?;
        }
        self.lines += taken as u64;
        Ok(taken)
    }

    /// Closes the current segment and starts the next.
    fn rotate(&mut self) -> Result<(), StoreError> {
        if self.params.fsync != Fsync::Never {
            self.sync()?;
        }
        let seq = self.segments.back().expect("at least one segment").seq + 1;
        let path = self.segment_path(seq);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(StoreError::io(format!("creating {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(StoreError::io("reading a new segment's size"))?
            .len();
        if self.params.fsync == Fsync::Always {
            // The new file's directory entry must survive a power loss too.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(StoreError::io("syncing the store directory"))?;
        }
        self.writer = file;
        self.segments.push_back(Segment { seq, size });
        self.bytes += size;
        Ok(())
    }

    pub(crate) fn peek(&mut self, max: usize) -> Result<Vec<Pending>, StoreError> {
        self.peeked.clear();
        let mut out = Vec::new();
        let mut pos = self.read;
        let mut lines = 0u64;
        let mut index = self
            .segments
            .iter()
            .position(|s| s.seq == pos.seg)
            .unwrap_or(0);
        'segments: while out.len() < max {
            let size = self.segments[index].size;
            if pos.off < size {
                let path = self.segment_path(pos.seg);
                let mut file = File::open(&path)
                    .map_err(StoreError::io(format!("opening {}", path.display())))?;
                file.seek(SeekFrom::Start(pos.off))
                    .map_err(StoreError::io("seeking in a segment"))?;
                let mut reader = BufReader::with_capacity(256 * 1024, file.take(size - pos.off));
                while out.len() < max {
                    let mut line = Vec::new();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(StoreError::io(format!("reading {}", path.display())))?;
                    if n == 0 {
                        break;
                    }
                    if line.last() != Some(&b'\n') {
                        // A line still being written (not by this store: its writes are
                        // whole lines).
                        break 'segments;
                    }
                    let start = pos;
                    pos.off += n as u64;
                    lines += 1;
                    line.pop();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let raw = Bytes::from(line);
                    match decode_stored(raw.clone(), &self.prefix, self.max_event_bytes) {
                        Ok(p) => {
                            out.push(p);
                            self.peeked.push((pos, lines));
                        }
                        Err(e) if pos > self.dead_through => {
                            self.dead_letter(start, &raw, &e.to_string())?;
                            self.dead_through = pos;
                        }
                        Err(_) => {}
                    }
                }
                if out.len() >= max {
                    break;
                }
            }
            if index + 1 >= self.segments.len() {
                break;
            }
            index += 1;
            pos = Pos {
                seg: self.segments[index].seq,
                off: 0,
            };
        }
        if out.is_empty() && pos != self.read {
            // Only corrupt or blank lines: pass them now.
            self.commit_read(pos, lines)?;
        }
        Ok(out)
    }

    fn dead_letter(&mut self, at: Pos, raw: &[u8], reason: &str) -> Result<(), StoreError> {
        let record = serde_json::json!({
            "segment": format!("{:020}.jsonl", at.seg),
            "offset": at.off,
            "reason": reason,
            "line": String::from_utf8_lossy(raw),
        });
        let path = self.dir.join("dead-letters.jsonl");
        let mut text = record.to_string();
        text.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(StoreError::io(format!("opening {}", path.display())))?;
        file.write_all(text.as_bytes())
            .map_err(StoreError::io(format!("writing {}", path.display())))?;
        if self.params.fsync != Fsync::Never {
            file.sync_data()
                .map_err(StoreError::io(format!("syncing {}", path.display())))?;
        }
        self.dead_lettered += 1;
        tracing::warn!(
            segment = %format!("{:020}.jsonl", at.seg),
            offset = at.off,
            reason,
            dead_letters = %path.display(),
            message = "Audit client: a line in the file store is not a valid event; moved it to the dead-letter file."
        );
        Ok(())
    }

    pub(crate) fn remove(&mut self, n: usize) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let (pos, lines) = self.peeked[n.min(self.peeked.len()) - 1];
        self.peeked.clear();
        self.commit_read(pos, lines)
    }

    /// Moves the cursor to `pos`, `lines` further on; deletes the segments it has passed.
    fn commit_read(&mut self, pos: Pos, lines: u64) -> Result<(), StoreError> {
        self.peeked.clear();
        self.lines = self.lines.saturating_sub(lines);
        // At the end of a closed segment: start of the next, so the closed one can go.
        let mut pos = pos;
        if let Some(i) = self.segments.iter().position(|s| s.seq == pos.seg)
            && i + 1 < self.segments.len()
            && pos.off >= self.segments[i].size
        {
            pos = Pos {
                seg: self.segments[i + 1].seq,
                off: 0,
            };
        }
        self.read = pos;
        let last = self.segments.back().expect("at least one segment");
        if pos.seg == last.seq && pos.off == last.size && last.size > 0 {
            // Empty: start afresh so the drained bytes are freed.
            self.rotate()?;
            self.read = Pos {
                seg: self.segments.back().expect("just created").seq,
                off: 0,
            };
        }
        write_cursor(&self.dir, self.read)?;
        while self.segments.front().is_some_and(|s| s.seq < self.read.seg) {
            let s = self.segments.pop_front().expect("checked");
            let path = self.segment_path(s.seq);
            fs::remove_file(&path)
                .map_err(StoreError::io(format!("deleting {}", path.display())))?;
            self.bytes -= s.size;
        }
        Ok(())
    }

    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced_since.take().is_some() {
            self.writer.sync_data().map_err(|e| {
                self.unsynced_since = Some(Instant::now());
                StoreError::io(format!("fsync in {}", self.dir.display()))(e)
            })?;
        }
        Ok(())
    }

    pub(crate) fn sync_due(&self) -> bool {
        self.params.fsync == Fsync::Interval
            && self
                .unsynced_since
                .is_some_and(|t| t.elapsed() >= self.params.fsync_interval)
    }

    pub(crate) fn events(&self) -> u64 {
        self.lines
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.jsonl"))
}

fn read_cursor(dir: &Path) -> Option<Pos> {
    let text = fs::read_to_string(dir.join("cursor")).ok()?;
    let (seg, off) = text.trim().split_once(' ')?;
    Some(Pos {
        seg: seg.parse().ok()?,
        off: off.parse().ok()?,
    })
}

fn write_cursor(dir: &Path, pos: Pos) -> Result<(), StoreError> {
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, format!("{} {}\n", pos.seg, pos.off))
        .and_then(|()| fs::rename(&tmp, dir.join("cursor")))
        .map_err(StoreError::io(format!(
            "writing the cursor in {}",
            dir.display()
        )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{TempDir, pending};

    fn open(dir: &Path, segment_bytes: u64, max_bytes: u64) -> FileStore {
        let mut params = FileParams::new(dir);
        params.segment_bytes = segment_bytes;
        params.max_bytes = max_bytes;
        FileStore::open(params, "audit".into(), 65536).unwrap()
    }

    fn ids(events: &[Pending]) -> Vec<auditbridge_event::Uuid> {
        events.iter().map(|p| p.id).collect()
    }

    fn segment_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("jsonl".as_ref()))
            .filter(|e| !e.as_ref().unwrap().file_name().eq("dead-letters.jsonl"))
            .count()
    }

    #[test]
    fn drains_in_order_across_segments_and_restarts() {
        let tmp = TempDir::new();
        let events: Vec<Pending> = (0..50).map(|_| pending()).collect();
        let one = events[0].payload.len() as u64 + 1;
        let mut store = open(tmp.path(), one * 8, 1 << 20);
        assert_eq!(store.append(&events[..30]).unwrap(), 30);
        assert_eq!(store.append(&events[30..]).unwrap(), 20);
        assert_eq!(store.events(), 50);
        assert!(segment_files(tmp.path()) >= 6, "rotated by size");

        let first = store.peek(20).unwrap();
        assert_eq!(ids(&first), ids(&events[..20]));
        assert_eq!(first[0].subject, "audit.acme.user.login");
        store.remove(15).unwrap();
        assert_eq!(store.events(), 35);
        drop(store);

        // A new client resumes at the cursor.
        let mut store = open(tmp.path(), one * 8, 1 << 20);
        assert_eq!(store.events(), 35);
        let rest = store.peek(100).unwrap();
        assert_eq!(ids(&rest), ids(&events[15..]));
        store.remove(rest.len()).unwrap();
        assert_eq!((store.events(), store.bytes()), (0, 0));
        assert!(store.peek(10).unwrap().is_empty());
        assert_eq!(segment_files(tmp.path()), 1, "drained segments are deleted");
    }

    #[test]
    fn the_size_limit_makes_it_full_and_draining_makes_room() {
        let tmp = TempDir::new();
        let events: Vec<Pending> = (0..10).map(|_| pending()).collect();
        let one = events[0].payload.len() as u64 + 1;
        let mut store = open(tmp.path(), one * 2, one * 4);
        assert_eq!(store.append(&events).unwrap(), 4);
        assert_eq!(store.append(&events[4..]).unwrap(), 0);
        assert_eq!(store.bytes(), one * 4);
        store.peek(2).unwrap();
        store.remove(2).unwrap();
        assert_eq!(store.append(&events[4..]).unwrap(), 2);
    }

    #[test]
    fn corrupt_lines_go_to_the_dead_letter_file_once_and_do_not_block() {
        let tmp = TempDir::new();
        let events: Vec<Pending> = (0..4).map(|_| pending()).collect();
        let mut store = open(tmp.path(), 1 << 20, 1 << 20);
        store.append(&events[..2]).unwrap();
        store.write(b"{\"id\": \"torn\nnot json at all\n").unwrap();
        store.append(&events[2..]).unwrap();
        // Corrupt lines in the middle of a peek: skipped, dead-lettered once, even when the
        // same batch is peeked again after a failed publish.
        assert_eq!(ids(&store.peek(10).unwrap()), ids(&events));
        assert_eq!(ids(&store.peek(10).unwrap()), ids(&events));
        store.remove(4).unwrap();
        assert_eq!(store.events(), 0);
        let dead = fs::read_to_string(tmp.path().join("dead-letters.jsonl")).unwrap();
        assert_eq!(dead.lines().count(), 2, "{dead}");
        let first: serde_json::Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
        assert_eq!(first["line"], "{\"id\": \"torn");
        assert!(first["reason"].as_str().unwrap().contains("not valid JSON"));
        assert_eq!(store.dead_lettered, 2);

        // Corrupt lines at the head are passed even with nothing behind them.
        store.write(b"garbage\n").unwrap();
        store.lines += 1;
        assert!(store.peek(10).unwrap().is_empty());
        assert_eq!(store.events(), 0);
        assert_eq!(store.dead_lettered, 3);
    }

    #[test]
    fn a_torn_tail_does_not_swallow_the_next_event() {
        let tmp = TempDir::new();
        let events: Vec<Pending> = (0..2).map(|_| pending()).collect();
        let mut store = open(tmp.path(), 1 << 20, 1 << 20);
        store.append(&events[..1]).unwrap();
        store.write(b"{\"id\":\"0192").unwrap(); // the crash
        drop(store);
        let mut store = open(tmp.path(), 1 << 20, 1 << 20);
        store.append(&events[1..]).unwrap();
        assert_eq!(ids(&store.peek(10).unwrap()), ids(&events));
        assert_eq!(store.dead_lettered, 1);
    }

    #[test]
    fn one_client_per_directory() {
        let tmp = TempDir::new();
        let _first = open(tmp.path(), 1 << 20, 1 << 20);
        let err = FileStore::open(FileParams::new(tmp.path()), "audit".into(), 65536)
            .err()
            .unwrap();
        assert!(err.to_string().contains("another client"), "{err}");
    }
}
