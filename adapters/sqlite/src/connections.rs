//! The store's connections: one writer with group commit, and read-only readers that
//! run at once on the calling thread.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use session_lifecycle_store::{StoreError, lock};
use tokio::sync::oneshot;

use crate::error::{db, unavailable};
use crate::schema;

/// The most calls committed in one transaction.
const MAX_BATCH: usize = 512;

/// A write queued for the next batch.
trait Job: Send {
    /// Runs its statements and keeps their answer; whether they succeeded. Given `Err`, it
    /// does not run: its answer is that error. It may run again after its transaction was
    /// rolled back (its statements are a function of the database, nothing else).
    fn run(&mut self, conn: Result<&Connection, &str>) -> bool;

    /// Hands its answer to its caller once its transaction committed (`None`) or failed
    /// to (the commit's error).
    fn finish(self: Box<Self>, commit_error: Option<&str>);
}

/// The [`Job`] of [`Connections::write`]: `f`, its last answer, and where it goes.
struct Write<T, F> {
    f: F,
    answer: Option<Result<T, StoreError>>,
    to: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Write<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: Result<&Connection, &str>) -> bool {
        let answer = match conn {
            Ok(conn) => (self.f)(conn),
            Err(msg) => Err(unavailable(msg)),
        };
        let ok = answer.is_ok();
        self.answer = Some(answer);
        ok
    }

    fn finish(self: Box<Self>, commit_error: Option<&str>) {
        let answer = match (self.answer, commit_error) {
            (Some(Ok(v)), None) => Ok(v),
            (Some(Ok(_)), Some(e)) => Err(StoreError::unavailable(format!("commit failed: {e}"))),
            (Some(Err(e)), _) => Err(e),
            (None, _) => Err(unavailable("a write did not run")),
        };
        let _ = self.to.send(answer);
    }
}

/// How long a connection waits for another's lock before it reports SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections kept for reuse (one per worker thread reading at once suffices).
const READ_POOL: usize = 8;

/// The connections to one database file.
pub(crate) struct Connections {
    path: PathBuf,
    /// The write connection. Whoever holds it commits every queued job in one
    /// transaction (group commit): alone, a caller commits its own job on its own thread;
    /// under load, one fsync covers everything that queued up meanwhile.
    writer: tokio::sync::Mutex<Connection>,
    queue: Mutex<Vec<Box<dyn Job>>>,
    /// Read-only connections, idle. Beside the writer: reads never wait for a commit's
    /// fsync (WAL readers and the writer do not block each other).
    readers: Mutex<Vec<Connection>>,
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unavailable)?;
    // FULL: each commit is fsynced before it is acknowledged (NORMAL in WAL mode may lose
    // the last commits on power loss).
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    // Each write runs in a savepoint, which keeps the original of every page it changes
    // in a statement journal for its rollback. On disk, past a few pages, that is a write
    // call per page per savepoint; in memory it is a copy. It only ever undoes a
    // savepoint of the open transaction, so the database's durability does not rest on it.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(unavailable)?;
    Ok(conn)
}

impl Connections {
    /// Opens (creating if needed) the database at `path` in WAL mode, and migrates its
    /// schema.
    pub(crate) fn open(path: &Path) -> Result<Connections, StoreError> {
        let path = path.to_path_buf();
        let mut conn = open_connection(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::unavailable(format!(
                "{} cannot use WAL mode (got {mode})",
                path.display()
            )));
        }
        schema::migrate(&mut conn)?;
        Ok(Connections {
            path,
            writer: tokio::sync::Mutex::new(conn),
            queue: Mutex::new(Vec::new()),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread, inside the current batch's transaction; the answer
    /// comes only after that transaction committed. `f` may run more than once (a batch
    /// runs again when one of its writes fails), so it touches nothing but the database.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (to, mut rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Write {
            f,
            answer: None,
            to,
        });
        lock(&self.queue).push(job);
        let conn = self.writer.lock().await;
        // An earlier holder may have committed our job with its batch.
        if let Ok(answer) = rx.try_recv() {
            return answer;
        }
        let jobs = std::mem::take(&mut *lock(&self.queue));
        blocking(|| commit_batch(&conn, jobs));
        drop(conn);
        rx.await.map_err(|_| unavailable("a write was dropped"))?
    }

    /// Runs `f` on a read connection, in one snapshot.
    ///
    /// At once, on this thread: a WAL read waits for no lock the writer holds and reads
    /// a few pages, usually from the page cache or the OS's, which costs less than
    /// handing it to another thread (a cold read from disk stalls this worker meanwhile).
    /// Its connection does not wait for locks (busy timeout 0); when one is held (a
    /// checkpoint resetting the log, a recovery), the read runs again off the async
    /// workers, waiting up to the busy timeout.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(&Connection) -> Result<T, StoreError>,
    {
        let pooled = lock(&self.readers).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let result = match snapshot(&conn, &f) {
            Err(e) if is_busy(&e) => blocking(|| {
                conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
                let result = snapshot(&conn, &f);
                conn.busy_timeout(Duration::ZERO).map_err(db)?;
                result
            }),
            other => other,
        };
        // A connection left inside a transaction (its COMMIT failed) is not reused.
        let mut idle = lock(&self.readers);
        if idle.len() < READ_POOL && conn.is_autocommit() {
            idle.push(conn);
        }
        result
    }

    /// Runs `PRAGMA integrity_check` and returns its verdict (`ok` when sound).
    pub(crate) async fn integrity_check(&self) -> Result<String, StoreError> {
        // It reads the whole file: off the async workers.
        blocking(|| {
            let conn = open_connection(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .map_err(unavailable)
        })
    }
}

/// Runs blocking SQLite work on the current thread, telling a multi-threaded tokio
/// runtime to move its other tasks away meanwhile (no hop to another thread; on a
/// current-thread runtime it simply runs).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A read-only connection to `path` that never waits for a lock (see [`SqliteStore::read`]).
/// Opening it reads nothing: the pragmas a writer sets (`synchronous` reads the schema)
/// mean nothing to a reader.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db)?;
    conn.busy_timeout(Duration::ZERO).map_err(db)?;
    conn.pragma_update(None, "query_only", "ON").map_err(db)?;
    Ok(conn)
}

/// Runs `f` in one snapshot: a session row and its resources' rows are read by separate
/// statements, and a write committed between them must not show half of itself.
fn snapshot<T>(
    conn: &Connection,
    f: &impl Fn(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let run = |sql| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(db)
    };
    run("BEGIN")?;
    let result = f(conn);
    // Ends the snapshot whatever `f` answered (a read-only transaction: nothing to undo);
    // `f`'s own error comes first.
    let commit = run("COMMIT");
    let value = result?;
    commit?;
    Ok(value)
}

/// Whether `e` is SQLite reporting a lock held by another connection.
fn is_busy(e: &StoreError) -> bool {
    let StoreError::Unavailable(source) = e else {
        return false;
    };
    source
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
        .is_some_and(|code| {
            matches!(
                code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
        })
}

/// Commits `jobs` in one transaction, then gives every job its answer. They run one after
/// another with nothing between them; if one fails, the transaction is rolled back and
/// they all run again, each in its own savepoint, so that the failing one undoes only
/// itself. (A savepoint keeps a copy of every page its write changes: most of a small
/// write's cost, for a failure that is rare.)
fn commit_batch(conn: &Connection, jobs: Vec<Box<dyn Job>>) {
    for chunk in chunks(jobs, MAX_BATCH) {
        commit_chunk(conn, chunk);
    }
}

fn chunks(mut jobs: Vec<Box<dyn Job>>, size: usize) -> Vec<Vec<Box<dyn Job>>> {
    let mut out = Vec::new();
    while jobs.len() > size {
        let rest = jobs.split_off(size);
        out.push(jobs);
        jobs = rest;
    }
    out.push(jobs);
    out
}

fn statement(conn: &Connection, sql: &str) -> Result<(), String> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Every job's answer is an error: `msg`, from the transaction around them.
fn fail_all(jobs: Vec<Box<dyn Job>>, msg: &str) {
    for mut job in jobs {
        job.run(Err(msg));
        job.finish(Some(msg));
    }
}

/// Commits `jobs` in one transaction (see [`commit_batch`]).
fn commit_chunk(conn: &Connection, mut jobs: Vec<Box<dyn Job>>) {
    if jobs.is_empty() {
        return;
    }
    if let Err(msg) = statement(conn, "BEGIN IMMEDIATE") {
        return fail_all(jobs, &msg);
    }
    // (A transaction SQLite rolled back on its own counts as a failure: see below.)
    if jobs
        .iter_mut()
        .all(|job| job.run(Ok(conn)) && !conn.is_autocommit())
    {
        return commit(conn, jobs);
    }
    let rolled_back = conn.is_autocommit();
    let _ = statement(conn, "ROLLBACK");
    if jobs.len() == 1 {
        // Alone: its own error is its answer (or, if it succeeded in a transaction the
        // database rolled back, that), and nothing of it was kept.
        for job in jobs {
            job.finish(rolled_back.then_some(ROLLED_BACK));
        }
        return;
    }
    if let Err(msg) = statement(conn, "BEGIN IMMEDIATE") {
        return fail_all(jobs, &msg);
    }
    let mut done = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter();
    while let Some(mut job) = jobs.next() {
        let closed = match statement(conn, "SAVEPOINT job") {
            Err(msg) => {
                job.run(Err(&msg));
                Err(msg)
            }
            Ok(()) if job.run(Ok(conn)) => statement(conn, "RELEASE job"),
            Ok(()) => {
                statement(conn, "ROLLBACK TO job").and_then(|()| statement(conn, "RELEASE job"))
            }
        };
        done.push(job);
        // A savepoint that could not be opened or closed leaves the chunk's writes in no
        // known state; and SQLite may have rolled the whole transaction back (it may, on
        // SQLITE_FULL, IOERR or NOMEM): then what ran in it is gone, and a savepoint now
        // would be a transaction of its own, committed by its RELEASE. Either way the
        // chunk keeps nothing and every write of it is answered with the error.
        let lost = match closed {
            Err(msg) => Some(msg),
            Ok(()) => conn.is_autocommit().then(|| ROLLED_BACK.to_owned()),
        };
        if let Some(msg) = lost {
            let _ = statement(conn, "ROLLBACK");
            for job in done {
                job.finish(Some(&msg));
            }
            return fail_all(jobs.collect(), &msg);
        }
    }
    commit(conn, done);
}

/// The answer of the writes of a chunk whose transaction SQLite rolled back.
const ROLLED_BACK: &str = "the write's transaction was rolled back by the database";

/// Commits the open transaction and gives each job its answer (the commit's error, if
/// it failed).
fn commit(conn: &Connection, jobs: Vec<Box<dyn Job>>) {
    let commit_error = statement(conn, "COMMIT").err();
    if commit_error.is_some() {
        let _ = statement(conn, "ROLLBACK");
    }
    for job in jobs {
        job.finish(commit_error.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test job does after its write.
    #[derive(Clone, Copy)]
    enum Then {
        Succeed,
        /// Rolls the whole transaction back, as SQLite may itself on SQLITE_FULL or
        /// SQLITE_IOERR, and fails.
        RollBackAndFail,
        /// The same, but answers Ok (as a job that swallowed the error would).
        RollBackAndSucceed,
    }

    /// A job writing `value` into table `t`, then doing `then`.
    fn job(value: i64, then: Then) -> (Box<dyn Job>, oneshot::Receiver<Result<(), StoreError>>) {
        let (to, rx) = oneshot::channel();
        let f = move |c: &Connection| {
            c.execute("INSERT INTO t (v) VALUES (?1)", [value])
                .map_err(db)?;
            match then {
                Then::Succeed => Ok(()),
                Then::RollBackAndFail => {
                    c.execute_batch("ROLLBACK").map_err(db)?;
                    Err(unavailable("disk full"))
                }
                Then::RollBackAndSucceed => {
                    c.execute_batch("ROLLBACK").map_err(db)?;
                    Ok(())
                }
            }
        };
        let job: Box<dyn Job> = Box::new(Write {
            f,
            answer: None,
            to,
        });
        (job, rx)
    }

    fn values(c: &Connection) -> Vec<i64> {
        c.prepare("SELECT v FROM t ORDER BY v")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A chunk whose transaction the database rolled back mid-way keeps nothing and
    /// answers every write with an error: no write after it commits on its own while
    /// being answered as failed.
    #[test]
    fn a_chunk_rolled_back_by_the_database_keeps_nothing_and_fails_every_write() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        for chunk in [
            vec![
                job(1, Then::Succeed),
                job(2, Then::RollBackAndFail),
                job(3, Then::Succeed),
            ],
            vec![
                job(1, Then::Succeed),
                job(2, Then::RollBackAndSucceed),
                job(3, Then::Succeed),
            ],
            vec![job(2, Then::RollBackAndSucceed)],
            vec![job(2, Then::RollBackAndFail)],
        ] {
            let (jobs, answers): (Vec<_>, Vec<_>) = chunk.into_iter().unzip();
            commit_batch(&conn, jobs);
            assert!(conn.is_autocommit());
            assert_eq!(values(&conn), Vec::<i64>::new(), "nothing kept");
            for mut answer in answers {
                assert!(answer.try_recv().unwrap().is_err(), "answered as kept");
            }
        }

        // A failing write that leaves the transaction alone undoes only itself.
        let (to, rx) = oneshot::channel();
        let failing: Box<dyn Job> = Box::new(Write {
            f: |c: &Connection| {
                c.execute("INSERT INTO t (v) VALUES (5)", []).map_err(db)?;
                Err::<(), _>(unavailable("refused"))
            },
            answer: None,
            to,
        });
        let (four, mut four_answer) = job(4, Then::Succeed);
        let (six, mut six_answer) = job(6, Then::Succeed);
        commit_batch(&conn, vec![four, failing, six]);
        assert_eq!(values(&conn), [4, 6]);
        assert!(four_answer.try_recv().unwrap().is_ok());
        assert!(six_answer.try_recv().unwrap().is_ok());
        let mut rx = rx;
        assert!(rx.try_recv().unwrap().is_err());
    }
}
