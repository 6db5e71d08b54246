//! Durable stores behind the engine's store traits: SQLite (embedded default) and PostgreSQL.

pub mod codec;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod pushdown;

pub use zerotouch_engine::StoreError;
