//! The IoT Hub query language (`POST /devices/query`): parser, evaluator and paged execution.
//!
//! [`parse`] turns query text into a [`Query`] whose WHERE clause is a public [`Expr`] tree (so a
//! SQL backend can push simple clauses down); [`execute`] runs it over any [`QuerySource`] one
//! page at a time. Property names match case-insensitively, values case-sensitively, and a
//! missing property is `undefined`: every comparison with it is not true (spec §9.3).

mod ast;
mod eval;
mod exec;
mod lexer;
mod parser;

pub use ast::{
    Aggregate, ArithOp, Collection, CompareOp, Expr, Function, ItemType, Literal, Path, Projection, Query,
    Select, SelectItem,
};
pub use eval::{compare, eval, json_eq, lookup, matches, Evaluated};
pub use exec::{execute, QueryPage, QuerySource, VecSource, MAX_PAGE_SIZE};
pub use parser::{parse, parse_condition, ParseError, MAX_QUERY_LEN};
