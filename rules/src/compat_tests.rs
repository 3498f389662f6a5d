//! EMQX compatibility cases: each row is an input and the result EMQX gives for it, with the
//! EMQX source (file and test, or file and function) the expected value was read from. The
//! rows were written for this repository from EMQX's test suites and code; none is copied.
//!
//! Sources (github.com/emqx/emqx, `apps/emqx_rule_engine/` unless named otherwise):
//! - `funcs_SUITE` = `test/emqx_rule_funcs_SUITE.erl`
//! - `engine_SUITE` = `test/emqx_rule_engine_SUITE.erl`
//! - `rule_funcs.erl` = `src/emqx_rule_funcs.erl`
//! - `emqx_rule_events.erl` = `src/emqx_rule_events.erl` (event topics and their fields),
//!   `emqx_rule_runtime.erl` = `src/emqx_rule_runtime.erl` (`metadata`)
//! - `variform_bif.erl` = `apps/emqx_utils/src/emqx_variform_bif.erl`
//! - `utils_conv.erl` = `apps/emqx_utils/src/emqx_utils_conv.erl`
//! - `utils_calendar.erl` = `apps/emqx_utils/src/emqx_utils_calendar.erl`
//!
//! A row's expected value is the selected column as JSON, `ERROR` when EMQX fails the rule
//! (Outpost: a dead letter), or `FILTERED` when the WHERE clause drops the event. Where EMQX
//! returns a binary that is not text, the row checks it through a function that makes it
//! text (`bin2hexstr`, a round trip), as EMQX's own tests do.

use crate::{EventContext, Output, RuleSet, TableSources, Value};

/// (EMQX source, expression selected `AS v`, payload, expected).
type Case = (&'static str, &'static str, &'static str, &'static str);

const NO_PAYLOAD: &str = "{}";

/// Runs `SELECT <expr> AS v FROM "t/#"` (or a whole statement when `expr` starts with
/// `SELECT`) on one event and renders the outcome as the rows expect it.
fn run(expr: &str, payload: &str) -> String {
    let sql =
        if expr.starts_with("SELECT") { expr.to_owned() } else { format!("SELECT {expr} AS v FROM \"t/#\"") };
    let rules = format!("[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\n");
    let set = match RuleSet::compile(&rules, &TableSources::new()) {
        Ok(set) => set,
        Err(e) => return format!("COMPILE ERROR: {e}"),
    };
    let event = EventContext {
        topic: "t/a/b",
        payload: payload.as_bytes(),
        clientid: Some("clientid"),
        username: Some("feng"),
        qos: 1,
        timestamp_ms: 1_708_671_600_123,
        event_id: 7,
        hops: 0,
        peerhost: None,
        retain: false,
        dup: false,
        pub_props: None,
        lifecycle: None,
    };
    let outputs = set.evaluate(&event);
    match outputs.as_slice() {
        [] => "FILTERED".to_owned(),
        [Output::Forward { payload, .. }] => {
            let row = Value::from_json(payload).unwrap_or(Value::Null);
            match row.get("v") {
                Some(v) if !expr.starts_with("SELECT") => v.to_json_string(),
                _ => row.to_json_string(),
            }
        }
        [Output::DeadLetter { .. }] => "ERROR".to_owned(),
        other => format!("{other:?}"),
    }
}

#[track_caller]
fn check_all(cases: &[Case]) {
    let mut failures = Vec::new();
    for (source, expr, payload, expected) in cases {
        let got = run(expr, payload);
        if got != *expected {
            failures.push(format!(
                "{source}: `{expr}` on {payload}\n    expected {expected}\n    got      {got}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from EMQX:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

const P: &str = NO_PAYLOAD;

#[test]
fn conversion_functions() {
    check_all(&[
        ("funcs_SUITE t_str", "str('abc')", P, r#""abc""#),
        ("funcs_SUITE t_str", "str(1)", P, r#""1""#),
        ("funcs_SUITE t_str", "str(2.0)", P, r#""2.0""#),
        ("funcs_SUITE t_str", "str(true)", P, r#""true""#),
        ("funcs_SUITE t_str", "str(json_decode('{\"a\":1}'))", P, r#""{\"a\":1}""#),
        ("utils_conv.erl number_to_binary (10 decimals, compact)", "str(1/3)", P, r#""0.3333333333""#),
        ("utils_conv.erl number_to_binary", "str(31.5)", P, r#""31.5""#),
        ("utils_conv.erl number_to_binary", "str(0.1 + 0.2)", P, r#""0.3""#),
        ("utils_conv.erl bin/1 via concat", "concat('t=', 20.25)", P, r#""t=20.25""#),
        ("funcs_SUITE t_str_utf8", "str_utf8('abc')", P, r#""abc""#),
        ("funcs_SUITE t_str_utf8", "str_utf8(1)", P, r#""1""#),
        ("funcs_SUITE t_str_utf8", "str_utf8(2.0)", P, r#""2.0""#),
        ("funcs_SUITE t_str_utf8", "str_utf8(true)", P, r#""true""#),
        ("funcs_SUITE t_str_utf8", "str_utf8('abc 你好')", P, r#""abc 你好""#),
        ("funcs_SUITE t_str_utf16_le", "bin2hexstr(str_utf16_le('abc'))", P, r#""610062006300""#),
        ("funcs_SUITE t_str_utf16_le", "bin2hexstr(str_utf16_le(1))", P, r#""3100""#),
        ("funcs_SUITE t_str_utf16_le", "bin2hexstr(str_utf16_le('你'))", P, r#""604F""#),
        ("funcs_SUITE t_int", "int('1')", P, "1"),
        ("funcs_SUITE t_int", "int('1.0')", P, "1"),
        ("funcs_SUITE t_int", "int(1)", P, "1"),
        ("funcs_SUITE t_int", "int(1.9)", P, "1"),
        ("funcs_SUITE t_int", "int(1.0001)", P, "1"),
        ("funcs_SUITE t_int", "int(true)", P, "1"),
        ("funcs_SUITE t_int", "int(false)", P, "0"),
        ("funcs_SUITE t_int", "int('a')", P, "ERROR"),
        ("funcs_SUITE t_float", "float('1.0')", P, "1.0"),
        ("funcs_SUITE t_float", "float(1)", P, "1.0"),
        ("funcs_SUITE t_float", "float(1.9)", P, "1.9"),
        ("funcs_SUITE t_float", "float(1.0001)", P, "1.0001"),
        ("funcs_SUITE t_float", "float(1.0000000001)", P, "1.0000000001"),
        ("funcs_SUITE t_float", "float('a')", P, "ERROR"),
        ("funcs_SUITE t_float2str", "float2str(20.2, 1)", P, r#""20.2""#),
        ("funcs_SUITE t_float2str", "float2str(20.2, 10)", P, r#""20.2""#),
        ("funcs_SUITE t_float2str", "float2str(20.2, 15)", P, r#""20.199999999999999""#),
        ("funcs_SUITE t_float2str", "float2str(20.2, 16)", P, r#""20.1999999999999993""#),
        ("funcs_SUITE t_map", "map('{\"a\":1}')", P, r#"{"a":1}"#),
        ("funcs_SUITE t_map", "map('a')", P, "ERROR"),
        ("funcs_SUITE t_map", "map(1.0)", P, "ERROR"),
        ("funcs_SUITE t_bool", "bool(1)", P, "true"),
        ("funcs_SUITE t_bool", "bool(1.0)", P, "true"),
        ("funcs_SUITE t_bool", "bool(0)", P, "false"),
        ("funcs_SUITE t_bool", "bool(0.0)", P, "false"),
        ("funcs_SUITE t_bool", "bool(true)", P, "true"),
        ("funcs_SUITE t_bool", "bool('true')", P, "true"),
        ("funcs_SUITE t_bool", "bool(false)", P, "false"),
        ("funcs_SUITE t_bool", "bool('false')", P, "false"),
        ("funcs_SUITE t_bool", "bool(3)", P, "ERROR"),
    ]);
}

#[test]
fn hex_and_base64() {
    check_all(&[
        ("funcs_SUITE t_hexstr2bin", "bin2hexstr(hexstr2bin('6364f'))", P, r#""06364F""#),
        ("funcs_SUITE t_hexstr2bin", "bin2hexstr(hexstr2bin('a'))", P, r#""0A""#),
        ("funcs_SUITE t_hexstr2bin", "bin2hexstr(hexstr2bin('f'))", P, r#""0F""#),
        ("funcs_SUITE t_hexstr2bin", "bin2hexstr(hexstr2bin('5'))", P, r#""05""#),
        ("funcs_SUITE t_hexstr2bin", "bin2hexstr(hexstr2bin('0102'))", P, r#""0102""#),
        ("funcs_SUITE t_hexstr2bin", "hexstr2bin('1121')", P, r#""\u0011!""#),
        ("funcs_SUITE t_hexstr2bin_with_prefix", "bin2hexstr(hexstr2bin('0x6364f', '0x'))", P, r#""06364F""#),
        ("funcs_SUITE t_hexstr2bin_with_prefix", "bin2hexstr(hexstr2bin('0Xa', '0X'))", P, r#""0A""#),
        ("funcs_SUITE t_hexstr2bin_with_prefix", "bin2hexstr(hexstr2bin('0bf', '0b'))", P, r#""0F""#),
        ("funcs_SUITE t_hexstr2bin_with_prefix", "bin2hexstr(hexstr2bin('0B5', '0B'))", P, r#""05""#),
        ("funcs_SUITE t_hexstr2bin_with_prefix", "bin2hexstr(hexstr2bin('0x0102', '0x'))", P, r#""0102""#),
        ("funcs_SUITE t_hexstr2bin_with_invalid_prefix", "hexstr2bin('0x6364f', 'ab')", P, "ERROR"),
        ("funcs_SUITE t_hexstr2bin_with_invalid_prefix", "hexstr2bin('0Xa', 'ef')", P, "ERROR"),
        ("funcs_SUITE t_hexstr2bin_with_invalid_prefix", "hexstr2bin('0B5', '🐸')", P, "ERROR"),
        ("funcs_SUITE t_bin2hexstr", "bin2hexstr(hexstr2bin('0102'))", P, r#""0102""#),
        ("funcs_SUITE t_bin2hexstr", "bin2hexstr(hexstr2bin('1121'))", P, r#""1121""#),
        ("funcs_SUITE t_bin2hexstr_with_prefix", "bin2hexstr(hexstr2bin('0102'), '0x')", P, r#""0x0102""#),
        ("funcs_SUITE t_bin2hexstr_with_prefix", "bin2hexstr(hexstr2bin('0102'), '0X')", P, r#""0X0102""#),
        ("funcs_SUITE t_bin2hexstr_with_prefix", "bin2hexstr(hexstr2bin('1121'), '0b')", P, r#""0b1121""#),
        ("funcs_SUITE t_bin2hexstr_with_prefix", "bin2hexstr(hexstr2bin('0102'), '🧠')", P, r#""🧠0102""#),
        ("funcs_SUITE t_sqlserver_bin2hexstr", "sqlserver_bin2hexstr(hexstr2bin('0102'))", P, r#""0x0102""#),
        ("funcs_SUITE t_sqlserver_bin2hexstr", "sqlserver_bin2hexstr(hexstr2bin('1121'))", P, r#""0x1121""#),
        ("funcs_SUITE t_sqlserver_bin2hexstr", "sqlserver_bin2hexstr(hexstr2bin('02'))", P, r#""0x02""#),
        ("funcs_SUITE t_base64_encode_format_checks", "base64_encode('a')", P, r#""YQ==""#),
        ("funcs_SUITE t_base64_encode_format_checks", "base64_encode('a', 'no_padding')", P, r#""YQ""#),
        ("funcs_SUITE t_base64_encode_format_checks", "base64_encode(hexstr2bin('ffffff'))", P, r#""////""#),
        (
            "funcs_SUITE t_base64_encode_format_checks",
            "base64_encode(hexstr2bin('ffffff'), 'urlsafe')",
            P,
            r#""____""#,
        ),
        ("funcs_SUITE t_base64_encode_format_checks", "base64_encode(hexstr2bin('fbef'))", P, r#""++8=""#),
        (
            "funcs_SUITE t_base64_encode_format_checks",
            "base64_encode(hexstr2bin('fbef'), 'urlsafe')",
            P,
            r#""--8=""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_comprehensive",
            "base64_encode('test data', 'no_padding', 'urlsafe') = base64_encode('test data', 'urlsafe', 'no_padding')",
            P,
            "true",
        ),
        (
            "funcs_SUITE t_base64_encode_decode_comprehensive",
            "base64_encode('test data', 'unknown_option')",
            P,
            r#""dGVzdCBkYXRh""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_comprehensive",
            "base64_encode('test data', 'unknown1', 'unknown2')",
            P,
            r#""dGVzdCBkYXRh""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_comprehensive",
            "base64_encode('test data', 'no_padding', 'unknown') = base64_encode('test data', 'no_padding')",
            P,
            "true",
        ),
        (
            "funcs_SUITE t_base64_encode_decode_comprehensive",
            "base64_encode('test data', 'urlsafe', 'urlsafe') = base64_encode('test data', 'urlsafe')",
            P,
            "true",
        ),
        (
            "funcs_SUITE t_base64_encode_decode_roundtrip",
            "base64_decode(base64_encode('hello'))",
            P,
            r#""hello""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_roundtrip",
            "base64_decode(base64_encode('ab', 'no_padding'), 'no_padding')",
            P,
            r#""ab""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_roundtrip",
            "base64_decode(base64_encode('test+data', 'urlsafe'), 'urlsafe')",
            P,
            r#""test+data""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_roundtrip",
            "base64_decode(base64_encode('test/data', 'no_padding', 'urlsafe'), 'urlsafe', 'no_padding')",
            P,
            r#""test/data""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_roundtrip",
            "base64_decode(base64_encode('abcd'))",
            P,
            r#""abcd""#,
        ),
        (
            "funcs_SUITE t_base64_encode_decode_comprehensive",
            "base64_decode('dGVzdCBkYXRh', 'unknown_option')",
            P,
            r#""test data""#,
        ),
        ("variform_bif.erl base64_decode/2 docs", "base64_decode('aGVsbG8', 'no_padding')", P, r#""hello""#),
        (
            "variform_bif.erl base64_decode/1 docs (padding required)",
            "base64_decode('aGVsbG8=')",
            P,
            r#""hello""#,
        ),
    ]);
}

#[test]
fn null_and_type_checks() {
    check_all(&[
        ("funcs_SUITE t_is_null", "is_null(payload.missing)", P, "true"),
        ("funcs_SUITE t_is_null", "is_null('undefined')", P, "false"),
        ("funcs_SUITE t_is_null", "is_null('')", P, "false"),
        ("funcs_SUITE t_is_null", "is_null('a')", P, "false"),
        ("funcs_SUITE t_is_null_var", "is_null_var(payload.missing)", P, "true"),
        ("funcs_SUITE t_is_null_var", "is_null_var(payload.x)", r#"{"x":null}"#, "true"),
        ("funcs_SUITE t_is_null_var", "is_null_var('null')", P, "false"),
        ("funcs_SUITE t_is_null_var", "is_null_var('')", P, "false"),
        ("funcs_SUITE t_is_not_null", "is_not_null(payload.missing)", P, "false"),
        ("funcs_SUITE t_is_not_null", "is_not_null('a')", P, "true"),
        ("funcs_SUITE t_is_not_null_var", "is_not_null_var(payload.x)", r#"{"x":null}"#, "false"),
        ("funcs_SUITE t_is_not_null_var", "is_not_null_var('null')", P, "true"),
        ("funcs_SUITE t_is_str", "is_str('a')", P, "true"),
        ("funcs_SUITE t_is_str", "is_str('')", P, "true"),
        ("funcs_SUITE t_is_str", "is_str(1)", P, "false"),
        ("funcs_SUITE t_is_bool", "is_bool(true)", P, "true"),
        ("funcs_SUITE t_is_bool", "is_bool(false)", P, "true"),
        ("funcs_SUITE t_is_bool", "is_bool('')", P, "false"),
        ("funcs_SUITE t_is_bool", "is_bool(2)", P, "false"),
        ("funcs_SUITE t_is_int", "is_int(1)", P, "true"),
        ("funcs_SUITE t_is_int", "is_int(-1)", P, "true"),
        ("funcs_SUITE t_is_int", "is_int(1.1)", P, "false"),
        ("funcs_SUITE t_is_int", "is_int('a')", P, "false"),
        ("funcs_SUITE t_is_float", "is_float(1.1)", P, "true"),
        ("funcs_SUITE t_is_float", "is_float(2.0)", P, "true"),
        ("funcs_SUITE t_is_float", "is_float(-1.2)", P, "true"),
        ("funcs_SUITE t_is_float", "is_float(1)", P, "false"),
        ("funcs_SUITE t_is_float", "is_float('')", P, "false"),
        ("funcs_SUITE t_is_num", "is_num(1.1)", P, "true"),
        ("funcs_SUITE t_is_num", "is_num(1)", P, "true"),
        ("funcs_SUITE t_is_num", "is_num('a')", P, "false"),
        ("funcs_SUITE t_is_map", "is_map(json_decode(payload))", r#"{"a":1}"#, "true"),
        ("rule_runtime.erl (payload stays a binary: not a map)", "is_map(payload)", r#"{"a":1}"#, "false"),
        ("funcs_SUITE t_is_map", "is_map(map_new())", P, "true"),
        ("funcs_SUITE t_is_map", "is_map('a')", P, "false"),
        ("funcs_SUITE t_is_array", "is_array([])", P, "true"),
        ("funcs_SUITE t_is_array", "is_array([1, 2])", P, "true"),
        ("funcs_SUITE t_is_array", "is_array('')", P, "false"),
        ("funcs_SUITE t_is_empty", "is_empty([])", P, "true"),
        ("funcs_SUITE t_is_empty", "is_empty(map_new())", P, "true"),
        ("funcs_SUITE t_is_empty", "is_empty('{}')", P, "true"),
        ("funcs_SUITE t_is_empty", "is_empty([1])", P, "false"),
        ("funcs_SUITE t_is_empty", "is_empty(payload)", r#"{"a":"b"}"#, "false"),
        ("funcs_SUITE t_is_empty", "is_empty('{\"a\" : \"b\"}')", P, "false"),
        ("funcs_SUITE t_coalesce", "coalesce(payload.a, payload.b, payload.c)", P, "null"),
        ("funcs_SUITE t_coalesce", "coalesce(payload.a, 42, payload.c)", P, "42"),
        ("funcs_SUITE t_coalesce", "coalesce('hello', payload.a)", P, r#""hello""#),
        ("funcs_SUITE t_coalesce", "coalesce('hello', 'world')", P, r#""hello""#),
        ("funcs_SUITE t_coalesce", "coalesce(payload.a, 'world')", P, r#""world""#),
        ("funcs_SUITE t_coalesce_ne", "coalesce_ne('', payload.a, '')", P, "null"),
        ("funcs_SUITE t_coalesce_ne", "coalesce_ne('', 42, payload.a)", P, "42"),
        ("funcs_SUITE t_coalesce_ne", "coalesce_ne('hello', '')", P, r#""hello""#),
        ("funcs_SUITE t_coalesce_ne", "coalesce_ne('world')", P, r#""world""#),
        ("funcs_SUITE t_coalesce_ne", "coalesce_ne('', 'world')", P, r#""world""#),
    ]);
}

#[test]
fn math_and_bits() {
    check_all(&[
        ("rule_funcs.erl acosh/1 (math:acosh)", "acosh(1)", P, "0.0"),
        ("rule_funcs.erl asinh/1 (math:asinh)", "asinh(0)", P, "0.0"),
        ("rule_funcs.erl atanh/1 (math:atanh)", "atanh(0)", P, "0.0"),
        ("funcs_SUITE t_math_fun (math:cosh)", "cosh(0)", P, "1.0"),
        ("funcs_SUITE t_math_fun (math:exp)", "exp(0)", P, "1.0"),
        ("funcs_SUITE t_math_fun (math:log2)", "log2(8)", P, "3.0"),
        ("funcs_SUITE t_math_fun (math:pow)", "power(2, 10)", P, "1024.0"),
        ("funcs_SUITE t_math_fun (math:fmod)", "fmod(7, 2)", P, "1.0"),
        ("rule_funcs.erl ceil/1 (erlang:ceil)", "ceil(1.2)", P, "2"),
        ("rule_funcs.erl floor/1 (erlang:floor)", "floor(-1.2)", P, "-2"),
        ("rule_funcs.erl round/1 (erlang:round)", "round(2.5)", P, "3"),
        ("rule_funcs.erl abs/1", "abs(-3)", P, "3"),
        ("funcs_SUITE t_arith_op ('mod' is rem)", "mod(7, 3)", P, "1"),
        ("funcs_SUITE t_arith_op ('mod' is rem)", "mod(-7, 3)", P, "-1"),
        ("rule_funcs.erl 'div'/2 (Erlang div truncates)", "div(7, 2)", P, "3"),
        ("rule_funcs.erl 'div'/2 (Erlang div truncates)", "div(-7, 2)", P, "-3"),
        ("rule_funcs.erl 'div'/2 (integers only)", "div(7.0, 2)", P, "ERROR"),
        ("rule_funcs.erl 'div'/2", "div(1, 0)", P, "ERROR"),
        ("rule_funcs.erl random/0 (rand:uniform)", "random() >= 0 AND random() < 1", P, "true"),
        ("funcs_SUITE t_bits_op (bnot)", "bitnot(5)", P, "-6"),
        ("funcs_SUITE t_bits_op (band)", "bitand(12, 10)", P, "8"),
        ("funcs_SUITE t_bits_op (bor)", "bitor(12, 10)", P, "14"),
        ("funcs_SUITE t_bits_op (bxor)", "bitxor(12, 10)", P, "6"),
        ("funcs_SUITE t_bits_op (bsl)", "bitsl(1, 4)", P, "16"),
        ("funcs_SUITE t_bits_op (bsr)", "bitsr(16, 4)", P, "1"),
        ("funcs_SUITE t_bits_op (bsr of a negative)", "bitsr(-16, 2)", P, "-4"),
        ("funcs_SUITE t_bits_op (bsl by a negative)", "bitsl(16, -2)", P, "4"),
        ("funcs_SUITE t_bitsize", "bitsize('a')", P, "8"),
        ("funcs_SUITE t_bytesize", "bytesize('a')", P, "1"),
        ("funcs_SUITE t_bytesize", "bytesize('')", P, "0"),
        ("funcs_SUITE t_subbits", "subbits(hexstr2bin('FF'), 1)", P, "1"),
        ("funcs_SUITE t_subbits", "subbits(hexstr2bin('FF'), 3)", P, "7"),
        ("funcs_SUITE t_subbits", "subbits(hexstr2bin('FF'), 8)", P, "255"),
        ("funcs_SUITE t_subbits2", "subbits(hexstr2bin('FF'), 1, 4)", P, "15"),
        ("funcs_SUITE t_subbits2", "subbits(hexstr2bin('FF'), 1, 6)", P, "63"),
        ("funcs_SUITE t_subbits2_1", "subbits(hexstr2bin('FF'), 2, 1)", P, "1"),
        ("funcs_SUITE t_subbits2_1", "subbits(hexstr2bin('FF'), 2, 7)", P, "127"),
        (
            "funcs_SUITE t_subbits2_1 (past the end: what is left)",
            "subbits(hexstr2bin('FF'), 2, 8)",
            P,
            "127",
        ),
        (
            "funcs_SUITE t_subbits2_integer",
            "subbits(hexstr2bin('000001C8'), 1, 32, 'integer', 'signed', 'big')",
            P,
            "456",
        ),
        (
            "funcs_SUITE t_subbits2_integer",
            "subbits(hexstr2bin('FFFFFE38'), 1, 32, 'integer', 'signed', 'big')",
            P,
            "-456",
        ),
        (
            "funcs_SUITE t_subbits_5_args",
            "subbits(hexstr2bin('000001C8'), 1, 32, 'integer', 'unsigned')",
            P,
            "456",
        ),
        (
            "funcs_SUITE t_subbits2_float (5.3 as a 64-bit float)",
            "subbits(hexstr2bin('4015333333333333'), 1, 64, 'float', 'unsigned', 'big')",
            P,
            "5.3",
        ),
        ("funcs_SUITE t_subbits_4_args", "subbits(hexstr2bin('4015333333333333'), 1, 64, 'float')", P, "5.3"),
        (
            "funcs_SUITE t_subbits2_float (signed)",
            "subbits(hexstr2bin('C015333333333333'), 1, 64, 'float', 'signed', 'big')",
            P,
            "-5.3",
        ),
        (
            "rule_funcs.erl do_get_subbits (little-endian)",
            "subbits(hexstr2bin('C8010000'), 1, 32, 'integer', 'unsigned', 'little')",
            P,
            "456",
        ),
        (
            "rule_funcs.erl get_subbits (start past the end: undefined)",
            "subbits(hexstr2bin('FF'), 9, 1)",
            P,
            "null",
        ),
        (
            "rule_funcs.erl do_get_subbits ('bits')",
            "bin2hexstr(subbits(hexstr2bin('9F4E58'), 9, 16, 'bits', 'unsigned', 'big'))",
            P,
            r#""4E58""#,
        ),
    ]);
}

#[test]
fn string_functions() {
    check_all(&[
        ("funcs_SUITE t_lower_upper", "upper('abc4')", P, r#""ABC4""#),
        ("funcs_SUITE t_lower_upper", "lower('0ABC')", P, r#""0abc""#),
        ("variform_bif.erl upper/1 (undefined is badarg)", "upper(payload.missing)", P, "ERROR"),
        ("variform_bif.erl lower/1 (undefined is badarg)", "lower(payload.missing)", P, "ERROR"),
        ("variform_bif.erl trim/1 (undefined is badarg)", "trim(payload.missing)", P, "ERROR"),
        ("funcs_SUITE t_reverse", "reverse('abcd')", P, r#""dcba""#),
        ("funcs_SUITE t_reverse", "reverse('1234')", P, r#""4321""#),
        ("funcs_SUITE t_strlen", "strlen('abcd')", P, "4"),
        ("funcs_SUITE t_strlen", "strlen('你好')", P, "2"),
        ("funcs_SUITE t_substr", "substr('', 1)", P, r#""""#),
        ("funcs_SUITE t_substr", "substr('abc', 1)", P, r#""bc""#),
        ("funcs_SUITE t_substr", "substr('abcd', 1, 2)", P, r#""bc""#),
        ("funcs_SUITE t_trim", "trim('')", P, r#""""#),
        ("funcs_SUITE t_trim", "trim(' abc ')", P, r#""abc""#),
        ("funcs_SUITE t_trim", "ltrim(' abc ')", P, r#""abc ""#),
        ("funcs_SUITE t_trim", "rtrim(' abc')", P, r#"" abc""#),
        ("variform_bif.erl rtrim/2", "rtrim('abc;;', ';')", P, r#""abc""#),
        ("funcs_SUITE t_split_all", "split('', '/')", P, "[]"),
        ("funcs_SUITE t_split_all", "split('/', '/')", P, "[]"),
        ("funcs_SUITE t_split_all", "split('/a/b/c', '/')", P, r#"["a","b","c"]"#),
        ("funcs_SUITE t_split_all", "split('/a/b//c/', '/')", P, r#"["a","b","c"]"#),
        ("funcs_SUITE t_split_all", "split('a, b ,c', ',')", P, r#"["a"," b ","c"]"#),
        ("funcs_SUITE t_split_notrim_all", "split('', '/', 'notrim')", P, r#"[""]"#),
        ("funcs_SUITE t_split_notrim_all", "split('/', '/', 'notrim')", P, r#"["",""]"#),
        ("funcs_SUITE t_split_notrim_all", "split('/a/b/c', '/', 'notrim')", P, r#"["","a","b","c"]"#),
        (
            "funcs_SUITE t_split_notrim_all",
            "split('/a/b//c/', '/', 'notrim')",
            P,
            r#"["","a","b","","c",""]"#,
        ),
        (
            "funcs_SUITE t_split_notrim_all",
            "split('哈哈, 你好, 是的', ',', 'notrim')",
            P,
            r#"["哈哈"," 你好"," 是的"]"#,
        ),
        ("funcs_SUITE t_split_leading", "split('', '/', 'leading')", P, "[]"),
        ("funcs_SUITE t_split_leading", "split('/', '/', 'leading')", P, "[]"),
        ("funcs_SUITE t_split_leading", "split('/a/b/c', '/', 'leading')", P, r#"["a/b/c"]"#),
        ("funcs_SUITE t_split_leading", "split('a/b//c/', '/', 'leading')", P, r#"["a","b//c/"]"#),
        ("funcs_SUITE t_split_leading_notrim", "split('', '/', 'leading_notrim')", P, r#"[""]"#),
        ("funcs_SUITE t_split_leading_notrim", "split('/', '/', 'leading_notrim')", P, r#"["",""]"#),
        (
            "funcs_SUITE t_split_leading_notrim",
            "split('/a/b/c', '/', 'leading_notrim')",
            P,
            r#"["","a/b/c"]"#,
        ),
        (
            "funcs_SUITE t_split_leading_notrim",
            "split('a/b//c/', '/', 'leading_notrim')",
            P,
            r#"["a","b//c/"]"#,
        ),
        ("funcs_SUITE t_split_trailing", "split('', '/', 'trailing')", P, "[]"),
        ("funcs_SUITE t_split_trailing", "split('/a/b/c', '/', 'trailing')", P, r#"["/a/b","c"]"#),
        ("funcs_SUITE t_split_trailing", "split('a/b//c/', '/', 'trailing')", P, r#"["a/b//c"]"#),
        ("funcs_SUITE t_split_trailing_notrim", "split('', '/', 'trailing_notrim')", P, r#"[""]"#),
        ("funcs_SUITE t_split_trailing_notrim", "split('/', '/', 'trailing_notrim')", P, r#"["",""]"#),
        (
            "funcs_SUITE t_split_trailing_notrim",
            "split('/a/b/c', '/', 'trailing_notrim')",
            P,
            r#"["/a/b","c"]"#,
        ),
        (
            "funcs_SUITE t_split_trailing_notrim",
            "split('a/b//c/', '/', 'trailing_notrim')",
            P,
            r#"["a/b//c",""]"#,
        ),
        ("funcs_SUITE t_tokens", "tokens('', '/')", P, "[]"),
        ("funcs_SUITE t_tokens", "tokens('/', '/')", P, "[]"),
        ("funcs_SUITE t_tokens", "tokens('/a/b/c', '/')", P, r#"["a","b","c"]"#),
        ("funcs_SUITE t_tokens", "tokens('/a/b//c/', '/')", P, r#"["a","b","c"]"#),
        ("funcs_SUITE t_tokens", "tokens(' /a/ b /c', ' /')", P, r#"["a","b","c"]"#),
        ("funcs_SUITE t_tokens", "tokens(payload.s, ', ')", r#"{"s":"a ,\nb,c\n"}"#, r#"["a","\nb","c\n"]"#),
        (
            "funcs_SUITE t_tokens",
            "tokens(payload.s, ', ', 'nocrlf')",
            r#"{"s":"a,b, c\n"}"#,
            r#"["a","b","c"]"#,
        ),
        (
            "funcs_SUITE t_tokens",
            "tokens(payload.s, ',', 'nocrlf')",
            r#"{"s":"a,b\r\n,c\n"}"#,
            r#"["a","b","c"]"#,
        ),
        ("funcs_SUITE t_tokens", "tokens(payload.s, ',', 'nocrlf')", r#"{"s":"\r\n"}"#, "[]"),
        ("funcs_SUITE t_concat", "concat('a', 'b')", P, r#""ab""#),
        ("funcs_SUITE t_concat", "'a' + 'b'", P, r#""ab""#),
        ("funcs_SUITE t_concat", "concat('哈哈', '你好')", P, r#""哈哈你好""#),
        ("funcs_SUITE t_concat", "concat(concat('a', 'b'), 'c')", P, r#""abc""#),
        ("funcs_SUITE t_concat", "concat('', 'a')", P, r#""a""#),
        ("funcs_SUITE t_concat", "concat('', '')", P, r#""""#),
        ("funcs_SUITE t_sprintf", "sprintf('Hello ~ts!', 'Shawn')", P, r#""Hello Shawn!""#),
        ("funcs_SUITE t_sprintf", "sprintf('Name: ~ts, Count: ~p', 'ABC', 2)", P, r#""Name: ABC, Count: 2""#),
        ("rule_funcs.erl sprintf_s/2 (io_lib:format ~s)", "sprintf('~s-~s', 'a', 'b')", P, r#""a-b""#),
        ("rule_funcs.erl sprintf_s/2 (io_lib:format ~.2f)", "sprintf('~.2f', 3.14159)", P, r#""3.14""#),
        (
            "rule_funcs.erl sprintf_s/2 (io_lib:format ~p of a binary)",
            "sprintf('~p', 'x')",
            P,
            r#""<<\"x\">>""#,
        ),
        ("rule_funcs.erl sprintf_s/2 (argument count)", "sprintf('~s ~s', 'a')", P, "ERROR"),
        ("funcs_SUITE t_pad", "pad('abc', 5)", P, r#""abc  ""#),
        ("funcs_SUITE t_pad", "pad('abc', 0)", P, r#""abc""#),
        ("funcs_SUITE t_pad", "pad('abc', 5, 'trailing')", P, r#""abc  ""#),
        ("funcs_SUITE t_pad", "pad('abc', 5, 'both')", P, r#"" abc ""#),
        ("funcs_SUITE t_pad", "pad('abc', 0, 'both')", P, r#""abc""#),
        ("funcs_SUITE t_pad", "pad('abc', 5, 'leading')", P, r#""  abc""#),
        ("funcs_SUITE t_pad_char", "pad('abc', 5, 'trailing', 'e')", P, r#""abcee""#),
        ("funcs_SUITE t_pad_char", "pad('abc', 5, 'trailing', 'ex')", P, r#""abcexex""#),
        ("funcs_SUITE t_pad_char", "pad('abc', 5, 'both', 'e')", P, r#""eabce""#),
        ("funcs_SUITE t_pad_char", "pad('abc', 5, 'both', 'ex')", P, r#""exabcex""#),
        ("funcs_SUITE t_pad_char", "pad('abc', 5, 'leading', 'e')", P, r#""eeabc""#),
        ("funcs_SUITE t_pad_char", "pad('abc', 5, 'leading', 'ex')", P, r#""exexabc""#),
        ("funcs_SUITE t_replace", "replace('ab c  ', ' ', '-')", P, r#""ab-c--""#),
        ("funcs_SUITE t_replace", "replace('ab c  ', ' ', '::')", P, r#""ab::c::::""#),
        ("funcs_SUITE t_replace", "replace('ab c  ', ' ', '-', 'all')", P, r#""ab-c--""#),
        ("funcs_SUITE t_replace", "replace('ab c  ', ' ', '-', 'leading')", P, r#""ab-c  ""#),
        ("funcs_SUITE t_replace", "replace('ab c  ', ' ', '-', 'trailing')", P, r#""ab c -""#),
        ("funcs_SUITE t_ascii", "ascii('a')", P, "97"),
        ("funcs_SUITE t_ascii", "ascii('ab')", P, "97"),
        ("funcs_SUITE t_join_to_string", "join_to_string(',', ['a', 'b', 'c'])", P, r#""a,b,c""#),
        ("funcs_SUITE t_join_to_string", "join_to_string(' ', ['a', 'b', 'c'])", P, r#""a b c""#),
        ("funcs_SUITE t_join_to_string", "join_to_string(', ', ['a', 'b', 'c'])", P, r#""a, b, c""#),
        (
            "funcs_SUITE t_join_to_string",
            "join_to_string(', ', [1, 'c', [1, 2, 3]])",
            P,
            r#""1, c, [1,2,3]""#,
        ),
        ("funcs_SUITE t_join_to_string", "join_to_string(',', ['a'])", P, r#""a""#),
        ("funcs_SUITE t_join_to_string", "join_to_string(',', [])", P, r#""""#),
        (
            "funcs_SUITE t_join_to_string",
            "join_to_string(map_keys(payload))",
            r#"{"a":"a","b":1,"c":"c"}"#,
            r#""a, b, c""#,
        ),
        (
            "funcs_SUITE t_join_to_string",
            "join_to_string(map_values(payload))",
            r#"{"a":"a","b":1,"c":"c"}"#,
            r#""a, 1, c""#,
        ),
        (
            "funcs_SUITE t_join_to_string",
            "join_to_string(map_keys('{\"a\":\"a\",\"b\":1,\"c\":\"c\"}'))",
            P,
            r#""a, b, c""#,
        ),
        ("funcs_SUITE t_find", "find('acbcd', 'c')", P, r#""cbcd""#),
        ("funcs_SUITE t_find", "find('acbcd', 'c', 'leading')", P, r#""cbcd""#),
        ("funcs_SUITE t_find", "find('acbcd', 'e')", P, r#""""#),
        ("funcs_SUITE t_find", "find('', 'c')", P, r#""""#),
        ("funcs_SUITE t_find_trailing", "find('acbcd', 'c', 'trailing')", P, r#""cd""#),
        ("funcs_SUITE t_find_trailing", "find('acbcd', 'e', 'trailing')", P, r#""""#),
        ("funcs_SUITE t_regex_match", "regex_match('acbcd', 'c')", P, "true"),
        ("funcs_SUITE t_regex_match", "regex_match('acbcd', '(ac)+')", P, "true"),
        ("funcs_SUITE t_regex_match", "regex_match('bcd', '(ac)+')", P, "false"),
        ("funcs_SUITE t_regex_match", "regex_match('', '.*')", P, "true"),
        ("funcs_SUITE t_regex_match", "regex_match('', '[a-z]+')", P, "false"),
        ("funcs_SUITE t_regex_match", "regex_match('exebd', '^[a-z]+$')", P, "true"),
        ("funcs_SUITE t_regex_match", "regex_match('e2xebd', '^[a-z]+$')", P, "false"),
        ("funcs_SUITE t_regex_replace", "regex_replace('', 'c.*', 'e')", P, r#""""#),
        ("funcs_SUITE t_regex_replace", "regex_replace('accbcd', 'c+', 'e')", P, r#""aebed""#),
        (
            "funcs_SUITE t_regex_replace (& is the whole match)",
            "regex_replace('accbcd', 'c+', '[&]')",
            P,
            r#""a[cc]b[c]d""#,
        ),
        (
            "funcs_SUITE t_regex_replace (& is the whole match, pattern from the payload)",
            "regex_replace('accbcd', payload.re, '[&]')",
            r#"{"re":"c+"}"#,
            r#""a[cc]b[c]d""#,
        ),
        (
            "variform_bif.erl regex_extract/2 docs",
            "regex_extract('Number: 12345', '(\\d+)')",
            P,
            r#"["12345"]"#,
        ),
        (
            "variform_bif.erl regex_extract/2 docs",
            "regex_extract('Hello, world!', '(\\w+).*\\s(\\w+)')",
            P,
            r#"["Hello","world"]"#,
        ),
        ("variform_bif.erl regex_extract/2 docs", "regex_extract('No numbers here!', '(\\d+)')", P, "[]"),
        (
            "variform_bif.erl regex_extract/2 docs",
            "regex_extract('Date: 2021-05-20', '(\\d{4})-(\\d{2})-(\\d{2})')",
            P,
            r#"["2021","05","20"]"#,
        ),
        ("variform_bif.erl rm_prefix/2", "rm_prefix('devices/d1', 'devices/')", P, r#""d1""#),
        ("variform_bif.erl rm_prefix/2 (no match: unchanged)", "rm_prefix('d1', 'devices/')", P, r#""d1""#),
        ("funcs_SUITE t_unescape", "unescape('\\n') = payload.nl", r#"{"nl":"\n"}"#, "true"),
        ("funcs_SUITE t_unescape", "unescape('\\t') = payload.t", r#"{"t":"\t"}"#, "true"),
        ("funcs_SUITE t_unescape", "unescape('\\\\')", P, r#""\\""#),
        ("funcs_SUITE t_unescape", "unescape(payload.s)", r#"{"s":"\\'"}"#, r#""'""#),
        ("funcs_SUITE t_unescape", "unescape('\\\"')", P, r#""\"""#),
        ("funcs_SUITE t_unescape", "unescape('\\?')", P, r#""?""#),
        ("funcs_SUITE t_unescape", "bin2hexstr(unescape('\\a'))", P, r#""07""#),
        ("funcs_SUITE t_unescape", "unescape('Hello, World!')", P, r#""Hello, World!""#),
        ("funcs_SUITE t_unescape", "unescape('Hello,\\t World\\n!')", P, r#""Hello,\t World\n!""#),
        ("funcs_SUITE t_unescape", "unescape('\\L')", P, "ERROR"),
        ("funcs_SUITE t_unescape", "unescape('\\x0A')", P, r#""\n""#),
        ("funcs_SUITE t_unescape", "unescape('hej\\x0Ahej')", P, r#""hej\nhej""#),
        ("funcs_SUITE t_unescape", "unescape('\\x41\\x42\\x43')", P, r#""ABC""#),
        ("funcs_SUITE t_unescape", "unescape('Hello, \\x57orld!')", P, r#""Hello, World!""#),
        ("funcs_SUITE t_unescape_hex", "unescape('\\x0041')", P, r#""A""#),
        ("funcs_SUITE t_unescape_hex", "unescape('\\x20AC')", P, r#""€""#),
        ("funcs_SUITE t_unescape_hex", "unescape('\\x2764')", P, r#""❤""#),
        ("funcs_SUITE t_unescape_hex", "unescape('\\xG1')", P, "ERROR"),
        ("funcs_SUITE t_unescape_hex", "unescape('\\x11000000')", P, "ERROR"),
        ("funcs_SUITE t_unescape_hex", "unescape('Hello, \\x00004E16\\x0000754C')", P, r#""Hello, 世界""#),
    ]);
}

#[test]
fn array_and_map_functions() {
    check_all(&[
        ("funcs_SUITE t_nth", "nth(2, [1, 2, 3, 4])", P, "2"),
        ("funcs_SUITE t_nth", "nth(4, [1, 2, 3, 4])", P, "4"),
        ("rule_funcs.erl nth/2 (lists:nth: 0 fails)", "nth(0, [1, 2])", P, "ERROR"),
        ("rule_funcs.erl nth/2 (lists:nth: past the end fails)", "nth(3, [1, 2])", P, "ERROR"),
        ("funcs_SUITE t_length", "length([1, 2, 3, 4])", P, "4"),
        ("funcs_SUITE t_length", "length([])", P, "0"),
        ("funcs_SUITE t_slice", "sublist(4, [1, 2, 3, 4])", P, "[1,2,3,4]"),
        ("funcs_SUITE t_slice", "sublist(2, [1, 2, 3, 4])", P, "[1,2]"),
        ("funcs_SUITE t_slice", "sublist(4, 1, [1, 2, 3, 4])", P, "[4]"),
        ("funcs_SUITE t_slice", "sublist(4, 2, [1, 2, 3, 4])", P, "[4]"),
        ("funcs_SUITE t_slice", "sublist(5, 2, [1, 2, 3, 4])", P, "[]"),
        ("funcs_SUITE t_slice", "sublist(2, 2, [1, 2, 3, 4])", P, "[2,3]"),
        ("funcs_SUITE t_slice", "sublist(1, 1, [1, 2, 3, 4])", P, "[1]"),
        ("funcs_SUITE t_first_last", "first([1, 2, 3, 4])", P, "1"),
        ("funcs_SUITE t_first_last", "last([1, 2, 3, 4])", P, "4"),
        ("rule_funcs.erl first/1 (hd of [] fails)", "first([])", P, "ERROR"),
        ("funcs_SUITE t_contains", "contains(1, [1, 2, 3, 4])", P, "true"),
        ("funcs_SUITE t_contains", "contains(3, [1, 2, 3, 4])", P, "true"),
        ("funcs_SUITE t_contains", "contains('a', ['', 'ab', 3, 'a'])", P, "true"),
        (
            "funcs_SUITE t_contains",
            "contains(payload.b, payload.l)",
            r#"{"b":{"a":"b"},"l":[{"a":1},{"a":"b"}]}"#,
            "true",
        ),
        (
            "funcs_SUITE t_contains",
            "contains(payload.b, payload.l)",
            r#"{"b":{"a":"b"},"l":[{"a":1}]}"#,
            "false",
        ),
        ("funcs_SUITE t_contains", "contains(3, [1, 2])", P, "false"),
        ("funcs_SUITE t_contains", "contains('c', ['', 'ab', 3, 'a'])", P, "false"),
        ("funcs_SUITE t_map_get", "map_get('a', payload)", r#"{"a":1}"#, "1"),
        ("funcs_SUITE t_map_get", "map_get('a', map_new())", P, "null"),
        ("funcs_SUITE t_map_get", "map_get('a.b', payload)", r#"{"a":{"b":1}}"#, "1"),
        ("funcs_SUITE t_map_get", "map_get('a.c', payload)", r#"{"a":{"b":1}}"#, "null"),
        ("rule_funcs.erl map_get/3 (default)", "map_get('a.c', payload, 0)", r#"{"a":{"b":1}}"#, "0"),
        ("rule_maps.erl general_find (JSON text is decoded)", "map_get('a.b', '{\"a\":{\"b\":2}}')", P, "2"),
        ("funcs_SUITE t_map_put", "map_put('a', 1, map_new())", P, r#"{"a":1}"#),
        ("funcs_SUITE t_map_put", "map_put('a', 2, payload)", r#"{"a":1}"#, r#"{"a":2}"#),
        ("funcs_SUITE t_map_put", "map_put('a.b', 1, map_new())", P, r#"{"a":{"b":1}}"#),
        (
            "funcs_SUITE t_map_put",
            "map_put('a.c', 1, json_decode(payload))",
            r#"{"a":{"b":1}}"#,
            r#"{"a":{"b":1,"c":1}}"#,
        ),
        (
            "rule_maps.erl nested_put (a binary is not a map: starts empty)",
            "map_put('a.c', 1, payload)",
            r#"{"a":{"b":1}}"#,
            r#"{"a":{"c":1}}"#,
        ),
        ("funcs_SUITE t_mget", "mget('a', payload)", r#"{"a":1}"#, "1"),
        ("funcs_SUITE t_mget", "mget('a', '{\"a\" : 1}')", P, "1"),
        ("funcs_SUITE t_mget", "mget('a.b', payload)", r#"{"a.b":1}"#, "1"),
        ("funcs_SUITE t_mget", "mget('a', map_new())", P, "null"),
        ("funcs_SUITE t_mput", "mput('a', 1, map_new())", P, r#"{"a":1}"#),
        ("funcs_SUITE t_mput", "mput('a', 2, payload)", r#"{"a":1}"#, r#"{"a":2}"#),
        ("funcs_SUITE t_mput", "mput('a', 2, '{\"a\" : 1}')", P, r#"{"a":2}"#),
        ("funcs_SUITE t_mput", "mput('a.b', 2, payload)", r#"{"a.b":1}"#, r#"{"a.b":2}"#),
        ("funcs_SUITE t_map_to_entries", "map_to_entries(map_new())", P, "[]"),
        (
            "funcs_SUITE t_map_to_entries",
            "map_to_entries('{\"a\":1,\"b\":\"b\"}')",
            P,
            r#"[{"key":"a","value":1},{"key":"b","value":"b"}]"#,
        ),
        ("funcs_SUITE t_map_size", "map_size(map_new())", P, "0"),
        ("funcs_SUITE t_map_size", "map_size(payload)", r#"{"a":"b"}"#, "1"),
        ("funcs_SUITE t_map_size", "map_size([])", P, "0"),
        ("funcs_SUITE t_map_size", "map_size('{}')", P, "0"),
        ("funcs_SUITE t_map_size", "map_size('{\"a\" : \"b\"}')", P, "1"),
        ("rule_funcs.erl map_keys/1", "map_keys(payload)", r#"{"a":1,"b":2}"#, r#"["a","b"]"#),
        ("rule_funcs.erl map_values/1", "map_values(payload)", r#"{"a":1,"b":2}"#, "[1,2]"),
    ]);
}

#[test]
fn hash_compression_and_random() {
    check_all(&[
        (
            "funcs_SUITE t_hash_funcs (md5: 32 hex digits)",
            "md5('hello')",
            P,
            r#""5d41402abc4b2a76b9719d911017c592""#,
        ),
        (
            "funcs_SUITE t_hash_funcs (sha: 40 hex digits)",
            "sha('hello')",
            P,
            r#""aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d""#,
        ),
        (
            "funcs_SUITE t_hash_funcs (sha256: 64 hex digits)",
            "sha256('hello')",
            P,
            r#""2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824""#,
        ),
        ("funcs_SUITE t_hash_funcs", "strlen(md5(''))", P, "32"),
        ("variform_bif.erl hash/2 (sha1 is sha)", "hash('sha1', 'hello') = sha('hello')", P, "true"),
        ("funcs_SUITE t_zip_funcs", "unzip(zip('hello'))", P, r#""hello""#),
        ("funcs_SUITE t_gzip_funcs", "gunzip(gzip('hello'))", P, r#""hello""#),
        ("funcs_SUITE t_zip_compress_funcs", "zip_uncompress(zip_compress('hello'))", P, r#""hello""#),
        (
            "rule_funcs.erl gzip/1 (zlib:gzip: gzip magic)",
            "substr(bin2hexstr(gzip('x')), 0, 4)",
            P,
            r#""1F8B""#,
        ),
        (
            "rule_funcs.erl zip_compress/1 (zlib:compress: zlib header)",
            "substr(bin2hexstr(zip_compress('x')), 0, 2)",
            P,
            r#""78""#,
        ),
        ("rule_funcs.erl unzip/1 (not deflate data)", "unzip('hello')", P, "ERROR"),
        ("rule_funcs.erl uuid_v4/0 (36 characters)", "strlen(uuid_v4())", P, "36"),
        ("rule_funcs.erl uuid_v4/0 (version 4)", "substr(uuid_v4(), 14, 1)", P, r#""4""#),
        ("rule_funcs.erl uuid_v4_no_hyphen/0", "strlen(uuid_v4_no_hyphen())", P, "32"),
        ("variform_bif.erl getenv/1 (unset: empty)", "getenv('OUTPOST_SURELY_UNSET_VARIABLE')", P, r#""""#),
    ]);
}

#[test]
fn time_functions() {
    check_all(&[
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds('+02:00:00')", P, "7200"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds('-02:00:00')", P, "-7200"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds('+00:01:42')", P, "102"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds('z')", P, "0"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds('Z')", P, "0"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds(42)", P, "42"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_offset_seconds(payload.missing)", P, "0"),
        ("funcs_SUITE t_timezone_to_offset_seconds", "timezone_to_second('+02:00:00')", P, "7200"),
        (
            "funcs_SUITE t_date_to_unix_ts",
            "date_to_unix_ts('second', '+08:00', '%Y-%m-%d %H-%M-%S', '2024-03-01 10:30:38')",
            P,
            "1709260238",
        ),
        (
            "funcs_SUITE t_date_to_unix_ts",
            "date_to_unix_ts('second', '+08:00', '%Y-%m-%d %H-%M-%S.%3N', '2024-03-01 10:30:38.333')",
            P,
            "1709260238",
        ),
        (
            "funcs_SUITE t_date_to_unix_ts",
            "date_to_unix_ts('millisecond', '+08:00', '%Y-%m-%d %H-%M-%S.%3N', '2024-03-01 10:30:38.333')",
            P,
            "1709260238333",
        ),
        (
            "funcs_SUITE t_date_to_unix_ts",
            "date_to_unix_ts('microsecond', '+08:00', '%Y-%m-%d %H-%M-%S.%3N', '2024-03-01 10:30:38.333')",
            P,
            "1709260238333000",
        ),
        (
            "funcs_SUITE t_date_to_unix_ts",
            "date_to_unix_ts('microsecond', '+08:00', '%Y-%m-%d %H-%M-%S.%6N', '2024-03-01 10:30:38.333444')",
            P,
            "1709260238333444",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2022-05-26 10:40:12')",
            P,
            "1653561612",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H-%M-%S', '2022-05-26 10:40:12')",
            P,
            "1653561612",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2022-05-26 10-40-12')",
            P,
            "1653561612",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2024-02-29 14:31:40')",
            P,
            "1709217100",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2024-03-01 12:44:31')",
            P,
            "1709297071",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2100-03-01 12:44:31')",
            P,
            "4107588271",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '+08:00', '%Y-%m-%d %H:%M:%S', '2024-02-29 14:31:40')",
            P,
            "1709188300",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '+08:00', '%Y-%m-%d %H:%M:%S', '2100-03-01 12:44:31')",
            P,
            "4107559471",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S.%3N%:z', '2024-02-23 15:00:00.123+08:00')",
            P,
            "1708671600",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2022-059999-26 10:40:12')",
            P,
            "ERROR",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%y-%m-%d %H:%M:%S', '2022-05-26 10:40:12')",
            P,
            "ERROR",
        ),
        (
            "funcs_SUITE t_parse_date_errors (missing_date_part month)",
            "date_to_unix_ts('second', '%Y-%d %H:%M:%S', '2022-32 10:40:12')",
            P,
            "ERROR",
        ),
        (
            "funcs_SUITE t_parse_date_errors (missing_date_part year)",
            "date_to_unix_ts('second', '%H:%M:%S', '10:40:12')",
            P,
            "ERROR",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2022-05-32 10:40:12')",
            P,
            "ERROR",
        ),
        (
            "funcs_SUITE t_parse_date_errors",
            "date_to_unix_ts('second', '%Y-%m-%d %H:%M:%S', '2023-02-29 10:40:12')",
            P,
            "ERROR",
        ),
        (
            "utils_calendar.erl do_formatted_datetime_to_system_time (parsed %z offset)",
            "date_to_unix_ts('second', '%m--%d--%Y---%H:%M:%S%z', format_date('second', '+07:00', '%m--%d--%Y---%H:%M:%S%z', 1708671600))",
            P,
            "1708671600",
        ),
        (
            "funcs_SUITE t_format_date_funcs (round trip, ms)",
            "date_to_unix_ts('millisecond', '--%m--%d--%Y---%H:%M:%S:%3N%z', format_date('millisecond', '+04:00', '--%m--%d--%Y---%H:%M:%S:%3N%z', 1708671600123))",
            P,
            "1708671600123",
        ),
        (
            "funcs_SUITE t_format_date_funcs (no offset in the format)",
            "date_to_unix_ts('second', '+04:00', '--%m--%d--%Y---%H:%M:%S', format_date('second', '+04:00', '--%m--%d--%Y---%H:%M:%S', 1708671600))",
            P,
            "1708671600",
        ),
        (
            "utils_calendar.erl offset_second_ (+hh:mm:ss)",
            "format_date('second', '+08:20:30', '%Y-%m-%d %H:%M:%S', 0)",
            P,
            r#""1970-01-01 08:20:30""#,
        ),
        (
            "utils_calendar.erl offset_second_ (-hhmm)",
            "format_date('second', '-0530', '%H:%M', 0)",
            P,
            r#""18:30""#,
        ),
        (
            "rule_funcs.erl format_date/3 (now)",
            "format_date('millisecond', 'Z', '%Y-%m-%d %H:%M:%S.%3N')",
            P,
            r#""2024-02-23 07:00:00.123""#,
        ),
        (
            "funcs_SUITE t_now_rfc3339 (parses back)",
            "rfc3339_to_unix_ts(now_rfc3339()) = now_timestamp()",
            P,
            "true",
        ),
        (
            "funcs_SUITE t_now_rfc3339_1",
            "rfc3339_to_unix_ts(now_rfc3339('millisecond'), 'millisecond') = now_timestamp('millisecond')",
            P,
            "true",
        ),
        (
            "funcs_SUITE t_unix_ts_to_rfc3339 (round trip)",
            "rfc3339_to_unix_ts(unix_ts_to_rfc3339(1708671600123, 'millisecond'), 'millisecond')",
            P,
            "1708671600123",
        ),
        (
            "funcs_SUITE t_rfc3339_to_unix_ts",
            "rfc3339_to_unix_ts('2024-02-23T15:00:00+08:00')",
            P,
            "1708671600",
        ),
    ]);
}

#[test]
fn payload_is_text_until_a_path_reads_it() {
    check_all(&[
        (
            "engine_SUITE t_sqlselect_01 (json_decode(payload), WHERE p.x = 1)",
            "SELECT json_decode(payload) AS p, payload FROM \"t/#\" WHERE p.x = 1",
            r#"{"x":1}"#,
            r#"{"p":{"x":1},"payload":"{\"x\":1}"}"#,
        ),
        (
            "engine_SUITE t_sqlselect_01 (x = 2 is filtered)",
            "SELECT json_decode(payload) AS p, payload FROM \"t/#\" WHERE p.x = 1",
            r#"{"x":2}"#,
            "FILTERED",
        ),
        ("rule_runtime.erl (payload is the binary as received)", "payload", r#"{"x": 1}"#, r#""{\"x\": 1}""#),
        ("rule_runtime.erl maybe_decode_payload (paths decode)", "payload.x", r#"{"x": 1}"#, "1"),
        ("rule_funcs.erl json_decode/1", "json_decode(payload).a[2]", r#"{"a":[1,2]}"#, "2"),
        ("rule_funcs.erl is_str (payload is a binary)", "is_str(payload)", r#"{"a":1}"#, "true"),
        ("rule_funcs.erl map_size (map() decodes JSON text)", "map_size(payload)", r#"{"a":1,"b":2}"#, "2"),
        (
            "rule_funcs.erl map_get (nested_get decodes JSON text)",
            "map_get('a.b', payload)",
            r#"{"a":{"b":"c"}}"#,
            r#""c""#,
        ),
        ("rule_funcs.erl strlen of the text", "strlen(payload)", "hello", "5"),
    ]);
}

#[test]
fn metadata_function_forms() {
    check_all(&[
        ("funcs_SUITE t_qos", "qos()", P, "1"),
        ("funcs_SUITE t_topic", "topic()", P, r#""t/a/b""#),
        ("funcs_SUITE t_clientid", "clientid()", P, r#""clientid""#),
        ("funcs_SUITE t_username", "username()", P, r#""feng""#),
        ("funcs_SUITE t_payload", "payload()", "hello", r#""hello""#),
        ("funcs_SUITE t_payload", "payload('a.b.c')", r#"{"a":{"b":{"c":"c"}}}"#, r#""c""#),
    ]);
}

#[test]
fn emqx_syntax() {
    check_all(&[
        (
            "engine_SUITE t_sqlselect_002 (infix mod)",
            "SELECT 2 mod 2 AS mod1, mod(3, 2) AS mod2, 4 div 2 AS div1, div(7, 2) AS div2 FROM \"t/#\"",
            P,
            r#"{"mod1":0,"mod2":1,"div1":2,"div2":3}"#,
        ),
        ("rulesql.yrl scalar_exp 'div' (precedence of * and /)", "1 + 7 div 2", P, "4"),
        (
            "rule_runtime.erl do_compare('=~') (topic match)",
            "SELECT topic FROM \"t/#\" WHERE topic =~ 't/+/b'",
            P,
            r#"{"topic":"t/a/b"}"#,
        ),
        (
            "rule_runtime.erl do_compare('=~') (no match)",
            "SELECT topic FROM \"t/#\" WHERE topic =~ 'x/#'",
            P,
            "FILTERED",
        ),
        ("rule_runtime.erl do_compare('=~') (in SELECT)", "topic =~ 't/#'", P, "true"),
        (
            "engine_SUITE t_sqlparse_both_string_types_in_from",
            "SELECT topic FROM 't/#'",
            P,
            r#"{"topic":"t/a/b"}"#,
        ),
        (
            "engine_SUITE t_sqlparse_both_string_types_in_from (both kinds)",
            "SELECT topic FROM 'x/#', \"t/#\"",
            P,
            r#"{"topic":"t/a/b"}"#,
        ),
        (
            "sql_lex.xrl (a double-quoted word is a NAME)",
            "SELECT \"topic\" AS t FROM \"t/#\"",
            P,
            r#"{"t":"t/a/b"}"#,
        ),
        ("sql_lex.xrl (a double-quoted word is a NAME, in a path)", "\"payload\".x", r#"{"x":5}"#, "5"),
        (
            "engine_SUITE t_sqlparse_array_index_2 (a list literal with a NAME)",
            "SELECT [payload.a, \"topic\", 'c'] AS c FROM \"t/#\"",
            r#"{"a":11}"#,
            r#"{"c":[11,"t/a/b","c"]}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_1 (index into an alias)",
            "SELECT json_decode(payload) AS p, p[1] AS a FROM \"t/#\"",
            r#"[{"x": 1}]"#,
            r#"{"p":[{"x":1}],"a":{"x":1}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_1 (no AS: nested)",
            "SELECT payload.x[2] FROM \"t/#\"",
            r#"{"x":[1,3,4]}"#,
            r#"{"payload":{"x":[3]}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_1 (no AS: nested, deeper)",
            "SELECT payload.x[2].y FROM \"t/#\"",
            r#"{"x":[1,{"y":3},4]}"#,
            r#"{"payload":{"x":[{"y":3}]}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_1 (with AS)",
            "SELECT payload.x[2].y AS b FROM \"t/#\"",
            r#"{"x":[1,{"y":3},4]}"#,
            r#"{"b":3}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_2 (negative index)",
            "SELECT payload.x[-2].y AS b FROM \"t/#\"",
            r#"{"x":[1,{"y":3},4]}"#,
            r#"{"b":3}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_2 (AS c[-0] appends, AS c[0] prepends)",
            "SELECT payload.x AS b, 1 AS c[-0], 2 AS c[-0], b AS c[0] FROM \"t/#\"",
            r#"{"x":0}"#,
            r#"{"b":0,"c":[0,1,2]}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_2 (construct from [])",
            "SELECT [] AS c, 1 AS c[-0], 2 AS c[-0], 0 AS c[0] FROM \"t/#\"",
            P,
            r#"{"c":[0,1,2]}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_2 (construct a list)",
            "SELECT [payload.a, \"topic\", 'c'] AS c, 1 AS c[-0], 2 AS c[-0], 0 AS c[0] FROM \"t/#\"",
            r#"{"a":11}"#,
            r#"{"c":[0,11,"t/a/b","c",1,2]}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_3 (payload text decoded by the put)",
            "SELECT payload, payload.x[2].y FROM \"t/#\"",
            r#"{"x": [1,{"y": [1,2]},3]}"#,
            r#"{"payload":{"x":[1,{"y":[1,2]},3]}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_3",
            "SELECT payload.x[2].y AS b FROM \"t/#\"",
            r#"{"x": [1,{"y": [1,2]},3]}"#,
            r#"{"b":[1,2]}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_3 (dotted AS target)",
            "SELECT payload.x[2].y AS b.c FROM \"t/#\"",
            r#"{"x": [1,{"y": [1,2]},3]}"#,
            r#"{"b":{"c":[1,2]}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_4 (indexed AS target into nothing)",
            "SELECT 0 AS payload.x[2].y FROM \"t/#\"",
            r#"{"x": [1,{"y": [1,2]},3]}"#,
            r#"{"payload":{"x":[{"y":0}]}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_4 (indexed AS target into a selected list)",
            "SELECT payload.x, 0 AS payload.x[2].y FROM \"t/#\"",
            r#"{"x": [1,{"y": [1,2]},3]}"#,
            r#"{"payload":{"x":[1,{"y":0},3]}}"#,
        ),
        (
            "engine_SUITE t_sqlselect_as_put",
            "SELECT payload, 'STEVE' AS payload.data[1].name FROM \"t/#\"",
            r#"{"f1":"f1","data":[{"name":"n1","idx":1},{"name":"n2","idx":2}]}"#,
            r#"{"payload":{"f1":"f1","data":[{"name":"STEVE","idx":1},{"name":"n2","idx":2}]}}"#,
        ),
        (
            "engine_SUITE t_sqlselect_0 (AS p.z into a selected map)",
            "SELECT json_decode(payload) AS p, payload.a AS p.z FROM \"t/#\"",
            r#"{"a":1,"b":"2"}"#,
            r#"{"p":{"a":1,"b":"2","z":1}}"#,
        ),
        (
            "rulesql.yrl name_or_path_ref (AS meta.info)",
            "SELECT clientid AS meta.info FROM \"t/#\"",
            P,
            r#"{"meta":{"info":"clientid"}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_array_index_5",
            "SELECT [1,2,3,4] AS v FROM \"t/#\"",
            P,
            r#"{"v":[1,2,3,4]}"#,
        ),
        (
            "engine_SUITE t_sqlparse_true_false",
            "SELECT true AS a, false AS b, true = 'true' AS c FROM \"t/#\"",
            P,
            r#"{"a":true,"b":false,"c":true}"#,
        ),
        (
            "engine_SUITE t_sqlparse_new_map",
            "SELECT map_new() AS a, map_put('b', 1, map_new()) AS c FROM \"t/#\"",
            P,
            r#"{"a":{},"c":{"b":1}}"#,
        ),
        (
            "engine_SUITE t_sqlparse_nested_get",
            "SELECT payload.a.b.c AS v FROM \"t/#\"",
            r#"{"a":{"b":{"c":1}}}"#,
            r#"{"v":1}"#,
        ),
    ]);
}

#[test]
fn null_logic() {
    check_all(&[
        (
            "engine_SUITE t_sqlparse_undefined_variable (undefined = undefined)",
            "SELECT payload.a AS a, payload.b AS b FROM \"t/#\" WHERE payload.a = payload.b",
            P,
            r#"{"a":null,"b":null}"#,
        ),
        (
            "engine_SUITE t_sqlparse_undefined_variable (undefined > 1 is false)",
            "SELECT 1 AS x FROM \"t/#\" WHERE payload.a > payload.b",
            r#"{"b":1}"#,
            "FILTERED",
        ),
        (
            "engine_SUITE t_sqlparse_undefined_variable (a < b AS c)",
            "payload.a < payload.b",
            r#"{"b":1}"#,
            "false",
        ),
        ("rule_runtime.erl compare/3 (undefined != 1 is false)", "payload.a != 1", P, "false"),
        ("rule_runtime.erl compare/3 (undefined <> 1 is false)", "payload.a <> 1", P, "false"),
        ("rule_runtime.erl compare/3 (undefined <= undefined)", "payload.a <= payload.b", P, "true"),
        ("rule_runtime.erl compare/3 (undefined < undefined)", "payload.a < payload.b", P, "false"),
        (
            "rule_runtime.erl match_conditions({'not', _}) (not of false)",
            "SELECT 1 AS x FROM \"t/#\" WHERE NOT (payload.a > 1)",
            P,
            r#"{"x":1}"#,
        ),
        (
            "rule_runtime.erl match_conditions (or)",
            "SELECT 1 AS x FROM \"t/#\" WHERE payload.a > 1 OR payload.n = 7",
            r#"{"n":7}"#,
            r#"{"x":1}"#,
        ),
        (
            "rule_runtime.erl match_conditions (and)",
            "SELECT 1 AS x FROM \"t/#\" WHERE payload.a > 1 AND payload.n = 7",
            r#"{"n":7}"#,
            "FILTERED",
        ),
        (
            "rule_runtime.erl match_conditions({in, ..}) (lists:member)",
            "SELECT 1 AS x FROM \"t/#\" WHERE payload.n IN (1, 7)",
            r#"{"n":7}"#,
            r#"{"x":1}"#,
        ),
        (
            "rule_runtime.erl match_conditions({in, ..}) (undefined is a member of [undefined])",
            "SELECT 1 AS x FROM \"t/#\" WHERE payload.a IN (1, payload.b)",
            P,
            r#"{"x":1}"#,
        ),
        (
            "rule_runtime.erl compare/3 (number vs numeric binary)",
            "SELECT 1 AS x FROM \"t/#\" WHERE payload.s = 12",
            r#"{"s":"12"}"#,
            r#"{"x":1}"#,
        ),
        ("rule_runtime.erl compare/3 (atom true vs <<\"true\">>)", "true = 'true'", P, "true"),
        ("rule_runtime.erl do_compare('>') on binaries", "'b' > 'a'", P, "true"),
    ]);
}

#[test]
fn undefined_in_functions_and_operators() {
    check_all(&[
        (
            "rule_funcs.erl '+'/2 (a string side concatenates; undefined is written `undefined`)",
            "'a' + payload.missing",
            P,
            r#""aundefined""#,
        ),
        ("rule_funcs.erl '*'/2 (numbers only: undefined fails)", "payload.missing * 2", P, "ERROR"),
        ("rule_funcs.erl '+'/2 (numbers only: undefined fails)", "payload.missing + 1", P, "ERROR"),
        (
            "variform_bif.erl concat/1 (any_to_str(undefined))",
            "concat('a', payload.missing)",
            P,
            r#""aundefined""#,
        ),
        ("utils_conv.erl bin/1 (atom undefined)", "str(payload.missing)", P, r#""undefined""#),
        (
            "rule_runtime.erl compare/3 (number(<<\"abc\">>) fails)",
            "payload.s = 1",
            r#"{"s":"abc"}"#,
            "ERROR",
        ),
        (
            "rule_runtime.erl compare/3 (number(<<\"abc\">>) fails)",
            "payload.s > 1",
            r#"{"s":"abc"}"#,
            "ERROR",
        ),
        ("rule_runtime.erl compare/3 (numeric text)", "payload.s > 9", r#"{"s":"10"}"#, "true"),
        ("rule_funcs.erl float/2 (float_to_list decimals)", "float(3.14159, 2)", P, "3.14"),
        ("rule_funcs.erl float/2 (float_to_list rounds the exact value)", "float(2.675, 2)", P, "2.67"),
        ("rule_funcs.erl float/2 (Decimals > 0)", "float(1.5, 0)", P, "ERROR"),
        ("rule_funcs.erl is_null/1 of a computed undefined", "is_null(map_get('x', map_new()))", P, "true"),
        // EMQX's functions have no clause for undefined: their guards refuse it.
        ("rule_funcs.erl abs/1 (is_integer guard)", "abs(payload.missing)", P, "ERROR"),
        ("rule_funcs.erl sqrt/1 (is_number guard)", "sqrt(payload.missing)", P, "ERROR"),
        ("rule_funcs.erl round/1 (is_number guard)", "round(payload.missing)", P, "ERROR"),
        ("rule_funcs.erl bitand/2 (is_integer guard)", "bitand(payload.missing, 1)", P, "ERROR"),
        ("utils_conv.erl int/1 (badarg)", "int(payload.missing)", P, "ERROR"),
        ("utils_conv.erl float/1 (badarg)", "float(payload.missing)", P, "ERROR"),
        ("utils_conv.erl bool/1 (badarg)", "bool(payload.missing)", P, "ERROR"),
        ("rule_funcs.erl length/1 (is_list guard)", "length(payload.missing)", P, "ERROR"),
        ("rule_funcs.erl nth/2 (is_list guard)", "nth(1, payload.missing)", P, "ERROR"),
        ("rule_funcs.erl map_keys/1 (map(undefined) badarg)", "map_keys(payload.missing)", P, "ERROR"),
        ("rule_funcs.erl md5/1 (is_binary guard)", "md5(payload.missing)", P, "ERROR"),
        (
            "rule_funcs.erl unix_ts_to_rfc3339/2 (is_integer guard)",
            "unix_ts_to_rfc3339(payload.missing, 'second')",
            P,
            "ERROR",
        ),
        ("rule_funcs.erl json_decode/1 (jiffy refuses the atom)", "json_decode(payload.missing)", P, "ERROR"),
        // ...except where the value is only written out or looked for.
        ("rule_funcs.erl str_utf8/1 (str(undefined))", "str_utf8(payload.missing)", P, r#""undefined""#),
        (
            "variform_bif.erl sprintf_s/2 (~s of the atom)",
            "sprintf('~s', payload.missing)",
            P,
            r#""undefined""#,
        ),
        (
            "variform_bif.erl join_to_string/2 (any_to_str)",
            "join_to_string('-', [1, payload.missing])",
            P,
            r#""1-undefined""#,
        ),
        (
            "rule_funcs.erl contains/2 (lists:member)",
            "contains(payload.missing, [1, payload.other])",
            P,
            "true",
        ),
        ("rule_funcs.erl contains/2 (lists:member)", "contains(payload.missing, [1])", P, "false"),
    ]);
}

/// A JSON `null` is EMQX's atom `null` (jiffy decodes it so, `emqx_utils_json:decode/1`
/// with `return_maps`): a value, not `undefined`. Each family that looks at it.
#[test]
fn json_null_is_a_value() {
    const N: &str = r#"{"x":null,"n":7,"s":"a"}"#;
    check_all(&[
        // NULL checks.
        ("funcs_SUITE t_is_null (is_null(null) is false)", "is_null(payload.x)", N, "false"),
        ("funcs_SUITE t_is_not_null (not is_null(null))", "is_not_null(payload.x)", N, "true"),
        ("funcs_SUITE t_is_null_var (is_null_var(null) is true)", "is_null_var(payload.x)", N, "true"),
        ("funcs_SUITE t_is_not_null_var", "is_not_null_var(payload.x)", N, "false"),
        ("funcs_SUITE t_is_null_var (a missing field too)", "is_null_var(payload.missing)", N, "true"),
        ("rule_funcs.erl is_null/1 (IS NULL is is_null)", "payload.x IS NULL", N, "false"),
        ("rule_funcs.erl is_null/1 (IS NOT NULL)", "payload.x IS NOT NULL", N, "true"),
        // Type checks: `null` is an atom, none of these types.
        ("rule_funcs.erl is_str/1", "is_str(payload.x)", N, "false"),
        ("rule_funcs.erl is_num/1", "is_num(payload.x)", N, "false"),
        ("rule_funcs.erl is_bool/1", "is_bool(payload.x)", N, "false"),
        ("rule_funcs.erl is_map/1", "is_map(payload.x)", N, "false"),
        ("rule_funcs.erl is_array/1", "is_array(payload.x)", N, "false"),
        ("rule_funcs.erl is_empty/1 (map_size(null) fails)", "is_empty(payload.x)", N, "ERROR"),
        // coalesce skips only undefined.
        (
            "rule_funcs.erl coalesce/1 (null is not undefined)",
            "coalesce(payload.missing, payload.x, 'd')",
            N,
            "null",
        ),
        ("rule_funcs.erl coalesce_ne/1 (null is not empty)", "coalesce_ne(payload.x, 'd')", N, "null"),
        ("rule_funcs.erl coalesce/1 (null, then a value)", "is_null_var(coalesce(payload.x, 1))", N, "true"),
        // Conversion: `null` is written as its text, numbers and booleans refuse it.
        ("utils_conv.erl bin/1 (atom_to_binary(null))", "str(payload.x)", N, r#""null""#),
        ("rule_funcs.erl str_utf8/1", "str_utf8(payload.x)", N, r#""null""#),
        ("utils_conv.erl int/1 (no clause for null)", "int(payload.x)", N, "ERROR"),
        ("utils_conv.erl float/1 (no clause for null)", "float(payload.x)", N, "ERROR"),
        ("utils_conv.erl bool/1 (badarg)", "bool(payload.x)", N, "ERROR"),
        ("rule_funcs.erl map/1 (badarg)", "map(payload.x)", N, "ERROR"),
        ("rule_funcs.erl json_encode/1", "json_encode(payload.x)", N, r#""null""#),
        (
            "rule_funcs.erl json_encode/1 (inside a map)",
            "json_encode(json_decode(payload))",
            r#"{"x":null}"#,
            r#""{\"x\":null}""#,
        ),
        (
            "rule_funcs.erl json_decode/1 (jiffy: null is the atom)",
            "is_null(json_decode('null'))",
            N,
            "false",
        ),
        ("rule_funcs.erl json_decode/1", "is_null_var(json_decode('{\"a\":null}').a)", N, "true"),
        // Strings: the variform functions refuse null and undefined alike (?IS_NULL).
        ("variform_bif.erl upper/1 (badarg on null)", "upper(payload.x)", N, "ERROR"),
        ("variform_bif.erl trim/1 (badarg on null)", "trim(payload.x)", N, "ERROR"),
        ("variform_bif.erl strlen/1 (badarg on null)", "strlen(payload.x)", N, "ERROR"),
        ("variform_bif.erl split/2 (badarg on null)", "split(payload.x, ',')", N, "ERROR"),
        ("variform_bif.erl substr/2 (badarg on null)", "substr(payload.x, 1)", N, "ERROR"),
        ("variform_bif.erl replace/3 (badarg on null)", "replace(payload.x, 'a', 'b')", N, "ERROR"),
        ("variform_bif.erl regex_match/2 (badarg on null)", "regex_match(payload.x, 'n')", N, "ERROR"),
        ("variform_bif.erl pad/2 (badarg on null)", "pad(payload.x, 6)", N, "ERROR"),
        ("variform_bif.erl concat/1 (any_to_str(null))", "concat('a', payload.x)", N, r#""anull""#),
        ("variform_bif.erl concat/1 via ||", "payload.s || payload.x", N, r#""anull""#),
        (
            "variform_bif.erl join_to_string/2 (any_to_str)",
            "join_to_string('-', [1, payload.x])",
            N,
            r#""1-null""#,
        ),
        ("variform_bif.erl sprintf_s/2 (~p of the atom)", "sprintf('~p', payload.x)", N, r#""null""#),
        // Operators.
        ("rule_funcs.erl '+'/2 (a string side concatenates)", "'a' + payload.x", N, r#""anull""#),
        ("rule_funcs.erl '+'/2 (no number clause for null)", "payload.x + 1", N, "ERROR"),
        ("rule_funcs.erl '*'/2 (no number clause for null)", "payload.x * 2", N, "ERROR"),
        ("rule_runtime.erl eval({'-', _}) (-null fails)", "-payload.x", N, "ERROR"),
        ("math functions (is_number guard)", "abs(payload.x)", N, "ERROR"),
        ("math functions (is_number guard)", "sqrt(payload.x)", N, "ERROR"),
        ("array functions (is_list guard)", "length(payload.x)", N, "ERROR"),
        ("rule_funcs.erl contains/2 (lists:member)", "contains(payload.x, [1, payload.x])", N, "true"),
        // Comparisons: compare/3 has no undefined clause for null.
        ("rule_runtime.erl compare/3 (null != 1)", "payload.x != 1", N, "true"),
        ("rule_runtime.erl compare/3 (null = 1)", "payload.x = 1", N, "false"),
        ("rule_runtime.erl compare/3 (null = undefined is false)", "payload.x = payload.missing", N, "false"),
        (
            "rule_runtime.erl compare/3 (undefined != null is false)",
            "payload.missing != payload.x",
            N,
            "false",
        ),
        ("rule_runtime.erl compare/3 (null = null)", "payload.x = json_decode('null')", N, "true"),
        ("rule_runtime.erl compare/3 (atom vs binary: atom_to_binary)", "payload.x = 'null'", N, "true"),
        ("rule_runtime.erl compare/3 (atom vs binary)", "payload.x > 'a'", N, "true"),
        ("rule_runtime.erl do_compare (term order: number < atom)", "payload.x > 30", N, "true"),
        ("rule_runtime.erl do_compare (term order: number < atom)", "payload.x < 30", N, "false"),
        ("rule_runtime.erl do_compare (atoms by name: false < null)", "payload.x > false", N, "true"),
        ("rule_runtime.erl do_compare (atoms by name: null < true)", "payload.x < true", N, "true"),
        ("rule_runtime.erl do_compare (term order: atom < map)", "payload.x < json_decode('{}')", N, "true"),
        (
            "rule_runtime.erl match_conditions({in, ..}) (lists:member)",
            "SELECT 1 AS v FROM \"t/#\" WHERE payload.x IN (1, payload.missing)",
            N,
            "FILTERED",
        ),
        (
            "rule_runtime.erl match_conditions({'not', _}) (not a boolean: false)",
            "SELECT 1 AS v FROM \"t/#\" WHERE NOT payload.x",
            N,
            "FILTERED",
        ),
        (
            "rule_runtime.erl match_conditions (a WHERE that keeps a device's null)",
            "SELECT payload.x AS v FROM \"t/#\" WHERE payload.x != 1",
            N,
            r#"{"v":null}"#,
        ),
        (
            "rule_runtime.erl eval_switch_clauses (CASE on null)",
            "CASE payload.x WHEN 'null' THEN 'atom' ELSE 'other' END",
            N,
            r#""atom""#,
        ),
    ]);
}

#[test]
fn case_when() {
    let sql = "SELECT CASE WHEN payload.x < 0 THEN 0 WHEN payload.x > 7 THEN 7 ELSE payload.x END AS y FROM \"t/#\"";
    check_all(&[
        ("engine_SUITE t_sqlparse_case_when_1", sql, r#"{"x": 1}"#, r#"{"y":1}"#),
        ("engine_SUITE t_sqlparse_case_when_1", sql, r#"{"x": 0}"#, r#"{"y":0}"#),
        ("engine_SUITE t_sqlparse_case_when_1", sql, r#"{"x": -1}"#, r#"{"y":0}"#),
        ("engine_SUITE t_sqlparse_case_when_1", sql, r#"{"x": 7}"#, r#"{"y":7}"#),
        ("engine_SUITE t_sqlparse_case_when_1", sql, r#"{"x": 8}"#, r#"{"y":7}"#),
    ]);
}

/// Runs a `FOREACH` statement on one event: the rows of its forwards as a JSON array, each
/// row cut to `keys` (comma-separated; empty keeps every column), or `ERROR`.
fn run_each(sql: &str, payload: &str, keys: &str) -> String {
    let rules = format!("[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\n");
    let set = match RuleSet::compile(&rules, &TableSources::new()) {
        Ok(set) => set,
        Err(e) => return format!("COMPILE ERROR: {e}"),
    };
    let event = EventContext {
        topic: "t/a",
        payload: payload.as_bytes(),
        clientid: Some("c_a"),
        username: None,
        qos: 1,
        timestamp_ms: 1_708_671_600_123,
        event_id: 7,
        hops: 0,
        peerhost: None,
        retain: false,
        dup: false,
        pub_props: None,
        lifecycle: None,
    };
    let mut rows = Vec::new();
    for output in set.evaluate(&event) {
        match output {
            Output::Forward { payload, .. } => {
                let row = Value::from_json(&payload).unwrap_or(Value::Null);
                rows.push(match (keys.is_empty(), row) {
                    (false, Value::Object(columns)) => Value::Object(
                        columns.into_iter().filter(|(k, _)| keys.split(',').any(|want| want == k)).collect(),
                    ),
                    (_, row) => row,
                });
            }
            Output::DeadLetter { .. } => return "ERROR".to_owned(),
            other => return format!("{other:?}"),
        }
    }
    Value::Array(rows).to_json_string()
}

#[test]
fn foreach_do_incase() {
    let sensors = r#"{"sensors": [{"cmd":"1"}, {"cmd":"2"}]}"#;
    let nested =
        r#"{"sensors": {"page": 2, "collection": {"info":[{"name":"cmd1", "cmd":"1"}, {"cmd":"2"}]} } }"#;
    let haha = r#"{"sensors": {"page": 2, "collection": {"info":["haha", {"name":"cmd1", "cmd":"1"}]} } }"#;
    let ts = r#"[{"ts": 1451649600512, "values": {"heartrate": 130}}]"#;
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        ("engine_SUITE t_sqlparse_foreach_1", r#"FOREACH payload.sensors AS s FROM "t/#""#, r#"{"sensors": [1, 2]}"#, "s", r#"[{"s":1},{"s":2}]"#),
        ("engine_SUITE t_sqlparse_foreach_1", r#"FOREACH payload.sensors FROM "t/#""#, r#"{"sensors": [1, 2]}"#, "item", r#"[{"item":1},{"item":2}]"#),
        ("engine_SUITE t_sqlparse_foreach_1", r#"FOREACH payload.sensors FROM "t/#""#, r#"{"sensors": [{"cmd":"1"}, {"cmd":"2","name":"ct"}]}"#, "item,clientid",
            r#"[{"clientid":"c_a","item":{"cmd":"1"}},{"clientid":"c_a","item":{"cmd":"2","name":"ct"}}]"#),
        ("engine_SUITE t_sqlparse_foreach_1 (payload nested as selected)", r#"FOREACH payload.sensors FROM "t/#""#, r#"{"sensors": [1, 2]}"#, "payload",
            r#"[{"payload":{"sensors":[1,2]}},{"payload":{"sensors":[1,2]}}]"#),
        ("engine_SUITE t_sqlparse_foreach_2", r#"FOREACH payload.sensors AS s DO s.cmd AS msg_type FROM "t/#""#, sensors, "", r#"[{"msg_type":"1"},{"msg_type":"2"}]"#),
        ("engine_SUITE t_sqlparse_foreach_2", r#"FOREACH payload.sensors DO item.cmd AS msg_type FROM "t/#""#, sensors, "", r#"[{"msg_type":"1"},{"msg_type":"2"}]"#),
        ("engine_SUITE t_sqlparse_foreach_2", r#"FOREACH payload.sensors DO item AS item FROM "t/#""#, r#"{"sensors": [1, 2]}"#, "", r#"[{"item":1},{"item":2}]"#),
        ("engine_SUITE t_sqlparse_foreach_3", r#"FOREACH payload.sensors AS s INCASE s.cmd != 1 FROM "t/#""#, r#"{"sensors": [{"cmd":1}, {"cmd":2}, {"cmd":3}]}"#, "s",
            r#"[{"s":{"cmd":2}},{"s":{"cmd":3}}]"#),
        ("engine_SUITE t_sqlparse_foreach_3", r#"FOREACH payload.sensors INCASE item.cmd != 1 FROM "t/#""#, r#"{"sensors": [{"cmd":1}, {"cmd":2}, {"cmd":3}]}"#, "item",
            r#"[{"item":{"cmd":2}},{"item":{"cmd":3}}]"#),
        ("engine_SUITE t_sqlparse_foreach_4", r#"FOREACH payload.sensors AS s DO s.cmd AS msg_type, s.name AS name INCASE is_not_null(s.cmd) FROM "t/#""#, sensors, "",
            r#"[{"msg_type":"1","name":null},{"msg_type":"2","name":null}]"#),
        ("engine_SUITE t_sqlparse_foreach_4", r#"FOREACH payload.sensors AS s DO s.cmd AS msg_type, s.name AS name INCASE is_not_null(s.cmd) FROM "t/#""#,
            r#"{"sensors": [{"cmd":"1", "name":"n1"}, {"cmd":"2"}, {"name":"n3"}]}"#, "", r#"[{"msg_type":"1","name":"n1"},{"msg_type":"2","name":null}]"#),
        ("engine_SUITE t_sqlparse_foreach_4 (elements without fields)", r#"FOREACH payload.sensors AS s DO s.cmd AS msg_type, s.name AS name INCASE is_not_null(s.cmd) FROM "t/#""#,
            r#"{"sensors": [1, 2]}"#, "", "[]"),
        ("engine_SUITE t_sqlparse_foreach_5 (not an array)", r#"FOREACH payload.sensors AS s DO s.cmd AS msg_type FROM "t/#""#, r#"{"sensors": 1}"#, "", "[]"),
        ("engine_SUITE t_sqlparse_foreach_5 (empty array)", r#"FOREACH payload.sensors AS s DO s.cmd AS msg_type FROM "t/#""#, r#"{"sensors": []}"#, "", "[]"),
        ("engine_SUITE t_sqlparse_foreach_5 (no DO)", r#"FOREACH payload.sensors FROM "t/#""#, r#"{"sensors": 1}"#, "", "[]"),
        ("emqx_rule_runtime.erl ensure_list (missing field)", r#"FOREACH payload.sensors FROM "t/#""#, r#"{"other": [1]}"#, "", "[]"),
        ("engine_SUITE t_sqlparse_foreach_6", r#"FOREACH json_decode(payload) DO item.id AS zid, timestamp AS t FROM "t/#""#, r#"[{"id": 5},{"id": 15}]"#, "",
            r#"[{"zid":5,"t":1708671600123},{"zid":15,"t":1708671600123}]"#),
        ("engine_SUITE t_sqlparse_foreach_7", r#"FOREACH json_decode(payload) AS p, p.sensors AS s, s.collection AS c, c.info AS info DO info.cmd AS msg_type, info.name AS name INCASE is_not_null(info.cmd) FROM "t/#" WHERE s.page = '2'"#,
            nested, "", r#"[{"msg_type":"1","name":"cmd1"},{"msg_type":"2","name":null}]"#),
        ("engine_SUITE t_sqlparse_foreach_7 (WHERE false)", r#"FOREACH json_decode(payload) AS p, p.sensors AS s, s.collection AS c, c.info AS info DO info.cmd AS msg_type FROM "t/#" WHERE s.page = '3'"#,
            nested, "", "[]"),
        ("engine_SUITE t_sqlparse_foreach_8", r#"FOREACH json_decode(payload) AS p, p.sensors AS s, s.collection AS c, c.info AS info DO info.cmd AS msg_type, info.name AS name, s, c INCASE is_map(info) FROM "t/#" WHERE s.page = '2'"#,
            haha, "", r#"[{"msg_type":"1","name":"cmd1","s":{"page":2,"collection":{"info":["haha",{"name":"cmd1","cmd":"1"}]}},"c":{"info":["haha",{"name":"cmd1","cmd":"1"}]}}]"#),
        ("engine_SUITE t_sqlparse_foreach_8 (sublist)", r#"FOREACH json_decode(payload) AS p, p.sensors AS s, s.collection AS c, sublist(2, 1, c.info) AS info DO info.cmd AS msg_type, info.name AS name FROM "t/#" WHERE s.page = '2'"#,
            haha, "", r#"[{"msg_type":"1","name":"cmd1"}]"#),
        ("engine_SUITE t_sqlparse_foreach_9", r#"FOREACH json_decode(payload) AS p DO p.ts AS ts FROM "t/#""#, ts, "", r#"[{"ts":1451649600512}]"#),
        ("engine_SUITE t_sqlparse_foreach_9 (payload not decoded first)", r#"FOREACH payload AS p DO p.ts AS ts FROM "t/#""#, ts, "", r#"[{"ts":1451649600512}]"#),
        ("engine_SUITE t_sqlparse_foreach_10", r#"FOREACH payload AS item DO item.data AS next_data FROM "t/#""#, r#"[{"data": "value1"}, {"data": "value2"}]"#, "",
            r#"[{"next_data":"value1"},{"next_data":"value2"}]"#),
        ("emqx_rule_runtime.erl maybe_decode_payload (not JSON)", r#"FOREACH payload DO item AS x FROM "t/#""#, "not json", "", "ERROR"),
        ("engine_SUITE t_sqlparse_foreach_1 (lowercase keywords)", r#"foreach payload.sensors as s do s as v from "t/#""#, r#"{"sensors": [1, 2]}"#, "", r#"[{"v":1},{"v":2}]"#),
        ("emqx_rule_runtime.erl filter_collection (INCASE fails)", r#"FOREACH payload.sensors AS s INCASE s > 'a' FROM "t/#""#, r#"{"sensors": [1]}"#, "", "ERROR"),
    ];
    let mut failures = Vec::new();
    for (source, sql, payload, keys, expected) in cases {
        let got = run_each(sql, payload, keys);
        if got != *expected {
            failures
                .push(format!("{source}: `{sql}` on {payload}\n    expected {expected}\n    got      {got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} FOREACH cases differ from EMQX:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn ranges_and_paths_into_json_text() {
    let a = r#"{"a":[0,1,2,3,4,5]}"#;
    #[rustfmt::skip]
    check_all(&[
        ("engine_SUITE t_sqlparse_array_range_1", "payload.a[1..4]", a, "[0,1,2,3]"),
        ("engine_SUITE t_sqlparse_array_range_1 (not a list)", "payload.a[1..4]", r#"{"x":[0,1]}"#, "ERROR"),
        ("engine_SUITE t_sqlparse_array_range_1 (construct)", r#"SELECT [1..4] AS c, 5 AS c[-0], 6 AS c[-0], 0 AS c[0] FROM "t/#""#, P, r#"{"c":[0,1,2,3,4,5,6]}"#),
        ("engine_SUITE t_sqlparse_array_range_2 (no AS)", r#"SELECT payload.a[1..4] FROM "t/#""#, a, r#"{"payload":{"a":[0,1,2,3]}}"#),
        ("engine_SUITE t_sqlparse_invalid_json", "payload.a[1..4]", r#"{"x":[0,1,2,3,}"#, "ERROR"),
        ("emqx_rule_maps.erl range_get (negative)", "payload.a[-2..-1]", a, "[4,5]"),
        ("emqx_rule_maps.erl range_get (mixed)", "payload.a[2..-2]", a, "[1,2,3,4]"),
        ("emqx_rule_maps.erl range_get (past the end: sublist truncates)", "payload.a[5..10]", a, "[4,5]"),
        ("emqx_rule_maps.erl range_get (start past end+1)", "payload.a[8..9]", a, "ERROR"),
        ("emqx_rule_maps.erl range_get (end before start-1)", "payload.a[4..2]", a, "ERROR"),
        ("emqx_rule_maps.erl range_get (empty)", "payload.a[4..3]", a, "[]"),
        ("emqx_rule_maps.erl range_gen", "[3..5]", P, "[3,4,5]"),
        ("emqx_rule_maps.erl range_gen (negative)", "[-2..1]", P, "[-2,-1,0,1]"),
        ("emqx_rule_maps.erl range_gen (empty, lists:seq(2,1))", "[2..1]", P, "[]"),
        ("emqx_rule_maps.erl range_gen in an expression", "length([1..10])", P, "10"),
        ("emqx_rule_maps.erl range over an alias", r#"SELECT payload.a AS x, x[2..3] AS y FROM "t/#""#, a, r#"{"x":[0,1,2,3,4,5],"y":[1,2]}"#),
        ("emqx_rule_maps.erl general_find (JSON text decoded on the way)", "payload.a.b", r#"{"a":"{\"b\":1}"}"#, "1"),
        ("emqx_rule_maps.erl general_find (array in JSON text)", "payload.a[2]", r#"{"a":"[5,6,7]"}"#, "6"),
        ("emqx_rule_maps.erl general_find (twice)", "payload.a.b.c", r#"{"a":"{\"b\":\"{\\\"c\\\":true}\"}"}"#, "true"),
        ("emqx_rule_maps.erl general_find (text that is not JSON)", "payload.a.b", r#"{"a":"plain"}"#, "null"),
        ("emqx_rule_maps.erl general_find (through a value)", "json_decode(payload.j).a.b", r#"{"j":"{\"a\":\"{\\\"b\\\":2}\"}"}"#, "2"),
        ("engine_SUITE t_json_payload_decoding (jsonlike)", r#"SELECT payload.jsonlike.a AS v FROM "t/#""#, r#"{"jsonlike":"{\"a\":0}","f":"huh"}"#, r#"{"v":0}"#),
        ("engine_SUITE t_sqlselect_0 (path target read in WHERE)", r#"SELECT payload.cmd AS cmd, cmd.info AS meta.info FROM "t/#" WHERE cmd.info = 'tt' AND meta.info = 'tt'"#, r#"{"cmd": {"info":"tt"}}"#, r#"{"cmd":{"info":"tt"},"meta":{"info":"tt"}}"#),
        ("emqx_rule_runtime.erl maybe_decode_payload (bare payload needs no JSON)", "payload", "{broken", r#""{broken""#),
        ("engine_SUITE t_sqlparse_nested_get", r#"SELECT payload AS p, p.a.b AS c FROM "t/#""#, r#"{"a": {"b": 0}}"#, r#"{"p":"{\"a\": {\"b\": 0}}","c":0}"#),
    ]);
}

/// Runs `sql` (forward to `x`) on one event and renders its row as JSON, or `FILTERED`. With
/// `kind`, the event is that client event, with `topic` its subscription filter or dropped
/// publish's topic and `reason` its reason; without, a publish to `topic`.
fn run_event(sql: &str, kind: Option<crate::EventKind>, topic: &str, reason: Option<&str>) -> String {
    let rules = format!(
        "[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"x\"\n"
    );
    let set = match RuleSet::compile(&rules, &TableSources::new()) {
        Ok(set) => set,
        Err(e) => return format!("COMPILE ERROR: {e}"),
    };
    let lifecycle = kind.map(|kind| {
        let mut event = crate::Lifecycle::new(kind);
        event.reason = reason.map(str::to_owned);
        event
    });
    let event = EventContext {
        clientid: Some("abc"),
        qos: 1,
        lifecycle: lifecycle.as_ref(),
        ..EventContext::new(topic, b"")
    };
    match set.evaluate(&event).as_slice() {
        [] => "FILTERED".to_owned(),
        [Output::Forward { payload, .. }] => String::from_utf8_lossy(payload).into_owned(),
        other => format!("{other:?}"),
    }
}

/// (EMQX source, statement, the client event or `None` for a publish, its topic, its reason,
/// expected row).
type EventCase =
    (&'static str, &'static str, Option<crate::EventKind>, &'static str, Option<&'static str>, &'static str);

#[test]
fn event_topics_and_metadata() {
    use crate::EventKind::*;
    #[rustfmt::skip]
    let cases: &[EventCase] = &[
        ("engine_SUITE t_sqlparse_event_1", r#"SELECT topic AS tp FROM "$events/session_subscribed""#, Some(SessionSubscribed), "t/tt", None, r#"{"tp":"t/tt"}"#),
        ("engine_SUITE t_sqlparse_event_2", r#"SELECT clientid FROM "$events/client_connected""#, Some(ClientConnected), "", None, r#"{"clientid":"abc"}"#),
        ("engine_SUITE t_sqlparse_event_3 (a publish to the topic source)", r#"SELECT clientid, topic AS tp FROM "t/tt", "$events/client_connected""#, None, "t/tt", None, r#"{"clientid":"abc","tp":"t/tt"}"#),
        ("engine_SUITE t_sqlparse_event_3 (the event source)", r#"SELECT clientid, topic AS tp FROM "t/tt", "$events/client_connected""#, Some(ClientConnected), "", None, r#"{"clientid":"abc","tp":null}"#),
        ("engine_SUITE t_event_client_disconnected_normal", r#"SELECT reason FROM "$events/client_disconnected""#, Some(ClientDisconnected), "", Some("normal"), r#"{"reason":"normal"}"#),
        ("engine_SUITE t_event_client_disconnected_takenover", r#"SELECT reason FROM "$events/client_disconnected""#, Some(ClientDisconnected), "", Some("takenover"), r#"{"reason":"takenover"}"#),
        ("emqx_rule_events.erl event_name (EMQX 5 spelling)", r#"SELECT event FROM "$events/client/connected""#, Some(ClientConnected), "", None, r#"{"event":"client.connected"}"#),
        ("emqx_rule_events.erl event_name (not that event)", r#"SELECT event FROM "$events/client/connected""#, Some(ClientDisconnected), "", None, "FILTERED"),
        ("emqx_rule_events.erl eventmsg_dropped", r#"SELECT event, reason, topic, qos FROM "$events/message_dropped""#, Some(MessageDropped), "t/1", Some("not_authorized"), r#"{"event":"message.dropped","reason":"not_authorized","topic":"t/1","qos":1}"#),
        ("emqx_rule_events.erl eventmsg_connack", r#"SELECT reason_code FROM "$events/client_connack""#, Some(ClientConnack), "", Some("success"), r#"{"reason_code":"success"}"#),
        ("emqx_rule_events.erl eventmsg_sub_or_unsub (unsubscribed)", r#"SELECT event, topic FROM "$events/session_unsubscribed""#, Some(SessionUnsubscribed), "t/#", None, r#"{"event":"session.unsubscribed","topic":"t/#"}"#),
        ("emqx_rule_events.erl event topics are not filters", r#"SELECT clientid FROM "$events/client_connected""#, None, "$events/client_connected", None, "FILTERED"),
        ("engine_SUITE t_sqlparse_select_matadata_1", r#"SELECT payload, metadata FROM "t/#""#, None, "t/a", None, r#"{"payload":"","metadata":{"rule_id":"r"}}"#),
        ("emqx_rule_runtime.erl add_metadata (rule_id)", r#"SELECT metadata.rule_id AS id FROM "$events/client_connected""#, Some(ClientConnected), "", None, r#"{"id":"r"}"#),
    ];
    let mut failures = Vec::new();
    for (source, sql, kind, topic, reason, expected) in cases {
        let got = run_event(sql, *kind, topic, *reason);
        if got != *expected {
            failures.push(format!("{source}: `{sql}`\n    expected {expected}\n    got      {got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from EMQX:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Arithmetic and comparisons where the operands' types differ: EMQX's `'+'`/2 and friends
/// (`emqx_rule_funcs.erl`: `'+'` adds numbers and otherwise concatenates when either side is
/// a binary; `'-'`, `'*'`, `'/'` have only `is_number` clauses) and `emqx_rule_runtime:compare`
/// (numbers against binaries converted, atoms against binaries as text, everything else in
/// Erlang's term order: number < atom < map < list < binary).
#[test]
fn mixed_types_in_operators() {
    const M: &str = r#"{"n":7,"f":1.5,"s":"12","t":"abc","b":true,"o":{"k":1},"a":[1,2],"e":[]}"#;
    check_all(&[
        ("rule_funcs.erl '+'/2 (binary: concat)", "payload.s + 1", M, r#""121""#),
        ("rule_funcs.erl '+'/2 (binary first)", "1 + payload.s", M, r#""112""#),
        ("rule_funcs.erl '+'/2 (two binaries)", "payload.t + payload.s", M, r#""abc12""#),
        ("rule_funcs.erl '+'/2 (binary and bool)", "payload.t + payload.b", M, r#""abctrue""#),
        ("rule_funcs.erl '+'/2 (numbers)", "payload.n + payload.f", M, "8.5"),
        ("rule_funcs.erl '-'/2 (is_number only)", "payload.s - 1", M, "ERROR"),
        ("rule_funcs.erl '*'/2 (is_number only)", "payload.s * 2", M, "ERROR"),
        ("rule_funcs.erl '/'/2 (is_number only)", "payload.s / 2", M, "ERROR"),
        ("rule_funcs.erl '+'/2 (no clause for a bool and a number)", "payload.b + 1", M, "ERROR"),
        ("rule_runtime.erl compare/3 (binary to number)", "payload.s > 11", M, "true"),
        ("rule_runtime.erl compare/3 (atom as text: 'true' > 'abc')", "payload.b > payload.t", M, "true"),
        ("rule_runtime.erl compare/3 (atom as text: 'true' < 'x')", "payload.b < 'x'", M, "true"),
        ("term order: number < atom", "payload.n < payload.b", M, "true"),
        ("term order: atom < map", "payload.b < payload.o", M, "true"),
        ("term order: map < list", "payload.o < payload.a", M, "true"),
        ("term order: list < binary", "payload.a < payload.t", M, "true"),
        ("term order: number < list", "payload.n > payload.a", M, "false"),
        ("term order: lists element by element", "payload.a < [1, 3]", M, "true"),
        ("term order: a prefix first", "payload.e < payload.a", M, "true"),
        ("term order: inside a list a number is less than a binary", "[1] < ['1']", M, "true"),
        ("term order: maps by size first", "payload.o < map_put('z', 0, payload.o)", M, "true"),
        ("Erlang ==: [1] == [1.0]", "[1] = [1.0]", M, "true"),
        ("Erlang ==: maps compare by value", "payload.o = json_decode('{\"k\":1.0}')", M, "true"),
    ]);
}
