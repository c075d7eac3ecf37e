//! The CPU side of a load, off the async threads (the sink runs it on a blocking thread):
//! events → rows grouped per table (one row per id; `users` merged, the latest value of
//! each column winning), then each table's rows → `INSERT ... SELECT ... FROM unnest(...)
//! ON CONFLICT (id) ...` statements whose parameters are one binary array per column:
//! `bigint`, `boolean` and `timestamp with time zone` columns in their own binary form
//! (nothing for the database to parse: timestamps were most of its input work), others
//! as `text[]` the database reads with the column's own input function, as COPY would.
//! No staging table: one statement per table per load (more for huge loads, see
//! [`MAX_STATEMENT_BYTES`]), no catalog changes, each row written once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};

use super::schema::{self, ColType, Discard, Name, Row, Val, Why};
use super::sink::quote;
use crate::destinations::Event;

/// Encoded parameters of one statement at most (a table with more is loaded by several
/// statements of the same transaction): bounds the memory of a load and keeps every
/// array far below PostgreSQL's 1 GiB limit on one value.
pub const MAX_STATEMENT_BYTES: usize = 32 << 20;

/// One table's rows of a load, one per id, in id order.
pub struct TableRows {
    pub table: String,
    pub rows: Vec<Row>,
    /// The columns the rows use, with the type a new column would get.
    pub wanted: BTreeMap<String, ColType>,
}

/// What a load writes: rows per table (in table name order) and discards.
pub struct Batch {
    pub tables: Vec<TableRows>,
    pub discards: Vec<Discard>,
}

/// A column as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub ty: ColType,
    /// The cast from text to the column's type (`bigint`, an operator's `uuid`); None for
    /// text columns (character types: assigned, so a too-long value is refused, not cut).
    pub cast: Option<Arc<str>>,
    /// The column's type when its values are sent in binary (exactly `bigint`, `boolean`
    /// or `timestamp with time zone`; anything else, `integer` or a domain included,
    /// goes as text through `cast`).
    pub binary: Option<Elem>,
}

impl Column {
    /// A column of the database type `base` (as `format_type` names it without its
    /// modifier; `full` with it).
    pub fn of_type(base: &str, full: &str) -> Column {
        let (cast, binary) = match base {
            // Assigned from text as they are: a value too long is refused, not cut.
            "text" | "character varying" | "character" => (None, None),
            "bigint" => (Some(full), Some(Elem::Int8)),
            "boolean" => (Some(full), Some(Elem::Bool)),
            "timestamp with time zone" => (Some(full), Some(Elem::Timestamptz)),
            _ => (Some(full), None),
        };
        Column {
            ty: ColType::from_information_schema(base),
            cast: cast.map(Arc::from),
            binary,
        }
    }
}

/// Columns whose type is fixed whatever the first value looks like.
pub fn fixed_type(column: &str) -> Option<ColType> {
    match column {
        "received_at" | "sent_at" | "timestamp" | "original_timestamp" | "uuid_ts" => {
            Some(ColType::Timestamp)
        }
        "id" | "anonymous_id" | "user_id" | "context_request_ip" | "event" | "event_text"
        | "channel" => Some(ColType::Text),
        _ => None,
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Turns events into rows grouped per table.
pub fn group(events: &[Event]) -> Batch {
    let mut discards = Vec::new();
    // Per table: its rows and where each id is among them.
    let mut tables: BTreeMap<String, (Vec<Row>, FastMap<String, usize>)> = BTreeMap::new();
    // Rows are made in id order (a row's id is its event's messageId; `users` aside), the
    // order they are loaded in: encoding then reads their values in the order they were
    // allocated, not scattered over the load's memory (a cache miss per value otherwise).
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_unstable_by(|a, b| a.message_id.cmp(&b.message_id));
    for e in events {
        let r = schema::rows_of(&e.json, &e.message_id);
        discards.extend(r.discards);
        for (table, row) in r.rows {
            let (list, index) = match tables.get_mut(&table) {
                Some(t) => t,
                None => tables.entry(table.clone()).or_default(),
            };
            match index.get(&row.id) {
                Some(&i) if table == "users" => merge_user(&mut list[i], row),
                // The same event twice in one load: once.
                Some(_) => {}
                None => {
                    index.insert(row.id.clone(), list.len());
                    list.push(row);
                }
            }
        }
    }
    let tables = tables
        .into_iter()
        .map(|(table, (mut rows, _))| {
            // In id order: concurrent loads lock rows in the same order.
            rows.sort_unstable_by(|a, b| a.id.cmp(&b.id));
            let mut wanted: Vec<(&str, ColType)> = Vec::new();
            let mut index: FastMap<&str, usize> = FastMap::default();
            // The previous row's columns by position (name address, place in `wanted`):
            // rows of one table mostly have the same names in the same order, shared
            // (names.rs), so most are found without hashing. Every row is alive here,
            // so an address is one name.
            let mut last: Vec<(usize, usize)> = Vec::new();
            for r in &rows {
                for (j, (c, v)) in r.cols.iter().enumerate() {
                    let addr = c.as_ptr() as usize;
                    let c: &str = c;
                    let at = match last.get(j) {
                        Some(&(a, at)) if a == addr => Some(at),
                        _ => {
                            let found = index.get(c).copied();
                            if let Some(at) = found {
                                remember(&mut last, j, (addr, at));
                            }
                            found
                        }
                    };
                    match at {
                        None => {
                            remember(&mut last, j, (addr, wanted.len()));
                            index.insert(c, wanted.len());
                            wanted.push((c, fixed_type(c).unwrap_or(v.natural())));
                        }
                        // An integer and a fraction for a new column in one load: numeric.
                        Some(at) => {
                            let e = &mut wanted[at].1;
                            if *e == ColType::BigInt
                                && v.natural() == ColType::Numeric
                                && fixed_type(c).is_none()
                            {
                                *e = ColType::Numeric
                            }
                        }
                    }
                }
            }
            let wanted = wanted
                .into_iter()
                .map(|(c, t)| (c.to_string(), t))
                .collect();
            TableRows {
                table,
                rows,
                wanted,
            }
        })
        .collect();
    dedup_discards(&mut discards);
    Batch { tables, discards }
}

/// Keeps each discard once (the same event twice in a load, or a track's discards for
/// `tracks` and its event table... which differ by table): two values of one column of
/// one row (colliding keys) both stay.
pub fn dedup_discards(discards: &mut Vec<Discard>) {
    let mut seen = HashSet::new();
    discards.retain(|d: &Discard| {
        seen.insert((
            d.table.clone(),
            d.row_id.clone(),
            d.column.clone(),
            d.value.clone(),
            d.reason.clone(),
        ))
    });
}

/// Sets `cache[j]` (growing it as needed).
fn remember<T: Default>(cache: &mut Vec<T>, j: usize, v: T) {
    if cache.len() <= j {
        cache.resize_with(j + 1, T::default);
    }
    cache[j] = v;
}

/// A later identify of the same user in one load: it wins column by column (by
/// `receivedAt`; by order when unknown); an older one only fills what is empty.
fn merge_user(prev: &mut Row, row: Row) {
    let newer = match (
        prev.received_at.as_deref().and_then(schema::timestamp_key),
        row.received_at.as_deref().and_then(schema::timestamp_key),
    ) {
        (Some(p), Some(r)) => r >= p,
        _ => true,
    };
    prev.cols.merge(row.cols, newer);
    if newer {
        prev.received_at = row.received_at;
    }
}

/// The element type of a parameter array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    Text,
    Int8,
    Bool,
    Timestamptz,
}

impl Elem {
    /// The array type, as the statement names it.
    fn array_sql(self) -> &'static str {
        match self {
            Elem::Text => "text[]",
            Elem::Int8 => "int8[]",
            Elem::Bool => "bool[]",
            Elem::Timestamptz => "timestamptz[]",
        }
    }

    fn element_type(self) -> Type {
        match self {
            Elem::Text => Type::TEXT,
            Elem::Int8 => Type::INT8,
            Elem::Bool => Type::BOOL,
            Elem::Timestamptz => Type::TIMESTAMPTZ,
        }
    }
}

/// A one-dimensional array in PostgreSQL's binary format, built value by value.
#[derive(Debug)]
pub struct Array {
    elem: Elem,
    elements: Vec<u8>,
    len: i32,
    has_null: bool,
}

impl Array {
    pub fn new(elem: Elem) -> Array {
        Array {
            elem,
            elements: Vec::new(),
            len: 0,
            has_null: false,
        }
    }

    fn push_null(&mut self) {
        self.elements.put_i32(-1);
        self.len += 1;
        self.has_null = true;
    }

    /// Adds `s` to a `text[]`.
    fn push(&mut self, s: &[u8]) {
        if s.contains(&0) {
            // PostgreSQL text cannot hold NUL.
            let clean: Vec<u8> = s.iter().copied().filter(|b| *b != 0).collect();
            return self.push(&clean);
        }
        self.elements.put_i32(s.len() as i32);
        self.elements.extend_from_slice(s);
        self.len += 1;
    }

    /// Adds `v`; returns the bytes it took, or why it does not fit the array's type
    /// (`v` has been made the column's type before: only a bug gets here).
    pub fn push_val(&mut self, v: &Val) -> Result<usize, String> {
        match (self.elem, v) {
            (Elem::Text, v) => Ok(self.push_text(v)),
            (Elem::Int8, Val::Int(i)) => Ok(self.push_fixed(&i.to_be_bytes())),
            (Elem::Bool, Val::Bool(b)) => Ok(self.push_fixed(&[u8::from(*b)])),
            (Elem::Timestamptz, Val::Ts(s)) => match schema::pg_timestamptz(s) {
                Some(t) => Ok(self.push_fixed(&t.to_be_bytes())),
                None => Err(format!("{s:?} is not a timestamp PostgreSQL can hold")),
            },
            (elem, v) => Err(format!(
                "a {} value for a {} column",
                v.natural().word(),
                elem.element_type()
            )),
        }
    }

    fn push_fixed(&mut self, b: &[u8]) -> usize {
        self.elements.put_i32(b.len() as i32);
        self.elements.extend_from_slice(b);
        self.len += 1;
        b.len()
    }

    /// Adds `v` as text; returns its length.
    fn push_text(&mut self, v: &Val) -> usize {
        let b: &[u8] = match v {
            Val::Int(i) => return self.push_int(*i),
            Val::Bool(b) => {
                if *b {
                    b"t"
                } else {
                    b"f"
                }
            }
            Val::Num(s) | Val::Ts(s) | Val::Text(s) => s.as_bytes(),
        };
        self.push(b);
        b.len()
    }

    fn push_int(&mut self, i: i64) -> usize {
        let mut buf = [0u8; 20];
        let b = itoa(i, &mut buf);
        self.push(b);
        b.len()
    }

    fn push_opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.push(s.as_bytes()),
            None => self.push_null(),
        }
    }
}

/// `i` in decimal, in `buf`.
fn itoa(i: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = i.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

impl ToSql for Array {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let element = self.elem.element_type();
        if !matches!(ty.kind(), Kind::Array(e) if *e == element) {
            return Err(format!("a {element} array sent as {ty}").into());
        }
        out.reserve(20 + self.elements.len());
        out.put_i32(1); // dimensions
        out.put_i32(i32::from(self.has_null));
        out.put_u32(element.oid());
        out.put_i32(self.len);
        out.put_i32(1); // lower bound
        out.extend_from_slice(&self.elements);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        [
            Type::TEXT_ARRAY,
            Type::INT8_ARRAY,
            Type::BOOL_ARRAY,
            Type::TIMESTAMPTZ_ARRAY,
        ]
        .contains(ty)
    }

    to_sql_checked!();
}

/// One statement of a load and its parameters.
pub struct Statement {
    /// What the statement does with a row whose id the table has: nothing, or (`users`)
    /// merge it.
    pub sql: String,
    /// The same rows as a plain `INSERT` (tables other than `users`): one index descent
    /// per row instead of two, but refused whole (unique violation) when an id is there.
    pub plain: Option<String>,
    pub params: Vec<Array>,
    pub rows: usize,
}

impl Statement {
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect()
    }
}

/// How one column is read from its parameter: the array's element type and, for text,
/// the cast to the column's type.
type Source = (Elem, Option<Arc<str>>);

/// `SELECT` list and `FROM` of `columns` read from `$1..$n` (one array each; text cast to
/// the column's type).
fn select_from(columns: &[Source]) -> String {
    let list = columns
        .iter()
        .enumerate()
        .map(|(i, source)| match source {
            (Elem::Text, Some(t)) => format!("s.c{i}::{t}"),
            _ => format!("s.c{i}"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let unnest = columns
        .iter()
        .enumerate()
        .map(|(i, (elem, _))| format!("unnest(${}::{}) AS c{i}", i + 1, elem.array_sql()))
        .collect::<Vec<_>>()
        .join(", ");
    // Set-returning functions in a select list: read in step, in array order, without
    // being materialised first.
    format!("{list}, now() FROM (SELECT {unnest}) s")
}

/// Rows of one table being encoded into statements.
struct Chunk {
    names: Vec<String>,
    /// Column name → (its array, its type in the database).
    index: FastMap<String, (usize, ColType)>,
    arrays: Vec<Array>,
    rows: usize,
}

impl Chunk {
    fn new() -> Chunk {
        let mut c = Chunk {
            names: Vec::new(),
            index: FastMap::default(),
            arrays: Vec::new(),
            rows: 0,
        };
        c.column("id", ColType::Text, Elem::Text);
        c
    }

    /// Adds a column of the table: its array (of `elem`) and type.
    fn column(&mut self, name: &str, ty: ColType, elem: Elem) -> (usize, ColType) {
        let i = self.names.len();
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), (i, ty));
        let mut a = Array::new(elem);
        for _ in 0..self.rows {
            a.push_null();
        }
        self.arrays.push(a);
        (i, ty)
    }

    /// Ends the current row: columns it did not set get a NULL.
    fn end_row(&mut self) {
        self.rows += 1;
        for a in &mut self.arrays {
            if (a.len as usize) < self.rows {
                a.push_null();
            }
        }
    }
}

/// PostgreSQL's largest row (a heap tuple in an 8 KiB page: `MaxHeapTupleSize`).
pub const MAX_ROW_BYTES: usize = 8160;

/// What one row takes on disk at least, counted value by value as it is encoded: the
/// tuple header and null bitmap, then each value as PostgreSQL stores it once it has
/// moved every long one out of line (TOAST): a varlena value of `n` bytes takes `n + 1`
/// bytes while that is at most 24 (short values stay inline), else an 18-byte pointer;
/// `bigint` and timestamps 8 bytes, aligned to 8 (at most 7 bytes of padding each, and
/// padding only after a value that leaves the row unaligned), `boolean` 1.
struct Width {
    bytes: usize,
    eights: usize,
    others: usize,
}

impl Width {
    /// A row of a table with `columns` columns (its id and `uuid_ts` counted).
    fn new(columns: usize, id: &str) -> Width {
        let header = (23 + columns.div_ceil(8)).next_multiple_of(8);
        let mut w = Width {
            bytes: header,
            eights: 1, // uuid_ts
            others: 0,
        };
        w.bytes += 8 + varlena(id.len());
        w.others += 1;
        w
    }

    fn bound(&self) -> usize {
        self.bytes + 7 * self.eights.min(self.others + 1)
    }

    /// Adds `v` (in a column of type `ty`) if the row stays under PostgreSQL's limit.
    fn fits(&mut self, ty: ColType, v: &Val) -> bool {
        let (bytes, eight) = match ty {
            ColType::BigInt | ColType::Timestamp => (8, true),
            ColType::Boolean => (1, false),
            ColType::Numeric | ColType::Text => {
                let n = match v {
                    Val::Int(_) => 20,
                    Val::Bool(_) => 5,
                    Val::Num(s) | Val::Ts(s) | Val::Text(s) => s.len(),
                };
                (varlena(n), false)
            }
        };
        let mut next = Width { ..*self };
        next.bytes += bytes;
        if eight {
            next.eights += 1;
        } else {
            next.others += 1;
        }
        // A margin for what this count leaves out (a numeric's own header).
        if next.bound() + 64 > MAX_ROW_BYTES {
            return false;
        }
        *self = next;
        true
    }
}

/// Bytes a varlena value of `n` bytes takes in a row at least (see [`Width`]).
fn varlena(n: usize) -> usize {
    if n < 24 {
        n + 1
    } else {
        18
    }
}

/// The statements loading `t` into `target` (a quoted, schema-qualified name), given the
/// table's columns as the database has them (at most `limit` of them: a column the table
/// does not have is at that limit); values that do not fit go to `discards`, as do those
/// that would make a row larger than PostgreSQL takes ([`MAX_ROW_BYTES`]; the row's own
/// columns come first, so the ones left out are the last properties or traits).
pub fn encode(
    t: TableRows,
    known: &HashMap<String, Column>,
    limit: usize,
    target: &str,
    discards: &mut Vec<Discard>,
) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut chunk = Chunk::new();
    let users = t.table == "users";
    // What the chunk's values take, about.
    let mut bytes = 0;
    // The previous row's columns by position (name, array, type): rows of one table
    // mostly have the same names in the same order, shared (names.rs), so most are
    // found without hashing.
    let mut last: Vec<Option<(Name, usize, ColType)>> = Vec::new();
    for r in t.rows {
        chunk.arrays[0].push(r.id.as_bytes());
        bytes += r.id.len();
        let mut width = Width::new(known.len(), &r.id);
        for (j, (c, v)) in r.cols.into_iter().enumerate() {
            if &*c == "id" {
                continue;
            }
            let found = match last.get(j) {
                Some(Some((n, i, ty))) if Arc::ptr_eq(n, &c) => Some((*i, *ty)),
                _ => {
                    let found = match chunk.index.get(&*c) {
                        Some(&found) => Some(found),
                        None => known
                            .get(&*c)
                            .map(|k| chunk.column(&c, k.ty, k.binary.unwrap_or(Elem::Text))),
                    };
                    if let Some((i, ty)) = found {
                        remember(&mut last, j, Some((c.clone(), i, ty)));
                    }
                    found
                }
            };
            let pushed = match found {
                None => Err((
                    Why::ColumnLimit,
                    format!(
                        "no room for a new column: the table is at its limit of {limit} columns"
                    ),
                )),
                Some((i, ty)) => {
                    let fits = |v: Val, width: &mut Width| {
                        if width.fits(ty, &v) {
                            Ok(v)
                        } else {
                            Err((
                                Why::RowWidth,
                                format!(
                                    "the row would pass PostgreSQL's limit of {MAX_ROW_BYTES} \
                                     bytes"
                                ),
                            ))
                        }
                    };
                    if v.natural() == ty {
                        fits(v.clone(), &mut width).and_then(|v| {
                            chunk.arrays[i]
                                .push_val(&v)
                                .map_err(|e| (Why::Conversion, e))
                        })
                    } else {
                        v.clone()
                            .coerce(ty)
                            .map_err(|e| (Why::Conversion, e))
                            .and_then(|v| fits(v, &mut width))
                            .and_then(|v| {
                                chunk.arrays[i]
                                    .push_val(&v)
                                    .map_err(|e| (Why::Conversion, e))
                            })
                    }
                }
            };
            let (why, reason) = match pushed {
                Ok(n) => {
                    bytes += n;
                    continue;
                }
                Err(e) => e,
            };
            discards.push(Discard {
                table: t.table.clone(),
                row_id: r.id.clone(),
                column: c.to_string(),
                value: schema::discard_text(&v.text()),
                received_at: r.received_at.clone(),
                reason,
                why,
            });
        }
        chunk.end_row();
        bytes += 4 * chunk.arrays.len();
        if bytes >= MAX_STATEMENT_BYTES {
            // A new chunk: its arrays are not the ones remembered.
            last.clear();
            out.push(insert(
                std::mem::replace(&mut chunk, Chunk::new()),
                known,
                target,
                users,
            ));
            bytes = 0;
        }
    }
    if chunk.rows > 0 {
        out.push(insert(chunk, known, target, users));
    }
    out
}

fn insert(chunk: Chunk, known: &HashMap<String, Column>, target: &str, users: bool) -> Statement {
    let sources: Vec<Source> = chunk
        .names
        .iter()
        .zip(&chunk.arrays)
        .map(|(c, a)| (a.elem, known.get(c).and_then(|k| k.cast.clone())))
        .collect();
    let list = chunk
        .names
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ");
    let conflict = if users {
        let sets = chunk
            .names
            .iter()
            .filter(|c| c.as_str() != "id")
            .map(|c| {
                let c = quote(c);
                if c == "\"received_at\"" {
                    format!("{c} = GREATEST(t.{c}, EXCLUDED.{c})")
                } else {
                    format!(
                        "{c} = CASE WHEN t.received_at IS NULL OR EXCLUDED.received_at \
                         >= t.received_at THEN COALESCE(EXCLUDED.{c}, t.{c}) \
                         ELSE COALESCE(t.{c}, EXCLUDED.{c}) END"
                    )
                }
            })
            .chain(std::iter::once("uuid_ts = EXCLUDED.uuid_ts".to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        format!("DO UPDATE SET {sets}")
    } else {
        "DO NOTHING".to_string()
    };
    let select = select_from(&sources);
    Statement {
        sql: format!(
            "INSERT INTO {target} AS t ({list}, uuid_ts) SELECT {select} ON CONFLICT (id) \
             {conflict}"
        ),
        plain: (!users).then(|| format!("INSERT INTO {target} ({list}, uuid_ts) SELECT {select}")),
        rows: chunk.rows,
        params: chunk.arrays,
    }
}

/// The statements recording `discards` into `target` (`rudder_discards`), each once (a
/// re-delivered load records none again: same table, row, column, value and reason).
pub fn encode_discards(discards: &[Discard], target: &str) -> Vec<Statement> {
    let mut out = Vec::new();
    for part in discards.chunks(10_000) {
        let mut a: Vec<Array> = (0..6).map(|_| Array::new(Elem::Text)).collect();
        for d in part {
            let received = d
                .received_at
                .as_deref()
                .filter(|r| schema::looks_like_timestamp(r));
            a[0].push(d.table.as_bytes());
            a[1].push(d.row_id.as_bytes());
            a[2].push(d.column.as_bytes());
            a[3].push(d.value.as_bytes());
            a[4].push_opt(received);
            a[5].push(d.reason.as_bytes());
        }
        let ts: Option<Arc<str>> = Some(Arc::from("timestamp with time zone"));
        let sources = [None, None, None, None, ts, None].map(|cast| (Elem::Text, cast));
        out.push(Statement {
            sql: format!(
                "INSERT INTO {target} (table_name, row_id, column_name, column_value, \
                 received_at, reason, uuid_ts) SELECT {} WHERE NOT EXISTS (SELECT 1 FROM \
                 {target} x WHERE x.row_id = s.c1 AND x.table_name = s.c0 \
                 AND x.column_name = s.c2 AND x.column_value = s.c3 AND x.reason = s.c5)",
                select_from(&sources)
            ),
            plain: None,
            rows: part.len(),
            params: a,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_decimal() {
        for i in [0, 7, -7, 10, 1234567890, i64::MAX, i64::MIN] {
            assert_eq!(itoa(i, &mut [0; 20]), i.to_string().as_bytes());
        }
    }

    /// A one-dimensional array's header in PostgreSQL's binary format: dimensions, whether
    /// it has NULLs, the element type's oid, then the length and lower bound (1).
    fn header(has_null: bool, oid: u32, len: i32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&1i32.to_be_bytes());
        h.extend_from_slice(&i32::from(has_null).to_be_bytes());
        h.extend_from_slice(&oid.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&1i32.to_be_bytes());
        h
    }

    #[test]
    fn text_arrays_in_binary() {
        let mut a = Array::new(Elem::Text);
        a.push(b"ab");
        a.push_null();
        a.push(b"c\0d");
        let mut out = BytesMut::new();
        a.to_sql(&Type::TEXT_ARRAY, &mut out).unwrap();
        let mut want = header(true, 25, 3);
        want.extend_from_slice(&2i32.to_be_bytes());
        want.extend_from_slice(b"ab");
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&2i32.to_be_bytes());
        want.extend_from_slice(b"cd");
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn an_array_is_sent_only_as_its_own_type() {
        let mut a = Array::new(Elem::Int8);
        assert_eq!(a.push_val(&Val::Int(7)), Ok(8));
        assert!(a.push_val(&Val::Text("7".into())).is_err());
        let mut out = BytesMut::new();
        assert!(a.to_sql(&Type::TEXT_ARRAY, &mut out).is_err());
        assert!(a.to_sql(&Type::INT8_ARRAY, &mut out).is_ok());
        let mut want = header(false, 20, 1);
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&7i64.to_be_bytes());
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn rows_missing_a_column_get_null() {
        let row = |id: &str, cols: &[(&str, Val)]| Row {
            id: id.into(),
            received_at: None,
            cols: cols
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        let t = TableRows {
            table: "x".into(),
            rows: vec![
                row(
                    "a",
                    &[
                        ("n", Val::Int(1)),
                        ("t", Val::Ts("2026-11-29T10:00:00.5+01:00".into())),
                        ("k", Val::Int(-3)),
                    ],
                ),
                row("b", &[("s", Val::Text("x".into()))]),
                row("c", &[("n", Val::Text("no".into())), ("z", Val::Int(2))]),
            ],
            wanted: BTreeMap::new(),
        };
        let known: HashMap<String, Column> = [
            ("id", "text"),
            ("n", "integer"),
            ("s", "text"),
            ("t", "timestamp with time zone"),
            ("k", "bigint"),
        ]
        .into_iter()
        .map(|(n, ty)| (n.to_string(), Column::of_type(ty, ty)))
        .collect();
        let mut discards = Vec::new();
        let s = encode(t, &known, 1600, "\"w\".\"x\"", &mut discards);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].rows, 3);
        assert!(s[0].params.iter().all(|a| a.len == 3));
        // An integer column: text, cast; bigint and timestamptz columns: binary.
        assert!(s[0].sql.contains("s.c1::integer"), "{}", s[0].sql);
        assert!(
            s[0].sql.contains("unnest($2::text[]) AS c1"),
            "{}",
            s[0].sql
        );
        assert!(
            s[0].sql.contains("unnest($3::timestamptz[]) AS c2"),
            "{}",
            s[0].sql
        );
        assert!(
            s[0].sql.contains("unnest($4::int8[]) AS c3"),
            "{}",
            s[0].sql
        );
        assert!(!s[0].sql.contains("s.c2::"), "{}", s[0].sql);
        // 2026-11-29 09:00:00.5 UTC, in microseconds since 2000-01-01.
        let micros: i64 = (1_795_942_800 - 946_684_800) * 1_000_000 + 500_000;
        let mut t = 8i32.to_be_bytes().to_vec();
        t.extend_from_slice(&micros.to_be_bytes());
        t.extend_from_slice(&(-1i32).to_be_bytes());
        t.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(s[0].params[2].elements, t);
        // A column the table cannot have (it is full) is neither loaded nor named.
        assert!(!s[0].sql.contains("\"z\""), "{}", s[0].sql);
        assert_eq!(s[0].params.len(), 5);
        assert_eq!(discards.len(), 2);
        assert_eq!(discards[0].row_id, "c");
        assert!(discards[0].reason.contains("string to int"));
        assert!(discards[1].reason.contains("1600 columns"));
    }
}
