//! SQL92 message selectors (`MessageSelector.bySql`): consumers that filter by message
//! properties, as Java's broker does with `enablePropertyFilter=true`
//! (`org.apache.rocketmq.filter`, a JMS selector grammar without arithmetic).
//!
//! A selector is parsed once per subscription and evaluated against each message's
//! properties. Values are strings (properties), numbers, booleans or null (a property the
//! message lacks); comparisons with null are unknown, and only a selector that evaluates to
//! true selects a message.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::message::property;

/// Why a selector cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectorError {
    /// The text is not a selector.
    #[error("cannot parse the SQL92 expression at character {at}: {why}")]
    Syntax {
        /// Position (characters from the start) where parsing failed.
        at: usize,
        /// What was expected or found.
        why: String,
    },
}

/// A value while evaluating.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    /// A whole number that fits 32 bits (Java's Integer: a property compared with one is read
    /// as one).
    Int(i32),
    Long(i64),
    Double(f64),
    Str(String),
}

/// An evaluation that cannot go on (Java throws, and the message is not delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Abort;

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// String tests of RocketMQ 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrTest {
    Contains,
    StartsWith,
    EndsWith,
}

/// A parsed selector.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Const(Value),
    Property(String),
    Negate(Box<Expr>),
    Not(Box<Expr>),
    /// Operands in order (a chain of ANDs is one node, so a long chain nests nothing).
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare(Cmp, Box<Expr>, Box<Expr>),
    In {
        property: String,
        list: Vec<String>,
        negated: bool,
    },
    IsNull {
        value: Box<Expr>,
        negated: bool,
    },
    Text {
        test: StrTest,
        value: Box<Expr>,
        pattern: String,
        negated: bool,
    },
}

impl Expr {
    /// Whether the expression gives a boolean (a comparison, a logical operator, TRUE/FALSE).
    fn is_boolean(&self) -> bool {
        !matches!(
            self,
            Expr::Const(Value::Int(_) | Value::Long(_) | Value::Double(_) | Value::Str(_))
                | Expr::Property(_)
                | Expr::Negate(_)
        )
    }

    /// Whether it can be a condition (of NOT, AND, OR, or the whole selector): a boolean, or
    /// a property read as one, as Java's parser allows.
    fn is_condition(&self) -> bool {
        self.is_boolean() || matches!(self, Expr::Property(_))
    }
}

/// An SQL92 selector, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector(Expr);

/// Selectors by their text, parsed once for all the pulls of a subscription (Java keeps 100
/// too); a text that does not parse is remembered as such.
#[derive(Debug, Default)]
pub struct SelectorCache(Mutex<HashMap<String, Result<Arc<Selector>, SelectorError>>>);

/// Selectors a [`SelectorCache`] keeps; past that it starts afresh.
const CACHED: usize = 100;

impl SelectorCache {
    /// The selector `text` parses to.
    pub fn get(&self, text: &str) -> Result<Arc<Selector>, SelectorError> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = m.get(text) {
            return found.clone();
        }
        let parsed = Selector::parse(text).map(Arc::new);
        if m.len() >= CACHED {
            m.clear();
        }
        m.insert(text.to_string(), parsed.clone());
        parsed
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Number(Value),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    End,
}

/// Splits a selector into tokens, each with its position. As Java's grammar: `<>` (no `!=`),
/// strings in single quotes (`''` for a quote), decimal and floating-point numbers, ASCII
/// identifiers, `--` and `/* */` comments.
fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, SelectorError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |at: usize, why: &str| SelectorError::Syntax {
        at,
        why: why.to_string(),
    };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            if i >= chars.len() {
                return Err(err(start, "a comment is not closed"));
            }
            i += 2;
            continue;
        }
        let token = match c {
            '(' => {
                i += 1;
                Token::LParen
            }
            ')' => {
                i += 1;
                Token::RParen
            }
            ',' => {
                i += 1;
                Token::Comma
            }
            '=' => {
                i += 1;
                Token::Op("=")
            }
            '<' | '>' => {
                let next = chars.get(i + 1).copied();
                i += 1;
                match (c, next) {
                    ('<', Some('>')) => {
                        i += 1;
                        Token::Op("<>")
                    }
                    ('<', Some('=')) => {
                        i += 1;
                        Token::Op("<=")
                    }
                    ('>', Some('=')) => {
                        i += 1;
                        Token::Op(">=")
                    }
                    ('<', _) => Token::Op("<"),
                    _ => Token::Op(">"),
                }
            }
            '-' => {
                i += 1;
                Token::Op("-")
            }
            '+' => {
                i += 1;
                Token::Op("+")
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(err(start, "a string is not closed")),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                Token::Str(s)
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                let (value, end) = number(&chars, i).ok_or_else(|| err(start, "a bad number"))?;
                i = end;
                Token::Number(value)
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == '$' => {
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '$'))
                {
                    i += 1;
                }
                Token::Ident(chars[start..i].iter().collect())
            }
            other => return Err(err(start, &format!("unexpected character '{other}'"))),
        };
        out.push((start, token));
    }
    out.push((chars.len(), Token::End));
    Ok(out)
}

/// A number starting at `i`: decimal (`0` or no leading zero, an optional `L`) or floating
/// point (`5.5`, `5.`, `.5`, `5e10`); its value and where it ends.
fn number(chars: &[char], mut i: usize) -> Option<(Value, usize)> {
    let start = i;
    let digits = |i: &mut usize| {
        while chars.get(*i).is_some_and(char::is_ascii_digit) {
            *i += 1;
        }
    };
    digits(&mut i);
    let mut float = false;
    if chars.get(i) == Some(&'.') {
        float = true;
        i += 1;
        digits(&mut i);
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        let mut j = i + 1;
        if matches!(chars.get(j), Some('+' | '-')) {
            j += 1;
        }
        if chars.get(j).is_some_and(char::is_ascii_digit) {
            float = true;
            i = j;
            digits(&mut i);
        }
    }
    let text: String = chars[start..i].iter().collect();
    if float {
        return Some((Value::Double(text.parse().ok()?), i));
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    let v: i64 = text.parse().ok()?;
    // As Java: the suffix is dropped, and a value that fits 32 bits is an Integer anyway.
    if matches!(chars.get(i), Some('l' | 'L')) {
        i += 1;
    }
    let value = i32::try_from(v).map_or(Value::Long(v), Value::Int);
    Some((value, i))
}

/// Recursive-descent parser over the tokens, with Java's precedence: OR, AND, equality (`=`,
/// `<>`, IS NULL), comparison (`<`, BETWEEN, IN, CONTAINS ...), unary (`-`, `+`, NOT).
struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    /// Levels of nesting so far (see [`Parser::nest`]).
    depth: usize,
}

/// Longest selector accepted (characters): far more than any written by hand; a client could
/// otherwise have a pull or heartbeat allocate gigabytes of tokens.
const MAX_LEN: usize = 64 * 1024;

/// Deepest nesting accepted: far more than any selector written by hand, far less than would
/// exhaust a thread's stack.
const MAX_NESTING: usize = 100;

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)].1
    }

    fn at(&self) -> usize {
        self.tokens[self.pos.min(self.tokens.len() - 1)].0
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        self.pos += 1;
        t
    }

    fn fail<T>(&self, why: impl Into<String>) -> Result<T, SelectorError> {
        Err(SelectorError::Syntax {
            at: self.at(),
            why: why.into(),
        })
    }

    fn is_keyword(&self, offset: usize, kw: &str) -> bool {
        matches!(self.tokens.get(self.pos + offset), Some((_, Token::Ident(s))) if s.eq_ignore_ascii_case(kw))
    }

    /// Takes the keyword `kw` (any case) if it comes next.
    fn keyword(&mut self, kw: &str) -> bool {
        let found = self.is_keyword(0, kw);
        if found {
            self.pos += 1;
        }
        found
    }

    fn expect(&mut self, t: Token, what: &str) -> Result<(), SelectorError> {
        if *self.peek() == t {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(format!("expected {what}"))
        }
    }

    fn or(&mut self) -> Result<Expr, SelectorError> {
        self.chain("OR", Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr, SelectorError> {
        self.chain("AND", Self::equality, Expr::And)
    }

    /// Conditions `operand` parses, separated by `keyword`: one node for the whole chain.
    fn chain(
        &mut self,
        keyword: &str,
        operand: fn(&mut Self) -> Result<Expr, SelectorError>,
        node: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.condition(operand)?];
        while self.keyword(keyword) {
            terms.push(self.condition(operand)?);
        }
        Ok(match terms.len() {
            1 => terms.remove(0),
            _ => node(terms),
        })
    }

    /// An operand of AND, OR or NOT by `parse`; refused unless it can be a condition (so
    /// `NOT 5` fails at the consumer's start rather than select everything).
    fn condition(
        &mut self,
        parse: fn(&mut Self) -> Result<Expr, SelectorError>,
    ) -> Result<Expr, SelectorError> {
        let at = self.at();
        let e = parse(self)?;
        if e.is_condition() {
            Ok(e)
        } else {
            Err(SelectorError::Syntax {
                at,
                why: "not a condition (a comparison, a boolean or a property)".into(),
            })
        }
    }

    /// Counts one more level of nesting (a parenthesis, a unary operator, an operator
    /// applied to what came before), refusing more than [`MAX_NESTING`]: the parser and the
    /// evaluation recurse once per level, and an expression comes from a client.
    fn nest(&mut self) -> Result<(), SelectorError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return self.fail(format!("the expression nests more than {MAX_NESTING} deep"));
        }
        Ok(())
    }

    fn equality(&mut self) -> Result<Expr, SelectorError> {
        // Each operator applied to what came before nests it one level deeper.
        let entry = self.depth;
        let mut left = self.comparison()?;
        loop {
            let cmp = match self.peek().clone() {
                Token::Op("=") => Cmp::Eq,
                Token::Op("<>") => Cmp::Ne,
                _ if self.keyword("IS") => {
                    let negated = self.keyword("NOT");
                    if !self.keyword("NULL") {
                        return self.fail("expected NULL after IS");
                    }
                    self.nest()?;
                    left = Expr::IsNull {
                        value: Box::new(left),
                        negated,
                    };
                    continue;
                }
                _ => {
                    self.depth = entry;
                    return Ok(left);
                }
            };
            self.pos += 1;
            self.nest()?;
            let right = self.comparison()?;
            if [&left, &right]
                .iter()
                .any(|e| **e == Expr::Const(Value::Null))
            {
                return self.fail("'NULL' cannot be compared: use IS NULL");
            }
            if let (Expr::Const(Value::Bool(_)), Expr::Const(v)) = (&left, &right) {
                if !matches!(v, Value::Bool(_)) {
                    return self.fail("a boolean cannot be compared with a value of another type");
                }
            }
            left = Expr::Compare(cmp, Box::new(left), Box::new(right));
        }
    }

    fn comparison(&mut self) -> Result<Expr, SelectorError> {
        let entry = self.depth;
        let mut left_at = self.at();
        let mut left = self.unary()?;
        loop {
            let cmp = match self.peek() {
                Token::Op("<") => Some(Cmp::Lt),
                Token::Op("<=") => Some(Cmp::Le),
                Token::Op(">") => Some(Cmp::Gt),
                Token::Op(">=") => Some(Cmp::Ge),
                _ => None,
            };
            if let Some(cmp) = cmp {
                self.pos += 1;
                self.nest()?;
                let right_at = self.at();
                let right = self.unary()?;
                orderable(&left, left_at)?;
                orderable(&right, right_at)?;
                left = Expr::Compare(cmp, Box::new(left), Box::new(right));
                left_at = right_at;
                continue;
            }
            let negated = self.is_keyword(0, "NOT")
                && ["BETWEEN", "IN", "CONTAINS", "STARTSWITH", "ENDSWITH"]
                    .iter()
                    .any(|kw| self.is_keyword(1, kw));
            if negated {
                self.pos += 1;
            }
            if self.keyword("BETWEEN") {
                self.nest()?;
                let low_at = self.at();
                let low = self.unary()?;
                if !self.keyword("AND") {
                    return self.fail("expected AND in BETWEEN");
                }
                let high_at = self.at();
                let high = self.unary()?;
                for (e, at) in [(&left, left_at), (&low, low_at), (&high, high_at)] {
                    orderable(e, at)?;
                }
                if let (false, Expr::Const(l), Expr::Const(h)) = (negated, &low, &high) {
                    if compare(l, h) == Ok(Some(Ordering::Greater)) {
                        return self.fail("BETWEEN's lower bound is greater than its upper bound");
                    }
                }
                // [NOT] BETWEEN is `>= low AND <= high`, or `< low OR > high`.
                let (lo, hi) = (Box::new(left.clone()), Box::new(left));
                left = if negated {
                    Expr::Or(vec![
                        Expr::Compare(Cmp::Lt, lo, Box::new(low)),
                        Expr::Compare(Cmp::Gt, hi, Box::new(high)),
                    ])
                } else {
                    Expr::And(vec![
                        Expr::Compare(Cmp::Ge, lo, Box::new(low)),
                        Expr::Compare(Cmp::Le, hi, Box::new(high)),
                    ])
                };
                continue;
            }
            if self.keyword("IN") {
                self.nest()?;
                let Expr::Property(property) = left else {
                    return self.fail("IN needs a property on its left");
                };
                self.expect(Token::LParen, "'(' after IN")?;
                let mut list = Vec::new();
                loop {
                    match self.next() {
                        Token::Str(s) => list.push(s),
                        _ => {
                            self.pos -= 1;
                            return self.fail("IN takes a list of strings");
                        }
                    }
                    match self.next() {
                        Token::Comma => {}
                        Token::RParen => break,
                        _ => {
                            self.pos -= 1;
                            return self.fail("expected ',' or ')' in IN");
                        }
                    }
                }
                left = Expr::In {
                    property,
                    list,
                    negated,
                };
                continue;
            }
            let mut tested = false;
            for (kw, test) in [
                ("CONTAINS", StrTest::Contains),
                ("STARTSWITH", StrTest::StartsWith),
                ("ENDSWITH", StrTest::EndsWith),
            ] {
                if self.keyword(kw) {
                    self.nest()?;
                    let Token::Str(pattern) = self.next() else {
                        self.pos -= 1;
                        return self.fail(format!("{kw} takes a string"));
                    };
                    left = Expr::Text {
                        test,
                        value: Box::new(left.clone()),
                        pattern,
                        negated,
                    };
                    tested = true;
                    break;
                }
            }
            if !tested {
                self.depth = entry;
                if negated {
                    return self.fail("unexpected NOT");
                }
                return Ok(left);
            }
        }
    }

    fn unary(&mut self) -> Result<Expr, SelectorError> {
        let not = self.is_keyword(0, "NOT");
        let wrap: fn(Expr) -> Expr = match self.peek().clone() {
            Token::Op("-") => |e| Expr::Negate(Box::new(e)),
            Token::Op("+") => |e| e,
            _ if not => |e| Expr::Not(Box::new(e)),
            _ => return self.primary(),
        };
        self.pos += 1;
        self.nest()?;
        let e = if not {
            self.condition(Self::unary)?
        } else {
            self.unary()?
        };
        self.depth -= 1;
        Ok(wrap(e))
    }

    /// A literal, a property or a parenthesized expression.
    fn primary(&mut self) -> Result<Expr, SelectorError> {
        match self.next() {
            Token::Str(s) => Ok(Expr::Const(Value::Str(s))),
            Token::Number(v) => Ok(Expr::Const(v)),
            Token::LParen => {
                self.nest()?;
                let e = self.or()?;
                self.expect(Token::RParen, "')'")?;
                self.depth -= 1;
                Ok(e)
            }
            Token::Ident(name) => {
                if name.eq_ignore_ascii_case("TRUE") {
                    Ok(Expr::Const(Value::Bool(true)))
                } else if name.eq_ignore_ascii_case("FALSE") {
                    Ok(Expr::Const(Value::Bool(false)))
                } else if name.eq_ignore_ascii_case("NULL") {
                    Ok(Expr::Const(Value::Null))
                } else if KEYWORDS.iter().any(|k| name.eq_ignore_ascii_case(k)) {
                    self.pos -= 1;
                    self.fail(format!("unexpected keyword {name}"))
                } else {
                    Ok(Expr::Property(name))
                }
            }
            Token::End => {
                self.pos -= 1;
                self.fail("unexpected end")
            }
            _ => {
                self.pos -= 1;
                self.fail("expected a value")
            }
        }
    }
}

/// Refuses what `<`, `>` and BETWEEN cannot order (the operand at `at`): strings, booleans
/// and NULL written as literals, and boolean expressions.
fn orderable(e: &Expr, at: usize) -> Result<(), SelectorError> {
    let why = match e {
        Expr::Const(Value::Str(_) | Value::Bool(_) | Value::Null) => {
            "only numbers and properties can be ordered"
        }
        e if e.is_boolean() => "a boolean cannot be ordered",
        _ => return Ok(()),
    };
    Err(SelectorError::Syntax {
        at,
        why: why.into(),
    })
}

/// Words that cannot name a property.
const KEYWORDS: &[&str] = &[
    "NOT",
    "AND",
    "OR",
    "BETWEEN",
    "IN",
    "IS",
    "CONTAINS",
    "STARTSWITH",
    "ENDSWITH",
];

/// Reads a property's text as `like`'s type, as Java converts a String compared with a
/// number or boolean; `None` when it is not one (Java throws).
fn convert(text: &str, like: &Value) -> Option<Value> {
    match like {
        Value::Int(_) => text.parse().ok().map(Value::Int),
        Value::Long(_) => text.parse().ok().map(Value::Long),
        Value::Double(_) => java_double(text).map(Value::Double),
        Value::Bool(_) => Some(Value::Bool(text.eq_ignore_ascii_case("true"))),
        Value::Str(_) => Some(Value::Str(text.to_string())),
        Value::Null => None,
    }
}

/// Java's `Double.valueOf`: surrounding blanks ignored, an `f` or `d` suffix allowed.
fn java_double(text: &str) -> Option<f64> {
    let t = text.trim();
    match t.strip_prefix('+').unwrap_or(t) {
        "NaN" => return Some(f64::NAN),
        "Infinity" => return Some(f64::INFINITY),
        "-Infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let t = t.strip_suffix(['d', 'D', 'f', 'F']).unwrap_or(t);
    // Rust also reads "inf" and "nan" in any case, which Java does not.
    if t.bytes()
        .any(|b| b.is_ascii_alphabetic() && !matches!(b, b'e' | b'E'))
    {
        return None;
    }
    t.parse().ok()
}

/// A number widened to f64 or kept as i64.
fn numeric(v: &Value) -> Option<Result<i64, f64>> {
    match v {
        Value::Int(i) => Some(Ok(i64::from(*i))),
        Value::Long(l) => Some(Ok(*l)),
        Value::Double(d) => Some(Err(*d)),
        _ => None,
    }
}

/// Orders two non-null values as Java's ComparisonExpression does: numbers widened, a string
/// read as the other side's type. `Ok(None)` when they cannot be ordered (NaN), `Err` where
/// Java throws.
fn compare(l: &Value, r: &Value) -> Result<Option<Ordering>, Abort> {
    match (l, r) {
        (Value::Str(a), Value::Str(b)) => Ok(a.partial_cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Ok(a.partial_cmp(b)),
        (Value::Str(a), other) => compare(&convert(a, other).ok_or(Abort)?, other),
        (other, Value::Str(b)) => compare(other, &convert(b, other).ok_or(Abort)?),
        _ => match (numeric(l), numeric(r)) {
            (Some(Ok(a)), Some(Ok(b))) => Ok(Some(a.cmp(&b))),
            (Some(a), Some(b)) => {
                // Java's Double.compareTo: NaN above everything, -0.0 below 0.0.
                let wide = |x: Result<i64, f64>| x.map_or_else(|d| d, |i| i as f64);
                Ok(Some(wide(a).total_cmp(&wide(b))))
            }
            _ => Err(Abort),
        },
    }
}

/// Whether two non-null values are equal, as Java's `=` decides.
fn equal(l: &Value, r: &Value) -> Result<bool, Abort> {
    if l == r {
        return Ok(true);
    }
    match (l, r) {
        // Java casts text on the right of a boolean to Boolean and fails; a number and a
        // boolean are merely not equal.
        (Value::Bool(_), Value::Str(_)) => Err(Abort),
        (Value::Bool(_), Value::Int(_) | Value::Long(_) | Value::Double(_))
        | (Value::Int(_) | Value::Long(_) | Value::Double(_), Value::Bool(_)) => Ok(false),
        (Value::Str(_), Value::Str(_)) => Ok(false),
        _ => compare(l, r).map(|o| o == Some(Ordering::Equal)),
    }
}

/// A comparison's value: null when a side is null (except `=`'s own rules), an abort where
/// Java throws.
fn eval_compare(cmp: Cmp, l: Value, r: Value) -> Result<Value, Abort> {
    if matches!(cmp, Cmp::Eq | Cmp::Ne) {
        let eq = match (&l, &r) {
            (Value::Null, Value::Null) => Some(true),
            (Value::Null, _) => None,
            (_, Value::Null) => Some(false),
            _ => Some(equal(&l, &r)?),
        };
        return Ok(eq.map_or(Value::Null, |e| Value::Bool(e != (cmp == Cmp::Ne))));
    }
    if l == Value::Null || r == Value::Null {
        return Ok(Value::Null);
    }
    let order = match (&l, &r) {
        // Two strings are ordered as numbers, or not at all.
        (Value::Str(a), Value::Str(b)) => {
            let (a, b) = (java_double(a).ok_or(Abort)?, java_double(b).ok_or(Abort)?);
            Some(a.total_cmp(&b))
        }
        _ => compare(&l, &r)?,
    };
    Ok(Value::Bool(order.is_some_and(|o| match cmp {
        Cmp::Lt => o.is_lt(),
        Cmp::Le => o.is_le(),
        Cmp::Gt => o.is_gt(),
        Cmp::Ge => o.is_ge(),
        Cmp::Eq | Cmp::Ne => false,
    })))
}

/// A value where a boolean is wanted: booleans and null as they are, anything else false.
fn truth(v: Value) -> Value {
    match v {
        Value::Null | Value::Bool(_) => v,
        _ => Value::Bool(false),
    }
}

/// An AND (`decisive` false) or OR (`decisive` true) of `terms`: three-valued, left to right as
/// Java's left-nested operators, and what follows is not evaluated once a term decides (so what
/// would abort there does not).
fn chain(terms: &[Expr], decisive: bool, properties: &str) -> Result<Value, Abort> {
    let mut acc = Value::Bool(!decisive);
    for t in terms {
        acc = match (acc, truth(eval(t, properties)?)) {
            (_, Value::Bool(b)) if b == decisive => return Ok(Value::Bool(decisive)),
            (Value::Bool(a), Value::Bool(_)) if a != decisive => Value::Bool(!decisive),
            _ => Value::Null,
        };
    }
    Ok(acc)
}

fn eval(e: &Expr, properties: &str) -> Result<Value, Abort> {
    Ok(match e {
        Expr::Const(v) => v.clone(),
        Expr::Property(name) => {
            property(properties, name).map_or(Value::Null, |v| Value::Str(v.to_string()))
        }
        Expr::Negate(x) => match eval(x, properties)? {
            Value::Int(i) => i
                .checked_neg()
                .map_or(Value::Long(-i64::from(i)), Value::Int),
            Value::Long(l) => Value::Long(l.wrapping_neg()),
            Value::Double(d) => Value::Double(-d),
            _ => Value::Null,
        },
        Expr::Not(x) => match truth(eval(x, properties)?) {
            Value::Bool(b) => Value::Bool(!b),
            other => other,
        },
        Expr::And(terms) => chain(terms, false, properties)?,
        Expr::Or(terms) => chain(terms, true, properties)?,
        Expr::Compare(cmp, a, b) => eval_compare(*cmp, eval(a, properties)?, eval(b, properties)?)?,
        Expr::In {
            property: name,
            list,
            negated,
        } => match property(properties, name) {
            None => Value::Null,
            Some(v) => Value::Bool(list.iter().any(|s| s == v) != *negated),
        },
        Expr::IsNull { value, negated } => {
            Value::Bool((eval(value, properties)? == Value::Null) != *negated)
        }
        Expr::Text {
            test,
            value,
            pattern,
            negated,
        } => match eval(value, properties)? {
            Value::Str(s) if !pattern.is_empty() => {
                let hit = match test {
                    StrTest::Contains => s.contains(pattern.as_str()),
                    StrTest::StartsWith => s.starts_with(pattern.as_str()),
                    StrTest::EndsWith => s.ends_with(pattern.as_str()),
                };
                Value::Bool(hit != *negated)
            }
            _ => Value::Bool(false),
        },
    })
}

impl Selector {
    /// Parses an SQL92 selector; refuses what Java's broker refuses (and trailing text, which
    /// Java ignores).
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_LEN {
            return Err(SelectorError::Syntax {
                at: MAX_LEN,
                why: format!("the expression is longer than {MAX_LEN} bytes"),
            });
        }
        let mut p = Parser {
            tokens: tokenize(text)?,
            pos: 0,
            depth: 0,
        };
        let e = p.or()?;
        if *p.peek() != Token::End {
            return p.fail("unexpected text after the expression");
        }
        if !e.is_condition() {
            return Err(SelectorError::Syntax {
                at: 0,
                why: "the expression does not give a boolean".into(),
            });
        }
        Ok(Selector(e))
    }

    /// Whether a message with these properties (encoded as stored) is selected: only when
    /// the selector is true for it (unknown, or an evaluation Java would abort, is not).
    pub fn matches(&self, properties: &str) -> bool {
        eval(&self.0, properties) == Ok(Value::Bool(true))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Properties encoded as stored.
    fn props(pairs: &[(&str, &str)]) -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}\u{1}{v}\u{2}"))
            .collect()
    }

    fn check(sql: &str, pairs: &[(&str, &str)]) -> bool {
        Selector::parse(sql).unwrap().matches(&props(pairs))
    }

    #[test]
    fn comparisons_read_properties_as_the_literal_they_meet() {
        let p = [("a", "10"), ("b", "x"), ("f", "2.5"), ("t", "TRUE")];
        assert!(check("a > 5", &p));
        assert!(!check("a < 5", &p));
        assert!(check("a >= 10 AND a <= 10", &p));
        assert!(check("a = 10", &p) && check("a = 10.0", &p) && check("a = '10'", &p));
        assert!(check("f > 2.0", &p) && check("f < 2.6", &p));
        // An integer literal reads the property as an integer: "2.5" is not one (Java throws).
        assert!(!check("f > 2", &p));
        assert!(check("b = 'x'", &p) && check("b <> 'y'", &p));
        assert!(check("t = TRUE", &p) && check("b = FALSE", &p));
        assert!(check("5 < a", &p));
        assert!(check("a > -1", &p) && check("-a IS NULL", &p));
        // Two properties are ordered as numbers.
        assert!(check("a > f", &p));
        // Where Java throws (a non-number read as a number), nothing matches.
        assert!(!check("b > 5", &p) && !check("b = 5", &p) && !check("f > 5", &p));
        assert!(!check("b > f", &p));
        // An integer literal reads the property as a 32-bit integer, a long one as 64 bits.
        assert!(!check("big > 5", &[("big", "10000000000")]));
        assert!(
            !check("big > 5L", &[("big", "10000000000")]),
            "5L is an Integer too"
        );
        assert!(check("big > 5000000000", &[("big", "10000000000")]));
        // Java's Double.valueOf: NaN orders above everything; Rust's "inf" is not a number.
        assert!(check("a > 5.0", &[("a", "NaN")]) && check("a > 5.0", &[("a", " 7d ")]));
        assert!(!check("a > 5.0", &[("a", "inf")]) && check("a > 5.0", &[("a", "Infinity")]));
    }

    #[test]
    fn missing_properties_are_unknown_and_unknown_selects_nothing() {
        let p = [("a", "1")];
        assert!(!check("z = 'x'", &p) && !check("z <> 'x'", &p));
        assert!(!check("NOT (z = 'x')", &p));
        assert!(check("z IS NULL", &p) && check("a IS NOT NULL", &p));
        assert!(!check("z IN ('x')", &p) && !check("z NOT IN ('x')", &p));
        assert!(!check("z BETWEEN 1 AND 2", &p) && !check("z NOT BETWEEN 1 AND 2", &p));
        assert!(check("z IS NULL OR z = 'hello'", &p));
        assert!(check("a = 1 OR z = 'x'", &p) && !check("a = 1 AND z = 'x'", &p));
        assert!(!check("z = 'x' AND a = 2", &p));
        // A bare property is never true; NOT of a present one is.
        assert!(!check("a", &p) && check("NOT a", &p) && !check("NOT z", &p));
        assert!(check("TRUE", &p) && !check("FALSE", &p));
    }

    #[test]
    fn a_boolean_and_a_number_are_not_equal_rather_than_an_abort() {
        let p = [("a", "1"), ("b", "x")];
        assert!(check("NOT a = 1 OR b = 'x'", &p));
        assert!(check("NOT a <> 1", &p));
        assert!(
            check("a NOT BETWEEN 5 AND 1", &p),
            "no bound check when negated"
        );
        assert!(!check("NULL", &p));
    }

    #[test]
    fn the_right_side_is_not_evaluated_once_the_left_decides() {
        let p = [("a", "abc"), ("b", "x")];
        assert!(check("b = 'x' OR a = 5", &p));
        assert!(!check("a = 5 OR b = 'x'", &p));
        assert!(!check("b = 'y' AND a = 5", &p));
    }

    #[test]
    fn between_in_and_string_tests() {
        let p = [("a", "7"), ("c", "red"), ("s", "hello world")];
        assert!(check("a BETWEEN 5 AND 7", &p) && !check("a NOT BETWEEN 5 AND 7", &p));
        assert!(check("a NOT BETWEEN 8 AND 9", &p));
        assert!(check("c IN ('red', 'blue')", &p) && !check("c NOT IN ('red')", &p));
        assert!(!check("c IN ('RED')", &p), "case counts");
        assert!(check("s CONTAINS 'lo w'", &p) && check("s STARTSWITH 'hell'", &p));
        assert!(check("s ENDSWITH 'world'", &p) && check("s NOT CONTAINS 'x'", &p));
        assert!(
            !check("z NOT CONTAINS 'x'", &p),
            "missing is false, even negated"
        );
        assert!(!check("s CONTAINS ''", &p));
        assert!(check(
            "TAGS = 'T1' AND c = 'red'",
            &[("TAGS", "T1"), ("c", "red")]
        ));
    }

    #[test]
    fn keywords_any_case_comments_and_quotes() {
        let p = [("name", "it's"), ("n", "3")];
        assert!(check("name = 'it''s' and n between 1 and 5", &p));
        assert!(check(
            "n = 3 -- a comment\n AND /* another */ name IS NOT NULL",
            &p
        ));
        assert!(check("(n > 1 OR n < 0) AND NOT (n = 4)", &p));
        assert!(check("n > .5 AND n < 3e1 AND n <> 3.5", &p));
    }

    #[test]
    fn what_java_refuses_is_refused_with_where() {
        for bad in [
            "",
            "a >",
            "a != 1",
            "a = NULL",
            "a > 'x'",
            "a > TRUE",
            "(a = 1) > 2",
            "a BETWEEN 5 AND 1",
            "a BETWEEN 'a' AND 'z'",
            "a IN (1, 2)",
            "'x' IN ('x')",
            "a IN ()",
            "'abc'",
            "5",
            "a = 'x",
            "a = 1 b",
            "a = 07",
            "TRUE = 1",
            "NOT a > 1",
            "a LIKE 'x%'",
            "AND = 1",
            "NOT 'x'",
            "NOT 5",
            "a = 1 OR 5",
            "NOT -a",
            "-a",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} accepted");
        }
        // Nesting a client could use to exhaust the stack is refused; long flat chains are not.
        for deep in [
            format!("{}a = 1{}", "(".repeat(1_000), ")".repeat(1_000)),
            format!("{}a", "NOT ".repeat(1_000)),
            format!("a = {}1", "- ".repeat(1_000)),
            format!("a{}", " = TRUE".repeat(1_000)),
            format!("a{}", " IS NULL".repeat(1_000)),
            format!("s{}", " CONTAINS 'x'".repeat(1_000)),
        ] {
            let e = Selector::parse(&deep).unwrap_err();
            assert!(e.to_string().contains("nests more than"), "{e}");
        }
        // Long flat chains evaluate to their last term (within the length limit).
        let or = format!("{} OR a = 1", vec!["a = 2"; 6_000].join(" OR "));
        assert!(Selector::parse(&or).unwrap().matches(&props(&[("a", "1")])));
        let and = format!("{} AND a = 2", vec!["a = 1"; 6_000].join(" AND "));
        assert!(!Selector::parse(&and)
            .unwrap()
            .matches(&props(&[("a", "1")])));
        let long = format!("a = '{}'", "x".repeat(70_000));
        assert!(Selector::parse(&long).is_err());
        let e = Selector::parse("a = 1 AND b >").unwrap_err();
        assert_eq!(
            e,
            SelectorError::Syntax {
                at: 13,
                why: "unexpected end".into()
            }
        );
        assert!(e.to_string().contains("character 13"));
    }

    #[test]
    fn a_cache_parses_each_text_once_and_keeps_refusals() {
        let cache = SelectorCache::default();
        let a = cache.get("a = 1").unwrap();
        assert!(Arc::ptr_eq(&a, &cache.get("a = 1").unwrap()));
        assert!(cache.get("a >").is_err() && cache.get("a >").is_err());
        for i in 0..CACHED {
            cache.get(&format!("a = {i}")).unwrap();
        }
        assert!(cache.0.lock().unwrap().len() <= CACHED);
    }
}
