//! Durable stores behind the engine's store traits: SQLite (embedded default) and PostgreSQL.

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
