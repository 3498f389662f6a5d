//! Byte-level functions as EMQX defines them: hashes (`md5`, `sha`, `sha256`, `hash`),
//! compression (`zip`/`unzip` raw deflate, `gzip`/`gunzip`, `zip_compress`/`zip_uncompress`
//! zlib), integer bit operations, `bitsize`/`bytesize`/`subbits`, base64 and hex with
//! EMQX's options and prefixes.
//!
//! Rule values have no bit strings that are not whole bytes: `subbits(.., 'bits', ..)` of a
//! length that is not a multiple of 8 is an error that says so, where EMQX returns a bit
//! string.

use std::io::Read as _;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use md5::Digest as _;

use crate::expr::{Env, EvalError};
use crate::value::Value;

use super::{arg, bytes_of, bytes_value, count, fail, want_int, want_str};

/// Decompressed output above this is refused: a small payload must not make the engine
/// allocate without bound (a "zip bomb").
const MAX_INFLATED: u64 = 16 << 20;

fn hex_lower(bytes: &[u8]) -> Value {
    Value::Str(hex::encode(bytes))
}

pub(super) fn md5(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(hex_lower(&md5::Md5::digest(bytes_of(args, 0, "md5")?)))
}

pub(super) fn sha(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(hex_lower(&sha1::Sha1::digest(bytes_of(args, 0, "sha")?)))
}

pub(super) fn sha256(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(hex_lower(&sha2::Sha256::digest(bytes_of(args, 0, "sha256")?)))
}

/// `hash(algorithm, data)`: lower-case hex, as EMQX's `hash/2` returns it.
pub(super) fn hash(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let algorithm = want_str(args, 0, "hash")?;
    let data = bytes_of(args, 1, "hash")?;
    Ok(match algorithm {
        "md5" => hex_lower(&md5::Md5::digest(data)),
        "sha" | "sha1" => hex_lower(&sha1::Sha1::digest(data)),
        "sha224" => hex_lower(&sha2::Sha224::digest(data)),
        "sha256" => hex_lower(&sha2::Sha256::digest(data)),
        "sha384" => hex_lower(&sha2::Sha384::digest(data)),
        "sha512" => hex_lower(&sha2::Sha512::digest(data)),
        other => {
            return Err(EvalError::new(format!(
                "hash: unknown algorithm '{other}'; supported: md5, sha, sha1, sha224, sha256, sha384, sha512"
            )));
        }
    })
}

#[derive(Clone, Copy)]
pub(super) enum Codec {
    Deflate,
    Gzip,
    Zlib,
}

pub(super) fn compress(args: &[Value], codec: Codec, name: &str) -> Result<Value, EvalError> {
    use std::io::Write as _;
    let data = bytes_of(args, 0, name)?;
    let level = flate2::Compression::default();
    let out = match codec {
        Codec::Deflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), level);
            e.write_all(data).and_then(|()| e.finish())
        }
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
            e.write_all(data).and_then(|()| e.finish())
        }
        Codec::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(data).and_then(|()| e.finish())
        }
    };
    out.map(Value::Bytes).map_err(|e| EvalError::new(format!("{name}: {e}")))
}

pub(super) fn decompress(args: &[Value], codec: Codec, name: &str) -> Result<Value, EvalError> {
    let data = bytes_of(args, 0, name)?;
    let mut out = Vec::new();
    let read = match codec {
        Codec::Deflate => {
            flate2::read::DeflateDecoder::new(data).take(MAX_INFLATED + 1).read_to_end(&mut out)
        }
        Codec::Gzip => flate2::read::GzDecoder::new(data).take(MAX_INFLATED + 1).read_to_end(&mut out),
        Codec::Zlib => flate2::read::ZlibDecoder::new(data).take(MAX_INFLATED + 1).read_to_end(&mut out),
    };
    read.map_err(|e| EvalError::new(format!("{name}: not valid compressed data: {e}")))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(EvalError::new(format!("{name}: the data inflates to more than {MAX_INFLATED} bytes")));
    }
    Ok(bytes_value(out))
}

/// The integer bit operations (`bitnot`, `bitand`, ...): 64-bit two's complement. A left
/// shift that loses bits is an error (EMQX's integers are unbounded, so it would not).
pub(super) fn bits(args: &[Value], op: &str) -> Result<Value, EvalError> {
    let x = want_int(args, 0, op)?;
    if op == "bitnot" {
        return Ok(Value::Int(!x));
    }
    let y = want_int(args, 1, op)?;
    let shift = |x: i64, by: i64| -> Result<i64, EvalError> {
        // Positive `by` shifts left.
        if by >= 0 {
            let by = u32::try_from(by).unwrap_or(u32::MAX);
            let shifted = if by >= 64 { 0 } else { x << by };
            if x != 0 && (by >= 64 || shifted >> by != x) {
                return Err(EvalError::new(format!("{op}: {x} shifted by {by} does not fit in 64 bits")));
            }
            Ok(shifted)
        } else {
            let by = u32::try_from(by.unsigned_abs()).unwrap_or(u32::MAX).min(63);
            Ok(x >> by)
        }
    };
    Ok(Value::Int(match op {
        "bitand" => x & y,
        "bitor" => x | y,
        "bitxor" => x ^ y,
        "bitsl" => shift(x, y)?,
        _ => shift(x, y.checked_neg().unwrap_or(i64::MAX))?,
    }))
}

pub(super) fn bitsize(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(Value::Int(count(bytes_of(args, 0, "bitsize")?.len()).saturating_mul(8)))
}

pub(super) fn bytesize(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(Value::Int(count(bytes_of(args, 0, "bytesize")?.len())))
}

/// `subbits(bytes, len)`, `subbits(bytes, start, len[, type[, signedness[, endianness]]])`:
/// `len` bits from bit `start` (1-based), as an `'integer'` (default, unsigned, big-endian),
/// a `'float'` (32 or 64 bits) or `'bits'`. Past the end it takes what is left; a start past
/// the end gives NULL (EMQX: `undefined`).
pub(super) fn subbits(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let data = bytes_of(args, 0, "subbits")?;
    let (start, len) = if args.len() == 2 {
        (1, want_int(args, 1, "subbits")?)
    } else {
        (want_int(args, 1, "subbits")?, want_int(args, 2, "subbits")?)
    };
    let kind = if args.len() > 3 { want_str(args, 3, "subbits")? } else { "integer" };
    let signed = match if args.len() > 4 { want_str(args, 4, "subbits")? } else { "unsigned" } {
        "unsigned" => false,
        "signed" => true,
        other => {
            return Err(EvalError::new(format!("subbits: expected 'signed' or 'unsigned', got '{other}'")));
        }
    };
    let little = match if args.len() > 5 { want_str(args, 5, "subbits")? } else { "big" } {
        "big" => false,
        "little" => true,
        other => return Err(EvalError::new(format!("subbits: expected 'big' or 'little', got '{other}'"))),
    };
    let total = data.len() * 8;
    let begin = usize::try_from(start - 1)
        .map_err(|_| EvalError::new(format!("subbits: start must be >= 1, got {start}")))?;
    if begin >= total {
        return Ok(Value::Null);
    }
    let len = usize::try_from(len)
        .map_err(|_| EvalError::new(format!("subbits: length must be >= 0, got {len}")))?;
    let len = len.min(total - begin);
    let bit = |i: usize| (data[(begin + i) / 8] >> (7 - (begin + i) % 8)) & 1;
    match kind {
        "bits" => {
            if len % 8 != 0 {
                return Err(EvalError::new(format!(
                    "subbits: {len} bits are not whole bytes; rule values have no partial bytes (EMQX returns a bit string)"
                )));
            }
            let bytes =
                (0..len / 8).map(|byte| (0..8).fold(0u8, |acc, i| (acc << 1) | bit(byte * 8 + i))).collect();
            Ok(Value::Bytes(bytes))
        }
        "integer" | "float" => {
            if len > 64 {
                return Err(EvalError::new(format!("subbits: {len} bits do not fit in a 64-bit number")));
            }
            if little && len % 8 != 0 {
                return Err(EvalError::new(format!(
                    "subbits: little-endian needs whole bytes, got {len} bits"
                )));
            }
            let mut raw: u64 = (0..len).fold(0u64, |acc, i| (acc << 1) | u64::from(bit(i)));
            if little {
                let n = len / 8;
                let be = raw.to_be_bytes();
                let mut swapped = [0u8; 8];
                for i in 0..n {
                    swapped[8 - n + i] = be[7 - i];
                }
                raw = u64::from_be_bytes(swapped);
            }
            if kind == "float" {
                return match len {
                    32 => Ok(Value::Float(f64::from(f32::from_bits(u32::try_from(raw).unwrap_or(0))))),
                    64 => Ok(Value::Float(f64::from_bits(raw))),
                    other => Err(EvalError::new(format!("subbits: a float is 32 or 64 bits, got {other}"))),
                };
            }
            if signed && len > 0 && len < 64 && raw >> (len - 1) & 1 == 1 {
                raw |= u64::MAX << len;
            }
            Ok(if signed || len < 64 { Value::Int(raw as i64) } else { Value::from_meta_u64(raw) })
        }
        other => {
            Err(EvalError::new(format!("subbits: type must be 'integer', 'float' or 'bits', got '{other}'")))
        }
    }
}

/// The engine for `base64_encode`/`base64_decode` with EMQX's options (`'no_padding'`,
/// `'urlsafe'`; others are ignored, as in EMQX).
fn base64_engine(args: &[Value], name: &str, decode: bool) -> Result<GeneralPurpose, EvalError> {
    let (mut pad, mut urlsafe) = (true, false);
    for i in 1..args.len() {
        match want_str(args, i, name)? {
            "no_padding" => pad = false,
            "urlsafe" => urlsafe = true,
            _ => {}
        }
    }
    let alphabet = if urlsafe { &base64::alphabet::URL_SAFE } else { &base64::alphabet::STANDARD };
    let mode =
        if decode && !pad { DecodePaddingMode::Indifferent } else { DecodePaddingMode::RequireCanonical };
    Ok(GeneralPurpose::new(
        alphabet,
        GeneralPurposeConfig::new().with_encode_padding(pad).with_decode_padding_mode(mode),
    ))
}

pub(super) fn base64_encode(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let engine = base64_engine(args, "base64_encode", false)?;
    Ok(Value::Str(engine.encode(bytes_of(args, 0, "base64_encode")?)))
}

pub(super) fn base64_decode(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let engine = base64_engine(args, "base64_decode", true)?;
    let text = bytes_of(args, 0, "base64_decode")?;
    let text = text.trim_ascii();
    engine.decode(text).map(bytes_value).map_err(fail("base64_decode"))
}

/// `bin2hexstr(bytes[, prefix])`: upper-case hex after `prefix`.
pub(super) fn bin2hexstr(args: &[Value], name: &str) -> Result<Value, EvalError> {
    let hex = hex::encode_upper(bytes_of(args, 0, name)?);
    Ok(Value::Str(match args.get(1) {
        Some(_) => format!("{}{hex}", want_str(args, 1, name)?),
        None => hex,
    }))
}

/// `hexstr2bin(text[, prefix])`: an odd number of digits reads as if led by a `0` (EMQX:
/// `'6364f'` is `<<6, 54, 79>>`); with `prefix`, the text must start with it.
pub(super) fn hexstr2bin(args: &[Value], name: &str) -> Result<Value, EvalError> {
    let mut text = want_str(args, 0, name)?;
    if args.len() > 1 {
        let prefix = want_str(args, 1, name)?;
        text = text.strip_prefix(prefix).ok_or_else(|| {
            EvalError::new(format!("{name}: `{text}` does not start with the prefix `{prefix}`"))
        })?;
    }
    let decoded = if text.len() % 2 == 1 { hex::decode(format!("0{text}")) } else { hex::decode(text) };
    decoded.map(bytes_value).map_err(fail("hexstr2bin"))
}

pub(super) fn uuid_v4(hyphens: bool) -> Value {
    let id = uuid::Uuid::new_v4();
    Value::Str(if hyphens { id.hyphenated().to_string() } else { id.simple().to_string() })
}

pub(super) fn random() -> Value {
    Value::Float(rand::random::<f64>())
}

/// `str_utf8(x)`: the text of `x` (`str`), which must be valid UTF-8.
pub(super) fn str_utf8(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    match arg(args, 0) {
        Value::Bytes(b) => std::str::from_utf8(b)
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|_| EvalError::new("str_utf8: the bytes are not valid UTF-8")),
        other => super::str_of(other, "str_utf8").map(Value::Str),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_shifts_that_lose_bits_are_errors() {
        assert_eq!(bits(&[Value::Int(1), Value::Int(62)], "bitsl"), Ok(Value::Int(1 << 62)));
        assert!(bits(&[Value::Int(1), Value::Int(64)], "bitsl").is_err());
        assert!(bits(&[Value::Int(3), Value::Int(63)], "bitsl").is_err());
        assert_eq!(bits(&[Value::Int(-8), Value::Int(1)], "bitsr"), Ok(Value::Int(-4)));
        assert_eq!(bits(&[Value::Int(-8), Value::Int(100)], "bitsr"), Ok(Value::Int(-1)));
        assert_eq!(bits(&[Value::Int(0), Value::Int(i64::MIN)], "bitsr"), Ok(Value::Int(0)));
    }
}
