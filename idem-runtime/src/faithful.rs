//! Whether JSON holds a value faithfully, for `once`: its input's JSON is its
//! fingerprint, and its result's JSON is what later calls read.
//!
//! serde_json writes a non-finite float (NaN, an infinity) as `null`, so `Some(f64::NAN)`
//! and `None` write the same JSON: [`finite`] refuses such an input. A result must read
//! back as the value the operation returned: [`same_value`] compares the two through
//! serde's data model ([`trace`]), so that `Some(None)` of an `Option<Option<T>>`
//! (written as `null`, read back as `None`) or a variant of an untagged enum that reads
//! back as another is found, while a value that reads back exactly passes, whatever its
//! maps' and sets' iteration order.

use std::fmt;

use serde::Serialize;
use serde::ser;

/// Why a value is not held faithfully: a non-finite float, or an error of the value's own
/// `Serialize`.
#[derive(Debug)]
pub(crate) struct Unfaithful(String);

impl fmt::Display for Unfaithful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unfaithful {}

impl ser::Error for Unfaithful {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self(message.to_string())
    }
}

/// `Err` naming the first non-finite float `value` holds.
pub(crate) fn finite<T: Serialize + ?Sized>(value: &T) -> Result<(), Unfaithful> {
    value.serialize(Trace { floats_only: true }).map(drop)
}

/// Whether `read_back` is `value` as serde's data model sees them (maps and sequences as
/// multisets: JSON never reorders, while a hash map or set may iterate otherwise).
pub(crate) fn same_value<T: Serialize + ?Sized>(
    value: &T,
    read_back: &T,
) -> Result<bool, Unfaithful> {
    Ok(trace(value)? == trace(read_back)?)
}

/// `value` through serde's data model, as bytes: equal for equal values.
fn trace<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Unfaithful> {
    value.serialize(Trace { floats_only: false })
}

/// Walks a value: with `floats_only`, only to find a non-finite float (and writes
/// nothing); otherwise to write its trace.
#[derive(Clone, Copy)]
struct Trace {
    floats_only: bool,
}

impl Trace {
    fn scalar(self, tag: u8, payload: &[u8]) -> Result<Vec<u8>, Unfaithful> {
        if self.floats_only {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(1 + payload.len());
        out.push(tag);
        out.extend_from_slice(payload);
        Ok(out)
    }

    fn compound(self, tag: u8, name: &str) -> Compound {
        Compound {
            trace: self,
            head: [&[tag], name.as_bytes()].concat(),
            children: Vec::new(),
            key: None,
        }
    }

    fn integer(self, value: i128) -> Result<Vec<u8>, Unfaithful> {
        self.scalar(b'i', &value.to_be_bytes())
    }

    fn float(self, value: f64) -> Result<Vec<u8>, Unfaithful> {
        if !value.is_finite() {
            return Err(Unfaithful(format!(
                "{value} is not a number JSON can hold (it would be written as null)"
            )));
        }
        self.scalar(b'f', &value.to_bits().to_be_bytes())
    }
}

/// Children of a sequence, map, struct or variant, sorted when it ends.
struct Compound {
    trace: Trace,
    head: Vec<u8>,
    children: Vec<Vec<u8>>,
    /// A map's key, until its value comes.
    key: Option<Vec<u8>>,
}

impl Compound {
    fn push<T: Serialize + ?Sized>(&mut self, label: &[u8], value: &T) -> Result<(), Unfaithful> {
        let value = value.serialize(self.trace)?;
        if !self.trace.floats_only {
            self.children.push(framed([label, &value]));
        }
        Ok(())
    }

    fn end(mut self) -> Result<Vec<u8>, Unfaithful> {
        if self.trace.floats_only {
            return Ok(Vec::new());
        }
        self.children.sort_unstable();
        let mut out = framed([self.head.as_slice()]);
        for child in &self.children {
            out.extend(framed([child.as_slice()]));
        }
        out.push(b')');
        Ok(out)
    }
}

/// `parts`, each after its length.
fn framed<const N: usize>(parts: [&[u8]; N]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Integers of every width as one.
macro_rules! integers {
    ($($method:ident($type:ty);)*) => {$(
        fn $method(self, value: $type) -> Result<Vec<u8>, Unfaithful> {
            self.integer(i128::from(value))
        }
    )*};
}

impl ser::Serializer for Trace {
    type Ok = Vec<u8>;
    type Error = Unfaithful;
    type SerializeSeq = Compound;
    type SerializeTuple = Compound;
    type SerializeTupleStruct = Compound;
    type SerializeTupleVariant = Compound;
    type SerializeMap = Compound;
    type SerializeStruct = Compound;
    type SerializeStructVariant = Compound;

    integers! {
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
    }

    fn serialize_u128(self, value: u128) -> Result<Vec<u8>, Unfaithful> {
        match i128::try_from(value) {
            Ok(value) => self.integer(value),
            Err(_) => self.scalar(b'U', &value.to_be_bytes()),
        }
    }

    fn serialize_bool(self, value: bool) -> Result<Vec<u8>, Unfaithful> {
        self.scalar(b'b', &[u8::from(value)])
    }

    fn serialize_f32(self, value: f32) -> Result<Vec<u8>, Unfaithful> {
        self.float(f64::from(value))
    }

    fn serialize_f64(self, value: f64) -> Result<Vec<u8>, Unfaithful> {
        self.float(value)
    }

    // JSON writes a char as a string, and bytes as a list of numbers.
    fn serialize_char(self, value: char) -> Result<Vec<u8>, Unfaithful> {
        self.serialize_str(value.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<Vec<u8>, Unfaithful> {
        self.scalar(b's', value.as_bytes())
    }

    fn serialize_bytes(self, value: &[u8]) -> Result<Vec<u8>, Unfaithful> {
        let mut seq = self.compound(b'[', "");
        for byte in value {
            ser::SerializeSeq::serialize_element(&mut seq, byte)?;
        }
        seq.end()
    }

    fn serialize_none(self) -> Result<Vec<u8>, Unfaithful> {
        self.scalar(b'n', &[])
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, Unfaithful> {
        let inner = value.serialize(self)?;
        self.scalar(b'S', &inner)
    }

    fn serialize_unit(self) -> Result<Vec<u8>, Unfaithful> {
        self.scalar(b'u', &[])
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<Vec<u8>, Unfaithful> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Vec<u8>, Unfaithful> {
        self.scalar(b'v', variant.as_bytes())
    }

    // JSON writes a newtype struct as its content.
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Vec<u8>, Unfaithful> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Vec<u8>, Unfaithful> {
        let mut one = self.compound(b'V', variant);
        one.push(b"", value)?;
        one.end()
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'[', ""))
    }

    fn serialize_tuple(self, _: usize) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'[', ""))
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'[', ""))
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'T', variant))
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'{', ""))
    }

    // JSON writes a struct as a map with its fields' names as keys.
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'{', ""))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound, Unfaithful> {
        Ok(self.compound(b'R', variant))
    }
}

/// Sequences and tuples: elements.
macro_rules! elements {
    ($($trait:ident: $method:ident;)*) => {$(
        impl ser::$trait for Compound {
            type Ok = Vec<u8>;
            type Error = Unfaithful;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
                self.push(b"", value)
            }

            fn end(self) -> Result<Vec<u8>, Unfaithful> {
                Compound::end(self)
            }
        }
    )*};
}

elements! {
    SerializeSeq: serialize_element;
    SerializeTuple: serialize_element;
    SerializeTupleStruct: serialize_field;
    SerializeTupleVariant: serialize_field;
}

/// Structs: fields, as a map's entries keyed by their names' strings.
macro_rules! fields {
    ($($trait:ident;)*) => {$(
        impl ser::$trait for Compound {
            type Ok = Vec<u8>;
            type Error = Unfaithful;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Result<(), Unfaithful> {
                let name = ser::Serializer::serialize_str(self.trace, name)?;
                self.push(&name, value)
            }

            fn end(self) -> Result<Vec<u8>, Unfaithful> {
                Compound::end(self)
            }
        }
    )*};
}

fields! {
    SerializeStruct;
    SerializeStructVariant;
}

impl ser::SerializeMap for Compound {
    type Ok = Vec<u8>;
    type Error = Unfaithful;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Unfaithful> {
        self.key = Some(key.serialize(self.trace)?);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        let key = self.key.take().unwrap_or_default();
        self.push(&key, value)
    }

    fn end(self) -> Result<Vec<u8>, Unfaithful> {
        Compound::end(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use serde::Deserialize;
    use serde::de::DeserializeOwned;

    use super::*;

    /// Whether `value` reads back from its JSON as itself.
    fn faithful<T: Serialize + DeserializeOwned>(value: &T) -> bool {
        let json = serde_json::to_vec(value).unwrap();
        serde_json::from_slice::<T>(&json)
            .is_ok_and(|back| same_value(value, &back).unwrap_or(false))
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Quote {
        id: u32,
        rate: Option<f64>,
        legs: Vec<(String, f32)>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum State {
        Pending { id: String },
        Captured { id: String, cents: u64 },
    }

    #[derive(Serialize, Deserialize)]
    struct Patch {
        #[serde(default, skip_serializing_if = "Option::is_none", with = "double")]
        limit: Option<Option<u64>>,
    }

    mod double {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        pub(super) fn serialize<S: Serializer>(
            value: &Option<Option<u64>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            value.as_ref().and_then(Option::as_ref).serialize(s)
        }

        pub(super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Option<u64>>, D::Error> {
            Option::<u64>::deserialize(d).map(Some)
        }
    }

    #[test]
    fn finds_a_non_finite_float_wherever_it_is() {
        let quote = |rate, leg| Quote {
            id: 1,
            rate,
            legs: vec![("a".into(), 1.5), ("b".into(), leg)],
        };
        assert!(finite(&quote(Some(2.5), 0.25)).is_ok());
        assert!(finite(&quote(None, 0.25)).is_ok());
        assert!(finite(&quote(Some(f64::INFINITY), 0.25)).is_err());
        assert!(finite(&quote(Some(1.0), f32::NAN)).is_err());
        let keyed: BTreeMap<String, f64> = [("x".into(), f64::NEG_INFINITY)].into();
        assert!(finite(&keyed).is_err());
        assert!(finite(&(u128::MAX, i128::MIN, "text", [1u8, 2])).is_ok());
        assert!(
            finite(&Some(None::<u32>)).is_ok(),
            "only floats count for an input"
        );
    }

    #[test]
    fn a_value_that_reads_back_as_another_is_found() {
        assert!(!faithful(&Some(None::<u32>)));
        assert!(!faithful(&Some(())));
        assert!(!faithful(&Some(f64::INFINITY)));
        assert!(!faithful(&State::Captured {
            id: "ch_1".into(),
            cents: 1200
        }));
        assert!(!faithful(&Some(serde_json::Value::Null)));
    }

    #[test]
    fn a_value_that_reads_back_exactly_passes() {
        assert!(faithful(&Quote {
            id: 7,
            rate: Some(0.1),
            legs: vec![("x".into(), 0.3)]
        }));
        assert!(faithful(&Some(Some(3u32))));
        assert!(faithful(&None::<Option<u32>>));
        assert!(faithful(&Some(Vec::<u8>::new())));
        assert!(faithful(&State::Pending { id: "ch_2".into() }));
        assert!(
            faithful(&Patch { limit: Some(None) }),
            "the double-option PATCH idiom"
        );
        assert!(faithful(&Patch { limit: None }));
        assert!(faithful(&Patch {
            limit: Some(Some(5))
        }));
        let map: HashMap<u32, String> = (0..64).map(|n| (n, n.to_string())).collect();
        assert!(faithful(&map), "a hash map, whatever its order");
        let set: HashSet<String> = (0..64).map(|n| n.to_string()).collect();
        assert!(faithful(&set), "a hash set, whatever its order");
        assert!(faithful(&('c', u128::MAX, i64::MIN, -0.0f64)));
        assert!(faithful(&serde_json::json!({"a": [1, null, {"b": 2.5}]})));
    }
}
