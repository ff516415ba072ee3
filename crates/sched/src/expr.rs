//! Requirement and rank expressions over host attributes, in the spirit of
//! OpenNebula's `REQUIREMENTS` and `RANK`.
//!
//! A requirement such as `cpu_model == "EPYC" && labels.ssd && free.memory_mib >= 4096`
//! is parsed once into an [`Expr`] and then evaluated against many hosts through the
//! [`Context`] trait. Evaluation never allocates (as long as the context hands out
//! borrowed values), never panics, and has no notion of errors: anything that cannot be
//! computed is *missing*, and a missing value is simply not truthy.
//!
//! # Grammar
//!
//! From lowest to highest precedence; whitespace between tokens is ignored.
//!
//! ```text
//! or      := and ("||" and)*
//! and     := not ("&&" not)*
//! not     := "!" not | cmp
//! cmp     := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)?
//! sum     := term (("+" | "-") term)*
//! term    := unary (("*" | "/") unary)*
//! unary   := "-" unary | primary
//! primary := number | string | "true" | "false" | path | "(" or ")"
//!
//! number  := [0-9]+ ("." [0-9]+)?
//! string  := '"' (any character but '"' and '\', or '\"', or '\\')* '"'
//! path    := ident ("." ident)*            (no whitespace inside a path)
//! ident   := [A-Za-z_] [A-Za-z0-9_-]*      (`true` and `false` alone are literals)
//! ```
//!
//! Things worth knowing:
//!
//! * `!` binds *looser* than comparisons (as Python's `not`): `!a == b` is `!(a == b)`.
//! * Comparisons do not chain: `1 < x < 3` is an error; write `1 < x && x < 3`.
//! * `-` may appear inside an attribute name (`labels.rack-1`), so subtraction needs
//!   spaces when its left operand is an attribute: `free.vcpus - 2`, not `free.vcpus-2`.
//! * Limits: at most [`MAX_SOURCE_CHARS`] characters, [`MAX_DEPTH`] levels of nesting
//!   (parentheses, `!` and unary `-`), [`MAX_PATH_SEGMENTS`] parts per attribute path.
//!   Exceeding one is a [`ParseError`], never a stack overflow.
//!
//! # Semantics
//!
//! Values are booleans, numbers (`f64`) and strings ([`Value`]); an attribute the
//! context does not know is *missing*.
//!
//! * **Truthiness** (for `&&`, `||`, `!` and [`Expr::eval_bool`]): a boolean is itself;
//!   a number is true unless it is 0 or NaN; a string is true unless it is empty,
//!   `"false"` or `"0"`; missing is false. So `!labels.gpu` holds on hosts without the
//!   label. `&&`, `||` and `!` always produce a boolean and short-circuit.
//! * **Comparisons**: numbers compare numerically; strings lexicographically (by
//!   Unicode scalar value); a string compared with a number is parsed as a number
//!   (Rust's `f64` syntax) and the comparison is false if it does not parse; booleans
//!   support only `==` and `!=`, against booleans or the strings `"true"`/`"false"`;
//!   every other pairing is false. **Any comparison involving a missing value is false,
//!   including `!=`**: `labels.zone != "a"` does not hold on a host without a zone label
//!   (write `!(labels.zone == "a")` for that). Comparisons involving NaN are false too.
//! * **Arithmetic** (`+ - * /`, unary `-`) works on numbers and on strings that
//!   parse as numbers (host labels are strings). Anything else, a division by
//!   zero or a non-finite result yields missing.
//! * [`Expr::eval_number`] (for rank expressions) turns the result into a finite number:
//!   booleans count as 1 and 0, numeric strings are parsed, anything else is `None`.
//!
//! # Examples
//!
//! ```
//! use kumo_sched::expr::{Context, Expr, Value};
//!
//! struct Host {
//!     cpu_model: String,
//!     ssd: bool,
//!     free_memory_mib: u64,
//!     free_vcpus: u32,
//! }
//!
//! impl Context for Host {
//!     fn lookup(&self, path: &[&str]) -> Option<Value<'_>> {
//!         match path {
//!             ["cpu_model"] => Some(Value::from(self.cpu_model.as_str())),
//!             ["labels", "ssd"] => self.ssd.then_some(Value::Bool(true)),
//!             ["free", "memory_mib"] => Some(Value::from(self.free_memory_mib)),
//!             ["free", "vcpus"] => Some(Value::from(self.free_vcpus)),
//!             _ => None,
//!         }
//!     }
//! }
//!
//! let host = Host { cpu_model: "EPYC".into(), ssd: true, free_memory_mib: 8192, free_vcpus: 12 };
//!
//! let req = Expr::parse(r#"cpu_model == "EPYC" && labels.ssd && free.memory_mib >= 4096"#)?;
//! assert!(req.eval_bool(&host));
//! assert!(!Expr::parse("labels.gpu")?.eval_bool(&host)); // missing is false
//! assert!(Expr::parse("!labels.gpu")?.eval_bool(&host));
//!
//! let rank = Expr::parse("free.vcpus * 2 + free.memory_mib / 1024")?;
//! assert_eq!(rank.eval_number(&host), Some(32.0));
//!
//! // The attributes an expression reads, e.g. to reject unknown ones up front.
//! let read: Vec<String> = req.paths().map(|p| p.to_string()).collect();
//! assert_eq!(read, ["cpu_model", "labels.ssd", "free.memory_mib"]);
//!
//! // Display prints a canonical form that parses back to the same expression.
//! let e = Expr::parse("((a))||b&&!(c==1)")?;
//! assert_eq!(e.to_string(), "a || b && !(c == 1)");
//! assert_eq!(Expr::parse(&e.to_string())?, e);
//! # Ok::<(), kumo_sched::expr::ParseError>(())
//! ```
//!
//! Errors carry the character position of the offending token:
//!
//! ```
//! use kumo_sched::expr::Expr;
//!
//! let src = "cpu_model = \"EPYC\"";
//! let err = Expr::parse(src).unwrap_err();
//! assert_eq!(err.position, 10);
//! assert_eq!(err.to_string(), "at position 10: unknown operator '='; did you mean '=='?");
//! assert_eq!(err.pointer(src), "cpu_model = \"EPYC\"\n          ^");
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// Longest accepted source, in characters.
pub const MAX_SOURCE_CHARS: usize = 4096;
/// Deepest accepted nesting of parentheses, `!` and unary `-`.
pub const MAX_DEPTH: usize = 64;
/// Most parts an attribute path may have (`a.b.c` has three).
pub const MAX_PATH_SEGMENTS: usize = 8;

// ---------------------------------------------------------------------------
// Errors

/// A malformed expression: where (a 0-based *character* offset into the source, which
/// may equal the source's length for "end of expression") and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at position {position}: {message}")]
pub struct ParseError {
    /// 0-based character (not byte) offset of the offending token.
    pub position: usize,
    /// What was expected and what was found.
    pub message: String,
}

impl ParseError {
    /// An error at `position` (a character offset) with `message`. Callers can use this
    /// to report their own problems with an expression, e.g. an unknown attribute at
    /// [`Path::position`].
    pub fn new(position: usize, message: impl Into<String>) -> Self {
        ParseError {
            position,
            message: message.into(),
        }
    }

    /// Two lines for humans: the source (control characters and whitespace such as
    /// newlines shown as single spaces) and a caret under the error position.
    ///
    /// ```
    /// # use kumo_sched::expr::Expr;
    /// let err = Expr::parse("(a && b").unwrap_err();
    /// assert_eq!(err.pointer("(a && b"), "(a && b\n       ^");
    /// ```
    pub fn pointer(&self, src: &str) -> String {
        let line: String = src
            .chars()
            .map(|c| {
                if c.is_control() || c.is_whitespace() {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        let column = self.position.min(src.chars().count());
        format!("{line}\n{}^", " ".repeat(column))
    }
}

// ---------------------------------------------------------------------------
// Values and contexts

/// A value an expression computes or a [`Context`] supplies.
///
/// Strings come owned ([`Value::Str`]) or borrowed ([`Value::StrRef`]); the two mean the
/// same (they compare equal), but a context that lends its strings as `StrRef` (e.g. via
/// `Value::from(name.as_str())`) keeps evaluation free of allocation.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    Bool(bool),
    Number(f64),
    /// An owned string.
    Str(String),
    /// A borrowed string.
    StrRef(&'a str),
}

/// A value with its two string forms merged.
#[derive(Clone, Copy)]
enum View<'a> {
    Bool(bool),
    Number(f64),
    Str(&'a str),
}

impl<'a> Value<'a> {
    fn view(&self) -> View<'_> {
        match self {
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => View::Number(*n),
            Value::Str(s) => View::Str(s),
            Value::StrRef(s) => View::Str(s),
        }
    }

    /// The string, if the value is one (owned or borrowed).
    pub fn as_str(&self) -> Option<&str> {
        match self.view() {
            View::Str(s) => Some(s),
            View::Bool(_) | View::Number(_) => None,
        }
    }

    /// Truthiness: booleans are themselves; numbers are true unless 0 or NaN; strings are
    /// true unless empty, `"false"` or `"0"`.
    pub fn truthy(&self) -> bool {
        match self.view() {
            View::Bool(b) => b,
            View::Number(n) => n != 0.0 && !n.is_nan(),
            View::Str(s) => !(s.is_empty() || s == "false" || s == "0"),
        }
    }

    /// The value as a finite number: numbers as they are, booleans as 1 and 0, strings
    /// if they parse. `None` for anything else, NaN and infinities.
    pub fn as_number(&self) -> Option<f64> {
        let n = match self.view() {
            View::Bool(b) => f64::from(u8::from(b)),
            View::Number(n) => n,
            View::Str(s) => s.parse::<f64>().ok()?,
        };
        n.is_finite().then_some(n)
    }

    /// Detach from whatever the value borrows.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Bool(b) => Value::Bool(b),
            Value::Number(n) => Value::Number(n),
            Value::Str(s) => Value::Str(s),
            Value::StrRef(s) => Value::Str(s.to_string()),
        }
    }

    /// Reborrow: the same value, with strings borrowed from `self` (no allocation).
    pub fn borrowed(&self) -> Value<'_> {
        match self.view() {
            View::Bool(b) => Value::Bool(b),
            View::Number(n) => Value::Number(n),
            View::Str(s) => Value::StrRef(s),
        }
    }
}

/// Structural equality, with `Str` and `StrRef` of the same text equal and NaN unequal
/// to itself (as `f64`). This is not the expression language's `==`.
impl PartialEq for Value<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self.view(), other.view()) {
            (View::Bool(a), View::Bool(b)) => a == b,
            (View::Number(a), View::Number(b)) => a == b,
            (View::Str(a), View::Str(b)) => a == b,
            _ => false,
        }
    }
}

/// Prints booleans and numbers as they are and strings as expression literals (quoted).
impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.view() {
            View::Bool(b) => write!(f, "{b}"),
            View::Number(n) => write!(f, "{n}"),
            View::Str(s) => write_quoted(f, s),
        }
    }
}

impl From<bool> for Value<'_> {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<f64> for Value<'_> {
    fn from(n: f64) -> Self {
        Value::Number(n)
    }
}
impl From<u32> for Value<'_> {
    fn from(n: u32) -> Self {
        Value::Number(n.into())
    }
}
impl From<i32> for Value<'_> {
    fn from(n: i32) -> Self {
        Value::Number(n.into())
    }
}
impl From<u64> for Value<'_> {
    /// Exact up to 2^53, rounded beyond.
    fn from(n: u64) -> Self {
        Value::Number(n as f64)
    }
}
impl From<i64> for Value<'_> {
    /// Exact up to ±2^53, rounded beyond.
    fn from(n: i64) -> Self {
        Value::Number(n as f64)
    }
}
impl<'a> From<&'a str> for Value<'a> {
    fn from(s: &'a str) -> Self {
        Value::StrRef(s)
    }
}
impl From<String> for Value<'_> {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

/// What an expression is evaluated against (typically one host).
pub trait Context {
    /// The value at `path` (the parts of a dotted attribute path, e.g.
    /// `["labels", "ssd"]` for `labels.ssd`), or `None` if it is missing.
    ///
    /// Return borrowed strings (`Value::from(&*self.name)`) to keep evaluation free of
    /// allocation. Slice patterns make implementations short:
    /// `match path { ["cpu_model"] => …, ["labels", key] => …, _ => None }`.
    fn lookup(&self, path: &[&str]) -> Option<Value<'_>>;
}

impl<C: Context + ?Sized> Context for &C {
    fn lookup(&self, path: &[&str]) -> Option<Value<'_>> {
        (**self).lookup(path)
    }
}

/// The empty context: every attribute is missing.
impl Context for () {
    fn lookup(&self, _path: &[&str]) -> Option<Value<'_>> {
        None
    }
}

// ---------------------------------------------------------------------------
// AST

/// An attribute path such as `labels.ssd`, split into its parts at parse time.
///
/// Equality and hashing look only at the parts, not at [`Path::position`].
#[derive(Debug, Clone)]
pub struct Path {
    segments: Box<[Box<str>]>,
    position: usize,
}

impl Path {
    /// The parts of the path, in order.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.segments.iter().map(|s| &**s)
    }

    /// Character offset of the path in the source it was parsed from (0 for
    /// expressions not built by [`Expr::parse`]); handy for [`ParseError::new`].
    pub fn position(&self) -> usize {
        self.position
    }

    /// Calls `f` with the parts as the `&[&str]` a [`Context`] receives, without
    /// allocating, so that validation can share the context's matching logic.
    pub fn with_segments<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
        let mut buf: [&str; MAX_PATH_SEGMENTS] = [""; MAX_PATH_SEGMENTS];
        let n = self.segments.len().min(MAX_PATH_SEGMENTS);
        for (slot, segment) in buf.iter_mut().zip(self.segments.iter()) {
            *slot = segment;
        }
        f(&buf[..n])
    }
}

impl PartialEq for Path {
    fn eq(&self, other: &Self) -> bool {
        self.segments == other.segments
    }
}
impl Eq for Path {}
impl Hash for Path {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.segments.hash(state);
    }
}

/// The dotted form, e.g. `labels.ssd`.
impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(segment)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
        }
    }

    fn is_equality(self) -> bool {
        matches!(self, CmpOp::Eq | CmpOp::Ne)
    }

    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl ArithOp {
    fn apply(self, a: f64, b: f64) -> Option<f64> {
        let r = match self {
            ArithOp::Add => a + b,
            ArithOp::Sub => a - b,
            ArithOp::Mul => a * b,
            ArithOp::Div if b == 0.0 => return None,
            ArithOp::Div => a / b,
        };
        r.is_finite().then_some(r)
    }

    fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => " + ",
            ArithOp::Sub => " - ",
            ArithOp::Mul => " * ",
            ArithOp::Div => " / ",
        }
    }
}

/// The `(operator, operand)` pairs after the first operand of a sum or product.
type Chain = Box<[(ArithOp, Node)]>;

/// Chains of the same operator are n-ary, so that AST depth (and with it the recursion
/// depth of evaluation, printing and dropping) is bounded by the nesting the parser
/// limits, not by the length of `a && b && c && …`.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Two or more operands.
    Or(Box<[Node]>),
    /// Two or more operands.
    And(Box<[Node]>),
    Not(Box<Node>),
    Cmp(Box<Node>, CmpOp, Box<Node>),
    /// `first (+|- operand)+`; only `Add` and `Sub`.
    Sum(Box<Node>, Chain),
    /// `first (*|/ operand)+`; only `Mul` and `Div`.
    Product(Box<Node>, Chain),
    Neg(Box<Node>),
    /// Finite and non-negative (a leading `-` is a `Neg`).
    Number(f64),
    Str(Box<str>),
    Bool(bool),
    Path(Path),
}

// Binding strength, for printing.
const PREC_OR: u8 = 1;
const PREC_AND: u8 = 2;
const PREC_NOT: u8 = 3;
const PREC_CMP: u8 = 4;
const PREC_SUM: u8 = 5;
const PREC_PRODUCT: u8 = 6;
const PREC_NEG: u8 = 7;
const PREC_PRIMARY: u8 = 8;

impl Node {
    fn prec(&self) -> u8 {
        match self {
            Node::Or(_) => PREC_OR,
            Node::And(_) => PREC_AND,
            Node::Not(_) => PREC_NOT,
            Node::Cmp(..) => PREC_CMP,
            Node::Sum(..) => PREC_SUM,
            Node::Product(..) => PREC_PRODUCT,
            Node::Neg(_) => PREC_NEG,
            Node::Number(_) | Node::Str(_) | Node::Bool(_) | Node::Path(_) => PREC_PRIMARY,
        }
    }

    /// Truthiness of the node, without building a `Value` where avoidable.
    fn test<C: Context + ?Sized>(&self, ctx: &C) -> bool {
        match self {
            Node::Or(xs) => xs.iter().any(|x| x.test(ctx)),
            Node::And(xs) => xs.iter().all(|x| x.test(ctx)),
            Node::Not(x) => !x.test(ctx),
            Node::Cmp(l, op, r) => {
                let Some(l) = l.value(ctx) else {
                    return false;
                };
                let Some(r) = r.value(ctx) else {
                    return false;
                };
                compare(&l, *op, &r)
            }
            Node::Bool(b) => *b,
            _ => self.value(ctx).is_some_and(|v| v.truthy()),
        }
    }

    /// The node's value; `None` is missing.
    fn value<'a, C: Context + ?Sized>(&'a self, ctx: &'a C) -> Option<Value<'a>> {
        match self {
            Node::Or(_) | Node::And(_) | Node::Not(_) | Node::Cmp(..) => {
                Some(Value::Bool(self.test(ctx)))
            }
            Node::Sum(first, rest) | Node::Product(first, rest) => {
                let mut acc = number(first.value(ctx))?;
                for (op, x) in rest.iter() {
                    acc = op.apply(acc, number(x.value(ctx))?)?;
                }
                Some(Value::Number(acc))
            }
            Node::Neg(x) => number(x.value(ctx)).map(|n| Value::Number(-n)),
            Node::Number(n) => Some(Value::Number(*n)),
            Node::Str(s) => Some(Value::StrRef(s)),
            Node::Bool(b) => Some(Value::Bool(*b)),
            Node::Path(p) => p.with_segments(|segments| ctx.lookup(segments)),
        }
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<&'a Path>) {
        match self {
            Node::Or(xs) | Node::And(xs) => xs.iter().for_each(|x| x.collect_paths(out)),
            Node::Not(x) | Node::Neg(x) => x.collect_paths(out),
            Node::Cmp(l, _, r) => {
                l.collect_paths(out);
                r.collect_paths(out);
            }
            Node::Sum(first, rest) | Node::Product(first, rest) => {
                first.collect_paths(out);
                rest.iter().for_each(|(_, x)| x.collect_paths(out));
            }
            Node::Path(p) => out.push(p),
            Node::Number(_) | Node::Str(_) | Node::Bool(_) => {}
        }
    }

    /// Prints `self`, parenthesised if it binds less tightly than `min`.
    fn fmt_at(&self, min: u8, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prec() < min {
            f.write_str("(")?;
            self.fmt_node(f)?;
            f.write_str(")")
        } else {
            self.fmt_node(f)
        }
    }

    fn fmt_node(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // An operand of the same n-ary operator is parenthesised so that the
            // printed form parses back to the same tree.
            Node::Or(xs) => fmt_joined(xs, " || ", PREC_AND, f),
            Node::And(xs) => fmt_joined(xs, " && ", PREC_NOT, f),
            Node::Not(x) => {
                f.write_str("!")?;
                // `!a == b` would parse the same as `!(a == b)`, but reads wrongly.
                let min = if matches!(**x, Node::Not(_)) {
                    PREC_NOT
                } else {
                    PREC_NEG
                };
                x.fmt_at(min, f)
            }
            Node::Cmp(l, op, r) => {
                l.fmt_at(PREC_SUM, f)?;
                write!(f, " {} ", op.symbol())?;
                r.fmt_at(PREC_SUM, f)
            }
            Node::Sum(first, rest) => fmt_chain(first, rest, PREC_PRODUCT, f),
            Node::Product(first, rest) => fmt_chain(first, rest, PREC_NEG, f),
            Node::Neg(x) => {
                f.write_str("-")?;
                x.fmt_at(PREC_NEG, f)
            }
            Node::Number(n) => write!(f, "{n}"),
            Node::Str(s) => write_quoted(f, s),
            Node::Bool(b) => write!(f, "{b}"),
            Node::Path(p) => write!(f, "{p}"),
        }
    }
}

fn fmt_joined(xs: &[Node], sep: &str, min: u8, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, x) in xs.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        x.fmt_at(min, f)?;
    }
    Ok(())
}

fn fmt_chain(
    first: &Node,
    rest: &[(ArithOp, Node)],
    min: u8,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    first.fmt_at(min, f)?;
    for (op, x) in rest {
        f.write_str(op.symbol())?;
        x.fmt_at(min, f)?;
    }
    Ok(())
}

fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            c => fmt::Write::write_char(f, c)?,
        }
    }
    f.write_str("\"")
}

/// An arithmetic operand: a number, or a string that parses as one (host
/// labels are strings, so `labels.speed * 2` works).
fn number(v: Option<Value<'_>>) -> Option<f64> {
    match v? {
        Value::Number(n) => Some(n),
        Value::Bool(_) => None,
        s => s.as_number(),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

fn compare(l: &Value<'_>, op: CmpOp, r: &Value<'_>) -> bool {
    let ord = match (l.view(), r.view()) {
        (View::Number(a), View::Number(b)) => a.partial_cmp(&b),
        (View::Str(a), View::Str(b)) => Some(a.cmp(b)),
        (View::Str(s), View::Number(b)) => s.parse::<f64>().ok().and_then(|a| a.partial_cmp(&b)),
        (View::Number(a), View::Str(s)) => s.parse::<f64>().ok().and_then(|b| a.partial_cmp(&b)),
        (View::Bool(a), View::Bool(b)) if op.is_equality() => Some(a.cmp(&b)),
        (View::Bool(a), View::Str(s)) if op.is_equality() => parse_bool(s).map(|b| a.cmp(&b)),
        (View::Str(s), View::Bool(b)) if op.is_equality() => parse_bool(s).map(|a| a.cmp(&b)),
        _ => None,
    };
    ord.is_some_and(|o| op.holds(o))
}

// ---------------------------------------------------------------------------
// Expressions

/// A parsed requirement or rank expression. See the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    root: Node,
}

impl Expr {
    /// Parses `src`; errors point at the offending token by character offset.
    pub fn parse(src: &str) -> Result<Expr, ParseError> {
        if src.chars().nth(MAX_SOURCE_CHARS).is_some() {
            return Err(ParseError::new(
                MAX_SOURCE_CHARS,
                format!("expression is too long (at most {MAX_SOURCE_CHARS} characters)"),
            ));
        }
        let mut parser = Parser::new(src)?;
        let root = parser.parse_or()?;
        if parser.cur.tok != Tok::End {
            return Err(parser.unexpected_after_operand("an operator or end of expression"));
        }
        Ok(Expr { root })
    }

    /// The expression's value, or `None` if it is missing.
    pub fn eval<'a, C: Context + ?Sized>(&'a self, ctx: &'a C) -> Option<Value<'a>> {
        self.root.value(ctx)
    }

    /// Whether the expression holds (its value's truthiness; missing is false).
    pub fn eval_bool(&self, ctx: &(impl Context + ?Sized)) -> bool {
        self.root.test(ctx)
    }

    /// The expression's value as a finite number (booleans as 1 and 0, numeric strings
    /// parsed), for rank expressions; `None` if missing or not a number.
    pub fn eval_number(&self, ctx: &(impl Context + ?Sized)) -> Option<f64> {
        self.root.value(ctx).and_then(|v| v.as_number())
    }

    /// Every attribute path the expression reads, in source order (repeats included).
    pub fn paths(&self) -> impl Iterator<Item = &Path> + '_ {
        let mut out = Vec::new();
        self.root.collect_paths(&mut out);
        out.into_iter()
    }
}

impl FromStr for Expr {
    type Err = ParseError;

    fn from_str(src: &str) -> Result<Self, Self::Err> {
        Expr::parse(src)
    }
}

/// The canonical form: single spaces around binary operators, parentheses only where
/// needed. It parses back to an equal `Expr`.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt_node(f)
    }
}

// ---------------------------------------------------------------------------
// Lexer and parser

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Path(Vec<Box<str>>),
    True,
    False,
    LParen,
    RParen,
    Bang,
    AndAnd,
    OrOr,
    Cmp(CmpOp),
    Plus,
    Minus,
    Star,
    Slash,
    End,
}

impl Tok {
    fn starts_operand(&self) -> bool {
        matches!(
            self,
            Tok::Num(_)
                | Tok::Str(_)
                | Tok::Path(_)
                | Tok::True
                | Tok::False
                | Tok::LParen
                | Tok::Bang
                | Tok::Minus
        )
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self, Tok::Path(segments) if segments.len() == 1 && &*segments[0] == word)
    }
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    /// Character offsets.
    start: usize,
    end: usize,
}

struct Parser {
    chars: Vec<char>,
    /// Next character to lex.
    pos: usize,
    /// The lookahead token.
    cur: Token,
    depth: usize,
    /// Span of the token just consumed, if it was an attribute path (for hints).
    prev_path: Option<(usize, usize)>,
}

fn describe_char(c: Option<char>) -> String {
    match c {
        None => "end of expression".to_string(),
        Some(c) => format!("'{}'", c.escape_debug()),
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

impl Parser {
    fn new(src: &str) -> Result<Parser, ParseError> {
        let mut parser = Parser {
            chars: src.chars().collect(),
            pos: 0,
            cur: Token {
                tok: Tok::End,
                start: 0,
                end: 0,
            },
            depth: 0,
            prev_path: None,
        };
        parser.cur = parser.lex()?;
        Ok(parser)
    }

    fn char_at(&self, i: usize) -> Option<char> {
        self.chars.get(i).copied()
    }

    fn lex(&mut self) -> Result<Token, ParseError> {
        while self.char_at(self.pos).is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(c) = self.char_at(start) else {
            return Ok(Token {
                tok: Tok::End,
                start,
                end: start,
            });
        };
        let next = self.char_at(start + 1);
        let unknown = |op: &str, instead: &str| {
            Err(ParseError::new(
                start,
                format!("unknown operator '{op}'; did you mean '{instead}'?"),
            ))
        };
        let (tok, width) = match c {
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            '+' => (Tok::Plus, 1),
            '-' => (Tok::Minus, 1),
            '*' => (Tok::Star, 1),
            '/' => (Tok::Slash, 1),
            '!' if next == Some('=') => (Tok::Cmp(CmpOp::Ne), 2),
            '!' => (Tok::Bang, 1),
            '=' if next == Some('=') && self.char_at(start + 2) == Some('=') => {
                return unknown("===", "==")
            }
            '=' if next == Some('=') => (Tok::Cmp(CmpOp::Eq), 2),
            '=' if next == Some('<') => return unknown("=<", "<="),
            '=' if next == Some('>') => return unknown("=>", ">="),
            '=' => return unknown("=", "=="),
            '<' if next == Some('=') => (Tok::Cmp(CmpOp::Le), 2),
            '<' if next == Some('>') => return unknown("<>", "!="),
            '<' => (Tok::Cmp(CmpOp::Lt), 1),
            '>' if next == Some('=') => (Tok::Cmp(CmpOp::Ge), 2),
            '>' => (Tok::Cmp(CmpOp::Gt), 1),
            '&' if next == Some('&') => (Tok::AndAnd, 2),
            '&' => return unknown("&", "&&"),
            '|' if next == Some('|') => (Tok::OrOr, 2),
            '|' => return unknown("|", "||"),
            '"' => return self.lex_string(start),
            '0'..='9' => return self.lex_number(start),
            c if is_ident_start(c) => return self.lex_path(start),
            '\'' => {
                return Err(ParseError::new(
                    start,
                    "unexpected character '''; strings are written in double quotes",
                ))
            }
            c => {
                return Err(ParseError::new(
                    start,
                    format!("unexpected character {}", describe_char(Some(c))),
                ))
            }
        };
        self.pos = start + width;
        Ok(Token {
            tok,
            start,
            end: self.pos,
        })
    }

    fn lex_string(&mut self, start: usize) -> Result<Token, ParseError> {
        let mut s = String::new();
        let mut i = start + 1;
        loop {
            match self.char_at(i) {
                None => {
                    return Err(ParseError::new(
                        start,
                        "unterminated string: expected a closing '\"' but found end of expression",
                    ))
                }
                Some('"') => break,
                Some('\\') => {
                    match self.char_at(i + 1) {
                        Some(c @ ('"' | '\\')) => s.push(c),
                        Some(c) => {
                            return Err(ParseError::new(
                                i,
                                format!(
                                    "unknown escape '\\{}' in string; only \\\" and \\\\ are allowed",
                                    c.escape_debug()
                                ),
                            ))
                        }
                        None => {
                            return Err(ParseError::new(
                                start,
                                "unterminated string: expected a closing '\"' but found end of expression",
                            ))
                        }
                    }
                    i += 2;
                }
                Some(c) => {
                    s.push(c);
                    i += 1;
                }
            }
        }
        self.pos = i + 1;
        Ok(Token {
            tok: Tok::Str(s),
            start,
            end: self.pos,
        })
    }

    fn lex_number(&mut self, start: usize) -> Result<Token, ParseError> {
        let digits_from = |p: &Parser, mut i: usize| {
            while p.char_at(i).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
            i
        };
        let mut end = digits_from(self, start);
        if self.char_at(end) == Some('.') {
            let after = self.char_at(end + 1);
            if !after.is_some_and(|c| c.is_ascii_digit()) {
                return Err(ParseError::new(
                    end + 1,
                    format!(
                        "expected a digit after '.' in a number but found {}",
                        describe_char(after)
                    ),
                ));
            }
            end = digits_from(self, end + 1);
        }
        let text: String = self.chars[start..end].iter().collect();
        let n: f64 = text
            .parse()
            .map_err(|_| ParseError::new(start, format!("invalid number {text}")))?;
        if !n.is_finite() {
            return Err(ParseError::new(start, "number is too large"));
        }
        self.pos = end;
        Ok(Token {
            tok: Tok::Num(n),
            start,
            end,
        })
    }

    fn lex_path(&mut self, start: usize) -> Result<Token, ParseError> {
        let mut segments = Vec::new();
        let mut i = start;
        loop {
            let from = i;
            while self.char_at(i).is_some_and(is_ident_char) {
                i += 1;
            }
            segments.push(
                self.chars[from..i]
                    .iter()
                    .collect::<String>()
                    .into_boxed_str(),
            );
            if self.char_at(i) != Some('.') {
                break;
            }
            match self.char_at(i + 1) {
                Some(c) if is_ident_start(c) => i += 1,
                other => {
                    return Err(ParseError::new(
                        i + 1,
                        format!(
                            "expected an attribute name after '.' but found {}",
                            describe_char(other)
                        ),
                    ))
                }
            }
        }
        if segments.len() > MAX_PATH_SEGMENTS {
            return Err(ParseError::new(
                start,
                format!("attribute path has too many parts (at most {MAX_PATH_SEGMENTS})"),
            ));
        }
        self.pos = i;
        let tok = match &*segments {
            [word] if &**word == "true" => Tok::True,
            [word] if &**word == "false" => Tok::False,
            _ => Tok::Path(segments),
        };
        Ok(Token { tok, start, end: i })
    }

    /// Consumes the lookahead token, returning it, and lexes the next one.
    fn bump(&mut self) -> Result<Token, ParseError> {
        let next = self.lex()?;
        let token = std::mem::replace(&mut self.cur, next);
        self.prev_path = matches!(token.tok, Tok::Path(_)).then_some((token.start, token.end));
        Ok(token)
    }

    fn describe_cur(&self) -> String {
        const MAX: usize = 24;
        let t = &self.cur;
        if t.tok == Tok::End {
            return "end of expression".to_string();
        }
        let mut text: String = self.chars[t.start..t.end].iter().take(MAX).collect();
        if t.end - t.start > MAX {
            text.push('…');
        }
        match t.tok {
            Tok::Num(_) => format!("number {text}"),
            Tok::Str(_) => format!("string {text}"),
            _ => format!("'{text}'"),
        }
    }

    fn error_at_cur(&self, message: String) -> ParseError {
        ParseError::new(self.cur.start, message)
    }

    /// An operand was complete and the lookahead is neither an operator that may follow
    /// nor what the caller `expected`.
    fn unexpected_after_operand(&self, expected: &str) -> ParseError {
        let tok = &self.cur.tok;
        let message = if tok.is_word("and") {
            "unknown operator 'and'; did you mean '&&'?".to_string()
        } else if tok.is_word("or") {
            "unknown operator 'or'; did you mean '||'?".to_string()
        } else if *tok == Tok::RParen {
            "unmatched ')'".to_string()
        } else {
            let mut message = format!("expected {expected} but found {}", self.describe_cur());
            // `a-(b)` or `a- 1`: the '-' was taken as part of the name.
            if let Some((start, end)) = self.prev_path {
                if self.chars[end - 1] == '-' {
                    let name: String = self.chars[start..end].iter().collect();
                    message.push_str(&format!(
                        "; note that the '-' ending '{name}' is part of the name: \
                         put a space before '-' to subtract"
                    ));
                }
            }
            message
        };
        self.error_at_cur(message)
    }

    fn enter(&mut self, position: usize) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ParseError::new(
                position,
                format!("expression is nested too deeply (at most {MAX_DEPTH} levels)"),
            ));
        }
        Ok(())
    }

    fn parse_or(&mut self) -> Result<Node, ParseError> {
        let first = self.parse_and()?;
        if self.cur.tok != Tok::OrOr {
            return Ok(first);
        }
        let mut xs = vec![first];
        while self.cur.tok == Tok::OrOr {
            self.bump()?;
            xs.push(self.parse_and()?);
        }
        Ok(Node::Or(xs.into_boxed_slice()))
    }

    fn parse_and(&mut self) -> Result<Node, ParseError> {
        let first = self.parse_not()?;
        if self.cur.tok != Tok::AndAnd {
            return Ok(first);
        }
        let mut xs = vec![first];
        while self.cur.tok == Tok::AndAnd {
            self.bump()?;
            xs.push(self.parse_not()?);
        }
        Ok(Node::And(xs.into_boxed_slice()))
    }

    fn parse_not(&mut self) -> Result<Node, ParseError> {
        if self.cur.tok != Tok::Bang {
            return self.parse_cmp();
        }
        let bang = self.bump()?;
        self.enter(bang.start)?;
        let inner = self.parse_not()?;
        self.depth -= 1;
        Ok(Node::Not(Box::new(inner)))
    }

    fn parse_cmp(&mut self) -> Result<Node, ParseError> {
        let left = self.parse_sum()?;
        let Tok::Cmp(op) = self.cur.tok else {
            return Ok(left);
        };
        self.bump()?;
        let right = self.parse_sum()?;
        if let Tok::Cmp(second) = self.cur.tok {
            return Err(self.error_at_cur(format!(
                "comparisons cannot be chained: found '{}' after a comparison; \
                 combine them with '&&' or use parentheses",
                second.symbol()
            )));
        }
        Ok(Node::Cmp(Box::new(left), op, Box::new(right)))
    }

    fn parse_chain(
        &mut self,
        ops: fn(&Tok) -> Option<ArithOp>,
        operand: fn(&mut Parser) -> Result<Node, ParseError>,
        make: fn(Box<Node>, Chain) -> Node,
    ) -> Result<Node, ParseError> {
        let first = operand(self)?;
        let mut rest = Vec::new();
        while let Some(op) = ops(&self.cur.tok) {
            self.bump()?;
            rest.push((op, operand(self)?));
        }
        if rest.is_empty() {
            Ok(first)
        } else {
            Ok(make(Box::new(first), rest.into_boxed_slice()))
        }
    }

    fn parse_sum(&mut self) -> Result<Node, ParseError> {
        self.parse_chain(
            |t| match t {
                Tok::Plus => Some(ArithOp::Add),
                Tok::Minus => Some(ArithOp::Sub),
                _ => None,
            },
            Parser::parse_term,
            Node::Sum,
        )
    }

    fn parse_term(&mut self) -> Result<Node, ParseError> {
        self.parse_chain(
            |t| match t {
                Tok::Star => Some(ArithOp::Mul),
                Tok::Slash => Some(ArithOp::Div),
                _ => None,
            },
            Parser::parse_unary,
            Node::Product,
        )
    }

    fn parse_unary(&mut self) -> Result<Node, ParseError> {
        if self.cur.tok != Tok::Minus {
            return self.parse_primary();
        }
        let minus = self.bump()?;
        self.enter(minus.start)?;
        let inner = self.parse_unary()?;
        self.depth -= 1;
        Ok(Node::Neg(Box::new(inner)))
    }

    fn parse_primary(&mut self) -> Result<Node, ParseError> {
        if !self.cur.tok.starts_operand() || matches!(self.cur.tok, Tok::Bang | Tok::Minus) {
            return Err(self.error_at_cur(format!(
                "expected a value (number, string, true, false, attribute or '(') but found {}",
                self.describe_cur()
            )));
        }
        let token = self.bump()?;
        Ok(match token.tok {
            Tok::Num(n) => Node::Number(n),
            Tok::Str(s) => Node::Str(s.into_boxed_str()),
            Tok::True => Node::Bool(true),
            Tok::False => Node::Bool(false),
            Tok::Path(segments) => {
                if segments.len() == 1
                    && &*segments[0] == "not"
                    && self.cur.tok.starts_operand()
                    && self.cur.tok != Tok::Minus
                {
                    return Err(ParseError::new(
                        token.start,
                        "unknown operator 'not'; did you mean '!'?",
                    ));
                }
                Node::Path(Path {
                    segments: segments.into_boxed_slice(),
                    position: token.start,
                })
            }
            Tok::LParen => {
                self.enter(token.start)?;
                let inner = self.parse_or()?;
                if self.cur.tok != Tok::RParen {
                    return Err(self.unexpected_after_operand("')'"));
                }
                self.bump()?;
                self.depth -= 1;
                inner
            }
            // Excluded by the check above.
            _ => {
                return Err(ParseError::new(
                    token.start,
                    "expected a value (number, string, true, false, attribute or '(')",
                ))
            }
        })
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A context from `(dotted path, value)` pairs; lends its values without allocating.
    struct Map(Vec<(&'static str, Value<'static>)>);

    impl Context for Map {
        fn lookup(&self, path: &[&str]) -> Option<Value<'_>> {
            self.0
                .iter()
                .find(|(k, _)| k.split('.').eq(path.iter().copied()))
                .map(|(_, v)| v.borrowed())
        }
    }

    fn ctx() -> Map {
        Map(vec![
            ("cpu_model", Value::from("EPYC")),
            ("labels.ssd", Value::from("true")),
            ("labels.zone", Value::from("a")),
            ("labels.rack-1", Value::from("yes")),
            ("free.vcpus", Value::from(12u32)),
            ("free.memory_mib", Value::from(8192u32)),
            ("load", Value::from(0.25)),
            ("count", Value::from("10")),
            ("word", Value::from("abc")),
            ("t", Value::Bool(true)),
            ("f", Value::Bool(false)),
            ("nan", Value::Number(f64::NAN)),
            ("inf", Value::Number(f64::INFINITY)),
        ])
    }

    fn p(src: &str) -> Expr {
        Expr::parse(src).unwrap_or_else(|e| panic!("{src:?}: {e}\n{}", e.pointer(src)))
    }

    fn holds(src: &str) -> bool {
        p(src).eval_bool(&ctx())
    }

    fn num(src: &str) -> Option<f64> {
        p(src).eval_number(&ctx())
    }

    #[test]
    fn precedence() {
        let same = [
            ("a || b && c", "a || (b && c)"),
            ("a && b || c && d", "(a && b) || (c && d)"),
            ("!a && b", "(!a) && b"),
            ("!a == b", "!(a == b)"),
            ("a == b && c", "(a == b) && c"),
            ("a + b * c", "a + (b * c)"),
            ("a * b + c", "(a * b) + c"),
            ("a + b == c * d", "(a + b) == (c * d)"),
            ("-a * b", "(-a) * b"),
            ("- - a", "-(-a)"),
            ("!!a", "!(!a)"),
            ("((a))", "a"),
        ];
        for (a, b) in same {
            assert_eq!(p(a), p(b), "{a} vs {b}");
        }
        assert_ne!(p("a || b && c"), p("(a || b) && c"));
        assert_ne!(p("a - b - c"), p("a - (b - c)"));
        assert_ne!(p("a && b && c"), p("a && (b && c)"));

        assert_eq!(num("1 + 2 * 3"), Some(7.0));
        assert_eq!(num("(1 + 2) * 3"), Some(9.0));
        assert_eq!(num("10 - 4 - 3"), Some(3.0));
        assert_eq!(num("100 / 10 / 5"), Some(2.0));
        assert_eq!(num("-2 * 3"), Some(-6.0));
        assert_eq!(num("2 - -3"), Some(5.0));
        assert_eq!(num("--4"), Some(4.0));
        assert!(holds("true || false && false"));
        assert!(!holds("(true || false) && false"));
        assert!(!holds("!false && false"));
        assert!(holds("!(1 == 2)"));
        assert!(holds("!1 == 2"));
    }

    #[test]
    fn canonical_display() {
        let cases = [
            ("a||b&&c", "a || b && c"),
            ("(a||b)&&c", "(a || b) && c"),
            ("(a && b) && c", "(a && b) && c"),
            ("a && (b && c)", "a && (b && c)"),
            ("!a==b", "!(a == b)"),
            ("!(a)", "!a"),
            ("!!(a&&b)", "!!(a && b)"),
            ("!-a", "!-a"),
            ("(1<2)==true", "(1 < 2) == true"),
            ("a - (b - c)", "a - (b - c)"),
            ("a -b", "a - b"),
            ("a-b", "a-b"),
            ("(a - b)-c", "(a - b) - c"),
            ("-(a*b)", "-(a * b)"),
            ("- 5", "-5"),
            ("007.50", "7.5"),
            ("1000000000000000000000", "1000000000000000000000"),
            ("0.0000001", "0.0000001"),
            (r#" "a\"b\\c" "#, r#""a\"b\\c""#),
            ("labels.rack-1 != \"x\"", "labels.rack-1 != \"x\""),
            ("(((x)))", "x"),
        ];
        for (src, want) in cases {
            let e = p(src);
            assert_eq!(e.to_string(), want, "{src}");
            assert_eq!(p(want), e, "{src}");
        }
    }

    #[test]
    fn comparison_operators() {
        for (src, want) in [
            ("1 == 1", true),
            ("1 == 2", false),
            ("1 != 2", true),
            ("1 != 1", false),
            ("1 < 2", true),
            ("2 < 1", false),
            ("1 < 1", false),
            ("1 <= 1", true),
            ("2 <= 1", false),
            ("2 > 1", true),
            ("1 > 1", false),
            ("1 >= 1", true),
            ("0.5 >= 1", false),
            ("0.1 + 0.2 > 0.3", true),
            ("free.memory_mib >= 4096", true),
            ("free.vcpus * 2 == 24", true),
            // Strings: lexicographic.
            (r#""abc" < "abd""#, true),
            (r#""b" > "abc""#, true),
            (r#""abc" == "abc""#, true),
            (r#""abc" != "abc""#, false),
            (r#""" < "a""#, true),
            (r#""Z" < "a""#, true),
            (r#""10" < "9""#, true),
            (r#"cpu_model == "EPYC""#, true),
            (r#"cpu_model != "EPYC""#, false),
            // String vs number: parsed if possible, else false.
            (r#""10" == 10"#, true),
            (r#""10" > 9"#, true),
            ("count > 9", true),
            ("count == 10.0", true),
            (r#"9 < "10""#, true),
            (r#""abc" == 0"#, false),
            (r#""abc" != 0"#, false),
            (r#""abc" < 0"#, false),
            ("word > 1", false),
            // Booleans: equality only.
            ("true == true", true),
            ("true != false", true),
            ("true == false", false),
            ("true < false", false),
            ("false < true", false),
            ("t == true", true),
            (r#"true == "true""#, true),
            (r#"labels.ssd == true"#, true),
            (r#""false" != true"#, true),
            (r#"true == "yes""#, false),
            (r#"true != "yes""#, false),
            ("true == 1", false),
            ("true != 1", false),
            // NaN compares false; infinities compare.
            ("nan == nan", false),
            ("nan != nan", false),
            ("nan != 1", false),
            ("inf > 1000000", true),
        ] {
            assert_eq!(holds(src), want, "{src}");
        }
    }

    #[test]
    fn logic_operators() {
        for (src, want) in [
            ("true && true", true),
            ("true && false", false),
            ("false && true", false),
            ("true || false", true),
            ("false || false", false),
            ("false || false || true", true),
            ("true && true && false", false),
            ("!true", false),
            ("!false", true),
            ("!!true", true),
            (
                r#"cpu_model == "EPYC" && labels.ssd && free.memory_mib >= 4096"#,
                true,
            ),
            (r#"cpu_model == "Xeon" || labels.zone == "a""#, true),
            ("labels.rack-1", true),
        ] {
            assert_eq!(holds(src), want, "{src}");
        }
        assert_eq!(p("1 && 2").eval(&()), Some(Value::Bool(true)));
        assert_eq!(p("1 || 0").eval(&()), Some(Value::Bool(true)));
        assert_eq!(p("!0").eval(&()), Some(Value::Bool(true)));
    }

    #[test]
    fn arithmetic() {
        assert_eq!(num("1 + 2"), Some(3.0));
        assert_eq!(num("5 - 7"), Some(-2.0));
        assert_eq!(num("3 * 4"), Some(12.0));
        assert_eq!(num("7 / 2"), Some(3.5));
        assert_eq!(num("-load"), Some(-0.25));
        assert_eq!(num("free.vcpus * 2 + free.memory_mib / 1024"), Some(32.0));
        // Numbers and numeric strings (labels are strings); everything
        // else, division by zero, overflow: missing.
        assert_eq!(num(r#""1" + 1"#), Some(2.0));
        assert_eq!(num("1 / 0"), None);
        assert_eq!(num("0 / 0"), None);
        assert_eq!(num("count + 1"), Some(11.0));
        assert_eq!(num("true + 1"), None);
        assert_eq!(num("-word"), None);
        assert_eq!(num("-true"), None);
        assert_eq!(num("inf + 1"), None);
        assert_eq!(num("nan * 1"), None);
        let big = "9".repeat(300);
        assert_eq!(num(&format!("{big} * {big}")), None);
        assert!(!holds("1 / 0 == 1 / 0"));
        assert!(!holds("1 / 0"));
        assert_eq!(p("1 / 0").eval(&()), None);
    }

    #[test]
    fn eval_number_conversions() {
        assert_eq!(num("true"), Some(1.0));
        assert_eq!(num("1 < 2"), Some(1.0));
        assert_eq!(num("false"), Some(0.0));
        assert_eq!(num(r#""3.5""#), Some(3.5));
        assert_eq!(num("count"), Some(10.0));
        assert_eq!(num(r#""x""#), None);
        assert_eq!(num("nope"), None);
        assert_eq!(num("nan"), None);
        assert_eq!(num("inf"), None);
        assert_eq!(num("load"), Some(0.25));
    }

    #[test]
    fn truthiness() {
        let cases: [(Value<'static>, bool); 13] = [
            (Value::Bool(true), true),
            (Value::Bool(false), false),
            (Value::Number(1.0), true),
            (Value::Number(-0.5), true),
            (Value::Number(0.0), false),
            (Value::Number(-0.0), false),
            (Value::Number(f64::NAN), false),
            (Value::from("yes"), true),
            (Value::from("true"), true),
            (Value::from(""), false),
            (Value::from("false"), false),
            (Value::from("0"), false),
            (Value::from("0.0"), true),
        ];
        for (v, want) in cases {
            assert_eq!(v.truthy(), want, "{v:?}");
            let c = Map(vec![("x", v.clone())]);
            assert_eq!(p("x").eval_bool(&c), want, "{v:?}");
            assert_eq!(p("!x").eval_bool(&c), !want, "{v:?}");
            assert_eq!(p("x && true").eval_bool(&c), want, "{v:?}");
        }
        assert!(holds("1"));
        assert!(!holds("0"));
        assert!(holds(r#""x""#));
        assert!(!holds(r#""""#));
    }

    #[test]
    fn missing_values() {
        for (src, want) in [
            ("nope", false),
            ("!nope", true),
            ("labels.gpu", false),
            ("nope == 1", false),
            ("nope != 1", false),
            (r#"nope != "x""#, false),
            ("nope == nope", false),
            ("nope != nope", false),
            ("nope < 1", false),
            ("nope >= 1", false),
            ("!(nope == 1)", true),
            ("nope || true", true),
            ("nope && true", false),
            ("nope + 1 == 1", false),
            ("-nope == 0", false),
            ("cpu_model.extra", false),
        ] {
            assert_eq!(holds(src), want, "{src}");
        }
        assert_eq!(num("nope + 1"), None);
        assert_eq!(p("nope").eval(&ctx()), None);
        assert!(!p("x").eval_bool(&()));
    }

    #[test]
    fn strings_and_escapes() {
        let e = p(r#""a\"b\\c""#);
        assert_eq!(e.eval(&()), Some(Value::from("a\"b\\c")));
        assert_eq!(e.to_string(), r#""a\"b\\c""#);
        assert_eq!(p(r#""""#).eval(&()), Some(Value::from("")));
        assert_eq!(p(r#""日本 ok""#).eval(&()), Some(Value::from("日本 ok")));
        assert_eq!(
            p("\"two\nlines\"").eval(&()),
            Some(Value::from("two\nlines"))
        );
        assert_eq!(p(r#""\\""#).eval(&()), Some(Value::from("\\")));
        assert!(holds(r#""a\"" == "a\"""#));
        assert_eq!(Value::from("q\"").to_string(), r#""q\"""#);
    }

    #[test]
    fn paths_are_listed_in_order() {
        let e =
            p(r#"(cpu_model == "x" || labels.ssd) && free.vcpus * 2 > -load && cpu_model != "y""#);
        let got: Vec<String> = e.paths().map(Path::to_string).collect();
        assert_eq!(
            got,
            ["cpu_model", "labels.ssd", "free.vcpus", "load", "cpu_model"]
        );
        let positions: Vec<usize> = e.paths().map(Path::position).collect();
        assert_eq!(positions, [1, 21, 36, 54, 62]);
        let first = e.paths().nth(1).unwrap();
        assert_eq!(first.segments().collect::<Vec<_>>(), ["labels", "ssd"]);
        assert!(first.with_segments(|s| matches!(s, ["labels", _])));
        assert_eq!(p("1 + 2").paths().count(), 0);
        assert_eq!(p("true").paths().count(), 0);
        assert_eq!(p("labels.true").paths().count(), 1);
    }

    #[test]
    fn error_positions_and_messages() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "expected a value (number, string, true, false, attribute or '(') but found end of expression"),
            ("   ", 3, "but found end of expression"),
            ("a ==", 4, "expected a value (number, string, true, false, attribute or '(') but found end of expression"),
            ("(a && b", 7, "expected ')' but found end of expression"),
            ("(a b)", 3, "expected ')' but found 'b'"),
            ("a = 1", 2, "unknown operator '='; did you mean '=='?"),
            ("a === 1", 2, "unknown operator '==='; did you mean '=='?"),
            ("a =< 1", 2, "unknown operator '=<'; did you mean '<='?"),
            ("a => 1", 2, "unknown operator '=>'; did you mean '>='?"),
            ("a <> 1", 2, "unknown operator '<>'; did you mean '!='?"),
            ("a & b", 2, "unknown operator '&'; did you mean '&&'?"),
            ("a | b", 2, "unknown operator '|'; did you mean '||'?"),
            ("a and b", 2, "unknown operator 'and'; did you mean '&&'?"),
            ("a or b", 2, "unknown operator 'or'; did you mean '||'?"),
            ("not a", 0, "unknown operator 'not'; did you mean '!'?"),
            ("x == \"abc", 5, "unterminated string"),
            ("\"abc\\", 0, "unterminated string"),
            ("a && \"x\\n\"", 7, "unknown escape '\\n' in string"),
            ("a b", 2, "expected an operator or end of expression but found 'b'"),
            ("a 12", 2, "expected an operator or end of expression but found number 12"),
            ("a \"s\"", 2, "expected an operator or end of expression but found string \"s\""),
            ("a-(b)", 2, "found '('; note that the '-' ending 'a-' is part of the name: put a space before '-' to subtract"),
            ("(x.y- 1)", 6, "expected ')' but found number 1; note that the '-' ending 'x.y-' is part"),
            ("1 < 2 < 3", 6, "comparisons cannot be chained"),
            ("a == b != c", 7, "comparisons cannot be chained"),
            ("a)", 1, "unmatched ')'"),
            ("()", 1, "expected a value (number, string, true, false, attribute or '(') but found ')'"),
            ("1 + * 2", 4, "but found '*'"),
            ("a && || b", 5, "but found '||'"),
            ("labels.", 7, "expected an attribute name after '.' but found end of expression"),
            ("labels.1x", 7, "expected an attribute name after '.' but found '1'"),
            ("labels..x", 7, "expected an attribute name after '.' but found '.'"),
            ("5. + 1", 2, "expected a digit after '.' in a number but found ' '"),
            ("5.", 2, "expected a digit after '.' in a number but found end of expression"),
            (".5", 0, "unexpected character '.'"),
            ("'x'", 0, "unexpected character '''; strings are written in double quotes"),
            ("a @ b", 2, "unexpected character '@'"),
            ("日本 == 1", 0, "unexpected character '日'"),
            ("x == \"日本\" && @", 13, "unexpected character '@'"),
            ("x == \"日本\" &&", 12, "but found end of expression"),
            ("a\t==\n", 5, "but found end of expression"),
        ];
        for &(src, position, message) in cases {
            match Expr::parse(src) {
                Ok(e) => panic!("{src:?} parsed as {e}"),
                Err(err) => {
                    assert_eq!(err.position, position, "{src:?}: {err}");
                    assert!(
                        err.message.contains(message),
                        "{src:?}: {:?} does not contain {message:?}",
                        err.message
                    );
                    assert_eq!(
                        err.to_string(),
                        format!("at position {position}: {}", err.message)
                    );
                }
            }
        }
    }

    #[test]
    fn error_display_and_pointer() {
        let src = "cpu_model == \"EPYC\" &&";
        let err = Expr::parse(src).unwrap_err();
        assert_eq!(
            err.to_string(),
            "at position 22: expected a value (number, string, true, false, attribute or '(') but found end of expression"
        );
        assert_eq!(
            err.pointer(src),
            "cpu_model == \"EPYC\" &&\n                      ^"
        );
        let src = "a\n= b";
        let err = Expr::parse(src).unwrap_err();
        assert_eq!(err.position, 2);
        assert_eq!(err.pointer(src), "a = b\n  ^");
        let src = "日本 == 1";
        assert_eq!(Expr::parse(src).unwrap_err().pointer(src), "日本 == 1\n^");
        let err: Box<dyn std::error::Error> = Box::new(ParseError::new(3, "bad"));
        assert_eq!(err.to_string(), "at position 3: bad");
        assert!(matches!(
            "a = 1".parse::<Expr>(),
            Err(ParseError { position: 2, .. })
        ));
    }

    #[test]
    fn limits() {
        let nested = |n: usize| format!("{}x{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(p(&nested(MAX_DEPTH)), p("x"));
        let err = Expr::parse(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert_eq!(err.position, MAX_DEPTH);
        assert!(err.message.contains("nested too deeply"), "{err}");

        let err = Expr::parse(&"(".repeat(MAX_SOURCE_CHARS)).unwrap_err();
        assert_eq!(err.position, MAX_DEPTH);
        let err = Expr::parse(&format!("{}x", "!".repeat(3000))).unwrap_err();
        assert_eq!(err.position, MAX_DEPTH);
        let err = Expr::parse(&format!("{}x", "-".repeat(3000))).unwrap_err();
        assert_eq!(err.position, MAX_DEPTH);
        assert!(!p(&format!("{}x", "!".repeat(MAX_DEPTH))).eval_bool(&()));

        let long = "x".repeat(MAX_SOURCE_CHARS + 1);
        let err = Expr::parse(&long).unwrap_err();
        assert_eq!(err.position, MAX_SOURCE_CHARS);
        assert!(err.message.contains("too long"), "{err}");
        assert!(Expr::parse(&"x".repeat(MAX_SOURCE_CHARS)).is_ok());
        // Character count, not bytes.
        let wide = format!("\"{}\"", "日".repeat(MAX_SOURCE_CHARS - 2));
        assert!(Expr::parse(&wide).is_ok());

        // Long chains are flat: no deep recursion in parse, eval, print or drop.
        let chain = vec!["1"; 2000].join("+");
        assert_eq!(num(&chain), Some(2000.0));
        let ands = vec!["t"; 600].join("&&");
        let e = p(&ands);
        assert!(e.eval_bool(&ctx()));
        assert_eq!(p(&e.to_string()), e);

        let segments = |n: usize| vec!["a"; n].join(".");
        assert!(Expr::parse(&segments(MAX_PATH_SEGMENTS)).is_ok());
        let err = Expr::parse(&format!("1 + {}", segments(MAX_PATH_SEGMENTS + 1))).unwrap_err();
        assert_eq!(err.position, 4);
        assert!(err.message.contains("too many parts"), "{err}");

        let err = Expr::parse(&"9".repeat(400)).unwrap_err();
        assert_eq!(err.position, 0);
        assert!(err.message.contains("too large"), "{err}");
    }

    struct Host {
        cpu_model: String,
        labels: Vec<(String, String)>,
        free_memory_mib: u64,
    }

    impl Context for Host {
        fn lookup(&self, path: &[&str]) -> Option<Value<'_>> {
            match path {
                ["cpu_model"] => Some(Value::from(self.cpu_model.as_str())),
                ["labels", key] => self
                    .labels
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| Value::from(v.as_str())),
                ["free", "memory_mib"] => Some(Value::from(self.free_memory_mib)),
                _ => None,
            }
        }
    }

    /// `cargo test -p kumo-sched --release -- --ignored --nocapture expr::tests::eval_speed`
    #[test]
    #[ignore = "timing; run in release"]
    fn eval_speed() {
        let e = p(r#"cpu_model == "EPYC" && labels.ssd && free.memory_mib >= 4096"#);
        let host = Host {
            cpu_model: "EPYC".into(),
            labels: vec![("rack".into(), "r1".into()), ("ssd".into(), "true".into())],
            free_memory_mib: 65536,
        };
        let n = 2_000_000u32;
        let started = std::time::Instant::now();
        let mut hits = 0u32;
        for _ in 0..n {
            hits += u32::from(std::hint::black_box(&e).eval_bool(std::hint::black_box(&host)));
        }
        let per = started.elapsed() / n;
        println!("eval_bool: {per:?} per evaluation");
        assert_eq!(hits, n);
        assert!(per < std::time::Duration::from_micros(1), "{per:?}");
    }

    // --- property tests ---

    fn arb_path() -> impl Strategy<Value = Path> {
        prop::collection::vec("[A-Za-z_][A-Za-z0-9_-]{0,5}", 1..4)
            .prop_filter("keywords are literals", |s| {
                !(s.len() == 1 && (s[0] == "true" || s[0] == "false"))
            })
            .prop_map(|segments| Path {
                segments: segments.into_iter().map(String::into_boxed_str).collect(),
                position: 0,
            })
    }

    /// Paths from a small set, so that evaluation against [`arb_ctx`] hits.
    fn arb_known_path() -> impl Strategy<Value = Path> {
        prop::sample::select(&["a", "b", "labels.x", "free.n"][..]).prop_map(|s| Path {
            segments: s.split('.').map(Box::from).collect(),
            position: 0,
        })
    }

    fn arb_leaf(path: BoxedStrategy<Path>) -> BoxedStrategy<Node> {
        prop_oneof![
            (0u32..100_000).prop_map(|n| Node::Number(n.into())),
            (0.0f64..1e12).prop_map(Node::Number),
            "(?s).{0,6}".prop_map(|s| Node::Str(s.into())),
            "[a\"\\\\ ]{0,4}".prop_map(|s| Node::Str(s.into())),
            any::<bool>().prop_map(Node::Bool),
            path.prop_map(Node::Path),
        ]
        .boxed()
    }

    fn arb_node(path: BoxedStrategy<Path>) -> impl Strategy<Value = Node> {
        let cmp = prop::sample::select(
            &[
                CmpOp::Eq,
                CmpOp::Ne,
                CmpOp::Lt,
                CmpOp::Le,
                CmpOp::Gt,
                CmpOp::Ge,
            ][..],
        );
        arb_leaf(path).prop_recursive(6, 64, 4, move |inner| {
            let sum_op = prop::sample::select(&[ArithOp::Add, ArithOp::Sub][..]);
            let product_op = prop::sample::select(&[ArithOp::Mul, ArithOp::Div][..]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..4).prop_map(|xs| Node::Or(xs.into())),
                prop::collection::vec(inner.clone(), 2..4).prop_map(|xs| Node::And(xs.into())),
                inner.clone().prop_map(|x| Node::Not(Box::new(x))),
                (inner.clone(), cmp.clone(), inner.clone()).prop_map(|(l, op, r)| Node::Cmp(
                    Box::new(l),
                    op,
                    Box::new(r)
                )),
                (
                    inner.clone(),
                    prop::collection::vec((sum_op, inner.clone()), 1..3)
                )
                    .prop_map(|(first, rest)| Node::Sum(Box::new(first), rest.into())),
                (
                    inner.clone(),
                    prop::collection::vec((product_op, inner.clone()), 1..3)
                )
                    .prop_map(|(first, rest)| Node::Product(Box::new(first), rest.into())),
                inner.prop_map(|x| Node::Neg(Box::new(x))),
            ]
        })
    }

    fn arb_value() -> impl Strategy<Value = Value<'static>> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<f64>().prop_map(Value::Number),
            (-10i32..10).prop_map(Value::from),
            "(?s).{0,6}".prop_map(Value::from),
            prop::sample::select(&["", "0", "false", "true", "12.5", "NaN", "inf", "-3"][..])
                .prop_map(Value::from),
        ]
    }

    /// Values for the paths of [`arb_known_path`]; `None` is missing.
    #[derive(Debug)]
    struct AnyCtx(Vec<Option<Value<'static>>>);

    impl Context for AnyCtx {
        fn lookup(&self, path: &[&str]) -> Option<Value<'_>> {
            let i = match path {
                ["a"] => 0,
                ["b"] => 1,
                ["labels", "x"] => 2,
                ["free", "n"] => 3,
                _ => return None,
            };
            self.0[i].as_ref().map(Value::borrowed)
        }
    }

    fn arb_ctx() -> impl Strategy<Value = AnyCtx> {
        prop::collection::vec(prop::option::of(arb_value()), 4).prop_map(AnyCtx)
    }

    fn check_eval(e: &Expr, c: &AnyCtx) {
        let b = e.eval_bool(c);
        let v = e.eval(c);
        assert_eq!(b, v.as_ref().is_some_and(Value::truthy), "{e}");
        if let Some(n) = e.eval_number(c) {
            assert!(n.is_finite(), "{e}: {n}");
        }
        assert_eq!(
            e.eval_bool(&()),
            e.eval(&()).is_some_and(|v| v.truthy()),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 1000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn display_round_trips(root in arb_node(arb_path().boxed())) {
            let e = Expr { root };
            let s = e.to_string();
            let back = Expr::parse(&s).map_err(|err| {
                TestCaseError::fail(format!("{s:?}: {err}\n{}", err.pointer(&s)))
            })?;
            prop_assert_eq!(&back, &e, "{}", s);
            prop_assert_eq!(back.to_string(), s);
        }

        #[test]
        fn arbitrary_input_never_panics(src in any::<String>()) {
            check_parse(&src)?;
        }

        #[test]
        fn expression_like_input_never_panics(
            src in "[a-z0-9_.()!=<>&|+*/\"\\\\ -]{0,40}"
        ) {
            check_parse(&src)?;
        }

        #[test]
        fn evaluation_never_panics(root in arb_node(arb_known_path().boxed()), c in arb_ctx()) {
            check_eval(&Expr { root }, &c);
        }

        #[test]
        fn evaluation_of_parsed_input_never_panics(
            src in "[abtf0-9.()!=<>&|+*/\"\\\\ -]{0,40}",
            c in arb_ctx(),
        ) {
            if let Ok(e) = Expr::parse(&src) {
                check_eval(&e, &c);
            }
        }
    }

    fn check_parse(src: &str) -> Result<(), TestCaseError> {
        match Expr::parse(src) {
            Ok(e) => {
                let s = e.to_string();
                prop_assert_eq!(Expr::parse(&s).ok(), Some(e), "{:?} -> {:?}", src, s);
            }
            Err(err) => {
                prop_assert!(err.position <= src.chars().count(), "{:?}: {}", src, err);
                prop_assert!(!err.message.is_empty());
                let pointer = err.pointer(src);
                prop_assert_eq!(pointer.lines().count(), 2);
            }
        }
        Ok(())
    }
}
