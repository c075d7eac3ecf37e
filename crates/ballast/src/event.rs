//! What several parts know about an event's JSON: its top-level fields read shallowly
//! (each value kept as raw, validated JSON text; the gateway enriches from them) and its
//! identity (the ordering key and messageId the router finds when a record carries no meta
//! block written at ingest).

use std::borrow::Cow;
use std::fmt;

use bytestring::ByteString;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A top-level key, borrowed from the input when it has no escapes.
#[derive(Debug)]
pub struct Key<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// A JSON value that should be an event: an object's top-level fields, or "not an object".
#[derive(Debug)]
pub enum Shallow<'a> {
    Object(Vec<(Key<'a>, &'a RawValue)>),
    NotObject,
}

impl<'de: 'a, 'a> Deserialize<'de> for Shallow<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Shallow<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shallow<'a>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(k) = map.next_key::<Key<'a>>()? {
                    let v: &'a RawValue = map.next_value()?;
                    fields.push((k, v));
                }
                Ok(Shallow::Object(fields))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shallow<'a>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Shallow::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Shallow<'a>, E> {
                Ok(Shallow::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Shallow<'a>, E> {
                Ok(Shallow::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Shallow<'a>, E> {
                Ok(Shallow::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Shallow<'a>, E> {
                Ok(Shallow::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Shallow<'a>, E> {
                Ok(Shallow::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Shallow<'a>, E> {
                Ok(Shallow::NotObject)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// The ordering key and messageId of a stored event.
pub fn identify(json: &[u8]) -> (ByteString, ByteString) {
    let mut user: Option<String> = None;
    let mut anon: Option<String> = None;
    let mut message_id = String::new();
    if let Ok(Shallow::Object(fields)) = serde_json::from_slice::<Shallow>(json) {
        let text = |v: &RawValue| -> Option<String> {
            let raw = v.get();
            if raw.starts_with('"') {
                // Undecodable (a lone surrogate escape): its JSON text, as the gateway.
                let s = serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string());
                (!s.trim().is_empty()).then_some(s)
            } else if raw == "null" {
                None
            } else {
                Some(raw.to_string())
            }
        };
        for (k, v) in &fields {
            match &*k.0 {
                "userId" => user = text(v),
                "anonymousId" => anon = text(v),
                "messageId" => message_id = text(v).unwrap_or_default(),
                _ => {}
            }
        }
    }
    let key = match (user, anon) {
        (Some(u), _) => format!("u:{u}"),
        (None, Some(a)) => format!("a:{a}"),
        (None, None) => String::new(),
    };
    (key.into(), message_id.into())
}

#[cfg(test)]
mod tests {
    use super::identify;

    #[test]
    fn ordering_key_is_user_then_anonymous_id() {
        let (k, m) = identify(br#"{"userId":"u1","anonymousId":"a","messageId":"m"}"#);
        assert_eq!((&*k, &*m), ("u:u1", "m"));
        let (k, _) = identify(br#"{"userId":"","anonymousId":"a"}"#);
        assert_eq!(&*k, "a:a");
        let (k, _) = identify(br#"{"userId":42}"#);
        assert_eq!(&*k, "u:42");
    }
}
