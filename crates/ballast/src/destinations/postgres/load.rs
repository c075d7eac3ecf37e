//! The CPU side of a load, off the async threads (the sink runs it on a blocking thread):
//! events → rows grouped per table (one row per id; `users` merged, the latest value of
//! each column winning), then each table's rows → `INSERT ... SELECT ... FROM unnest(...)
//! ON CONFLICT (id) ...` statements whose parameters are one binary `text[]` per column
//! (the database reads each value with its column's own input function, as COPY would).
//! No staging table: one statement per table per load (more for huge loads, see
//! [`MAX_STATEMENT_BYTES`]), no catalog changes, each row written once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use super::schema::{self, ColType, Discard, Name, Row, Val};
use super::sink::{quote, MAX_COLUMNS};
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
    let mut seen = HashSet::new();
    discards
        .retain(|d: &Discard| seen.insert((d.table.clone(), d.row_id.clone(), d.column.clone())));
    Batch { tables, discards }
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

/// A one-dimensional `text[]` in PostgreSQL's binary format, built value by value.
#[derive(Debug, Default)]
pub struct TextArray {
    elements: Vec<u8>,
    len: i32,
    has_null: bool,
}

impl TextArray {
    fn push_null(&mut self) {
        self.elements.put_i32(-1);
        self.len += 1;
        self.has_null = true;
    }

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

    /// Adds `v` as text; returns its length.
    fn push_val(&mut self, v: &Val) -> usize {
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

impl ToSql for TextArray {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.reserve(20 + self.elements.len());
        out.put_i32(1); // dimensions
        out.put_i32(i32::from(self.has_null));
        out.put_u32(Type::TEXT.oid());
        out.put_i32(self.len);
        out.put_i32(1); // lower bound
        out.extend_from_slice(&self.elements);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

/// One statement of a load and its parameters.
pub struct Statement {
    pub sql: String,
    pub params: Vec<TextArray>,
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

/// `SELECT` list and `FROM` of `columns` read from `$1..$n` (one `text[]` each, cast to
/// the column's type).
fn select_from(casts: &[Option<Arc<str>>]) -> String {
    let list = casts
        .iter()
        .enumerate()
        .map(|(i, cast)| match cast {
            Some(t) => format!("s.c{i}::{t}"),
            None => format!("s.c{i}"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let unnest = (0..casts.len())
        .map(|i| format!("unnest(${}::text[]) AS c{i}", i + 1))
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
    arrays: Vec<TextArray>,
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
        c.column("id", ColType::Text);
        c
    }

    /// Adds a column of the table: its array and type.
    fn column(&mut self, name: &str, ty: ColType) -> (usize, ColType) {
        let i = self.names.len();
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), (i, ty));
        let mut a = TextArray::default();
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

/// The statements loading `t` into `target` (a quoted, schema-qualified name), given the
/// table's columns as the database has them; values that do not fit go to `discards`.
pub fn encode(
    t: TableRows,
    known: &HashMap<String, Column>,
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
        for (j, (c, v)) in r.cols.into_iter().enumerate() {
            if &*c == "id" {
                continue;
            }
            let found = match last.get(j) {
                Some(Some((n, i, ty))) if Arc::ptr_eq(n, &c) => Some((*i, *ty)),
                _ => {
                    let found = match chunk.index.get(&*c) {
                        Some(&found) => Some(found),
                        None => known.get(&*c).map(|k| chunk.column(&c, k.ty)),
                    };
                    if let Some((i, ty)) = found {
                        remember(&mut last, j, Some((c.clone(), i, ty)));
                    }
                    found
                }
            };
            let reason = match found {
                None => format!("table has {MAX_COLUMNS} columns, the most it can"),
                Some((i, ty)) if v.natural() == ty => {
                    bytes += chunk.arrays[i].push_val(&v);
                    continue;
                }
                Some((i, ty)) => match v.clone().coerce(ty) {
                    Ok(v) => {
                        bytes += chunk.arrays[i].push_val(&v);
                        continue;
                    }
                    Err(reason) => reason,
                },
            };
            discards.push(Discard {
                table: t.table.clone(),
                row_id: r.id.clone(),
                column: c.to_string(),
                value: schema::cut(&v.text(), schema::MAX_DISCARD_VALUE),
                received_at: r.received_at.clone(),
                reason,
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
    let casts: Vec<Option<Arc<str>>> = chunk
        .names
        .iter()
        .map(|c| known.get(c).and_then(|k| k.cast.clone()))
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
    Statement {
        sql: format!(
            "INSERT INTO {target} AS t ({list}, uuid_ts) SELECT {} ON CONFLICT (id) {conflict}",
            select_from(&casts)
        ),
        rows: chunk.rows,
        params: chunk.arrays,
    }
}

/// The statements recording `discards` into `target` (`rudder_discards`), each once.
pub fn encode_discards(discards: &[Discard], target: &str) -> Vec<Statement> {
    let mut out = Vec::new();
    for part in discards.chunks(10_000) {
        let mut a: Vec<TextArray> = (0..6).map(|_| TextArray::default()).collect();
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
        let casts = [None, None, None, None, ts, None];
        out.push(Statement {
            sql: format!(
                "INSERT INTO {target} (table_name, row_id, column_name, column_value, \
                 received_at, reason, uuid_ts) SELECT {} WHERE NOT EXISTS (SELECT 1 FROM \
                 {target} x WHERE x.row_id = s.c1 AND x.table_name = s.c0 \
                 AND x.column_name = s.c2)",
                select_from(&casts)
            ),
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

    #[test]
    fn text_arrays_in_binary() {
        let mut a = TextArray::default();
        a.push(b"ab");
        a.push_null();
        a.push(b"c\0d");
        let mut out = BytesMut::new();
        a.to_sql(&Type::TEXT_ARRAY, &mut out).unwrap();
        let mut want = Vec::new();
        for n in [1i32, 1] {
            want.extend_from_slice(&n.to_be_bytes());
        }
        want.extend_from_slice(&25u32.to_be_bytes());
        for n in [3i32, 1, 2] {
            want.extend_from_slice(&n.to_be_bytes());
        }
        want.extend_from_slice(b"ab");
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&2i32.to_be_bytes());
        want.extend_from_slice(b"cd");
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
                row("a", &[("n", Val::Int(1))]),
                row("b", &[("s", Val::Text("x".into()))]),
                row("c", &[("n", Val::Text("no".into())), ("z", Val::Int(2))]),
            ],
            wanted: BTreeMap::new(),
        };
        let known: HashMap<String, Column> = [
            ("id", ColType::Text, None),
            ("n", ColType::BigInt, Some("bigint")),
            ("s", ColType::Text, None),
        ]
        .into_iter()
        .map(|(n, ty, cast)| {
            (
                n.to_string(),
                Column {
                    ty,
                    cast: cast.map(Arc::from),
                },
            )
        })
        .collect();
        let mut discards = Vec::new();
        let s = encode(t, &known, "\"w\".\"x\"", &mut discards);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].rows, 3);
        assert!(s[0].params.iter().all(|a| a.len == 3));
        assert!(s[0].sql.contains("s.c1::bigint"), "{}", s[0].sql);
        // A column the table cannot have (it is full) is neither loaded nor named.
        assert!(!s[0].sql.contains("\"z\""), "{}", s[0].sql);
        assert_eq!(s[0].params.len(), 3);
        assert_eq!(discards.len(), 2);
        assert_eq!(discards[0].row_id, "c");
        assert!(discards[0].reason.contains("string to int"));
        assert!(discards[1].reason.contains("1600 columns"));
    }
}
