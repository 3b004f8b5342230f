//! Follows a JSONL audit file written by another program and publishes each line, mapped to
//! a v1 event, to JetStream.
//!
//! **Position.** The tail's position is the file's inode and the byte offset just after the
//! last line whose fate is settled (published and acknowledged, or rejected). It is written
//! to a small JSON state file by write-temp-fsync-rename, so a crash leaves the old or the new
//! position, never half of one. The offset moves only after JetStream acknowledged every line
//! before it: a crash re-publishes at most one chunk, and the ids deduplicate it
//! (at-least-once into JetStream, exactly once into the trail).
//!
//! **Rotation** is "the path now names another inode". The old file is read to its end from
//! the open handle (a writer may still have appended before it reopened), its partial last
//! line, if any, is taken as a line since nobody will finish it, and then the new file is
//! followed from 0. If the rotation happened while the tail was stopped, the old inode is
//! looked for in the same directory (`audit.jsonl.1`) and finished first.
//!
//! **Several rotations** (while stopped, or while publishing waited for NATS) leave files in
//! between: A was followed, then became `audit.jsonl.2` with B in `.1` and C live. "The file
//! after A" is therefore not the live file but the next rotated sibling in rotation order:
//! the files of the directory named like a rotation of the followed file (`name.N`,
//! `name-20261201`, `stem-20261201.ext`, …), ordered by modification time, then by the
//! pattern (`.2` before `.1`). Each is read from 0 to its end in turn, then the live file.
//! If the saved file itself is gone at start-up, its unread lines are lost: an error log
//! line and `auditbridge_tail_files_lost_total` say so, and the files rotated after it
//! (modified since the position was saved) are still read. A compressed rotation
//! (`name.1.gz`) cannot be read and is not a candidate.
//!
//! **Truncation** is "the file is shorter than the position", or "the 64 bytes before the
//! position are no longer the ones we settled" (a file truncated and at once written past the
//! old position, which its size cannot show; checked after every idle poll and at start-up):
//! the tail starts again at 0, logs a warning and counts it. (`copytruncate` rotation can lose lines written between the
//! copy and the truncation; that is inherent to it, prefer rename rotation.)
//!
//! **Partial lines** (no newline yet) are held in memory and not counted in the position
//! until their newline arrives.
//!
//! **Unmappable lines are never dropped silently.** They cannot go to the trail's
//! `dead_letters` through JetStream: without a valid tenant there is no subject that NATS
//! permissions would let this tail publish on, and the worker would only see "schema"
//! where the mapping knew the real reason. So each is appended (with its reason, inode and
//! offset) to the source's rejected file next to the state file, counted in
//! `auditbridge_tail_lines_total{result="rejected"}` and logged. The original line also
//! stays in the followed file. After fixing the mapping, the rejected lines can be replayed
//! with `auditbridge publish` or by feeding them to another file source.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::BackoffBuilder as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::FileParams;
use crate::mapping::{Mapping, Refusal, RefusalKind, check_tenant};
use crate::publish::{Outgoing, Sink};
use auditbridge_runtime::telemetry as m;

/// The most bytes read from the file at once; also bounds one published chunk.
const READ_BYTES: usize = 256 * 1024;

/// A file tail that cannot go on. Publishing failures are not errors: they are retried until
/// shutdown.
#[derive(Debug, thiserror::Error)]
#[error("source {source_name}: {what} {}: {error}", path.display())]
pub struct TailError {
    pub source_name: String,
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub error: io::Error,
}

/// The persisted position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub inode: u64,
    pub offset: u64,
    /// The last bytes before `offset` (hex), to notice a file that was truncated and
    /// written past the old offset again, which its size alone cannot show.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub check: String,
    /// The file's modification time when the position was saved (ns since the epoch). If
    /// the file is gone at the next start, the rotated files modified since then are the
    /// ones not read yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<i64>,
}

/// A rotated sibling of the followed file.
struct Rotated {
    path: PathBuf,
    name: String,
    inode: u64,
    modified_ns: i64,
    count: Option<std::cmp::Reverse<u64>>,
}

/// A file's modification time in ns since the epoch.
fn modified_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Whether `name` is a rotation of the followed file `followed`, and its stamp: the followed
/// name plus a stamp (`audit.jsonl.1`, `audit.jsonl-20261201`, `audit.jsonl.2026-12-01`), or
/// the stem, a stamp and the extension (`audit-20261201.jsonl`, `audit.1.jsonl`). A stamp is
/// digits and `-_.:T` with at least one digit, so `audit.jsonl.1.gz` (compressed: it cannot
/// be read) and `audit-other.jsonl` (another log) are not rotations.
fn is_rotated_name<'a>(followed: &str, name: &'a str) -> Option<&'a str> {
    let stamp_like = |s: &str| {
        s.bytes().any(|b| b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b"-_.:T".contains(&b))
    };
    let sep = ['.', '-', '_'];
    if let Some(rest) = name.strip_prefix(followed) {
        return rest.strip_prefix(sep).filter(|s| stamp_like(s));
    }
    let (stem, ext) = followed.rsplit_once('.')?;
    if stem.is_empty() {
        return None;
    }
    name.strip_prefix(stem)?
        .strip_suffix(ext)?
        .strip_suffix('.')?
        .strip_prefix(sep)
        .filter(|s| stamp_like(s))
}

/// How many bytes before the position are remembered to recognise the file.
const CHECK_BYTES: usize = 64;

/// One file source.
pub struct Tail<S> {
    name: String,
    params: FileParams,
    mapping: Mapping,
    sink: S,
    prefix: String,
    max_event_bytes: usize,
}

/// What one read of the file gave.
enum Read {
    /// Bytes, consumed.
    Data,
    /// Nothing: the position is at the end of the file.
    End,
    /// Shutdown while the bytes were being published.
    Stop,
}

/// The file being read.
struct Current {
    file: File,
    inode: u64,
    /// Offset of `buf[0]`: everything before it is settled.
    offset: u64,
    /// Bytes read after `offset` that do not yet end in a newline.
    buf: Vec<u8>,
    /// Skipping the rest of an over-long line up to its newline.
    discarding: bool,
    /// The last (up to [`CHECK_BYTES`]) bytes before `offset`.
    check: Vec<u8>,
}

impl Current {
    /// Moves the position over `settled`, the bytes just after it.
    fn advance(&mut self, settled: &[u8]) {
        self.offset += settled.len() as u64;
        let tail = &settled[settled.len().saturating_sub(CHECK_BYTES)..];
        self.check.extend_from_slice(tail);
        let excess = self.check.len().saturating_sub(CHECK_BYTES);
        self.check.drain(..excess);
    }

    /// True when the bytes before the position are no longer the ones settled: the file
    /// was truncated and written again (possibly past the old position).
    fn rewritten(&self) -> bool {
        use std::os::unix::fs::FileExt as _;
        if self.check.is_empty() {
            return false;
        }
        let mut now = vec![0u8; self.check.len()];
        let at = self.offset - self.check.len() as u64;
        match self.file.read_exact_at(&mut now, at) {
            Ok(()) => now != self.check,
            Err(_) => true,
        }
    }
}

impl<S: Sink> Tail<S> {
    pub fn new(
        name: String,
        params: FileParams,
        sink: S,
        prefix: String,
        max_event_bytes: usize,
    ) -> Tail<S> {
        Tail {
            name,
            mapping: Mapping::new(&params.mapping),
            params,
            sink,
            prefix,
            max_event_bytes,
        }
    }

    fn io_err(&self, what: &'static str, path: &Path, error: io::Error) -> TailError {
        TailError {
            source_name: self.name.clone(),
            what,
            path: path.to_owned(),
            error,
        }
    }

    /// Follows the file until `shutdown`; the position is saved after every settled chunk.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), TailError> {
        let span = tracing::info_span!("source", source = %self.name);
        self.follow(shutdown).instrument(span).await
    }

    async fn follow(self, shutdown: CancellationToken) -> Result<(), TailError> {
        let Some(mut cur) = self.open_initial(&shutdown).await? else {
            return Ok(());
        };
        tracing::info!(path = %self.params.path.display(), inode = cur.inode, offset = cur.offset, message = "Following file.");
        let mut chunk = vec![0u8; READ_BYTES];
        let mut after_sleep = false;
        while !shutdown.is_cancelled() {
            // The file may have been truncated and rewritten while we slept; its size may
            // even be past our position again. Compare the bytes before the position.
            if std::mem::take(&mut after_sleep) && cur.rewritten() {
                self.restart_at_zero(&mut cur, "rewritten")?;
                continue;
            }

            match self.read_on(&mut cur, &mut chunk, &shutdown).await? {
                Read::Data => continue,
                Read::Stop => break,
                Read::End => {}
            }
            // At the end of what we have: has the file been rotated or truncated?
            match std::fs::metadata(&self.params.path) {
                Ok(meta) if meta.ino() != cur.inode => {
                    // Rotated. The open handle still reads the old file to its end (the
                    // loop above runs again if it grew); it was at its end just now.
                    match self.read_on(&mut cur, &mut chunk, &shutdown).await? {
                        Read::Data => continue,
                        Read::Stop => break,
                        Read::End => {}
                    }
                    if !cur.buf.is_empty() && !cur.discarding {
                        tracing::warn!(
                            inode = cur.inode,
                            bytes = cur.buf.len(),
                            message = "Rotated file ends without a newline; taking its last line as complete."
                        );
                        if !self.consume(&mut cur, b"\n", &shutdown).await? {
                            break;
                        }
                    }
                    // Not necessarily the live file: when it was rotated more than once
                    // since we opened it (while publishing waited for NATS), the files
                    // rotated after it come first, oldest first.
                    let done = cur.inode;
                    let done_modified = cur.file.metadata().ok().map(|m| modified_ns(&m));
                    let Some((next, next_path)) = self.open_next(done, done_modified)? else {
                        // Replaced again in between: the next round sees it.
                        continue;
                    };
                    tracing::info!(old_inode = done, inode = next.inode, path = %next_path.display(), message = "File rotated; following the next file from its start.");
                    metrics::counter!(m::TAIL_ROTATIONS, "source" => self.name.clone())
                        .increment(1);
                    cur = next;
                    self.save(&cur)?;
                    continue;
                }
                Ok(meta) if meta.len() < cur.offset + cur.buf.len() as u64 => {
                    self.restart_at_zero(&mut cur, "shorter than the position")?;
                    continue;
                }
                // Unchanged, or renamed away and not recreated yet: wait.
                _ => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                                () = tokio::time::sleep(self.params.poll_interval) => {}
            }
            after_sleep = true;
        }
        tracing::info!(
            inode = cur.inode,
            offset = cur.offset,
            message = "File tail stopped."
        );
        Ok(())
    }

    /// Reads what follows the position into `chunk` and consumes it.
    async fn read_on(
        &self,
        cur: &mut Current,
        chunk: &mut [u8],
        shutdown: &CancellationToken,
    ) -> Result<Read, TailError> {
        let n = cur
            .file
            .read(chunk)
            .map_err(|e| self.io_err("reading", &self.params.path, e))?;
        if n == 0 {
            return Ok(Read::End);
        }
        Ok(if self.consume(cur, &chunk[..n], shutdown).await? {
            Read::Data
        } else {
            Read::Stop
        })
    }

    /// Truncation: follows the same file again from its beginning.
    fn restart_at_zero(&self, cur: &mut Current, why: &str) -> Result<(), TailError> {
        tracing::warn!(
            inode = cur.inode,
            offset = cur.offset,
            why,
            message = "File truncated; starting again from its beginning."
        );
        metrics::counter!(m::TAIL_TRUNCATIONS, "source" => self.name.clone()).increment(1);
        cur.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| self.io_err("seeking in", &self.params.path, e))?;
        cur.offset = 0;
        cur.buf.clear();
        cur.check.clear();
        cur.discarding = false;
        self.save(cur)
    }

    /// Opens the file at the saved position (or the configured start); `None` at shutdown
    /// while waiting for the file to appear.
    async fn open_initial(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Current>, TailError> {
        let saved = self.load()?;
        let path = &self.params.path;
        let mut waiting_logged = false;
        let file = loop {
            match File::open(path) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !waiting_logged {
                        tracing::info!(path = %path.display(), message = "Waiting for the file to appear.");
                        waiting_logged = true;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(None),
                        () = tokio::time::sleep(self.params.poll_interval) => {}
                    }
                }
                Err(e) => return Err(self.io_err("opening", path, e)),
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| self.io_err("reading metadata of", path, e))?;
        let mut check = Vec::new();
        let (mut file, inode, offset) = match saved {
            Some(pos) if pos.inode == meta.ino() => {
                if meta.len() < pos.offset {
                    tracing::warn!(
                        offset = pos.offset,
                        size = meta.len(),
                        message = "File is shorter than the saved position (truncated while stopped); starting from its beginning."
                    );
                    metrics::counter!(m::TAIL_TRUNCATIONS, "source" => self.name.clone())
                        .increment(1);
                    (file, meta.ino(), 0)
                } else {
                    check = hex::decode(&pos.check).unwrap_or_default();
                    (file, meta.ino(), pos.offset)
                }
            }
            Some(pos) => match self.find_inode(pos.inode) {
                // Rotated while stopped: finish the old file first; the rotation check
                // switches to the new one at its end.
                Some((old_path, old)) => {
                    check = hex::decode(&pos.check).unwrap_or_default();
                    tracing::info!(old = %old_path.display(), offset = pos.offset, message = "File was rotated while stopped; finishing the old file first.");
                    (old, pos.inode, pos.offset)
                }
                None => {
                    tracing::error!(
                        old_inode = pos.inode,
                        offset = pos.offset,
                        message = "The file the saved position points into is gone (deleted or compressed before it was finished): its lines after the saved offset were not read and are lost. Going on with the files rotated after it, then the live file."
                    );
                    metrics::counter!(m::TAIL_FILES_LOST, "source" => self.name.clone())
                        .increment(1);
                    match self.open_next(pos.inode, pos.modified_ns)? {
                        Some((next, next_path)) => {
                            tracing::info!(inode = next.inode, path = %next_path.display(), message = "Following the oldest file not read yet from its start.");
                            (next.file, next.inode, 0)
                        }
                        None => (file, meta.ino(), 0),
                    }
                }
            },
            None if self.params.start_at_end => (file, meta.ino(), meta.len()),
            None => (file, meta.ino(), 0),
        };
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| self.io_err("seeking in", path, e))?;
        let mut cur = Current {
            file,
            inode,
            offset,
            buf: Vec::new(),
            discarding: false,
            check,
        };
        if cur.rewritten() {
            // Truncated and written again while stopped.
            self.restart_at_zero(&mut cur, "rewritten while stopped")?;
        }
        self.save(&cur)?;
        Ok(Some(cur))
    }

    /// The followed file's directory.
    fn dir(&self) -> &Path {
        self.params
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// The followed file's rotated siblings (not the live file), oldest first: the files in
    /// its directory named like a rotation of it ([`is_rotated_name`]), ordered by
    /// modification time and then by the rotation pattern (`.2` before `.1`, dates
    /// ascending). A file is listed once even if several names link to it.
    fn rotated(&self) -> Vec<Rotated> {
        let Some(followed) = self.params.path.file_name().and_then(|n| n.to_str()) else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return Vec::new();
        };
        let mut files: Vec<Rotated> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let stamp = is_rotated_name(followed, &name)?;
                // A small number is a rotation count: the higher, the older.
                let count = (stamp.len() <= 6)
                    .then(|| stamp.parse::<u64>().ok())
                    .flatten()
                    .map(std::cmp::Reverse);
                let meta = std::fs::metadata(entry.path()).ok()?;
                meta.is_file().then(|| Rotated {
                    path: entry.path(),
                    inode: meta.ino(),
                    modified_ns: modified_ns(&meta),
                    count,
                    name,
                })
            })
            .collect();
        files.sort_by(|a, b| {
            (a.modified_ns, a.count, &a.name).cmp(&(b.modified_ns, b.count, &b.name))
        });
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| seen.insert(f.inode));
        files
    }

    /// Opens the file to read after the file `done` was read to its end: the next rotated
    /// sibling in rotation order, or the live file when there is none. `done` is found among
    /// the siblings by inode; when it is gone, every sibling modified at or after
    /// `done_modified` (the last time seen for it) comes after it, and without that time
    /// every sibling does (a file read twice costs duplicates, which the ids absorb; a file
    /// skipped would cost its lines). `None` when what was listed vanished while opening it
    /// (a rotation in progress); the caller tries again.
    fn open_next(
        &self,
        done: u64,
        done_modified: Option<i64>,
    ) -> Result<Option<(Current, PathBuf)>, TailError> {
        for _ in 0..5 {
            let rotated = self.rotated();
            let next = match rotated.iter().position(|f| f.inode == done) {
                Some(i) => rotated.get(i + 1),
                None => rotated
                    .iter()
                    .find(|f| done_modified.is_none_or(|m| f.modified_ns >= m)),
            };
            let (path, inode) = match next {
                Some(f) => (f.path.clone(), Some(f.inode)),
                None => (self.params.path.clone(), None),
            };
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_err("opening", &path, e)),
            };
            let opened = file
                .metadata()
                .map_err(|e| self.io_err("reading metadata of", &path, e))?
                .ino();
            if opened == done || inode.is_some_and(|i| i != opened) {
                // Renamed under us: list again.
                continue;
            }
            let cur = Current {
                file,
                inode: opened,
                offset: 0,
                buf: Vec::new(),
                discarding: false,
                check: Vec::new(),
            };
            return Ok(Some((cur, path)));
        }
        Ok(None)
    }

    /// A file in the followed file's directory with this inode (a rotated predecessor).
    fn find_inode(&self, inode: u64) -> Option<(PathBuf, File)> {
        std::fs::read_dir(self.dir())
            .ok()?
            .flatten()
            .find_map(|entry| {
                let meta = entry.metadata().ok()?;
                (meta.is_file() && meta.ino() == inode)
                    .then(|| File::open(entry.path()).ok().map(|f| (entry.path(), f)))
                    .flatten()
            })
    }

    /// Adds bytes read from the file; publishes and settles every complete line. Returns
    /// false when shutdown interrupted publishing (the position then stays where it was).
    async fn consume(
        &self,
        cur: &mut Current,
        data: &[u8],
        shutdown: &CancellationToken,
    ) -> Result<bool, TailError> {
        let mut data = data;
        if cur.discarding {
            match data.iter().position(|b| *b == b'\n') {
                None => {
                    cur.advance(data);
                    return Ok(true);
                }
                Some(i) => {
                    cur.advance(&data[..=i]);
                    cur.discarding = false;
                    data = &data[i + 1..];
                }
            }
        }
        cur.buf.extend_from_slice(data);
        let Some(last_newline) = cur.buf.iter().rposition(|b| *b == b'\n') else {
            if cur.buf.len() > self.params.max_line_bytes {
                let line = std::mem::take(&mut cur.buf);
                let refusal = Refusal {
                    kind: RefusalKind::Oversize,
                    detail: format!(
                        "line longer than max_line_bytes ({}); skipped up to its newline",
                        self.params.max_line_bytes
                    ),
                };
                self.reject(
                    cur.inode,
                    cur.offset,
                    &line[..1024.min(line.len())],
                    &refusal,
                )?;
                cur.advance(&line);
                cur.discarding = true;
                self.save(cur)?;
            }
            return Ok(true);
        };
        let complete = last_newline + 1;
        let received_at = OffsetDateTime::now_utc();
        let mut batch = Vec::new();
        let mut rejected = Vec::new();
        let mut at = 0usize;
        for line in cur.buf[..complete].split_inclusive(|b| *b == b'\n') {
            let line_offset = cur.offset + at as u64;
            at += line.len();
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let result = if text.len() > self.params.max_line_bytes {
                Err(Refusal {
                    kind: RefusalKind::Oversize,
                    detail: format!(
                        "line longer than max_line_bytes ({})",
                        self.params.max_line_bytes
                    ),
                })
            } else {
                self.mapping
                    .apply(&self.name, text, self.max_event_bytes, received_at)
                    .and_then(|mapped| {
                        check_tenant(&self.name, &self.params.tenants, &mapped.event)
                            .map(|()| mapped)
                    })
            };
            match result {
                Ok(mapped) => {
                    let raw = matches!(self.mapping, Mapping::Identity)
                        .then(|| Bytes::copy_from_slice(text));
                    batch.push(Outgoing::mapped(&mapped, &self.prefix, raw));
                }
                Err(refusal) => rejected.push((line_offset, text, refusal)),
            }
        }
        if !self.publish_until_acked(&batch, shutdown).await {
            // Keep the chunk; it is read again from the saved position next time.
            return Ok(false);
        }
        for (offset, text, refusal) in &rejected {
            self.reject(cur.inode, *offset, text, refusal)?;
        }
        metrics::counter!(m::TAIL_LINES, "source" => self.name.clone(), "result" => "published")
            .increment(batch.len() as u64);
        let settled: Vec<u8> = cur.buf.drain(..complete).collect();
        cur.advance(&settled);
        self.save(cur)?;
        Ok(true)
    }

    /// Publishes until JetStream acknowledged everything; false if shutdown came first.
    async fn publish_until_acked(&self, batch: &[Outgoing], shutdown: &CancellationToken) -> bool {
        if batch.is_empty() {
            return true;
        }
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let result = tokio::select! {
                () = shutdown.cancelled() => return false,
                r = self.sink.publish(batch) => r,
            };
            match result {
                Ok(()) => return true,
                Err(error) => {
                    metrics::counter!(m::TAIL_PUBLISH_FAILURES, "source" => self.name.clone())
                        .increment(1);
                    tracing::warn!(%error, message = "Publishing to JetStream failed; retrying (the position does not move).");
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Appends a refused line to the rejected file (and syncs it) before the position passes
    /// it.
    fn reject(
        &self,
        inode: u64,
        offset: u64,
        line: &[u8],
        refusal: &Refusal,
    ) -> Result<(), TailError> {
        let path = &self.params.rejected_file;
        tracing::warn!(inode, offset, kind = refusal.kind.as_str(), reason = %refusal.detail, rejected_file = %path.display(), message = "Line refused; kept in the rejected file.");
        metrics::counter!(m::TAIL_LINES, "source" => self.name.clone(), "result" => "rejected")
            .increment(1);
        let record = serde_json::json!({
            "at": OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
            "source": self.name,
            "path": self.params.path,
            "inode": inode,
            "offset": offset,
            "kind": refusal.kind.as_str(),
            "reason": refusal.detail,
            "line": String::from_utf8_lossy(line),
        });
        let mut text = serde_json::to_vec(&record).expect("JSON values serialize");
        text.push(b'\n');
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().create(true).append(true).open(path)?;
            f.write_all(&text)?;
            f.sync_data()
        };
        write().map_err(|e| self.io_err("writing rejected lines to", path, e))
    }

    fn load(&self) -> Result<Option<Position>, TailError> {
        let path = &self.params.state_file;
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.io_err(
                    "reading the position (delete the file to start over)",
                    path,
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("reading the position", path, e)),
        }
    }

    /// Replaces the state file atomically: write a temporary file, sync it, rename it over.
    fn save(&self, cur: &Current) -> Result<(), TailError> {
        let path = &self.params.state_file;
        let pos = Position {
            inode: cur.inode,
            offset: cur.offset,
            check: hex::encode(&cur.check),
            modified_ns: cur.file.metadata().ok().map(|m| modified_ns(&m)),
        };
        let tmp = path.with_extension("json.tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&pos).expect("a position serializes"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                // The rename itself is durable once the directory is synced.
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| self.io_err("saving the position to", path, e))?;
        metrics::gauge!(m::TAIL_OFFSET, "source" => self.name.clone()).set(cur.offset as f64);
        Ok(())
    }
}

/// Reads a saved position (for tests and diagnostics).
pub fn read_position(state_file: &Path) -> io::Result<Option<Position>> {
    match std::fs::read(state_file) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::PublishError;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// Records what would be published; fails while `down` is set.
    #[derive(Clone, Default)]
    struct Recorder {
        published: Arc<Mutex<Vec<Outgoing>>>,
        down: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Sink for Recorder {
        async fn publish(&self, batch: &[Outgoing]) -> Result<(), PublishError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(PublishError {
                    acked: 0,
                    total: batch.len(),
                    waited: Duration::ZERO,
                    last: "down".into(),
                });
            }
            self.published.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    impl Recorder {
        fn actors(&self) -> Vec<String> {
            self.published
                .lock()
                .unwrap()
                .iter()
                .map(|o| {
                    let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
                    v["actor"]["id"].as_str().unwrap().to_owned()
                })
                .collect()
        }

        async fn wait_for(&self, n: usize) -> Vec<String> {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let a = self.actors();
                if a.len() >= n || Instant::now() > deadline {
                    return a;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    fn line(actor: &str) -> String {
        format!(
            "{{\"id\":\"{}\",\"tenant\":\"acme\",\"occurred_at\":\"2026-11-23T10:00:00Z\",\"action\":\"file.read\",\"outcome\":\"success\",\"actor\":{{\"id\":\"{actor}\"}},\"source\":\"app\"}}\n",
            uuid::Uuid::now_v7()
        )
    }

    struct Fixture {
        dir: PathBuf,
        params: FileParams,
        sink: Recorder,
    }

    impl Fixture {
        fn new(test: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!("abtail-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let kind = crate::test_config::load(&serde_json::json!({"name": "t", "type": "file",
                "params": {"path": dir.join("audit.jsonl"), "poll_interval": "10ms",
                           "max_line_bytes": 4096}}));
            let crate::SourceKind::File(params) = kind else {
                unreachable!("a file source")
            };
            assert!(!params.start_at_end);
            Fixture {
                dir,
                params,
                sink: Recorder::default(),
            }
        }

        fn start(
            &self,
        ) -> (
            CancellationToken,
            tokio::task::JoinHandle<Result<(), TailError>>,
        ) {
            let tail = Tail::new(
                "app".into(),
                self.params.clone(),
                self.sink.clone(),
                "audit".into(),
                65536,
            );
            let token = CancellationToken::new();
            let handle = tokio::spawn(tail.run(token.clone()));
            (token, handle)
        }

        fn append(&self, path: &Path, text: &str) {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }

        fn position(&self) -> Position {
            read_position(&self.params.state_file).unwrap().unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn stop(
        token: CancellationToken,
        handle: tokio::task::JoinHandle<Result<(), TailError>>,
    ) {
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn appends_partial_lines_and_restart_resume_exactly() {
        let f = Fixture::new("append");
        let path = f.params.path.clone();
        f.append(&path, &(line("a") + &line("b")));
        let partial = line("c");
        let (head, rest) = partial.split_at(40);
        f.append(&path, head);
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(2).await, ["a", "b"]);
        // The partial line is held: not published, not counted in the position.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(f.sink.actors().len(), 2);
        let settled = (line("a").len() * 2) as u64;
        assert_eq!(f.position().offset, settled);
        f.append(&path, rest);
        assert_eq!(f.sink.wait_for(3).await, ["a", "b", "c"]);
        stop(token, handle).await;

        // Restart: nothing is published again; new lines are.
        let before = std::fs::metadata(&path).unwrap().len();
        assert_eq!(f.position().offset, before);
        f.append(&path, &line("d"));
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(4).await, ["a", "b", "c", "d"]);
        stop(token, handle).await;
        assert_eq!(f.position().inode, std::fs::metadata(&path).unwrap().ino());
    }

    #[tokio::test]
    async fn rotation_finishes_the_old_file_then_starts_the_new_one() {
        let f = Fixture::new("rotate");
        let path = f.params.path.clone();
        let old = f.dir.join("audit.jsonl.1");
        f.append(&path, &line("a"));
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(1).await, ["a"]);
        // The writer renames, writes one last line (ending without a newline) to its old
        // handle, then reopens the path.
        std::fs::rename(&path, &old).unwrap();
        f.append(&old, &line("b"));
        f.append(&old, line("c").trim_end());
        f.append(&path, &line("d"));
        assert_eq!(f.sink.wait_for(4).await, ["a", "b", "c", "d"]);
        stop(token, handle).await;
        assert_eq!(f.position().inode, std::fs::metadata(&path).unwrap().ino());
    }

    #[tokio::test]
    async fn rotation_while_stopped_finishes_the_old_file_from_the_saved_position() {
        let f = Fixture::new("rotate-stopped");
        let path = f.params.path.clone();
        f.append(&path, &line("a"));
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(1).await, ["a"]);
        stop(token, handle).await;
        f.append(&path, &line("b"));
        std::fs::rename(&path, f.dir.join("audit.jsonl.1")).unwrap();
        f.append(&path, &line("c"));
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(3).await, ["a", "b", "c"]);
        stop(token, handle).await;
    }

    /// `n` lines whose actors are `<tag>-0`, `<tag>-1`, … (to check order per file).
    fn lines(tag: &str, n: usize) -> (String, Vec<String>) {
        let actors: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
        (actors.iter().map(|a| line(a)).collect(), actors)
    }

    /// Renames `audit.jsonl.N` to `.N+1` (highest first) and the live file to `.1`, as
    /// logrotate does.
    fn rotate(f: &Fixture) {
        let name = |i: usize| f.dir.join(format!("audit.jsonl.{i}"));
        let mut highest = 0;
        while name(highest + 1).exists() {
            highest += 1;
        }
        for i in (1..=highest).rev() {
            std::fs::rename(name(i), name(i + 1)).unwrap();
        }
        std::fs::rename(&f.params.path, name(1)).unwrap();
    }

    /// Stopped after file A; rotated `rotations` times with a file of 100 lines written
    /// after each; started again: every line of every file once, file after file, in order.
    async fn rotations_while_stopped(test: &str, rotations: usize) {
        let f = Fixture::new(test);
        let path = f.params.path.clone();
        let (a, mut want) = lines("a", 100);
        f.append(&path, &a);
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(100).await.len(), 100);
        stop(token, handle).await;
        // More lines to A while stopped: the saved inode is finished first.
        let (a2, more) = lines("a2", 20);
        f.append(&path, &a2);
        want.extend(more);
        for r in 0..rotations {
            rotate(&f);
            let (text, actors) = lines(&format!("f{r}"), 100);
            f.append(&path, &text);
            want.extend(actors);
        }
        let (token, handle) = f.start();
        let got = f.sink.wait_for(want.len()).await;
        stop(token, handle).await;
        assert_eq!(got.len(), want.len(), "every line once");
        assert!(got == want, "in order, file after file");
        assert_eq!(f.position().inode, std::fs::metadata(&path).unwrap().ino());
    }

    #[tokio::test]
    async fn two_rotations_while_stopped_read_every_file_in_order() {
        rotations_while_stopped("rotate-twice", 2).await;
    }

    #[tokio::test]
    async fn three_rotations_while_stopped_read_every_file_in_order() {
        rotations_while_stopped("rotate-thrice", 3).await;
    }

    /// The same while running, with publishing down (NATS away): the tail is held inside
    /// file A while it is rotated twice; once publishing is back it reads A, B and C.
    #[tokio::test]
    async fn two_rotations_while_publishing_is_down_read_every_file_in_order() {
        let f = Fixture::new("rotate-down");
        let path = f.params.path.clone();
        f.sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let (a, mut want) = lines("a", 100);
        f.append(&path, &a);
        let (token, handle) = f.start();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for r in 0..2 {
            rotate(&f);
            let (text, actors) = lines(&format!("f{r}"), 100);
            f.append(&path, &text);
            want.extend(actors);
        }
        f.sink
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let got = f.sink.wait_for(want.len()).await;
        stop(token, handle).await;
        assert_eq!(got.len(), want.len(), "every line once");
        assert!(got == want, "in order, file after file");
    }

    /// The saved file is deleted before the restart: its unread lines are lost (said in an
    /// error log line and a counter), and the files rotated after it are still read.
    #[tokio::test]
    async fn a_deleted_file_costs_only_its_own_unread_lines() {
        let f = Fixture::new("rotate-deleted");
        let path = f.params.path.clone();
        let (a, _) = lines("a", 10);
        f.append(&path, &a);
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(10).await.len(), 10);
        stop(token, handle).await;
        f.append(&path, &lines("lost", 5).0);
        let mut want: Vec<String> = f.sink.actors();
        for r in 0..2 {
            rotate(&f);
            let (text, actors) = lines(&format!("f{r}"), 100);
            f.append(&path, &text);
            want.extend(actors);
        }
        std::fs::remove_file(f.dir.join("audit.jsonl.2")).unwrap();
        let (token, handle) = f.start();
        let got = f.sink.wait_for(want.len()).await;
        stop(token, handle).await;
        assert!(
            got == want,
            "B then C, nothing of the deleted file's unread lines"
        );
    }

    #[test]
    fn rotated_names() {
        let r = |name| is_rotated_name("audit.jsonl", name);
        assert_eq!(r("audit.jsonl.1"), Some("1"));
        assert_eq!(r("audit.jsonl.12"), Some("12"));
        assert_eq!(r("audit.jsonl-20261201"), Some("20261201"));
        assert_eq!(r("audit.jsonl.2026-12-01"), Some("2026-12-01"));
        assert_eq!(r("audit-20261201.jsonl"), Some("20261201"));
        assert_eq!(r("audit.1.jsonl"), Some("1"));
        assert_eq!(r("audit.jsonl"), None);
        assert_eq!(r("audit.jsonl.1.gz"), None, "compressed: cannot be read");
        assert_eq!(r("audit-other.jsonl"), None);
        assert_eq!(r("audit.jsonl.tmp"), None);
        assert_eq!(r("audit.jsonl.state.json"), None);
        assert_eq!(r("auditx.jsonl.1"), None);
        assert_eq!(is_rotated_name("audit", "audit.1"), Some("1"));
        assert_eq!(is_rotated_name(".hidden", ".hidden.1"), Some("1"));
    }

    #[tokio::test]
    async fn truncation_starts_again_at_zero() {
        let f = Fixture::new("truncate");
        let path = f.params.path.clone();
        f.append(&path, &(line("a") + &line("b")));
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(2).await, ["a", "b"]);
        File::create(&path).unwrap(); // truncates, same inode
        f.append(&path, &line("c"));
        assert_eq!(f.sink.wait_for(3).await, ["a", "b", "c"]);
        stop(token, handle).await;
        assert_eq!(f.position().offset, line("c").len() as u64);
    }

    #[tokio::test]
    async fn a_file_rewritten_past_the_position_is_noticed() {
        let f = Fixture::new("rewrite");
        let path = f.params.path.clone();
        f.append(&path, &line("a"));
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(1).await, ["a"]);
        // Truncated and at once written longer than before: the size does not show it.
        std::fs::write(&path, line("b") + &line("c")).unwrap();
        assert_eq!(f.sink.wait_for(3).await, ["a", "b", "c"]);
        stop(token, handle).await;
        // The same while stopped.
        std::fs::write(&path, line("d") + &line("e") + &line("f")).unwrap();
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(6).await, ["a", "b", "c", "d", "e", "f"]);
        stop(token, handle).await;
        assert_eq!(f.position().offset, std::fs::metadata(&path).unwrap().len());
    }

    #[tokio::test]
    async fn refused_lines_go_to_the_rejected_file_and_do_not_block() {
        let f = Fixture::new("reject");
        let path = f.params.path.clone();
        f.append(
            &path,
            &(line("a") + "not json\n" + "\n" + &"x".repeat(5000) + "\n" + &line("b")),
        );
        let (token, handle) = f.start();
        assert_eq!(f.sink.wait_for(2).await, ["a", "b"]);
        stop(token, handle).await;
        let rejected = std::fs::read_to_string(&f.params.rejected_file).unwrap();
        let records: Vec<serde_json::Value> = rejected
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 2, "{rejected}");
        assert_eq!(records[0]["kind"], "not_json");
        assert_eq!(records[0]["line"], "not json");
        assert_eq!(records[0]["offset"], line("a").len());
        assert_eq!(records[1]["kind"], "oversize");
        assert_eq!(f.position().offset, std::fs::metadata(&path).unwrap().len());
    }

    #[tokio::test]
    async fn the_position_waits_for_the_acks() {
        let f = Fixture::new("acks");
        let path = f.params.path.clone();
        f.sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
        f.append(&path, &line("a"));
        let (token, handle) = f.start();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            f.position().offset,
            0,
            "nothing acknowledged, nothing settled"
        );
        f.sink
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(f.sink.wait_for(1).await, ["a"]);
        stop(token, handle).await;
        assert_eq!(f.position().offset, line("a").len() as u64);
    }
}
