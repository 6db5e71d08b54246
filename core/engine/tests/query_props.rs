//! The query parser never panics, whatever it is fed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::json;
use zerotouch_engine::query::{execute, parse, parse_condition, VecSource};
use zerotouch_engine::store::PageRequest;

const TOKENS: &[&str] = &[
    "SELECT",
    "select",
    "TOP",
    "5",
    "-1",
    "0x1F",
    "0x",
    "1.5e3",
    "1e",
    "*",
    ",",
    ".",
    "(",
    ")",
    "[",
    "]",
    "[[",
    "]]",
    "FROM",
    "devices",
    "devices.modules",
    "devices.jobs",
    "WHERE",
    "GROUP",
    "BY",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "=",
    "!=",
    "<>",
    "<",
    ">",
    "<=",
    ">=",
    "+",
    "-",
    "/",
    "%",
    "'str'",
    "\"dq\"",
    "'",
    "\"",
    "'\\u12'",
    "'\\x'",
    "true",
    "false",
    "null",
    "undefined",
    "COUNT()",
    "COUNT",
    "SUM",
    "AVG",
    "MIN",
    "MAX",
    "IS_DEFINED",
    "STARTSWITH",
    "ENDSWITH",
    "ARRAY_CONTAINS",
    "IS_NULL",
    "deviceId",
    "tags",
    "properties.reported.x",
    "[[group]]",
    "$metadata",
    "é",
    "\n",
    " ",
    "\t",
    "&&",
    "||",
];

fn fleet() -> VecSource {
    VecSource::with_devices(vec![
        json!({"deviceId": "a", "tags": {"x": 1, "group": "g"}, "properties": {"reported": {"x": [1, 2]}}}),
        json!({"deviceId": "b", "tags": {"x": "1"}, "properties": {"reported": {"x": null}}}),
        json!({"deviceId": "c"}),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_survives_arbitrary_text(text in any::<String>()) {
        let _ = parse(&text);
        let _ = parse_condition(&text);
    }

    #[test]
    fn parser_survives_token_soups(tokens in proptest::collection::vec(proptest::sample::select(TOKENS), 0..40)) {
        let text = tokens.join(" ");
        let _ = parse(&text);
        let glued = tokens.concat();
        let _ = parse(&glued);
    }

    #[test]
    fn queries_that_parse_also_run(tokens in proptest::collection::vec(proptest::sample::select(TOKENS), 0..30)) {
        let text = format!("SELECT * FROM devices WHERE {}", tokens.join(" "));
        if let Ok(q) = parse(&text) {
            let page = execute(&q, &fleet(), &PageRequest { continuation: None, max_items: 2 }).unwrap();
            prop_assert!(page.items.len() <= 2);
        }
    }

    #[test]
    fn error_positions_lie_inside_the_query(text in "[ -~\n]{0,80}") {
        if let Err(e) = parse(&text) {
            prop_assert!(e.offset <= text.len());
            prop_assert!(e.line >= 1 && e.column >= 1);
            prop_assert!(!e.message.is_empty());
        }
    }
}
