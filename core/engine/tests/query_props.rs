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

/// Text of a valid condition, built from the grammar so that most cases parse.
fn condition() -> impl Strategy<Value = String> {
    let path = proptest::sample::select(vec![
        "deviceId",
        "tags.x",
        "TAGS.X",
        "properties.reported.x",
        "devices.tags.group",
        "tags.[[group]]",
        "[[group]].y",
        "devices.devices.x",
        "version",
        "$metadata.$version",
    ])
    .prop_map(str::to_owned);
    let constant = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
        "[a-z' \\\\\u{e9}]{0,6}".prop_map(|s| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))),
        proptest::sample::select(vec!["true", "false", "null", "undefined", "0x1f", "'\\u0041'"])
            .prop_map(str::to_owned),
    ];
    let leaf = prop_oneof![path.clone(), constant.clone()];
    leaf.prop_recursive(4, 24, 3, move |inner| {
        let list =
            proptest::collection::vec(constant.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", ")));
        prop_oneof![
            (
                inner.clone(),
                proptest::sample::select(vec![
                    "=", "!=", "<>", "<", "<=", ">", ">=", "+", "-", "*", "/", "%", "AND", "or"
                ]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            inner.clone().prop_map(|a| format!("(NOT {a})")),
            inner.clone().prop_map(|a| format!("-{a}")),
            inner.clone().prop_map(|a| format!("({a})")),
            (inner.clone(), proptest::sample::select(vec!["IN", "NIN", "NOT IN"]), list)
                .prop_map(|(a, op, l)| format!("({a} {op} {l})")),
            (
                proptest::sample::select(vec![
                    "IS_DEFINED",
                    "is_null",
                    "IS_STRING",
                    "IS_NUMBER",
                    "IS_BOOL",
                    "IS_OBJECT",
                    "IS_ARRAY",
                    "IS_PRIMITIVE"
                ]),
                inner.clone()
            )
                .prop_map(|(f, a)| format!("{f}({a})")),
            (
                proptest::sample::select(vec!["STARTSWITH", "endswith", "ARRAY_CONTAINS"]),
                inner.clone(),
                inner
            )
                .prop_map(|(f, a, b)| format!("{f}({a}, {b})")),
        ]
    })
}

fn query_text() -> impl Strategy<Value = String> {
    let select = proptest::sample::select(vec![
        "*",
        "deviceId",
        "deviceId AS id, tags.x",
        "COUNT() AS n",
        "tags.x, COUNT(), SUM(properties.reported.x) AS s",
        "tags.x + 1, [[group]] AS [[select]]",
    ]);
    let from = proptest::sample::select(vec!["devices", "devices.modules", "devices.jobs"]);
    (proptest::option::of(0u32..5), select, from, proptest::option::of(condition())).prop_map(
        |(top, sel, from, cond)| {
            let top = top.map(|t| format!("TOP {t} ")).unwrap_or_default();
            let group = if sel.starts_with("tags.x, COUNT") { " GROUP BY tags.x" } else { "" };
            let cond = cond.map(|c| format!(" WHERE {c}")).unwrap_or_default();
            format!("SELECT {top}{sel} FROM {from}{cond}{group}")
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn printed_queries_parse_back_to_the_same_tree(text in query_text()) {
        if let Ok(q) = parse(&text) {
            let printed = q.to_string();
            let again = parse(&printed).map_err(|e| TestCaseError::fail(format!("{printed}: {e}")))?;
            prop_assert_eq!(again, q, "{}", printed);
        }
    }

    #[test]
    fn generated_conditions_parse_and_split_the_fleet(cond in condition()) {
        let e = parse_condition(&cond).map_err(|e| TestCaseError::fail(format!("{cond}: {e}")))?;
        prop_assert_eq!(parse_condition(&e.to_string()).unwrap(), e.clone());
        let src = fleet();
        for doc in &src.devices {
            let yes = zerotouch_engine::query::matches(&e, doc);
            let no = zerotouch_engine::query::matches(&zerotouch_engine::query::Expr::Not(Box::new(e.clone())), doc);
            prop_assert!(!(yes && no), "{} both true and false", cond);
        }
    }

    #[test]
    fn pages_of_one_concatenate_to_the_whole_result(text in query_text()) {
        let Ok(q) = parse(&text) else { return Ok(()) };
        let src = VecSource { devices: fleet().devices, modules: fleet().devices, jobs: fleet().devices };
        let whole = execute(&q, &src, &PageRequest { continuation: None, max_items: 1000 }).unwrap();
        prop_assert_eq!(whole.continuation, None);
        let mut items = Vec::new();
        let mut token = None;
        loop {
            let p = execute(&q, &src, &PageRequest { continuation: token, max_items: 1 }).unwrap();
            prop_assert!(p.items.len() <= 1);
            prop_assert!(p.continuation.is_none() || !p.items.is_empty());
            items.extend(p.items);
            match p.continuation {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        prop_assert_eq!(items, whole.items);
    }
}
