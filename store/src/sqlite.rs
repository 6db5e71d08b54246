//! (in progress) The SQLite backend.
