//! (in progress) The PostgreSQL backend.
