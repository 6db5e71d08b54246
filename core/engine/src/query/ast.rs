//! The parsed form of a query, public so a SQL backend can translate simple WHERE clauses.

use std::fmt;

use serde_json::{Number, Value};

/// The collection a query reads (`FROM ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    /// `devices`: device twins with their registry fields.
    Devices,
    /// `devices.modules`: module twins.
    Modules,
    /// `devices.jobs`: per-device job records (spec §8.4).
    Jobs,
}

impl Collection {
    /// The collection as written in a query.
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Devices => "devices",
            Collection::Modules => "devices.modules",
            Collection::Jobs => "devices.jobs",
        }
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A property path such as `properties.reported.batteryLevel`.
///
/// Segments are kept as written; lookups compare them case-insensitively. Any collection prefix
/// (`devices.`, `devices.jobs.`, `devices.modules.`) has been removed by the parser.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    /// The names, outermost first; never empty.
    pub segments: Vec<String>,
}

impl Path {
    /// Whether two paths name the same property (names compare case-insensitively).
    pub fn same_property(&self, other: &Path) -> bool {
        self.segments.len() == other.segments.len()
            && self.segments.iter().zip(&other.segments).all(|(a, b)| a.eq_ignore_ascii_case(b))
    }
}

/// Words that cannot start a path unescaped.
const KEYWORDS: [&str; 16] = [
    "SELECT",
    "TOP",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "TRUE",
    "FALSE",
    "NULL",
    "UNDEFINED",
];

pub(crate) fn is_keyword(s: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(s))
}

fn is_plain_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

fn write_name(f: &mut fmt::Formatter<'_>, name: &str, first: bool) -> fmt::Result {
    if is_plain_name(name) && !(first && is_keyword(name)) {
        f.write_str(name)
    } else {
        write!(f, "[[{name}]]")
    }
}

impl Path {
    /// Writes the path so that parsing it in a query over `collection` gives it back: a path that
    /// itself starts with `devices` gets the collection prefix the parser strips.
    fn write_in(&self, f: &mut fmt::Formatter<'_>, collection: Collection) -> fmt::Result {
        if self.segments.first().is_some_and(|s| s.eq_ignore_ascii_case("devices")) {
            write!(f, "{collection}.")?;
        }
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write_name(f, s, i == 0)?;
        }
        Ok(())
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_in(f, Collection::Devices)
    }
}

/// A constant written in the query.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `undefined`: the value of a missing property.
    Undefined,
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A decimal or `0x` hexadecimal number.
    Number(Number),
    /// A single- or double-quoted string, escapes resolved.
    String(String),
    /// `[c1, c2, ...]` of constants.
    Array(Vec<Literal>),
}

impl Literal {
    /// The JSON value of the constant; `None` for `undefined` (arrays drop undefined members).
    pub fn to_json(&self) -> Option<Value> {
        match self {
            Literal::Undefined => None,
            Literal::Null => Some(Value::Null),
            Literal::Bool(b) => Some(Value::Bool(*b)),
            Literal::Number(n) => Some(Value::Number(n.clone())),
            Literal::String(s) => Some(Value::String(s.clone())),
            Literal::Array(items) => Some(Value::Array(items.iter().filter_map(Literal::to_json).collect())),
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Undefined => f.write_str("undefined"),
            Literal::Null => f.write_str("null"),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Number(n) => write!(f, "{n}"),
            Literal::String(s) => {
                f.write_str("'")?;
                for c in s.chars() {
                    match c {
                        '\'' => f.write_str("\\'")?,
                        '\\' => f.write_str("\\\\")?,
                        c if c.is_control() => write!(f, "\\u{:04x}", u32::from(c))?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("'")
            }
            Literal::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// Arithmetic operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Rem,
}

/// Built-in scalar functions (names are case-insensitive in queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    /// `IS_DEFINED(x)`: the property exists (even with value `null`).
    IsDefined,
    /// `IS_NULL(x)`
    IsNull,
    /// `IS_STRING(x)`
    IsString,
    /// `IS_NUMBER(x)`
    IsNumber,
    /// `IS_BOOL(x)`
    IsBool,
    /// `IS_OBJECT(x)`
    IsObject,
    /// `IS_ARRAY(x)`
    IsArray,
    /// `IS_PRIMITIVE(x)`: string, number, boolean or null.
    IsPrimitive,
    /// `STARTSWITH(s, prefix)`: ordinal, case-sensitive.
    StartsWith,
    /// `ENDSWITH(s, suffix)`: ordinal, case-sensitive.
    EndsWith,
    /// `ARRAY_CONTAINS(array, value [, partial])`: `partial = true` matches objects by subset.
    ArrayContains,
}

impl Function {
    /// Every function with its canonical name.
    pub const ALL: [(Function, &'static str); 11] = [
        (Function::IsDefined, "IS_DEFINED"),
        (Function::IsNull, "IS_NULL"),
        (Function::IsString, "IS_STRING"),
        (Function::IsNumber, "IS_NUMBER"),
        (Function::IsBool, "IS_BOOL"),
        (Function::IsObject, "IS_OBJECT"),
        (Function::IsArray, "IS_ARRAY"),
        (Function::IsPrimitive, "IS_PRIMITIVE"),
        (Function::StartsWith, "STARTSWITH"),
        (Function::EndsWith, "ENDSWITH"),
        (Function::ArrayContains, "ARRAY_CONTAINS"),
    ];

    /// Looks a function up by name, case-insensitively.
    pub fn from_name(name: &str) -> Option<Function> {
        Self::ALL.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(f, _)| *f)
    }

    /// The canonical (upper-case) name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(f, _)| *f == self).map_or("?", |(_, n)| n)
    }

    /// The accepted number of arguments (inclusive range).
    pub fn arity(self) -> (usize, usize) {
        match self {
            Function::StartsWith | Function::EndsWith => (2, 2),
            Function::ArrayContains => (2, 3),
            _ => (1, 1),
        }
    }
}

/// An expression of a WHERE clause or a projection.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A constant.
    Literal(Literal),
    /// A property of the document.
    Path(Path),
    /// `NOT e`
    Not(Box<Expr>),
    /// `a AND b`
    And(Box<Expr>, Box<Expr>),
    /// `a OR b`
    Or(Box<Expr>, Box<Expr>),
    /// `a <op> b`
    Compare(CompareOp, Box<Expr>, Box<Expr>),
    /// `a <op> b` for `+ - * / %`.
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    /// Unary minus.
    Neg(Box<Expr>),
    /// `e IN [..]` (`negated = false`) or `e NIN [..]` (`negated = true`).
    In {
        /// The tested value.
        expr: Box<Expr>,
        /// The constants it is compared with.
        list: Vec<Literal>,
        /// `NIN` rather than `IN`.
        negated: bool,
    },
    /// A function call.
    Call(Function, Vec<Expr>),
}

impl CompareOp {
    fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }
}

impl ArithOp {
    fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Rem => "%",
        }
    }
}

/// An expression written for a query over a given collection (see [`Path::write_in`]).
struct InCollection<'a, T>(&'a T, Collection);

impl fmt::Display for InCollection<'_, Expr> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_expr(f, self.0, self.1, false)
    }
}

fn additive(op: ArithOp) -> bool {
    matches!(op, ArithOp::Add | ArithOp::Sub)
}

/// Writes `e` parenthesised, except that the left operand of a left-associative chain of one
/// precedence level (`a OR b OR c`, `a + b - c`) is written `bare`, so long chains do not turn
/// into deep parenthesis nesting when printed.
fn write_expr(f: &mut fmt::Formatter<'_>, e: &Expr, c: Collection, bare: bool) -> fmt::Result {
    let (open, close) = if bare { ("", "") } else { ("(", ")") };
    match e {
        Expr::Literal(l) => write!(f, "{l}"),
        Expr::Path(p) => p.write_in(f, c),
        Expr::Not(a) => {
            f.write_str("(NOT ")?;
            write_expr(f, a, c, false)?;
            f.write_str(")")
        }
        Expr::And(a, b) | Expr::Or(a, b) => {
            let and = matches!(e, Expr::And(..));
            let chain = matches!((and, &**a), (true, Expr::And(..)) | (false, Expr::Or(..)));
            f.write_str(open)?;
            write_expr(f, a, c, chain)?;
            f.write_str(if and { " AND " } else { " OR " })?;
            write_expr(f, b, c, false)?;
            f.write_str(close)
        }
        Expr::Compare(op, a, b) => {
            f.write_str("(")?;
            write_expr(f, a, c, false)?;
            write!(f, " {} ", op.symbol())?;
            write_expr(f, b, c, false)?;
            f.write_str(")")
        }
        Expr::Arith(op, a, b) => {
            let chain = matches!(&**a, Expr::Arith(inner, ..) if additive(*inner) == additive(*op));
            f.write_str(open)?;
            write_expr(f, a, c, chain)?;
            write!(f, " {} ", op.symbol())?;
            write_expr(f, b, c, false)?;
            f.write_str(close)
        }
        Expr::Neg(a) => {
            f.write_str("-(")?;
            write_expr(f, a, c, false)?;
            f.write_str(")")
        }
        Expr::In { expr, list, negated } => {
            f.write_str("(")?;
            write_expr(f, expr, c, false)?;
            write!(f, " {} {})", if *negated { "NIN" } else { "IN" }, Literal::Array(list.clone()))
        }
        Expr::Call(func, args) => {
            write!(f, "{}(", func.name())?;
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write_expr(f, a, c, false)?;
            }
            f.write_str(")")
        }
    }
}

/// Parenthesised query text; [`crate::query::parse_condition`] reads it back to the same tree.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        InCollection(self, Collection::Devices).fmt(f)
    }
}

impl Expr {
    /// The operands of the top-level `AND`s (the expression itself when it is not an `AND`).
    ///
    /// A document matches only if every conjunct is true, so a store can use any conjunct it
    /// understands (say `deviceId = 'x'` or `tags.region IN [..]`) to narrow a scan.
    pub fn conjuncts(&self) -> Vec<&Expr> {
        let mut out = Vec::new();
        let mut stack = vec![self];
        while let Some(e) = stack.pop() {
            match e {
                Expr::And(a, b) => {
                    stack.push(b);
                    stack.push(a);
                }
                other => out.push(other),
            }
        }
        out
    }
}

/// Aggregate functions of a select list.
#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    /// `COUNT()`: number of documents (in the group).
    Count,
    /// `SUM(path)` over numeric values.
    Sum(Path),
    /// `AVG(path)` over numeric values.
    Avg(Path),
    /// `MIN(path)` over numeric values.
    Min(Path),
    /// `MAX(path)` over numeric values.
    Max(Path),
}

impl Aggregate {
    /// The function name as written in queries.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregate::Count => "COUNT",
            Aggregate::Sum(_) => "SUM",
            Aggregate::Avg(_) => "AVG",
            Aggregate::Min(_) => "MIN",
            Aggregate::Max(_) => "MAX",
        }
    }

    /// The aggregated property (`None` for `COUNT()`).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Aggregate::Count => None,
            Aggregate::Sum(p) | Aggregate::Avg(p) | Aggregate::Min(p) | Aggregate::Max(p) => Some(p),
        }
    }
}

/// What one select item computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// A scalar expression evaluated per document (or the grouped property).
    Expr(Expr),
    /// An aggregate over the documents of a group.
    Aggregate(Aggregate),
}

/// One item of the select list.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    /// What is computed.
    pub projection: Projection,
    /// `AS alias`, if given.
    pub alias: Option<String>,
}

/// The select list.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// `SELECT *`: whole documents.
    All,
    /// Explicit items; never empty.
    Items(Vec<SelectItem>),
}

/// A parsed query. Build one with [`crate::query::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `TOP n`: maximum number of results over all pages.
    pub top: Option<u64>,
    /// The select list.
    pub select: Select,
    /// The collection read.
    pub from: Collection,
    /// The WHERE condition, if any.
    pub filter: Option<Expr>,
    /// The GROUP BY property, if any.
    pub group_by: Option<Path>,
}

impl Query {
    /// Whether the select list holds an aggregate (so results are computed over all documents).
    pub fn is_aggregate(&self) -> bool {
        self.group_by.is_some()
            || matches!(&self.select, Select::Items(items)
                if items.iter().any(|i| matches!(i.projection, Projection::Aggregate(_))))
    }

    /// The `x-ms-item-type` of the results.
    pub fn item_type(&self) -> ItemType {
        match (&self.select, self.from) {
            (Select::All, Collection::Jobs) => ItemType::DeviceJob,
            (Select::All, _) => ItemType::Twin,
            (Select::Items(_), _) => ItemType::Raw,
        }
    }
}

/// Canonical query text; [`crate::query::parse`] reads it back to the same query.
impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.from;
        f.write_str("SELECT ")?;
        if let Some(n) = self.top {
            write!(f, "TOP {n} ")?;
        }
        match &self.select {
            Select::All => f.write_str("*")?,
            Select::Items(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match &item.projection {
                        Projection::Expr(e) => write!(f, "{}", InCollection(e, c))?,
                        Projection::Aggregate(a) => {
                            write!(f, "{}(", a.name())?;
                            if let Some(p) = a.path() {
                                p.write_in(f, c)?;
                            }
                            f.write_str(")")?;
                        }
                    }
                    if let Some(alias) = &item.alias {
                        f.write_str(" AS ")?;
                        write_name(f, alias, true)?;
                    }
                }
            }
        }
        write!(f, " FROM {c}")?;
        if let Some(e) = &self.filter {
            write!(f, " WHERE {}", InCollection(e, c))?;
        }
        if let Some(g) = &self.group_by {
            f.write_str(" GROUP BY ")?;
            g.write_in(f, c)?;
        }
        Ok(())
    }
}

/// The kind of items a query returns (the `x-ms-item-type` response header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemType {
    /// Whole device or module twins.
    Twin,
    /// Device job records.
    DeviceJob,
    /// Projections and aggregates.
    Raw,
}

impl ItemType {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemType::Twin => "twin",
            ItemType::DeviceJob => "deviceJob",
            ItemType::Raw => "raw",
        }
    }
}
