//! Evaluation of expressions over one JSON document, with the hub's undefined/null semantics.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

use super::ast::{ArithOp, CompareOp, Expr, Function, Literal, Path};

/// The value of an expression: `None` is `undefined` (a missing property or a meaningless
/// operation, such as comparing a string with a number).
pub type Evaluated<'a> = Option<Cow<'a, Value>>;

/// Finds a property by path, matching each name case-insensitively (an exact match wins).
///
/// Returns the key as spelled in the document (so `SELECT DeviceId` yields `deviceId`) and the value.
pub fn lookup<'a>(doc: &'a Value, path: &Path) -> Option<(&'a str, &'a Value)> {
    let mut current = doc;
    let mut key: &str = "";
    for seg in &path.segments {
        let obj = current.as_object()?;
        let (k, v) = find_key(obj, seg)?;
        key = k;
        current = v;
    }
    Some((key, current))
}

fn find_key<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<(&'a str, &'a Value)> {
    if let Some((k, v)) = obj.get_key_value(name) {
        return Some((k.as_str(), v));
    }
    let found = obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
    let found = match found {
        Some(f) => Some(f),
        None if !name.is_ascii() => {
            let lower = name.to_lowercase();
            obj.iter().find(|(k, _)| k.to_lowercase() == lower)
        }
        None => None,
    };
    found.map(|(k, v)| (k.as_str(), v))
}

/// Whether `expr` is exactly `true` for `doc` (what a WHERE clause requires).
pub fn matches(expr: &Expr, doc: &Value) -> bool {
    matches!(eval(expr, doc).as_deref(), Some(Value::Bool(true)))
}

/// Evaluates an expression against a document.
pub fn eval<'a>(expr: &'a Expr, doc: &'a Value) -> Evaluated<'a> {
    match expr {
        Expr::Literal(l) => literal(l),
        Expr::Path(p) => lookup(doc, p).map(|(_, v)| Cow::Borrowed(v)),
        Expr::Not(e) => match eval(e, doc).as_deref() {
            Some(Value::Bool(b)) => Some(Cow::Owned(Value::Bool(!b))),
            _ => None,
        },
        Expr::And(a, b) => {
            let l = as_bool(eval(a, doc));
            if l == Some(false) {
                return Some(Cow::Owned(Value::Bool(false)));
            }
            match (l, as_bool(eval(b, doc))) {
                (_, Some(false)) => Some(Cow::Owned(Value::Bool(false))),
                (Some(true), Some(true)) => Some(Cow::Owned(Value::Bool(true))),
                _ => None,
            }
        }
        Expr::Or(a, b) => {
            let l = as_bool(eval(a, doc));
            if l == Some(true) {
                return Some(Cow::Owned(Value::Bool(true)));
            }
            match (l, as_bool(eval(b, doc))) {
                (_, Some(true)) => Some(Cow::Owned(Value::Bool(true))),
                (Some(false), Some(false)) => Some(Cow::Owned(Value::Bool(false))),
                _ => None,
            }
        }
        Expr::Compare(op, a, b) => {
            let (l, r) = (eval(a, doc)?, eval(b, doc)?);
            compare(*op, &l, &r).map(|b| Cow::Owned(Value::Bool(b)))
        }
        Expr::Arith(op, a, b) => {
            let (l, r) = (eval(a, doc)?, eval(b, doc)?);
            match (l.as_ref(), r.as_ref()) {
                (Value::Number(x), Value::Number(y)) => {
                    arith(*op, x, y).map(|n| Cow::Owned(Value::Number(n)))
                }
                _ => None,
            }
        }
        Expr::Neg(e) => match eval(e, doc).as_deref() {
            Some(Value::Number(n)) => {
                arith(ArithOp::Sub, &Number::from(0), n).map(|n| Cow::Owned(Value::Number(n)))
            }
            _ => None,
        },
        Expr::In { expr, list, negated } => {
            let v = eval(expr, doc)?;
            if !is_primitive(&v) {
                return None;
            }
            let found = list
                .iter()
                .filter_map(Literal::to_json)
                .any(|c| compare(CompareOp::Eq, &v, &c) == Some(true));
            Some(Cow::Owned(Value::Bool(found != *negated)))
        }
        Expr::Call(f, args) => call(*f, args, doc),
    }
}

fn literal(l: &Literal) -> Evaluated<'_> {
    match l {
        Literal::Undefined => None,
        Literal::Array(_) => l.to_json().map(Cow::Owned),
        Literal::Null => Some(Cow::Owned(Value::Null)),
        Literal::Bool(b) => Some(Cow::Owned(Value::Bool(*b))),
        Literal::Number(n) => Some(Cow::Owned(Value::Number(n.clone()))),
        Literal::String(s) => Some(Cow::Owned(Value::String(s.clone()))),
    }
}

fn as_bool(v: Evaluated<'_>) -> Option<bool> {
    match v.as_deref() {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    }
}

fn is_primitive(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

/// Compares two primitives of the same type; anything else is undefined (`None`).
pub fn compare(op: CompareOp, a: &Value, b: &Value) -> Option<bool> {
    let ord = match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => cmp_numbers(x, y)?,
        // Ordinal: byte order of UTF-8 is code-point order.
        (Value::String(x), Value::String(y)) => x.as_str().cmp(y.as_str()),
        _ => return None,
    };
    Some(match op {
        CompareOp::Eq => ord == Ordering::Equal,
        CompareOp::Ne => ord != Ordering::Equal,
        CompareOp::Lt => ord == Ordering::Less,
        CompareOp::Le => ord != Ordering::Greater,
        CompareOp::Gt => ord == Ordering::Greater,
        CompareOp::Ge => ord != Ordering::Less,
    })
}

fn cmp_numbers(x: &Number, y: &Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return Some(a.cmp(&b));
    }
    x.as_f64()?.partial_cmp(&y.as_f64()?)
}

/// Integer arithmetic while exact, floating point otherwise; undefined for non-finite results.
fn arith(op: ArithOp, x: &Number, y: &Number) -> Option<Number> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        let exact = match op {
            ArithOp::Add => a.checked_add(b),
            ArithOp::Sub => a.checked_sub(b),
            ArithOp::Mul => a.checked_mul(b),
            ArithOp::Div => a.checked_rem(b).filter(|r| *r == 0).and_then(|_| a.checked_div(b)),
            ArithOp::Rem => a.checked_rem(b),
        };
        if let Some(n) = exact {
            return Some(Number::from(n));
        }
        if b == 0 {
            return None;
        }
    }
    let (a, b) = (x.as_f64()?, y.as_f64()?);
    let r = match op {
        ArithOp::Add => a + b,
        ArithOp::Sub => a - b,
        ArithOp::Mul => a * b,
        ArithOp::Div => a / b,
        ArithOp::Rem => a % b,
    };
    Number::from_f64(r)
}

fn call<'a>(f: Function, args: &'a [Expr], doc: &'a Value) -> Evaluated<'a> {
    let arg = |i: usize| args.get(i).and_then(|e| eval(e, doc));
    let test = |pred: fn(&Value) -> bool| Some(Cow::Owned(Value::Bool(arg(0).as_deref().is_some_and(pred))));
    match f {
        Function::IsDefined => Some(Cow::Owned(Value::Bool(arg(0).is_some()))),
        Function::IsNull => test(Value::is_null),
        Function::IsString => test(Value::is_string),
        Function::IsNumber => test(Value::is_number),
        Function::IsBool => test(Value::is_boolean),
        Function::IsObject => test(Value::is_object),
        Function::IsArray => test(Value::is_array),
        Function::IsPrimitive => test(is_primitive),
        Function::StartsWith | Function::EndsWith => match (arg(0).as_deref(), arg(1).as_deref()) {
            (Some(Value::String(s)), Some(Value::String(p))) => {
                let r = if f == Function::StartsWith {
                    s.starts_with(p.as_str())
                } else {
                    s.ends_with(p.as_str())
                };
                Some(Cow::Owned(Value::Bool(r)))
            }
            _ => None,
        },
        Function::ArrayContains => {
            let partial = match args.get(2) {
                None => false,
                Some(e) => match eval(e, doc).as_deref() {
                    Some(Value::Bool(b)) => *b,
                    _ => return None,
                },
            };
            let haystack = arg(0)?;
            let needle = arg(1)?;
            let Value::Array(items) = haystack.as_ref() else { return None };
            let found =
                items.iter().any(
                    |item| {
                        if partial {
                            json_subset(&needle, item)
                        } else {
                            json_eq(item, &needle)
                        }
                    },
                );
            Some(Cow::Owned(Value::Bool(found)))
        }
    }
}

/// Deep equality where numbers compare by value (`1` equals `1.0`).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => cmp_numbers(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// `ARRAY_CONTAINS(.., .., true)`: every property of the needle object appears in the item.
fn json_subset(needle: &Value, item: &Value) -> bool {
    match (needle, item) {
        (Value::Object(n), Value::Object(i)) => {
            n.iter().all(|(k, v)| i.get(k).is_some_and(|w| json_subset(v, w)))
        }
        _ => json_eq(needle, item),
    }
}
