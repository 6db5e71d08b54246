//! Atomic units over PostgreSQL: the per-thread ambient transaction behind
//! [`zerotouch_engine::store::RegistrationStore::atomically`].
//!
//! While a unit runs, its thread holds one pooled connection with an open transaction in a
//! thread-local slot keyed by the pool. Every [`super::PgStore`] call on that thread through a
//! store sharing the pool (clones and hub views) borrows that connection instead of taking one
//! from the pool, so the unit's writes commit or roll back together and its reads see them.
//! A call borrows the connection out of the slot and puts it back when done, so a re-entrant
//! borrow fails cleanly rather than aliasing the connection.
//!
//! Units are per thread on purpose: a store call made on another thread while a unit runs
//! takes its own connection, outside the unit, and may wait on row locks the unit holds.
//!
//! A transaction that PostgreSQL cancels because it conflicts with concurrent ones — a deadlock
//! (SQLSTATE 40P01) or a serialization failure (40001, routine under `serializable` isolation
//! and on CockroachDB) — did nothing wrong and succeeds when run again. Every failed statement
//! notes such a conflict on its thread ([`note_conflict`]); an outermost unit, or a transaction
//! of its own ([`super::PgStore::transaction`]), that fails after one rolls back and runs again
//! ([`retrying`]), [`ATTEMPTS`] times in all, and then fails with [`StoreError::Conflict`]
//! naming the conflict.

use std::cell::RefCell;
use std::hash::{BuildHasher, RandomState};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::Client;
use zerotouch_engine::{Error, StoreError};

use super::Conn;

/// Identity of a pool: every [`super::PgStore::connect`] draws a new one.
pub(super) fn next_pool_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The open unit of one pool on this thread.
struct Slot {
    pool: u64,
    /// `None` while a store call has it borrowed.
    conn: Option<Conn>,
    /// Nested units open on this slot (each is a savepoint).
    depth: u32,
}

thread_local! {
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
    /// The last conflict with a concurrent transaction a statement on this thread failed with
    /// (SQLSTATE and message), since the innermost [`retrying`] began.
    static CONFLICT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// How many times a unit or a transaction of its own runs at most while each attempt conflicts
/// with concurrent transactions.
const ATTEMPTS: u32 = 3;

/// The pause before attempt `next` (2, 3, ..): 10 ms, then 20 ms, each plus up to as much
/// again at random, so the transactions that conflicted do not meet again in step.
fn backoff(next: u32) -> Duration {
    let base = Duration::from_millis(10) * 2u32.saturating_pow(next.saturating_sub(2));
    // A fresh `RandomState` is seeded differently on every call: enough randomness for jitter.
    let jitter = RandomState::new().hash_one(std::thread::current().id()) % 1000;
    base + base * u32::try_from(jitter).unwrap_or(0) / 1000
}

/// Notes `e` on this thread when it is a conflict with a concurrent transaction, for the
/// innermost [`retrying`] to run its attempt again.
pub(super) fn note_conflict(e: &postgres::Error) {
    if retryable(e) {
        let cause = super::describe(e);
        CONFLICT.with(|c| *c.borrow_mut() = Some(cause));
    }
}

/// Runs `attempt` until it succeeds, fails without a conflict having been noted on this thread
/// during it ([`note_conflict`]), or has run [`ATTEMPTS`] times, pausing a little between
/// attempts. Each attempt must begin and end its own transaction: one that PostgreSQL
/// cancelled is rolled back whole, and running it again is what resolves the conflict.
///
/// The error of the last attempt is returned as it is, unless that attempt conflicted: then the
/// error is [`StoreError::Conflict`] naming the conflict (SQLSTATE and message), whatever the
/// attempt's own code made of it (inside a unit a conflict reads as
/// [`StoreError::PreconditionFailed`]: see `super::backend`), because no etag was at fault:
/// the caller may try again later (a device is told so with 429 and `retry-after`).
/// Conflicts noted before are kept for the enclosing `retrying`, if any.
pub(super) fn retrying<R, E: From<StoreError>>(mut attempt: impl FnMut() -> Result<R, E>) -> Result<R, E> {
    let outer = CONFLICT.with(|c| c.borrow_mut().take());
    let mut attempts = 1;
    let result = loop {
        let result = attempt();
        let conflict = CONFLICT.with(|c| c.borrow_mut().take());
        match (result, conflict) {
            (Err(_), Some(cause)) if attempts < ATTEMPTS => {
                tracing::debug!(attempts, "PostgreSQL: a transaction conflicted and runs again: {cause}");
                std::thread::sleep(backoff(attempts + 1));
                attempts += 1;
            }
            (Err(_), Some(cause)) => {
                tracing::debug!(attempts, "PostgreSQL: a transaction conflicted in each attempt: {cause}");
                break Err(StoreError::Conflict(format!(
                    "PostgreSQL: the transaction conflicted with concurrent ones in each of its {attempts} \
                     attempts; the last time: {cause}"
                ))
                .into());
            }
            (result, _) => break result,
        }
    };
    CONFLICT.with(|c| *c.borrow_mut() = outer);
    result
}

/// What [`take`] found for a pool on this thread.
// Short-lived on the stack, and the connection moves on into a `Lease` of the same size.
#[allow(clippy::large_enum_variant)]
pub(super) enum Ambient {
    /// No unit is open: use the pool.
    None,
    /// The unit's connection, borrowed until the [`Borrowed`] drops.
    Conn(Borrowed),
    /// A unit is open but its connection is already borrowed (a re-entrant call).
    Busy,
}

/// Borrows the connection of the unit open for `pool` on this thread, if any.
pub(super) fn take(pool: u64) -> Ambient {
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        match slots.iter_mut().rev().find(|s| s.pool == pool) {
            None => Ambient::None,
            Some(slot) => match slot.conn.take() {
                Some(conn) => Ambient::Conn(Borrowed { pool, conn: Some(conn) }),
                None => Ambient::Busy,
            },
        }
    })
}

/// Whether any unit is open on this thread (errors then map to what a unit's caller retries).
pub(super) fn active() -> bool {
    SLOTS.with(|slots| !slots.borrow().is_empty())
}

/// Whether a unit is open for `pool` on this thread.
pub(super) fn is_open(pool: u64) -> bool {
    depth(pool).is_some()
}

/// Nesting depth of the unit open for `pool` on this thread (`None` when none is open).
fn depth(pool: u64) -> Option<u32> {
    SLOTS.with(|slots| slots.borrow().iter().rev().find(|s| s.pool == pool).map(|s| s.depth))
}

fn set_depth(pool: u64, depth: u32) {
    SLOTS.with(|slots| {
        if let Some(slot) = slots.borrow_mut().iter_mut().rev().find(|s| s.pool == pool) {
            slot.depth = depth;
        }
    });
}

/// The unit's connection lent to one store call; returned to the slot on drop.
pub(super) struct Borrowed {
    pool: u64,
    conn: Option<Conn>,
}

impl Deref for Borrowed {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Always `Some` until drop.
        self.conn.as_deref().unwrap_or_else(|| unreachable!("a borrowed unit connection is held until drop"))
    }
}

impl DerefMut for Borrowed {
    fn deref_mut(&mut self) -> &mut Client {
        self.conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("a borrowed unit connection is held until drop"))
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        let conn = self.conn.take();
        SLOTS.with(|slots| {
            if let Some(slot) = slots.borrow_mut().iter_mut().rev().find(|s| s.pool == self.pool) {
                slot.conn = conn;
            }
        });
    }
}

/// The open outermost unit: pops its slot on drop and rolls back unless committed, so a panic
/// inside the unit neither leaks the slot nor returns a connection mid-transaction to the pool.
struct Open {
    pool: u64,
    finished: bool,
}

impl Open {
    fn enter(pool: u64, conn: Conn) -> Self {
        SLOTS.with(|slots| slots.borrow_mut().push(Slot { pool, conn: Some(conn), depth: 0 }));
        Open { pool, finished: false }
    }

    /// Pops the slot and hands its connection back.
    fn leave(&mut self) -> Option<Conn> {
        self.finished = true;
        SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            let at = slots.iter().rposition(|s| s.pool == self.pool)?;
            slots.remove(at).conn
        })
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(mut conn) = self.leave() {
                // Best effort while unwinding: a connection that cannot roll back is broken,
                // and the pool discards closed connections.
                let _ = conn.batch_execute("ROLLBACK");
            }
        }
    }
}

/// Runs `unit` as one transaction on a connection of `pool_key`'s pool, or as a savepoint of
/// the unit already open for that pool on this thread. An outermost unit that conflicts with
/// concurrent transactions runs again ([`retrying`]); a nested one fails, and its outermost
/// unit runs again.
pub(super) fn run(
    pool_key: u64,
    connect: impl Fn() -> Result<Conn, StoreError>,
    unit: &mut dyn FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    if let Some(depth) = depth(pool_key) {
        return nested(pool_key, depth, unit);
    }
    retrying(|| run_once(pool_key, &connect, unit))
}

/// One attempt of an outermost unit.
fn run_once(
    pool_key: u64,
    connect: &impl Fn() -> Result<Conn, StoreError>,
    unit: &mut dyn FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    let mut conn = connect()?;
    conn.batch_execute("BEGIN").map_err(super::backend)?;
    let mut open = Open::enter(pool_key, conn);
    let result = unit();
    let Some(mut conn) = open.leave() else {
        return Err(StoreError::Backend("the unit's PostgreSQL connection went missing".to_owned()).into());
    };
    if let Err(e) = result {
        // A connection that cannot roll back is closed, and the pool discards it.
        let _ = conn.batch_execute("ROLLBACK");
        return Err(e);
    }
    // COMMIT of a transaction a failed statement aborted would roll back without an error;
    // the SELECT fails first in that case (and the COMMIT is skipped).
    match conn.batch_execute("SELECT 1; COMMIT") {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = conn.batch_execute("ROLLBACK");
            Err(commit_error(&e).into())
        }
    }
}

fn nested(pool_key: u64, depth: u32, unit: &mut dyn FnMut() -> Result<(), Error>) -> Result<(), Error> {
    let savepoint = format!("zt_unit_{depth}");
    on_unit_conn(pool_key, &format!("SAVEPOINT {savepoint}"))?;
    set_depth(pool_key, depth + 1);
    let result = unit();
    set_depth(pool_key, depth);
    match result {
        Ok(()) => on_unit_conn(pool_key, &format!("RELEASE SAVEPOINT {savepoint}")).map_err(Error::from),
        Err(e) => {
            on_unit_conn(
                pool_key,
                &format!("ROLLBACK TO SAVEPOINT {savepoint}; RELEASE SAVEPOINT {savepoint}"),
            )?;
            Err(e)
        }
    }
}

fn on_unit_conn(pool_key: u64, sql: &str) -> Result<(), StoreError> {
    match take(pool_key) {
        Ambient::Conn(mut conn) => conn.batch_execute(sql).map_err(super::backend),
        Ambient::None | Ambient::Busy => {
            Err(StoreError::Backend("the unit's PostgreSQL connection is not available".to_owned()))
        }
    }
}

/// Whether an error is a conflict with a concurrent transaction that a retry resolves.
pub(super) fn retryable(e: &postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// A failed COMMIT (a conflict is noted, and the unit runs again: see [`retrying`]).
fn commit_error(e: &postgres::Error) -> StoreError {
    note_conflict(e);
    if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
        StoreError::Backend(
            "PostgreSQL: a statement of the unit failed, so the unit was rolled back".to_owned(),
        )
    } else {
        StoreError::Backend(format!("PostgreSQL: cannot commit: {}", super::describe(e)))
    }
}
