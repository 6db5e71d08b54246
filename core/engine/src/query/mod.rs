//! The IoT Hub query language (`POST /devices/query`): parser, evaluator and paged execution.
//!
//! [`parse`] turns query text into a [`Query`] whose WHERE clause is a public [`Expr`] tree (so a
//! SQL backend can push simple clauses down); [`execute`] runs it over any [`QuerySource`] one
//! page at a time. Property names match case-insensitively, values case-sensitively, and a
//! missing property is `undefined`: every comparison with it is not true (spec §9.3).
//!
//! ```
//! use serde_json::json;
//! use zerotouch_engine::query::{execute, parse, VecSource};
//! use zerotouch_engine::store::PageRequest;
//!
//! let fleet = VecSource::with_devices(vec![
//!     json!({"deviceId": "a", "tags": {"region": "US"}}),
//!     json!({"deviceId": "b", "tags": {"region": "EU"}}),
//! ]);
//! let query = parse("SELECT DeviceId FROM devices WHERE tags.Region = 'US'")?;
//! let page = execute(&query, &fleet, &PageRequest::default())?;
//! assert_eq!(page.items, vec![json!({"deviceId": "a"})]);
//! assert_eq!(page.item_type.as_str(), "raw");
//! assert_eq!(page.continuation, None);
//! # Ok::<(), zerotouch_engine::Error>(())
//! ```

mod ast;
mod eval;
mod exec;
mod index;
mod lexer;
mod parser;

pub use ast::{
    Aggregate, ArithOp, Collection, CompareOp, Expr, Function, ItemType, Literal, Path, Projection, Query,
    Select, SelectItem,
};
pub use eval::{compare, eval, json_eq, lookup, matches, Evaluated};
pub use exec::{execute, execute_shared, QueryPage, QuerySource, SourceDoc, VecSource, MAX_PAGE_SIZE};
pub use index::IndexedSource;
pub use parser::{parse, parse_condition, ParseError, MAX_QUERY_LEN};

/// The error of a continuation token the source did not issue (or issued for another query):
/// `ArgumentInvalid` (400004), the token being client input. For [`QuerySource`]s outside this
/// crate (the SQL push-down of the stores) to answer alike.
pub fn bad_continuation(message: &str) -> crate::Error {
    crate::registry::hub_error(zerotouch_proto::hub::HubErrorCode::ArgumentInvalid, message)
}
