//! Recognising the WHERE conjuncts both SQL backends push down (the engine re-checks every row).

use zerotouch_engine::query::{CompareOp, Expr, Literal, Path};

/// `path = 'constant'`, `'constant' = path` or `path IN ['a', 'b']`: the path and constants.
pub(crate) fn string_test(expr: &Expr) -> Option<(&Path, Vec<&str>)> {
    match expr {
        Expr::Compare(CompareOp::Eq, a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Path(p), Expr::Literal(Literal::String(s)))
            | (Expr::Literal(Literal::String(s)), Expr::Path(p)) => Some((p, vec![s.as_str()])),
            _ => None,
        },
        Expr::In { expr, list, negated: false } => {
            let Expr::Path(p) = expr.as_ref() else { return None };
            let values = list
                .iter()
                .map(|l| match l {
                    Literal::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            (!values.is_empty()).then_some((p, values))
        }
        _ => None,
    }
}

/// Paths below `properties.desired` / `properties.reported` outside the `$` bookkeeping, whose
/// values the document copies verbatim from the stored twin.
pub(crate) fn verbatim_property_path(path: &Path) -> bool {
    let s = &path.segments;
    let is = |i: usize, name: &str| s.get(i).is_some_and(|x| x.eq_ignore_ascii_case(name));
    is(0, "properties") && (is(1, "desired") || is(1, "reported")) && s.len() >= 3 && !s[2].starts_with('$')
}

/// Paths whose values a twin document copies verbatim from the stored twin: below `tags`, or a
/// [`verbatim_property_path`].
#[cfg(feature = "sqlite")]
pub(crate) fn verbatim_twin_path(path: &Path) -> bool {
    let s = &path.segments;
    (s.first().is_some_and(|x| x.eq_ignore_ascii_case("tags")) && s.len() >= 2)
        || verbatim_property_path(path)
}
