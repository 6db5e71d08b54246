//! Recursive-descent parser for the IoT Hub query dialect.
//!
//! Hand-written because no maintained crate parses this dialect (a Cosmos-SQL subset with
//! `NIN`, `[[escaped]]` names and hub-specific collections), and a general SQL parser would accept
//! a different language and report errors in its own terms rather than the hub's.

use std::fmt;

use super::ast::{
    is_keyword, Aggregate, ArithOp, Collection, CompareOp, Expr, Function, Literal, Path, Projection, Query,
    Select, SelectItem,
};
use super::lexer::{tokenize, Tok};

/// Longest query text the hub accepts (spec §9.1).
pub const MAX_QUERY_LEN: usize = 8192;

/// Deepest nesting of parentheses / `NOT` / unary minus accepted, so hostile input cannot
/// exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Highest expression tree accepted (operators included), for the same reason.
const MAX_TREE_DEPTH: usize = 256;

/// Why a query did not parse, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset of the offending token in the query text.
    pub offset: usize,
    /// 1-based line of the offending token.
    pub line: usize,
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
    /// What was expected and what was found.
    pub message: String,
}

impl ParseError {
    pub(crate) fn at(src: &str, offset: usize, message: String) -> Self {
        let offset = offset.min(src.len());
        let mut line = 1;
        let mut column = 1;
        for (i, c) in src.char_indices() {
            if i >= offset {
                break;
            }
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        ParseError { offset, line, column, message }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (line {}, column {})", self.message, self.line, self.column)
    }
}

impl std::error::Error for ParseError {}

impl From<ParseError> for crate::error::Error {
    fn from(e: ParseError) -> Self {
        crate::registry::hub_error(
            zerotouch_proto::hub::HubErrorCode::IotHubFormatError,
            format!("The query is invalid: {e}"),
        )
    }
}

/// Parses a whole query (`SELECT ... FROM ... [WHERE ...] [GROUP BY ...]`).
///
/// # Errors
/// A [`ParseError`] with the position of the first problem.
pub fn parse(text: &str) -> Result<Query, ParseError> {
    let mut p = Parser::new(text)?;
    let q = p.query()?;
    p.expect_eof()?;
    Ok(q)
}

/// Parses a bare condition, as in a job's `queryCondition` (`deviceId IN ['a','b']`).
///
/// # Errors
/// A [`ParseError`] with the position of the first problem.
pub fn parse_condition(text: &str) -> Result<Expr, ParseError> {
    let mut p = Parser::new(text)?;
    let mut e = p.expr()?;
    p.expect_eof()?;
    visit_paths(&mut e, &|path: &mut Path| strip_path(path, &["devices"]));
    Ok(e)
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Result<Self, ParseError> {
        if src.len() > MAX_QUERY_LEN {
            return Err(ParseError::at(
                src,
                MAX_QUERY_LEN,
                format!("the query is {} bytes long; at most {MAX_QUERY_LEN} are allowed", src.len()),
            ));
        }
        Ok(Parser { src, toks: tokenize(src)?, pos: 0, depth: 0 })
    }

    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).map_or(&Tok::Eof, |(t, _)| t)
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        self.toks.get(self.pos + ahead).map_or(&Tok::Eof, |(t, _)| t)
    }

    fn offset(&self) -> usize {
        self.toks.get(self.pos).map_or(self.src.len(), |(_, o)| *o)
    }

    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error(&self, expected: &str) -> ParseError {
        ParseError::at(
            self.src,
            self.offset(),
            format!("expected {expected}, found {}", self.peek().describe()),
        )
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str, expected: &str) -> Result<(), ParseError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn is_sym(&self, sym: &str) -> bool {
        matches!(self.peek(), Tok::Sym(s) if *s == sym)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if self.is_sym(sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: &str, expected: &str) -> Result<(), ParseError> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn expect_eof(&self) -> Result<(), ParseError> {
        if matches!(self.peek(), Tok::Eof) {
            Ok(())
        } else {
            Err(self.error("the end of the query (or AND / OR / an operator)"))
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ParseError::at(
                self.src,
                self.offset(),
                format!("expression nested too deeply (more than {MAX_DEPTH} levels)"),
            ));
        }
        Ok(())
    }

    fn query(&mut self) -> Result<Query, ParseError> {
        self.expect_kw("SELECT", "SELECT at the start of the query")?;
        let top = if self.eat_kw("TOP") {
            match self.peek().clone() {
                Tok::Num(n) if n.as_u64().is_some() => {
                    self.pos += 1;
                    n.as_u64()
                }
                _ => return Err(self.error("a whole number after TOP")),
            }
        } else {
            None
        };
        let select_at = self.offset();
        let select = if self.eat_sym("*") {
            Select::All
        } else {
            let mut items = vec![self.select_item()?];
            while self.eat_sym(",") {
                items.push(self.select_item()?);
            }
            Select::Items(items)
        };
        self.expect_kw("FROM", "',' or FROM after the select list")?;
        let from_at = self.offset();
        let from = self.collection()?;
        let filter = if self.eat_kw("WHERE") { Some(self.expr()?) } else { None };
        let group_at = self.offset();
        let group_by = if self.eat_kw("GROUP") {
            self.expect_kw("BY", "BY after GROUP")?;
            Some(self.path()?)
        } else {
            None
        };
        if !matches!(self.peek(), Tok::Eof) {
            let expected = match (&filter, &group_by) {
                (None, None) => "WHERE, GROUP BY or the end of the query",
                (Some(_), None) => "AND, OR, an operator, GROUP BY or the end of the query",
                _ => "the end of the query",
            };
            return Err(self.error(expected));
        }
        let mut q = Query { top, select, from, filter, group_by };
        strip_collection_prefix(&mut q);
        self.check_shape(&q, select_at, from_at, group_at)?;
        Ok(q)
    }

    fn check_shape(
        &self,
        q: &Query,
        select_at: usize,
        from_at: usize,
        group_at: usize,
    ) -> Result<(), ParseError> {
        if q.from == Collection::Jobs && q.is_aggregate() {
            return Err(ParseError::at(
                self.src,
                if q.group_by.is_some() { group_at } else { from_at },
                "devices.jobs does not support aggregates or GROUP BY; query devices instead".to_owned(),
            ));
        }
        // Spec §9.3: devices.jobs takes only SELECT *, and GROUP BY is for devices only.
        if q.from == Collection::Jobs && !matches!(q.select, Select::All) {
            return Err(ParseError::at(
                self.src,
                select_at,
                "devices.jobs only supports SELECT *; select the fields from the results".to_owned(),
            ));
        }
        if q.from == Collection::Modules && q.group_by.is_some() {
            return Err(ParseError::at(
                self.src,
                group_at,
                "GROUP BY is only supported on devices; count modules without GROUP BY or group device twins"
                    .to_owned(),
            ));
        }
        let Select::Items(items) = &q.select else {
            if q.group_by.is_some() {
                return Err(ParseError::at(
                    self.src,
                    select_at,
                    "SELECT * cannot be used with GROUP BY; select the grouped property and aggregates"
                        .to_owned(),
                ));
            }
            return Ok(());
        };
        if !q.is_aggregate() {
            return Ok(());
        }
        for item in items {
            if let Projection::Expr(e) = &item.projection {
                let grouped = matches!((e, &q.group_by), (Expr::Path(p), Some(g)) if p.same_property(g));
                if !grouped {
                    let msg = match &q.group_by {
                        Some(g) => format!(
                            "with GROUP BY only the grouped property '{g}' and aggregates (COUNT(), SUM(), ...) can be selected"
                        ),
                        None => "aggregates cannot be mixed with other properties unless the query has GROUP BY".to_owned(),
                    };
                    return Err(ParseError::at(self.src, select_at, msg));
                }
            }
        }
        Ok(())
    }

    fn collection(&mut self) -> Result<Collection, ParseError> {
        if !self.eat_kw("devices") {
            return Err(self.error("devices, devices.modules or devices.jobs after FROM"));
        }
        if !self.is_sym(".") {
            return Ok(Collection::Devices);
        }
        self.pos += 1;
        if self.eat_kw("modules") {
            Ok(Collection::Modules)
        } else if self.eat_kw("jobs") {
            Ok(Collection::Jobs)
        } else {
            Err(self.error("modules or jobs after 'devices.'"))
        }
    }

    fn select_item(&mut self) -> Result<SelectItem, ParseError> {
        let projection = match self.aggregate()? {
            Some(a) => Projection::Aggregate(a),
            None => Projection::Expr(self.expr()?),
        };
        let alias = if self.eat_kw("AS") {
            match self.bump() {
                Tok::Ident(s) if !is_keyword(&s) => Some(s),
                Tok::Escaped(s) => Some(s),
                _ => {
                    self.pos -= 1;
                    return Err(self.error("a name after AS"));
                }
            }
        } else {
            None
        };
        Ok(SelectItem { projection, alias })
    }

    fn aggregate(&mut self) -> Result<Option<Aggregate>, ParseError> {
        let Tok::Ident(name) = self.peek() else { return Ok(None) };
        if !matches!(self.peek_at(1), Tok::Sym("(")) {
            return Ok(None);
        }
        let kind = name.to_ascii_uppercase();
        if !matches!(kind.as_str(), "COUNT" | "SUM" | "AVG" | "MIN" | "MAX") {
            return Ok(None);
        }
        self.pos += 2;
        let agg = if kind == "COUNT" {
            if !self.is_sym(")") {
                return Err(self.error("')': COUNT() takes no argument"));
            }
            Aggregate::Count
        } else {
            let p = self.path()?;
            match kind.as_str() {
                "SUM" => Aggregate::Sum(p),
                "AVG" => Aggregate::Avg(p),
                "MIN" => Aggregate::Min(p),
                _ => Aggregate::Max(p),
            }
        };
        self.expect_sym(")", "')' to close the aggregate")?;
        Ok(Some(agg))
    }

    fn path(&mut self) -> Result<Path, ParseError> {
        let first = match self.peek().clone() {
            Tok::Ident(s) if is_keyword(&s) => {
                return Err(ParseError::at(
                    self.src,
                    self.offset(),
                    format!(
                    "expected a property name, found the keyword '{s}' (write [[{s}]] to use it as a name)"
                ),
                ))
            }
            Tok::Ident(s) | Tok::Escaped(s) => s,
            _ => return Err(self.error("a property name")),
        };
        self.pos += 1;
        let mut segments = vec![first];
        while self.is_sym(".") {
            self.pos += 1;
            match self.bump() {
                // After a dot a keyword cannot start a clause, so it is taken as a name.
                Tok::Ident(s) | Tok::Escaped(s) => segments.push(s),
                _ => {
                    self.pos -= 1;
                    return Err(self.error("a property name after '.'"));
                }
            }
        }
        Ok(Path { segments })
    }

    /// expr := or
    fn expr(&mut self) -> Result<Expr, ParseError> {
        let start = self.offset();
        self.enter()?;
        let r = self.or();
        self.depth -= 1;
        let e = r?;
        // Operator chains (`a AND b AND ...`, `1 + 1 + ...`) parse in loops but build deep trees,
        // and evaluating those recurses; bound the whole tree once, at the outermost expression.
        if self.depth == 0 && tree_depth(&e) > MAX_TREE_DEPTH {
            return Err(ParseError::at(
                self.src,
                start,
                format!(
                    "expression too complex: more than {MAX_TREE_DEPTH} nested operators \
                     (for long lists of alternatives use IN ['a', 'b', ...])"
                ),
            ));
        }
        Ok(e)
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.and()?;
        while self.eat_kw("OR") {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.not()?;
        while self.eat_kw("AND") {
            let right = self.not()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.eat_kw("NOT") {
            self.enter()?;
            let inner = self.not();
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.additive()?;
        let op = match self.peek() {
            Tok::Sym("=") => Some(CompareOp::Eq),
            Tok::Sym("!=") | Tok::Sym("<>") => Some(CompareOp::Ne),
            Tok::Sym("<") => Some(CompareOp::Lt),
            Tok::Sym("<=") => Some(CompareOp::Le),
            Tok::Sym(">") => Some(CompareOp::Gt),
            Tok::Sym(">=") => Some(CompareOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.pos += 1;
            let right = self.additive()?;
            return Ok(Expr::Compare(op, Box::new(left), Box::new(right)));
        }
        let negated = if self.eat_kw("IN") {
            false
        } else if self.eat_kw("NIN") {
            true
        } else if self.is_kw("NOT")
            && matches!(self.peek_at(1), Tok::Ident(s) if s.eq_ignore_ascii_case("IN"))
        {
            self.pos += 2;
            true
        } else {
            return Ok(left);
        };
        if !self.is_sym("[") {
            return Err(self.error("a list of constants in brackets after IN / NIN, like ['a', 'b']"));
        }
        let Literal::Array(list) = self.constant()? else {
            return Err(self.error("a list of constants"));
        };
        Ok(Expr::In { expr: Box::new(left), list, negated })
    }

    fn additive(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("+") => ArithOp::Add,
                Tok::Sym("-") => ArithOp::Sub,
                _ => return Ok(left),
            };
            self.pos += 1;
            let right = self.multiplicative()?;
            left = Expr::Arith(op, Box::new(left), Box::new(right));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("*") => ArithOp::Mul,
                Tok::Sym("/") => ArithOp::Div,
                Tok::Sym("%") => ArithOp::Rem,
                _ => return Ok(left),
            };
            self.pos += 1;
            let right = self.unary()?;
            left = Expr::Arith(op, Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        let neg = if self.eat_sym("-") {
            true
        } else if self.eat_sym("+") {
            false
        } else {
            return self.primary();
        };
        self.enter()?;
        let inner = self.unary();
        self.depth -= 1;
        let inner = inner?;
        Ok(match (neg, inner) {
            (true, Expr::Literal(Literal::Number(n))) => match negate(&n) {
                Some(m) => Expr::Literal(Literal::Number(m)),
                None => Expr::Neg(Box::new(Expr::Literal(Literal::Number(n)))),
            },
            (true, e) => Expr::Neg(Box::new(e)),
            (false, e) => e,
        })
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        match self.peek().clone() {
            Tok::Sym("(") => {
                self.pos += 1;
                let e = self.expr()?;
                self.expect_sym(")", "')' to close the parenthesis")?;
                Ok(e)
            }
            Tok::Str(_) | Tok::Num(_) | Tok::Sym("[") => Ok(Expr::Literal(self.constant()?)),
            // `-NOT (..)`: a keyword, not a function, so say what belongs here.
            Tok::Ident(s)
                if is_keyword(&s)
                    && keyword_constant(&s).is_none()
                    && matches!(self.peek_at(1), Tok::Sym("(")) =>
            {
                Err(self.error("a property, a constant, a function call or '('"))
            }
            Tok::Ident(s) if matches!(self.peek_at(1), Tok::Sym("(")) => self.call(&s),
            Tok::Ident(s) => match keyword_constant(&s) {
                Some(l) => {
                    self.pos += 1;
                    Ok(Expr::Literal(l))
                }
                None => Ok(Expr::Path(self.path()?)),
            },
            Tok::Escaped(_) => Ok(Expr::Path(self.path()?)),
            _ => Err(self.error("a property, a constant, a function call or '('")),
        }
    }

    fn call(&mut self, name: &str) -> Result<Expr, ParseError> {
        let at = self.offset();
        let Some(func) = Function::from_name(name) else {
            let upper = name.to_ascii_uppercase();
            let hint = match upper.as_str() {
                "STARTS_WITH" => " (did you mean STARTSWITH?)".to_owned(),
                "ENDS_WITH" => " (did you mean ENDSWITH?)".to_owned(),
                "COUNT" | "SUM" | "AVG" | "MIN" | "MAX" => {
                    " (aggregates are only allowed in the select list)".to_owned()
                }
                _ => {
                    let names: Vec<&str> = Function::ALL.iter().map(|(_, n)| *n).collect();
                    format!("; supported functions: {}", names.join(", "))
                }
            };
            return Err(ParseError::at(self.src, at, format!("unknown function '{name}'{hint}")));
        };
        self.pos += 2;
        let mut args = Vec::new();
        if !self.is_sym(")") {
            args.push(self.expr()?);
            while self.eat_sym(",") {
                args.push(self.expr()?);
            }
        }
        self.expect_sym(")", "',' or ')' in the argument list")?;
        let (min, max) = func.arity();
        if args.len() < min || args.len() > max {
            let want = if min == max { format!("{min}") } else { format!("{min} or {max}") };
            let plural = if max == 1 { "" } else { "s" };
            return Err(ParseError::at(
                self.src,
                at,
                format!("{} takes {want} argument{plural}, found {}", func.name(), args.len()),
            ));
        }
        Ok(Expr::Call(func, args))
    }

    fn constant(&mut self) -> Result<Literal, ParseError> {
        match self.peek().clone() {
            Tok::Str(s) => {
                self.pos += 1;
                Ok(Literal::String(s))
            }
            Tok::Num(n) => {
                self.pos += 1;
                Ok(Literal::Number(n))
            }
            Tok::Sym("-") if matches!(self.peek_at(1), Tok::Num(_)) => {
                self.pos += 1;
                let Tok::Num(n) = self.bump() else { return Err(self.error("a number")) };
                negate(&n).map(Literal::Number).ok_or_else(|| self.error("a number in range"))
            }
            Tok::Sym("[") => {
                self.enter()?;
                self.pos += 1;
                let mut items = Vec::new();
                if !self.is_sym("]") {
                    items.push(self.constant()?);
                    while self.eat_sym(",") {
                        items.push(self.constant()?);
                    }
                }
                self.expect_sym("]", "',' or ']' in the list of constants")?;
                self.depth -= 1;
                Ok(Literal::Array(items))
            }
            Tok::Ident(s) => match keyword_constant(&s) {
                Some(l) => {
                    self.pos += 1;
                    Ok(l)
                }
                None => Err(self.error("a constant (string, number, true, false, null)")),
            },
            _ => Err(self.error("a constant (string, number, true, false, null)")),
        }
    }
}

/// Height of the expression tree, computed without recursion.
fn tree_depth(root: &Expr) -> usize {
    let mut max = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        max = max.max(d);
        match e {
            Expr::Literal(_) | Expr::Path(_) => {}
            Expr::Not(a) | Expr::Neg(a) => stack.push((a, d + 1)),
            Expr::In { expr, .. } => stack.push((expr, d + 1)),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(_, a, b) | Expr::Arith(_, a, b) => {
                stack.push((a, d + 1));
                stack.push((b, d + 1));
            }
            Expr::Call(_, args) => stack.extend(args.iter().map(|a| (a, d + 1))),
        }
    }
    max
}

fn keyword_constant(s: &str) -> Option<Literal> {
    let l = match s.to_ascii_lowercase().as_str() {
        "true" => Literal::Bool(true),
        "false" => Literal::Bool(false),
        "null" => Literal::Null,
        "undefined" => Literal::Undefined,
        _ => return None,
    };
    Some(l)
}

fn negate(n: &serde_json::Number) -> Option<serde_json::Number> {
    if let Some(i) = n.as_i64() {
        return i.checked_neg().map(serde_json::Number::from);
    }
    if let Some(u) = n.as_u64() {
        // u64 beyond i64::MAX: only -(i64::MAX + 1) still fits.
        return if u == i64::MIN.unsigned_abs() { Some(serde_json::Number::from(i64::MIN)) } else { None };
    }
    n.as_f64().and_then(|f| serde_json::Number::from_f64(-f))
}

/// Removes the collection prefix the hub allows on paths (`devices.deviceId`,
/// `devices.jobs.status`, `devices.modules.moduleId`), so every path is relative to the document.
fn strip_collection_prefix(q: &mut Query) {
    let prefix: &[&str] = match q.from {
        Collection::Devices => &["devices"],
        Collection::Modules => &["devices", "modules"],
        Collection::Jobs => &["devices", "jobs"],
    };
    let fix = |p: &mut Path| strip_path(p, prefix);
    if let Select::Items(items) = &mut q.select {
        for item in items {
            match &mut item.projection {
                Projection::Expr(e) => visit_paths(e, &fix),
                Projection::Aggregate(Aggregate::Count) => {}
                Projection::Aggregate(
                    Aggregate::Sum(p) | Aggregate::Avg(p) | Aggregate::Min(p) | Aggregate::Max(p),
                ) => fix(p),
            }
        }
    }
    if let Some(f) = &mut q.filter {
        visit_paths(f, &fix);
    }
    if let Some(g) = &mut q.group_by {
        fix(g);
    }
}

fn strip_path(p: &mut Path, prefix: &[&str]) {
    // Longest prefix first (`devices.jobs.x`), then the bare collection root (`devices.x`),
    // always leaving at least one segment.
    for n in (1..=prefix.len()).rev() {
        let matches = p.segments.len() > n
            && p.segments.iter().zip(&prefix[..n]).all(|(s, want)| s.eq_ignore_ascii_case(want));
        if matches {
            p.segments.drain(..n);
            return;
        }
    }
}

fn visit_paths(e: &mut Expr, f: &dyn Fn(&mut Path)) {
    match e {
        Expr::Literal(_) => {}
        Expr::Path(p) => f(p),
        Expr::Not(a) | Expr::Neg(a) => visit_paths(a, f),
        Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(_, a, b) | Expr::Arith(_, a, b) => {
            visit_paths(a, f);
            visit_paths(b, f);
        }
        Expr::In { expr, .. } => visit_paths(expr, f),
        Expr::Call(_, args) => {
            for a in args {
                visit_paths(a, f);
            }
        }
    }
}
