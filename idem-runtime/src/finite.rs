//! Whether a value can be written as JSON without losing a number: serde_json writes a
//! non-finite float (NaN, an infinity) as `null`, so `Some(f64::NAN)` and `None` write the
//! same JSON. `once` checks its input (whose JSON is its fingerprint) and its result
//! (whose JSON is what later calls read) before writing either.

use std::fmt;

use serde::Serialize;
use serde::ser;

/// `Err` naming the first non-finite float `value` holds, or the error its own
/// `Serialize` raised.
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NonFinite> {
    value.serialize(Checker)
}

/// A float that JSON cannot hold, or an error of the value's own `Serialize`.
#[derive(Debug)]
pub(crate) struct NonFinite(String);

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFinite {}

impl ser::Error for NonFinite {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self(message.to_string())
    }
}

fn float(value: f64) -> Result<(), NonFinite> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(NonFinite(format!(
            "{value} is not a number JSON can hold (it would be written as null)"
        )))
    }
}

/// Walks a value, looking at its floats only.
struct Checker;

/// Accepts a value that holds no float.
macro_rules! accept {
    ($($method:ident($($arg:ty),*);)*) => {$(
        fn $method(self, $(_: $arg),*) -> Result<(), NonFinite> {
            Ok(())
        }
    )*};
}

impl ser::Serializer for Checker {
    type Ok = ();
    type Error = NonFinite;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    accept! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
        serialize_unit_variant(&'static str, u32, &'static str);
    }

    fn serialize_f32(self, value: f32) -> Result<(), NonFinite> {
        float(f64::from(value))
    }

    fn serialize_f64(self, value: f64) -> Result<(), NonFinite> {
        float(value)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NonFinite> {
        value.serialize(self)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), NonFinite> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), NonFinite> {
        value.serialize(self)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self, NonFinite> {
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self, NonFinite> {
        Ok(self)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, NonFinite> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, NonFinite> {
        Ok(self)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self, NonFinite> {
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, NonFinite> {
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, NonFinite> {
        Ok(self)
    }
}

/// Every compound checks each value it is handed, and keys as values.
macro_rules! compound {
    ($($trait:ident: $method:ident $(, $key:ty)?;)*) => {$(
        impl ser::$trait for Checker {
            type Ok = ();
            type Error = NonFinite;

            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $(_: $key,)?
                value: &T,
            ) -> Result<(), NonFinite> {
                value.serialize(Checker)
            }

            fn end(self) -> Result<(), NonFinite> {
                Ok(())
            }
        }
    )*};
}

compound! {
    SerializeSeq: serialize_element;
    SerializeTuple: serialize_element;
    SerializeTupleStruct: serialize_field;
    SerializeTupleVariant: serialize_field;
    SerializeStruct: serialize_field, &'static str;
    SerializeStructVariant: serialize_field, &'static str;
}

impl ser::SerializeMap for Checker {
    type Ok = ();
    type Error = NonFinite;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), NonFinite> {
        key.serialize(Checker)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NonFinite> {
        value.serialize(Checker)
    }

    fn end(self) -> Result<(), NonFinite> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Serialize)]
    struct Quote {
        id: u32,
        rate: Option<f64>,
        legs: Vec<(String, f32)>,
    }

    #[test]
    fn finds_a_non_finite_float_wherever_it_is() {
        let quote = |rate, leg| Quote {
            id: 1,
            rate,
            legs: vec![("a".into(), 1.5), ("b".into(), leg)],
        };
        assert!(check(&quote(Some(2.5), 0.25)).is_ok());
        assert!(check(&quote(None, 0.25)).is_ok());
        assert!(check(&quote(Some(f64::INFINITY), 0.25)).is_err());
        assert!(check(&quote(Some(1.0), f32::NAN)).is_err());
        let keyed: BTreeMap<String, f64> = [("x".into(), f64::NEG_INFINITY)].into();
        assert!(check(&keyed).is_err());
        assert!(check(&(u128::MAX, i128::MIN, "text", [1u8, 2])).is_ok());
    }
}
