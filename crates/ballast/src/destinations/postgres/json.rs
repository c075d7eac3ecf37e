//! The loader's JSON tree: an event parsed once, its strings borrowed from the event's
//! bytes where they hold no escapes (most), objects as members in the order sent in one
//! vector (with an index by key). `serde_json::Value` made a `String` of every key and value and a B-tree node
//! per few members, and the rows then copied the strings again; parsing was the largest
//! piece of turning events into rows. Same answers as `serde_json::Value` where the
//! loader asks: a member by key, the last of a repeated key wins, compact JSON text (keys
//! in order) for a nested array or object kept as one value. Unlike it, the members can be
//! walked in the order sent: of two keys that make the same column, the first sent wins.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

use crate::event::Key;

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object(Map<'a>),
}

/// An object's members in the order sent, each key once, with an index sorted by key
/// to look one up. A repeated key keeps the place it was first sent at and the value it
/// was last sent with (as `JSON.parse` does).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Map<'a> {
    members: Vec<(Cow<'a, str>, Value<'a>)>,
    /// Indices of `members`, sorted by key.
    sorted: Vec<u32>,
}

impl<'a> Map<'a> {
    fn from_members(mut members: Vec<(Cow<'a, str>, Value<'a>)>) -> Map<'a> {
        let mut sorted = by_key(&members);
        if sorted
            .windows(2)
            .any(|w| members[w[0] as usize].0 == members[w[1] as usize].0)
        {
            // Stable sort: a repeated key's indices are in the order sent.
            let mut gone = vec![false; members.len()];
            let mut i = 0;
            while i < sorted.len() {
                let mut j = i;
                while j + 1 < sorted.len()
                    && members[sorted[j + 1] as usize].0 == members[sorted[i] as usize].0
                {
                    j += 1;
                }
                if j > i {
                    let (first, last) = (sorted[i] as usize, sorted[j] as usize);
                    let v = std::mem::replace(&mut members[last].1, Value::Null);
                    members[first].1 = v;
                    for k in &sorted[i + 1..=j] {
                        gone[*k as usize] = true;
                    }
                }
                i = j + 1;
            }
            let mut n = 0;
            members.retain(|_| {
                n += 1;
                !gone[n - 1]
            });
            sorted = by_key(&members);
        }
        Map { members, sorted }
    }

    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.sorted
            .binary_search_by(|&i| (*self.members[i as usize].0).cmp(key))
            .ok()
            .map(|i| &self.members[self.sorted[i] as usize].1)
    }

    /// The members in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value<'a>)> {
        self.members.iter().map(|(k, v)| (&**k, v))
    }

    /// The members in key order.
    pub fn iter_sorted(&self) -> impl Iterator<Item = (&str, &Value<'a>)> {
        self.sorted.iter().map(|&i| {
            let (k, v) = &self.members[i as usize];
            (&**k, v)
        })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Adds `other`'s members after its own; where both have a key, `other`'s value wins
    /// (at the place the key has here).
    pub fn extend(&mut self, other: Map<'a>) {
        let mut all = std::mem::take(&mut self.members);
        all.extend(other.members);
        *self = Map::from_members(all);
    }
}

/// Indices of `members` sorted by key (stable: equal keys in the order given).
fn by_key(members: &[(Cow<'_, str>, Value<'_>)]) -> Vec<u32> {
    let mut sorted: Vec<u32> = (0..members.len() as u32).collect();
    sorted.sort_by(|&a, &b| members[a as usize].0.cmp(&members[b as usize].0));
    sorted
}

impl<'m, 'a> IntoIterator for &'m Map<'a> {
    type Item = (&'m str, &'m Value<'a>);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'m, (Cow<'a, str>, Value<'a>)>,
        fn(&'m (Cow<'a, str>, Value<'a>)) -> (&'m str, &'m Value<'a>),
    >;

    fn into_iter(self) -> Self::IntoIter {
        fn pair<'m, 'a>(m: &'m (Cow<'a, str>, Value<'a>)) -> (&'m str, &'m Value<'a>) {
            (&*m.0, &m.1)
        }
        self.members.iter().map(pair)
    }
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value<'de>, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value<'de>, E> {
                Ok(Value::Number(n.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value<'de>, E> {
                Ok(Value::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value<'de>, E> {
                Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Value<'de>, E> {
                Ok(Value::String(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Value<'de>, E> {
                Ok(Value::String(Cow::Owned(s.to_string())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Value<'de>, E> {
                Ok(Value::String(Cow::Owned(s)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Value<'de>, E> {
                Ok(Value::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Value<'de>, E> {
                Ok(Value::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(v) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(Key(k)) = map.next_key()? {
                    members.push((k, map.next_value()?));
                }
                Ok(Value::Object(Map::from_members(members)))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => n.serialize(s),
            Value::String(t) => s.serialize_str(t),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Object(m) => {
                // In key order, as `serde_json::Value` prints.
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m.iter_sorted() {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Compact JSON, as `serde_json::Value` prints.
impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// JSON documents of every kind, nested, with escapes and repeated keys.
    fn doc() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e12f64..1e12).prop_map(serde_json::Value::from),
            "[a-z\"\\\\/\u{e9}\u{1F600}\n\t ]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::vec(("[a-c\"]{0,3}", inner), 0..6)
                    .prop_map(|m| { serde_json::Value::Object(m.into_iter().collect()) }),
            ]
        })
    }

    proptest! {
        /// What serde_json's own tree says of any document, this one says too: the text
        /// of nested values, and each member's value.
        #[test]
        fn agrees_with_serde_json(doc in doc()) {
            let text = serde_json::to_string(&doc).unwrap();
            // Both read from the same text (serde_json's float parsing is its own).
            let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
            let ours: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(ours.to_string(), theirs.to_string());
            if let (Value::Object(m), serde_json::Value::Object(theirs)) = (&ours, &theirs) {
                prop_assert_eq!(m.len(), theirs.len());
                for (k, v) in theirs {
                    prop_assert_eq!(m.get(k).map(|v| v.to_string()), Some(v.to_string()));
                }
            }
        }
    }

    #[test]
    fn repeated_keys_keep_the_last_and_strings_are_borrowed() {
        let text = r#"{"b":1,"a":"plain","b":2,"c":"esc\"aped"}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let Value::Object(m) = &v else { panic!("{v}") };
        assert_eq!(
            m.iter_sorted().map(|(k, _)| k).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        // As sent; the repeated key at its first place, with its last value.
        assert_eq!(
            m.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["b", "a", "c"]
        );
        assert_eq!(m.get("b"), Some(&Value::Number(2.into())));
        assert!(matches!(
            m.get("a"),
            Some(Value::String(Cow::Borrowed("plain")))
        ));
        assert!(matches!(m.get("c"), Some(Value::String(Cow::Owned(s))) if s == "esc\"aped"));
        assert_eq!(v.to_string(), r#"{"a":"plain","b":2,"c":"esc\"aped"}"#);
    }

    #[test]
    fn extend_lets_the_other_win() {
        let mut a: Value = serde_json::from_str(r#"{"x":1,"y":1}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"y":2,"z":2}"#).unwrap();
        let (Value::Object(a), Value::Object(b)) = (&mut a, b) else {
            panic!()
        };
        a.extend(b);
        assert_eq!(
            Value::Object(a.clone()).to_string(),
            r#"{"x":1,"y":2,"z":2}"#
        );
    }
}
