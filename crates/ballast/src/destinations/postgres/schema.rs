//! From events to warehouse rows, with RudderStack's warehouse schema: which tables an
//! event goes to, its columns (flattened, named safely), and each value's type. Pure: the
//! sink decides what the database already has.

use std::cell::RefCell;
use std::sync::Arc;

use super::json::{Map, Value};

pub use super::names::{Cols, Name};
use super::names::{FastMap, FastSet, Names};

/// Tables every source has; a track event whose name makes one of these gets a `_`.
pub const STANDARD_TABLES: &[&str] = &[
    "tracks",
    "identifies",
    "users",
    "pages",
    "screens",
    "groups",
    "aliases",
    "accounts",
    "rudder_discards",
];

pub const DISCARDS: &str = "rudder_discards";

/// PostgreSQL's reserved key words: names equal to one get a leading `_`.
const RESERVED_WORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// PostgreSQL's identifier limit (bytes).
pub const MAX_NAME: usize = 63;
/// Nested objects deeper than this are kept whole, as JSON text, in one column.
pub const MAX_DEPTH: usize = 10;
/// A text value longer than this (bytes) goes to the discards instead of its column.
pub const MAX_TEXT: usize = 256 * 1024;
/// What of a discarded value `rudder_discards` keeps (bytes).
pub const MAX_DISCARD_VALUE: usize = 1024;

/// A column's type in the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    BigInt,
    Numeric,
    Boolean,
    Timestamp,
    Text,
}

impl ColType {
    pub fn sql(self) -> &'static str {
        match self {
            ColType::BigInt => "bigint",
            ColType::Numeric => "numeric",
            ColType::Boolean => "boolean",
            ColType::Timestamp => "timestamp with time zone",
            ColType::Text => "text",
        }
    }

    /// The name RudderStack's discard reasons use.
    pub fn word(self) -> &'static str {
        match self {
            ColType::BigInt => "int",
            ColType::Numeric => "float",
            ColType::Boolean => "boolean",
            ColType::Timestamp => "datetime",
            ColType::Text => "string",
        }
    }

    /// A column's `information_schema.columns.data_type`. Types an operator chose that
    /// are none of ours are treated as text (the value is sent as text and the database
    /// has the last word).
    pub fn from_information_schema(t: &str) -> ColType {
        match t {
            "bigint" | "integer" | "smallint" => ColType::BigInt,
            "numeric" | "double precision" | "real" => ColType::Numeric,
            "boolean" => ColType::Boolean,
            "timestamp with time zone" | "timestamp without time zone" | "date" => {
                ColType::Timestamp
            }
            _ => ColType::Text,
        }
    }
}

/// A value's text, shared: a track's `tracks` row and event-table row hold the same
/// values, cloned by reference.
pub type Str = Arc<str>;

/// One value, typed by what it looks like.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(i64),
    /// A number that is not an i64, as its decimal text.
    Num(Str),
    Bool(bool),
    /// A timestamp-looking string, as sent.
    Ts(Str),
    Text(Str),
}

impl Val {
    pub fn natural(&self) -> ColType {
        match self {
            Val::Int(_) => ColType::BigInt,
            Val::Num(_) => ColType::Numeric,
            Val::Bool(_) => ColType::Boolean,
            Val::Ts(_) => ColType::Timestamp,
            Val::Text(_) => ColType::Text,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Val::Int(i) => i.to_string(),
            Val::Num(s) | Val::Ts(s) | Val::Text(s) => s.to_string(),
            Val::Bool(b) => b.to_string(),
        }
    }

    /// This value in a column of type `col`, or why it does not fit.
    pub fn coerce(self, col: ColType) -> Result<Val, String> {
        let from = self.natural();
        if from == col {
            return Ok(self);
        }
        match (self, col) {
            (Val::Int(i), ColType::Numeric) => Ok(Val::Num(i.to_string().into())),
            (Val::Num(s), ColType::BigInt) => match s.parse::<f64>() {
                Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Val::Int(f as i64)),
                _ => Err(format!(
                    "incompatible schema conversion from {} to {}",
                    from.word(),
                    col.word()
                )),
            },
            (Val::Num(s) | Val::Ts(s), ColType::Text) => Ok(Val::Text(s)),
            (v, ColType::Text) => Ok(Val::Text(v.text().into())),
            _ => Err(format!(
                "incompatible schema conversion from {} to {}",
                from.word(),
                col.word()
            )),
        }
    }
}

/// Why a value did not make it into its column, as the `reason` label of
/// `ballast_warehouse_discards_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    /// Its column has another type.
    Conversion,
    /// Another key sent earlier made the same column name.
    NameClash,
    /// Longer than [`MAX_TEXT`].
    TooLong,
    /// Held a lone surrogate: stored with U+FFFD, the text as sent kept in the discard.
    InvalidUnicode,
    /// Held a NUL: stored without it, the text as sent kept in the discard.
    Nul,
    /// Its row would pass PostgreSQL's limit on a row's size.
    RowWidth,
    /// Its table is at its column limit.
    ColumnLimit,
    /// Its event table would pass the destination's `max_tables`.
    TableLimit,
    /// A track without an event name has no event table for its properties.
    NoEventName,
    /// The event is not a JSON object, or of no type the warehouse knows.
    NotAnEvent,
}

impl Why {
    pub fn label(self) -> &'static str {
        match self {
            Why::Conversion => "conversion",
            Why::NameClash => "name_clash",
            Why::TooLong => "too_long",
            Why::InvalidUnicode => "invalid_unicode",
            Why::Nul => "nul",
            Why::RowWidth => "row_width",
            Why::ColumnLimit => "column_limit",
            Why::TableLimit => "table_limit",
            Why::NoEventName => "no_event_name",
            Why::NotAnEvent => "not_an_event",
        }
    }
}

/// A value that did not make it into its column.
#[derive(Debug, Clone, PartialEq)]
pub struct Discard {
    pub table: String,
    pub row_id: String,
    pub column: String,
    pub value: String,
    pub received_at: Option<String>,
    pub reason: String,
    pub why: Why,
}

/// One row for one table: column name → value. `id` is always there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub id: String,
    pub received_at: Option<String>,
    pub cols: Cols,
}

/// What one event becomes.
#[derive(Debug, Default)]
pub struct Rows {
    /// (table, row), in the event's order.
    pub rows: Vec<(String, Row)>,
    pub discards: Vec<Discard>,
}

/// `Order Completed` → `order_completed`, `productID` → `product_id`, `userAgent` →
/// `user_agent`: ASCII letters and digits, words joined by one `_`, lowercase. Other
/// characters are transliterated to ASCII first (`注文完了` → `zhu_wen_wan_liao`, `é` →
/// `e`, `😀` → `grinning`; `deunicode`); what has no transliteration separates words.
/// May be empty (`!!!`): see [`name_part`].
pub fn snake_case(s: &str) -> String {
    if !s.is_ascii() {
        return snake_case(&deunicode::deunicode_with_tofu(s, " "));
    }
    // Most keys already are (`plan`, `order_id`, `prop3`).
    let b = s.as_bytes();
    if !b.is_empty()
        && b[0] != b'_'
        && b[b.len() - 1] != b'_'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
        && !s.contains("__")
    {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && i > 0 {
                let prev = chars[i - 1];
                let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
                if prev.is_ascii_lowercase()
                    || prev.is_ascii_digit()
                    || (prev.is_ascii_uppercase() && next_lower)
                {
                    out.push('_');
                }
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push('_');
        }
    }
    let mut collapsed = String::with_capacity(out.len());
    for c in out.chars() {
        if c == '_' && collapsed.ends_with('_') {
            continue;
        }
        collapsed.push(c);
    }
    collapsed.trim_matches('_').to_string()
}

/// What a key or an event name becomes before it is joined to a prefix: its
/// [`snake_case`], or, when that leaves nothing (`!!!`, a NUL, an empty key), `_` and 8
/// hexadecimal digits of the FNV-1a hash (64 bits) of the name's UTF-8 bytes
/// (`_cbf29ce4` for the empty key): never empty, the same for the same name everywhere.
pub fn name_part(s: &str) -> String {
    let snake = snake_case(s);
    if !snake.is_empty() {
        return snake;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("_{:08x}", h >> 32)
}

/// A name made safe: a leading `_` before a digit or a reserved word, cut to 63 bytes.
/// `snake` is ASCII (made by [`name_part`]).
pub fn safe_name(snake: &str) -> String {
    let mut name = if snake.starts_with(|c: char| c.is_ascii_digit())
        || RESERVED_WORDS.binary_search(&snake).is_ok()
    {
        format!("_{snake}")
    } else {
        snake.to_string()
    };
    let mut end = MAX_NAME.min(name.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// The table of a track event called `event`: its safe name, with a `_` when it would be
/// one of the standard tables. None for an event without a name (`""`).
pub fn event_table(event: &str) -> Option<String> {
    if event.is_empty() {
        return None;
    }
    let name = safe_name(&name_part(event));
    if STANDARD_TABLES.contains(&name.as_str()) {
        let mut n = format!("_{name}");
        n.truncate(MAX_NAME);
        Some(n)
    } else {
        Some(name)
    }
}

/// Whether a string is a timestamp PostgreSQL reads the same way: an ISO 8601 date
/// (`2026-11-29`), optionally with a time (`T` or a space, `HH:MM[:SS[.fraction]]`) and a
/// zone (`Z` or `±HH[:MM]`); every field in range.
pub fn looks_like_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 10 || b.len() > 40 {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        part.iter().all(u8::is_ascii_digit).then(|| digits(part))
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    if b[4] != b'-' || b[7] != b'-' || y == 0 || !(1..=12).contains(&m) {
        return false;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if d == 0 || d > days {
        return false;
    }
    if b.len() == 10 {
        return true;
    }
    if b[10] != b'T' && b[10] != b' ' {
        return false;
    }
    let (Some(h), Some(min)) = (num(11..13), num(14..16)) else {
        return false;
    };
    if b.get(13) != Some(&b':') || h > 23 || min > 59 {
        return false;
    }
    let mut i = 16;
    if b.get(i) == Some(&b':') {
        let Some(sec) = num(i + 1..i + 3) else {
            return false;
        };
        if sec > 59 {
            return false;
        }
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start || i - start > 9 {
                return false;
            }
        }
    }
    match b.get(i) {
        None => true,
        Some(b'Z') | Some(b'z') => i + 1 == b.len(),
        Some(b'+') | Some(b'-') => {
            let rest = &b[i + 1..];
            let (hh, mm) = match rest.len() {
                2 => (num(i + 1..i + 3), Some(0)),
                4 => (num(i + 1..i + 3), num(i + 3..i + 5)),
                5 if rest[2] == b':' => (num(i + 1..i + 3), num(i + 4..i + 6)),
                _ => return false,
            };
            matches!((hh, mm), (Some(hh), Some(mm)) if hh <= 15 && mm <= 59)
        }
        _ => false,
    }
}

/// A timestamp accepted by [`looks_like_timestamp`]: whole seconds since 1970 (UTC; no
/// zone means UTC) and the digits of its fraction of a second (none, or 1 to 9).
fn timestamp_parts(s: &str) -> Option<(i64, &str)> {
    if !looks_like_timestamp(s) {
        return None;
    }
    let b = s.as_bytes();
    // Fields checked above: ASCII digits.
    let n = |r: std::ops::Range<usize>| -> i64 { b.get(r).map_or(0, digits) };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (proleptic Gregorian).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400;
    let mut fraction = "";
    let mut i = 10;
    if b.len() > 10 {
        secs += n(11..13) * 3600 + n(14..16) * 60;
        i = 16;
        if b.get(i) == Some(&b':') {
            secs += n(i + 1..i + 3);
            i += 3;
            if b.get(i) == Some(&b'.') {
                let start = i + 1;
                i = start;
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                fraction = s.get(start..i)?;
            }
        }
    }
    if let Some(&sign) = b.get(i).filter(|c| **c == b'+' || **c == b'-') {
        let rest = &b[i + 1..];
        let (hh, mm) = match rest.len() {
            2 => (n(i + 1..i + 3), 0),
            4 => (n(i + 1..i + 3), n(i + 3..i + 5)),
            _ => (n(i + 1..i + 3), n(i + 4..i + 6)),
        };
        let offset = hh * 3600 + mm * 60;
        secs -= if sign == b'+' { offset } else { -offset };
    }
    Some((secs, fraction))
}

/// A timestamp accepted by [`looks_like_timestamp`] as nanoseconds since 1970 (UTC; no
/// zone means UTC), to order them.
pub fn timestamp_key(s: &str) -> Option<i128> {
    let (secs, fraction) = timestamp_parts(s)?;
    let nanos = digits(fraction.as_bytes()) * 10i64.pow(9 - fraction.len() as u32);
    Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
}

/// The number ASCII digits `b` make (at most 18 of them: no overflow).
fn digits(b: &[u8]) -> i64 {
    b.iter()
        .fold(0, |n, c| n * 10 + i64::from(c.wrapping_sub(b'0')))
}

/// Seconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_SECS: i64 = 946_684_800;

/// A timestamp accepted by [`looks_like_timestamp`] as the `timestamp with time zone` that
/// PostgreSQL's own input function makes of the text in a session whose `TimeZone` is UTC
/// (the destination's): microseconds since 2000-01-01 UTC. A fraction of more than six
/// digits is rounded as PostgreSQL rounds it (read as a double, times 10^6, to the nearest
/// integer, ties to even), so a value sent in binary is the value the text would give.
pub fn pg_timestamptz(s: &str) -> Option<i64> {
    let (secs, fraction) = timestamp_parts(s)?;
    let micros = if fraction.len() <= 6 {
        digits(fraction.as_bytes()) * 10i64.pow(6 - fraction.len() as u32)
    } else {
        // The digits over a power of ten, both exact doubles: their quotient is the
        // correctly rounded double of the decimal, as strtod reads it.
        let f = digits(fraction.as_bytes()) as f64 / [1e7, 1e8, 1e9].get(fraction.len() - 7)?;
        (f * 1_000_000.0).round_ties_even() as i64
    };
    (secs - PG_EPOCH_SECS)
        .checked_mul(1_000_000)?
        .checked_add(micros)
}

fn typed(v: &Value) -> Option<Val> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(Val::Bool(*b)),
        Value::Number(n) => Some(match n.as_i64() {
            Some(i) => Val::Int(i),
            None => Val::Num(n.to_string().into()),
        }),
        Value::String(s) if looks_like_timestamp(s) => Some(Val::Ts(Str::from(&**s))),
        Value::String(s) => Some(Val::Text(Str::from(&**s))),
        Value::Array(_) | Value::Object(_) => Some(Val::Text(v.to_string().into())),
    }
}

/// PostgreSQL text cannot hold NUL.
fn no_nul(s: &str) -> String {
    s.replace('\0', "")
}

/// What an id (messageId, userId, anonymousId) is stored as: itself, unless it holds a
/// NUL (PostgreSQL text cannot) or begins with [`ID_ESCAPE`]; then [`ID_ESCAPE`] and the
/// id with `\` written `\\` and NUL written `\0`. Reversible, and two different ids are
/// never stored as one (`a\0x` and `ax` stay two rows).
pub fn stored_id(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.contains('\0') && !id.starts_with(ID_ESCAPE) {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut s = String::with_capacity(id.len() + 8);
    s.push_str(ID_ESCAPE);
    for c in id.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\0' => s.push_str("\\0"),
            c => s.push(c),
        }
    }
    std::borrow::Cow::Owned(s)
}

/// The prefix of an escaped id ([`stored_id`]).
pub const ID_ESCAPE: &str = "~esc:";

/// An id as [`stored_id`] stores it, shared.
fn id_val(s: Str) -> Str {
    match stored_id(&s) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(o) => o.into(),
    }
}

/// What `rudder_discards` keeps of a value: its first KiB, or, when it holds a NUL, the
/// first KiB of its JSON text (PostgreSQL text cannot hold NUL).
pub fn discard_text(value: &str) -> String {
    if value.contains('\0') {
        cut(&json_text(value), MAX_DISCARD_VALUE)
    } else {
        cut(value, MAX_DISCARD_VALUE)
    }
}

/// A string as JSON text (`"a\u0000b"`): how a discard keeps text that PostgreSQL cannot
/// hold or that was repaired.
fn json_text(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut n = max;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s[..n].to_string()
}

/// Strings repaired when the event was read (a lone surrogate made U+FFFD): the string as
/// read → its JSON text as sent. Empty for almost every event.
pub type Repairs = FastMap<Box<str>, Box<str>>;

/// Builds one row, refusing what does not fit (reported as discards).
struct RowBuilder<'a> {
    table: &'a str,
    row: Row,
    /// Columns the row's own fields (not properties or traits) use.
    reserved: Vec<&'static str>,
    /// The names of the row's columns (a second value for one is a clash).
    taken: FastSet<Name>,
    names: &'a mut Names,
    discards: &'a mut Vec<Discard>,
    repairs: &'a Repairs,
}

impl<'a> RowBuilder<'a> {
    fn new(
        table: &'a str,
        id: &str,
        received_at: Option<&str>,
        names: &'a mut Names,
        d: &'a mut Vec<Discard>,
        repairs: &'a Repairs,
    ) -> Self {
        RowBuilder {
            table,
            row: Row {
                id: id.to_string(),
                received_at: received_at.map(str::to_string),
                cols: names.take_cols(),
            },
            reserved: Vec::with_capacity(12),
            taken: names.take_set(),
            names,
            discards: d,
            repairs,
        }
    }

    /// The row (its name set and room go back to be reused).
    fn finish(mut self) -> Row {
        self.names.give_set(self.taken);
        self.row.cols = self.names.give_cols(std::mem::take(&mut self.row.cols));
        self.row
    }

    fn discard(&mut self, column: &str, value: &str, why: Why, reason: String) {
        self.discards.push(Discard {
            table: self.table.to_string(),
            row_id: self.row.id.clone(),
            column: column.to_string(),
            value: discard_text(value),
            received_at: self.row.received_at.clone(),
            reason,
            why,
        });
    }

    /// The discards from `from` on again, for this builder's table (now another one).
    fn repeat_discards(&mut self, from: usize) {
        for i in from..self.discards.len() {
            let mut d = self.discards[i].clone();
            d.table = self.table.to_string();
            self.discards.push(d);
        }
    }

    /// A value of one of the row's own columns (overrides anything there).
    fn reserved(&mut self, column: &'static str, v: Option<Val>) {
        self.reserved.push(column);
        if let Some(v) = v {
            let name = self.names.exact(column);
            self.put(name, v);
        }
    }

    /// Whether `s` was repaired when the event was read; if so, a discard keeps it as sent.
    fn repaired(&mut self, column: &str, s: &str, what: &str) {
        if self.repairs.is_empty() {
            return;
        }
        if let Some(sent) = self.repairs.get(s) {
            let sent = sent.to_string();
            let reason = format!(
                "{what} held invalid Unicode (a lone surrogate), stored with U+FFFD; \
                 the JSON text as sent is kept here"
            );
            self.discard(column, &sent, Why::InvalidUnicode, reason);
        }
    }

    fn put(&mut self, column: Name, v: Val) {
        let v = match v {
            Val::Text(s) | Val::Ts(s) if s.len() > MAX_TEXT => {
                let reason = format!("value too long ({} bytes, at most {MAX_TEXT})", s.len());
                self.discard(&column, &s, Why::TooLong, reason);
                return;
            }
            Val::Text(s) => {
                self.repaired(&column, &s, "the value");
                if s.contains('\0') {
                    let reason = "the value held NUL, which PostgreSQL text cannot: stored \
                                  without it; the JSON text as sent is kept here"
                        .to_string();
                    let sent = json_text(&s);
                    self.discard(&column, &sent, Why::Nul, reason);
                    Val::Text(no_nul(&s).into())
                } else {
                    Val::Text(s)
                }
            }
            v => v,
        };
        if self.taken.insert(column.clone()) {
            self.row.cols.push_new(column, v);
        } else {
            self.row.cols.insert(column, v);
        }
    }

    /// Flattens `obj` into columns named `prefix` + key path joined by `_`, in the order
    /// the keys were sent. With `user_keys`, a name that is one of the row's own columns
    /// gets a leading `_`.
    fn flatten(&mut self, prefix: &str, obj: &Map<'_>, user_keys: bool, depth: usize) {
        self.flatten_but(prefix, obj, user_keys, depth, None)
    }

    /// [`Self::flatten`] without the key `skip` of `obj` itself.
    fn flatten_but(
        &mut self,
        prefix: &str,
        obj: &Map<'_>,
        user_keys: bool,
        depth: usize,
        skip: Option<&str>,
    ) {
        for (k, v) in obj {
            if skip == Some(k) {
                continue;
            }
            let key = self.names.key(prefix, k);
            match v {
                Value::Object(inner) if depth < MAX_DEPTH => {
                    self.repaired(&key.path, k, "the key");
                    self.flatten(&key.path, inner, user_keys, depth + 1)
                }
                _ => {
                    let Some(value) = typed(v) else { continue };
                    let mut name = key.column;
                    if user_keys && self.reserved.contains(&&*name) {
                        let mut renamed = format!("_{name}");
                        renamed.truncate(MAX_NAME);
                        name = self.names.exact(&renamed);
                    }
                    self.repaired(&name, k, "the key");
                    if self.taken.contains(&name) || &*name == "id" || &*name == "uuid_ts" {
                        let under = if prefix.is_empty() {
                            String::new()
                        } else {
                            format!(" under {prefix:?}")
                        };
                        let reason = format!(
                            "column name clash on {name:?}: key {k:?}{under}; the first key \
                             sent with this name has the column"
                        );
                        let text = value.text();
                        self.discard(&name, &text, Why::NameClash, reason);
                        continue;
                    }
                    self.put(name, value);
                }
            }
        }
    }

    /// Every column of `row` (built for a table that will not be written) as a discard.
    fn discard_row(&mut self, row: Row, why: Why, reason: &str) {
        for (c, v) in row.cols.iter() {
            let text = v.text();
            self.discard(c, &text, why, reason.to_string());
        }
    }
}

fn text_of(e: &Map<'_>, key: &str) -> Option<Str> {
    match e.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(Str::from(&**s)),
        other => Some(other.to_string().into()),
    }
}

/// `receivedAt`-like fields: a timestamp when they look like one, else text (which a
/// timestamp column refuses: a discard).
fn time_of(e: &Map<'_>, key: &str) -> Option<Val> {
    text_of(e, key).map(|s| {
        if looks_like_timestamp(&s) {
            Val::Ts(s)
        } else {
            Val::Text(s)
        }
    })
}

/// The columns every table has, in the order RudderStack lists them.
fn common(b: &mut RowBuilder<'_>, e: &Map<'_>) {
    b.reserved("id", Some(Val::Text(b.row.id.as_str().into())));
    b.reserved(
        "anonymous_id",
        text_of(e, "anonymousId").map(|s| Val::Text(id_val(s))),
    );
    b.reserved(
        "user_id",
        text_of(e, "userId").map(|s| Val::Text(id_val(s))),
    );
    b.reserved("received_at", time_of(e, "receivedAt"));
    b.reserved("sent_at", time_of(e, "sentAt"));
    b.reserved("timestamp", time_of(e, "timestamp"));
    b.reserved("original_timestamp", time_of(e, "originalTimestamp"));
    b.reserved(
        "context_request_ip",
        text_of(e, "request_ip").map(Val::Text),
    );
    b.reserved("channel", text_of(e, "channel").map(Val::Text));
    b.reserved.push("uuid_ts");
}

fn context(b: &mut RowBuilder<'_>, e: &Map<'_>) {
    if let Some(Value::Object(ctx)) = e.get("context") {
        // Its keys never clash with the row's own columns but for `request_ip`, which
        // the gateway's own value wins.
        b.flatten_but("context", ctx, false, 1, Some("request_ip"));
    }
}

fn object<'m, 'a>(e: &'m Map<'a>, key: &str) -> Option<&'m Map<'a>> {
    match e.get(key) {
        Some(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// The common columns, `extra` and the context: what every row of an event starts with.
fn begin(b: &mut RowBuilder<'_>, e: &Map<'_>, extra: &dyn Fn(&mut RowBuilder<'_>)) {
    common(b, e);
    extra(b);
    context(b, e);
}

/// The user's own keys: the event's object `key` (`properties`, `traits`), after the
/// row's own columns, which they give way to.
fn user_columns(b: &mut RowBuilder<'_>, e: &Map<'_>, key: &str) {
    if key == "traits" {
        // Traits sent in the context count too; top-level ones win.
        match object(e, "context").and_then(|c| object(c, "traits")) {
            Some(in_context) => {
                let mut traits = in_context.clone();
                if let Some(t) = object(e, "traits") {
                    traits.extend(t.clone());
                }
                b.flatten("", &traits, true, 1);
            }
            None => {
                if let Some(t) = object(e, "traits") {
                    b.flatten("", t, true, 1);
                }
            }
        }
    } else if let Some(o) = object(e, key) {
        b.flatten("", o, true, 1);
    }
}

thread_local! {
    /// The names this thread made lately (the loader's blocking threads keep theirs
    /// between loads).
    static NAMES: RefCell<Names> = RefCell::new(Names::default());
}

/// The rows one event makes (empty, with a discard, when it cannot make any).
pub fn rows_of(json: &[u8], message_id: &str) -> Rows {
    let kept = NAMES.try_with(|n| match n.try_borrow_mut() {
        Ok(mut names) => {
            names.trim();
            Some(rows_with(&mut names, json, message_id))
        }
        Err(_) => None,
    });
    match kept {
        Ok(Some(rows)) => rows,
        // The thread is ending (or in here already): names of its own.
        _ => rows_with(&mut Names::default(), json, message_id),
    }
}

fn rows_with(names: &mut Names, json: &[u8], message_id: &str) -> Rows {
    let mut out = Rows::default();
    let not_an_event = |value: String, reason: String| Discard {
        table: String::new(),
        row_id: stored_id(message_id).into_owned(),
        column: String::new(),
        value: discard_text(&value),
        received_at: None,
        reason,
        why: Why::NotAnEvent,
    };
    let mut repairs = Repairs::default();
    let repaired: Vec<u8>;
    let v: Value = match serde_json::from_slice(json) {
        Ok(v) => v,
        Err(e) => {
            // A lone surrogate (`"\ud83d"`: the gateway, as RudderStack's, takes it) is
            // read as U+FFFD; the strings it was in are kept as sent in the discards.
            repaired = repair_surrogates(json, &mut repairs).unwrap_or_default();
            let parsed = if repaired.is_empty() {
                None
            } else {
                serde_json::from_slice(&repaired).ok()
            };
            match parsed {
                Some(v) => v,
                None => {
                    let reason = format!("not JSON: {e}");
                    out.discards.push(not_an_event(
                        String::from_utf8_lossy(json).into_owned(),
                        reason,
                    ));
                    return out;
                }
            }
        }
    };
    let Value::Object(e) = v else {
        out.discards
            .push(not_an_event(v.to_string(), "not a JSON object".into()));
        return out;
    };
    let id = text_of(&e, "messageId").map_or_else(
        || stored_id(message_id).into_owned(),
        |s| stored_id(&s).into_owned(),
    );
    let received = text_of(&e, "receivedAt").filter(|s| looks_like_timestamp(s));
    let kind = text_of(&e, "type").unwrap_or_default().to_ascii_lowercase();
    let mut d = Vec::new();
    let mut rows = Vec::with_capacity(2);
    let repairs = &repairs;
    let mut standard = |table: &str, extra: &dyn Fn(&mut RowBuilder<'_>), user: Option<&str>| {
        let mut b = RowBuilder::new(
            table,
            &id,
            received.as_deref(),
            &mut *names,
            &mut d,
            repairs,
        );
        begin(&mut b, &e, extra);
        if let Some(key) = user {
            user_columns(&mut b, &e, key);
        }
        rows.push((table.to_string(), b.finish()));
    };
    match kind.as_str() {
        "track" => {
            let name = text_of(&e, "event").unwrap_or_default();
            let table = names.event_table(&name);
            let event_cols = |b: &mut RowBuilder<'_>| {
                b.reserved("event", table.as_deref().map(|t| Val::Text(t.into())));
                b.reserved("event_text", Some(Val::Text(name.clone())));
            };
            // `tracks` and the event's own table: the same columns but for the
            // properties (and the same discards but for the table), built once.
            let before = d.len();
            let mut b = RowBuilder::new("tracks", &id, received.as_deref(), names, &mut d, repairs);
            begin(&mut b, &e, &event_cols);
            match table.as_deref() {
                None => {
                    // No event table: its properties are discarded, each on its own.
                    let mut props = RowBuilder::new(
                        "tracks",
                        &id,
                        received.as_deref(),
                        &mut *b.names,
                        &mut *b.discards,
                        repairs,
                    );
                    user_columns(&mut props, &e, "properties");
                    let row = props.finish();
                    b.discard_row(
                        row,
                        Why::NoEventName,
                        "a track without an event name has no event table for its properties",
                    );
                    rows.push(("tracks".to_string(), b.finish()));
                }
                Some(t) => {
                    rows.push(("tracks".to_string(), b.row.clone()));
                    b.table = t;
                    b.repeat_discards(before);
                    user_columns(&mut b, &e, "properties");
                    rows.push((t.to_string(), b.finish()));
                }
            }
        }
        "identify" => {
            standard("identifies", &|_| {}, Some("traits"));
            if let Some(user) = text_of(&e, "userId").filter(|u| !u.is_empty()) {
                // users: the identify's columns, keyed by the userId.
                if let Some((_, identify)) = rows.last() {
                    let mut cols = identify.cols.clone();
                    for c in ["user_id", "sent_at", "timestamp", "original_timestamp"] {
                        cols.remove(c);
                    }
                    let user = id_val(user);
                    cols.insert(names.exact("id"), Val::Text(user.clone()));
                    let row = Row {
                        id: user.to_string(),
                        received_at: identify.received_at.clone(),
                        cols,
                    };
                    rows.push(("users".to_string(), row));
                }
            }
        }
        "page" | "screen" => {
            let table = if kind == "page" { "pages" } else { "screens" };
            let name = |b: &mut RowBuilder<'_>| {
                b.reserved("name", text_of(&e, "name").map(Val::Text));
            };
            standard(table, &name, Some("properties"));
        }
        "group" => {
            let group = |b: &mut RowBuilder<'_>| {
                b.reserved("group_id", text_of(&e, "groupId").map(Val::Text));
            };
            standard("groups", &group, Some("traits"));
        }
        "alias" => {
            let previous = |b: &mut RowBuilder<'_>| {
                b.reserved("previous_id", text_of(&e, "previousId").map(Val::Text));
            };
            standard("aliases", &previous, None);
        }
        other => d.push(Discard {
            table: String::new(),
            row_id: id.clone(),
            column: "type".into(),
            value: discard_text(other),
            received_at: received.as_deref().map(String::from),
            reason: format!("unknown event type {other:?}"),
            why: Why::NotAnEvent,
        }),
    }
    out.rows = rows;
    out.discards = d;
    out
}

/// `json` with every lone surrogate escape (`\ud83d` not followed by a low one, a low one
/// alone) written `\ufffd`, and, in `repairs`, each string changed (as read after the
/// repair) with its JSON text as sent. None when there is nothing to repair (the text is
/// not JSON for another reason).
pub fn repair_surrogates(json: &[u8], repairs: &mut Repairs) -> Option<Vec<u8>> {
    let hex = |b: &[u8]| -> Option<u16> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    };
    let escape_at = |i: usize| -> Option<u16> {
        if json.get(i) == Some(&b'\\') && json.get(i + 1) == Some(&b'u') {
            hex(json.get(i + 2..)?)
        } else {
            None
        }
    };
    let mut out = Vec::with_capacity(json.len());
    let mut i = 0;
    let mut in_string = false;
    let mut start = (0, 0); // where the current string starts in `json` and in `out`
    let mut changed = false;
    let mut any = false;
    while i < json.len() {
        let c = json[i];
        if !in_string {
            if c == b'"' {
                in_string = true;
                start = (i, out.len());
                changed = false;
            }
            out.push(c);
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                out.push(c);
                i += 1;
                in_string = false;
                if changed {
                    let fixed: String = serde_json::from_slice(&out[start.1..]).ok()?;
                    let sent = String::from_utf8_lossy(&json[start.0..i]).into_owned();
                    repairs.insert(fixed.into(), sent.into());
                }
            }
            b'\\' => match escape_at(i) {
                Some(0xD800..=0xDBFF) => match escape_at(i + 6) {
                    Some(0xDC00..=0xDFFF) => {
                        out.extend_from_slice(&json[i..i + 12]);
                        i += 12;
                    }
                    _ => {
                        out.extend_from_slice(b"\\ufffd");
                        i += 6;
                        changed = true;
                        any = true;
                    }
                },
                Some(0xDC00..=0xDFFF) => {
                    out.extend_from_slice(b"\\ufffd");
                    i += 6;
                    changed = true;
                    any = true;
                }
                _ => {
                    // Any other escape: itself and the character it escapes.
                    out.extend_from_slice(json.get(i..i + 2)?);
                    i += 2;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    any.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_words_are_sorted() {
        let mut sorted = RESERVED_WORDS.to_vec();
        sorted.sort();
        assert_eq!(sorted, RESERVED_WORDS);
    }

    #[test]
    fn names() {
        assert_eq!(snake_case("Order Completed"), "order_completed");
        assert_eq!(snake_case("productID"), "product_id");
        assert_eq!(snake_case("userAgent"), "user_agent");
        assert_eq!(snake_case("HTTPServer"), "http_server");
        assert_eq!(snake_case("  a--b  "), "a_b");
        assert_eq!(snake_case("address1"), "address1");
        assert_eq!(safe_name("1st"), "_1st");
        assert_eq!(safe_name("order"), "_order");
        assert_eq!(safe_name(&"x".repeat(100)).len(), 63);
        assert_eq!(
            event_table("Order Completed").as_deref(),
            Some("order_completed")
        );
        assert_eq!(event_table("tracks").as_deref(), Some("_tracks"));
        assert_eq!(event_table("Users").as_deref(), Some("_users"));
        assert_eq!(event_table("group").as_deref(), Some("_group"));
        assert_eq!(event_table(""), None);
        // Other scripts are transliterated; what has no letter left gets a hash.
        assert_eq!(snake_case("注文完了"), "zhu_wen_wan_liao");
        assert_eq!(snake_case("é"), "e");
        assert_eq!(snake_case("e\u{301}"), "e");
        assert_eq!(snake_case("Ünïcödé Key"), "unicode_key");
        assert!(!snake_case("😀").is_empty());
        assert!(!snake_case("مرحبا").is_empty());
        for nothing in ["!!!", "", "\0", "___"] {
            let n = name_part(nothing);
            assert!(n.starts_with('_') && n.len() == 9, "{nothing:?} {n}");
            assert_eq!(name_part(nothing), n);
        }
        assert_ne!(name_part("!!!"), name_part("???"));
        assert_eq!(name_part(""), "_cbf29ce4");
        assert_eq!(
            event_table("!!!").as_deref(),
            Some(name_part("!!!").as_str())
        );
    }

    #[test]
    fn a_track_without_a_name_discards_its_properties() {
        let e =
            r#"{"type":"track","event":"","messageId":"m","properties":{"":{"-":1.5},"a":"x"}}"#;
        let r = rows_of(e.as_bytes(), "m");
        assert_eq!(r.rows.len(), 1);
        let mut lost: Vec<&str> = r.discards.iter().map(|d| d.value.as_str()).collect();
        lost.sort();
        assert_eq!(lost, ["1.5", "x"], "{:?}", r.discards);
        assert!(r.discards.iter().all(|d| d.why == Why::NoEventName));
    }

    #[test]
    fn ids_are_stored_reversibly() {
        assert_eq!(stored_id("m-1"), "m-1");
        assert_eq!(stored_id("a\0x"), "~esc:a\\0x");
        assert_eq!(stored_id("ax"), "ax");
        assert_eq!(stored_id("~esc:a\\0x"), "~esc:~esc:a\\\\0x");
        let ids = ["a\0x", "ax", "~esc:a\\0x", "~esc:ax", "a\\0x", "\0", ""];
        let stored: std::collections::HashSet<String> =
            ids.iter().map(|i| stored_id(i).into_owned()).collect();
        assert_eq!(stored.len(), ids.len());
        assert!(stored.iter().all(|s| !s.contains('\0')));
    }

    #[test]
    fn lone_surrogates_are_repaired() {
        let mut repairs = Repairs::default();
        let text = br#"{"a":"x \ud83d","b":"\ud83d\ude00 ok","\udc00k":1,"c":"\\ud83d"}"#;
        let fixed = repair_surrogates(text, &mut repairs).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fixed).unwrap();
        assert_eq!(v["a"], "x \u{fffd}");
        assert_eq!(v["b"], "\u{1F600} ok");
        assert_eq!(v["\u{fffd}k"], 1);
        assert_eq!(v["c"], "\\ud83d");
        assert_eq!(repairs.len(), 2);
        assert_eq!(&*repairs["x \u{fffd}"], r#""x \ud83d""#);
        assert_eq!(&*repairs["\u{fffd}k"], r#""\udc00k""#);
        assert!(repair_surrogates(br#"{"a":"fine"}"#, &mut Repairs::default()).is_none());
        // The row lands, with a discard keeping the string as sent.
        let e =
            br#"{"type":"track","event":"Cut","messageId":"m","properties":{"title":"x \ud83d"}}"#;
        let r = rows_of(e, "m");
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[1].1.cols["title"], Val::Text("x \u{fffd}".into()));
        assert_eq!(r.discards.len(), 1, "{:?}", r.discards);
        assert_eq!(r.discards[0].why, Why::InvalidUnicode);
        assert_eq!(r.discards[0].value, r#""x \ud83d""#);
    }

    #[test]
    fn the_first_key_sent_wins_and_every_other_is_discarded() {
        let e = r#"{"type":"track","event":"E","messageId":"m","properties":{
            "productID":1,"product_id":2,"Product ID":3,"product-id":4,"PRODUCT_ID":5}}"#;
        let r = rows_of(e.as_bytes(), "m");
        assert_eq!(r.rows[1].1.cols["product_id"], Val::Int(1));
        let mut lost: Vec<String> = r.discards.iter().map(|d| d.value.clone()).collect();
        lost.sort();
        assert_eq!(lost, ["2", "3", "4", "5"]);
        assert!(r.discards.iter().all(|d| d.why == Why::NameClash));
        assert!(
            r.discards[1].reason.contains("Product ID"),
            "{}",
            r.discards[1].reason
        );
    }

    #[test]
    fn timestamps() {
        for ok in [
            "2026-11-29",
            "2026-11-29T08:00:00Z",
            "2026-11-29T08:00:00.123Z",
            "2026-11-29 08:00",
            "2024-02-29T23:59:59.123456789+05:30",
            "2026-11-29T08:00:00-0800",
            "2026-11-29T08:00:00+01",
        ] {
            assert!(looks_like_timestamp(ok), "{ok}");
        }
        for bad in [
            "2026-13-01",
            "2025-02-29",
            "0000-01-01",
            "2026-11-29T24:00:00Z",
            "2026-11-29X",
            "20261129",
            "2026-11-29T08:00:00ZZ",
            "2026-11-29T08:00:00.Z",
            "hello world, 2026",
        ] {
            assert!(!looks_like_timestamp(bad), "{bad}");
        }
    }

    #[test]
    fn timestamp_order() {
        let k = |s: &str| timestamp_key(s).unwrap();
        assert_eq!(k("1970-01-01T00:00:00Z"), 0);
        assert_eq!(k("1970-01-02"), 86_400_000_000_000);
        assert_eq!(k("2026-11-29T10:00:00+02:00"), k("2026-11-29T08:00:00Z"));
        assert_eq!(
            k("2026-11-29T08:00:00.5Z") - k("2026-11-29T08:00:00Z"),
            500_000_000
        );
        assert!(k("2024-03-01T00:00:00Z") - k("2024-02-28T00:00:00Z") == 2 * 86_400_000_000_000);
        assert!(timestamp_key("soon").is_none());
    }

    #[test]
    fn postgres_microseconds() {
        let t = |s: &str| pg_timestamptz(s).unwrap();
        assert_eq!(t("2000-01-01T00:00:00Z"), 0);
        assert_eq!(t("2000-01-01"), 0);
        assert_eq!(t("1970-01-01T00:00:00Z"), -946_684_800_000_000);
        assert_eq!(t("2000-01-01T01:00:00+01:00"), 0);
        assert_eq!(t("2000-01-01T00:00:00.123456Z"), 123_456);
        assert_eq!(t("2000-01-01T00:00:00.5Z"), 500_000);
        // Past six digits, rounded as PostgreSQL rounds (a double, ties to even).
        assert_eq!(t("2000-01-01T00:00:00.0000005Z"), 0);
        assert_eq!(t("2000-01-01T00:00:00.0000015Z"), 2);
        assert_eq!(t("2000-01-01T00:00:00.0000025Z"), 2);
        assert_eq!(t("2000-01-01T00:00:00.9999999Z"), 1_000_000);
        assert_eq!(t("1999-12-31T23:59:59.999999999Z"), 0);
        assert!(pg_timestamptz("soon").is_none());
    }

    #[test]
    fn coercion() {
        assert_eq!(
            Val::Int(3).coerce(ColType::Numeric),
            Ok(Val::Num("3".into()))
        );
        assert_eq!(
            Val::Num("3".into()).coerce(ColType::BigInt),
            Ok(Val::Int(3))
        );
        assert!(Val::Num("3.5".into()).coerce(ColType::BigInt).is_err());
        assert_eq!(
            Val::Bool(true).coerce(ColType::Text),
            Ok(Val::Text("true".into()))
        );
        assert!(Val::Text("x".into()).coerce(ColType::Boolean).is_err());
        assert!(Val::Text("x".into()).coerce(ColType::Timestamp).is_err());
    }

    #[test]
    fn a_track_makes_two_rows() {
        let e = serde_json::json!({
            "type": "track", "event": "Order Completed", "messageId": "m1", "userId": "u1",
            "receivedAt": "2026-11-29T08:00:00Z", "request_ip": "1.2.3.4",
            "context": {"library": {"name": "js"}, "request_ip": "9.9.9.9"},
            "properties": {"total": 9.5, "items": [1, 2], "id": "p", "event": "x",
                           "nested": {"deep": {"er": true}}},
        });
        let r = rows_of(e.to_string().as_bytes(), "m1");
        assert!(r.discards.is_empty(), "{:?}", r.discards);
        assert_eq!(r.rows.len(), 2);
        let (t, tracks) = &r.rows[0];
        assert_eq!(t, "tracks");
        assert!(!tracks.cols.contains_key("total"));
        let (t, row) = &r.rows[1];
        assert_eq!(t, "order_completed");
        let c = &row.cols;
        assert_eq!(c["id"], Val::Text("m1".into()));
        assert_eq!(c["event"], Val::Text("order_completed".into()));
        assert_eq!(c["event_text"], Val::Text("Order Completed".into()));
        assert_eq!(c["context_library_name"], Val::Text("js".into()));
        assert_eq!(c["context_request_ip"], Val::Text("1.2.3.4".into()));
        assert_eq!(c["total"], Val::Num("9.5".into()));
        assert_eq!(c["items"], Val::Text("[1,2]".into()));
        assert_eq!(c["_id"], Val::Text("p".into()));
        assert_eq!(c["_event"], Val::Text("x".into()));
        assert_eq!(c["nested_deep_er"], Val::Bool(true));
        assert_eq!(c["received_at"], Val::Ts("2026-11-29T08:00:00Z".into()));
    }

    #[test]
    fn hostile_input_is_bounded() {
        let mut deep = serde_json::json!("bottom");
        for _ in 0..50 {
            deep = serde_json::json!({ "a": deep });
        }
        let e = serde_json::json!({
            "type": "identify", "messageId": "m", "userId": "u",
            "traits": {"deep": deep, "big": "x".repeat(MAX_TEXT + 1), "user_id": "t"},
        });
        let r = rows_of(e.to_string().as_bytes(), "m");
        let (_, identify) = &r.rows[0];
        assert!(identify.cols.keys().all(|k| k.len() <= MAX_NAME));
        assert_eq!(identify.cols["_user_id"], Val::Text("t".into()));
        assert_eq!(identify.cols["user_id"], Val::Text("u".into()));
        assert!(identify
            .cols
            .values()
            .any(|v| matches!(v, Val::Text(s) if s.contains("bottom"))));
        assert_eq!(r.discards.len(), 1, "{:?}", r.discards);
        assert!(r.discards[0].reason.contains("too long"));
        assert!(r.discards[0].value.len() <= MAX_DISCARD_VALUE);
        let (t, users) = &r.rows[1];
        assert_eq!(t, "users");
        assert_eq!(users.id, "u");
        assert!(!users.cols.contains_key("user_id"));
    }
}
