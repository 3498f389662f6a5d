//! Table-driven tests of the whole engine: rules text + one event in, rendered outputs (or
//! the compile error) out. Every case goes through [`check`]; update expectations with
//! `UPDATE_EXPECT=1 cargo test -p outpost-rules`.

use expect_test::{Expect, expect};

use crate::{EventContext, Output, RuleSet, TableSources, Value};

const DEVICES_CSV: &str = "device,site,line,max_temp\nd1,plant-a,1,80\nd2,plant-b,2,72.5\n";
const DEVICES_TOML: &str = "[d1]\nsite = \"plant-a\"\n[d2]\nsite = \"plant-b\"\n";

/// Compiles `rules_toml` (with `devices.csv` and `devices.toml` available as table files),
/// evaluates one event and renders the outputs, one per line, or the compile error.
///
/// - `topic` may start with `hops=N ` to set the event's hop count.
/// - `payload` is sent as is, except: `cbor:<json>` sends the JSON value encoded as CBOR,
///   `hex:<hex>` sends raw bytes.
#[track_caller]
fn check(rules_toml: &str, topic: &str, payload: &str, expect: Expect) {
    let sources =
        TableSources::new().with_text("devices.csv", DEVICES_CSV).with_text("devices.toml", DEVICES_TOML);
    let rules = match RuleSet::compile(rules_toml, &sources) {
        Ok(rules) => rules,
        Err(e) => return expect.assert_eq(&format!("error: {e}\n")),
    };
    let (hops, topic) = match topic.split_once(' ') {
        Some((hops, topic)) => (hops.trim_start_matches("hops=").parse().unwrap(), topic),
        None => (0, topic),
    };
    let bytes = if let Some(json) = payload.strip_prefix("cbor:") {
        Value::from_json(json.as_bytes()).unwrap().to_cbor()
    } else if let Some(hex) = payload.strip_prefix("hex:") {
        hex::decode(hex).unwrap()
    } else {
        payload.as_bytes().to_vec()
    };
    let event = EventContext {
        topic,
        payload: &bytes,
        clientid: Some("c1"),
        username: None,
        qos: 1,
        timestamp_ms: 1_708_671_600_123,
        event_id: 42,
        hops,
        peerhost: None,
        retain: false,
        dup: false,
        pub_props: None,
        lifecycle: None,
    };
    let mut text = String::new();
    for output in rules.evaluate(&event) {
        text.push_str(&render(&output));
        text.push('\n');
    }
    expect.assert_eq(&text);
}

fn render(output: &Output) -> String {
    let body = |payload: &[u8]| match Value::from_cbor(payload) {
        Ok(v) if payload.first().is_some_and(|b| *b >= 0x80) => format!("cbor:{}", v.to_json_string()),
        _ => String::from_utf8_lossy(payload).into_owned(),
    };
    match output {
        Output::Forward { rule, topic, payload, qos, priority, ttl } => {
            let ttl = ttl.map(|t| format!(" ttl={}s", t.as_secs())).unwrap_or_default();
            format!("forward[{rule}] {topic} qos={qos} prio={priority}{ttl} {}", body(payload))
        }
        Output::Republish { rule, topic, payload, qos, hops } => {
            format!("republish[{rule}] {topic} qos={qos} hops={hops} {}", body(payload))
        }
        Output::Dropped { rule } => format!("dropped[{rule}]"),
        Output::LoopPrevented { rule, topic, hops } => format!("loop-prevented[{rule}] {topic} hops={hops}"),
        Output::DeadLetter { rule, reason, topic, deliberate: false, .. } => {
            format!("dead-letter[{rule}] {topic}: {reason}")
        }
        Output::DeadLetter { rule, reason, topic, deliberate: true, .. } => {
            format!("dead-letter-action[{rule}] {topic}: {reason}")
        }
    }
}

/// One rule named `r` with a plain forward action and the device table declared.
fn one(sql: &str) -> String {
    format!(
        "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n\n[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\n"
    )
}

/// Evaluates `SELECT <expr> AS v FROM "t"` on `payload` and renders the output.
#[track_caller]
fn check_expr(expr: &str, payload: &str, expect: Expect) {
    check(&one(&format!("SELECT {expr} AS v FROM \"t\"")), "t", payload, expect);
}

const P: &str = r#"{"temp": 31.5, "n": 7, "s": "Hello", "neg": -3, "arr": [10, 20, {"x": "deep"}], "obj": {"a": {"b": true}}, "nul": null, "num_str": "12", "device": "d1"}"#;

#[test]
fn select_paths_metadata_and_star() {
    check(
        &one(
            r#"SELECT payload.temp, payload.obj.a.b, payload.arr[1] AS first, payload.arr[-1].x AS last, payload.arr[9] AS none, topic, clientid, username, qos, timestamp, ts, id, event_id FROM "sensors/+/temp""#,
        ),
        "sensors/d1/temp",
        P,
        expect![[r#"
            forward[r] sensors/d1/temp qos=1 prio=5 {"payload":{"temp":31.5,"obj":{"a":{"b":true}}},"first":10,"last":"deep","none":null,"topic":"sensors/d1/temp","clientid":"c1","username":null,"qos":1,"timestamp":1708671600123,"ts":1708671600123,"id":42,"event_id":42}
        "#]],
    );
    check(
        &one(r#"SELECT * FROM "t""#),
        "t",
        r#"{"a":1}"#,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"id":42,"topic":"t","clientid":"c1","username":null,"qos":1,"timestamp":1708671600123,"payload":"{\"a\":1}"}
        "#]],
    );
    check(
        &one(r#"SELECT payload FROM "t""#),
        "t",
        "not json",
        expect![[r#"
            forward[r] t qos=1 prio=5 {"payload":"not json"}
        "#]],
    );
}

#[test]
fn topic_levels_are_one_based() {
    check(
        &one(
            r##"SELECT topic(1) AS a, topic(2) AS b, topic(4) AS missing, topic() AS whole FROM "sensors/#""##,
        ),
        "sensors/d1/temp",
        "{}",
        expect![[r#"
            forward[r] sensors/d1/temp qos=1 prio=5 {"a":"sensors","b":"d1","missing":null,"whole":"sensors/d1/temp"}
        "#]],
    );
    check(
        &one(r#"SELECT topic(0) AS a FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 23: rule `r`: topic(N) takes an integer literal N >= 1: topic(1) is the first level
          |
        7 | SELECT topic(0) AS a FROM "t"
          |              ^
    "#]],
    );
}

#[test]
fn where_filters_with_emqx_null_logic() {
    let cases = [
        ("payload.temp > 30", "pass"),
        ("payload.temp > 40", "fail"),
        ("payload.missing > 1", "NULL comparison"),
        ("NOT (payload.missing > 1)", "NOT of a comparison with NULL (EMQX: the comparison is false)"),
        ("payload.missing > 1 OR payload.n = 7", "NULL OR TRUE"),
        ("payload.missing > 1 AND payload.n = 8", "NULL AND FALSE"),
        ("payload.missing IS NULL AND payload.n IS NOT NULL AND payload.nul IS NOT NULL", "IS NULL"),
        ("payload.n IN (1, 7, 9)", "IN"),
        ("payload.n NOT IN (1, 2)", "NOT IN"),
        ("payload.n IN (1, NULL)", "IN with NULL in the list"),
        ("payload.s LIKE 'He%o'", "LIKE"),
        ("payload.s LIKE 'h%'", "LIKE is case-sensitive"),
        ("payload.s ILIKE 'h_llo'", "ILIKE"),
        ("payload.s NOT LIKE '%x%'", "NOT LIKE"),
        ("regex_match(payload.s, '^H.l+o$')", "regex_match"),
        ("payload.num_str = 12 AND payload.num_str > 9", "numeric string vs number"),
        ("payload.s = 12", "non-numeric string = number is an error (EMQX)"),
        ("payload.n BETWEEN 5 AND 7", "BETWEEN"),
        ("payload.obj.a.b", "boolean field as condition"),
        ("payload.device = 'd1'", "single-quoted string literal"),
        ("payload.missing != 1", "NULL != 1 is false (EMQX)"),
        ("payload.missing = payload.other_missing", "NULL = NULL is true (EMQX)"),
        ("payload.missing IN (1, NULL)", "NULL IN a list with NULL (EMQX lists:member)"),
        ("payload.nul != 1", "JSON null != 1 is true (EMQX's atom null is a value)"),
        ("payload.nul = 'null'", "JSON null = 'null' (EMQX compares an atom as its text)"),
        ("payload.nul > 30", "JSON null > 30 (Erlang's term order: numbers < atoms)"),
        ("payload.nul = payload.missing", "JSON null = NULL is false"),
        ("payload.nul = payload.nul", "JSON null = JSON null"),
        ("is_null_var(payload.nul) AND NOT is_null(payload.nul)", "is_null_var, not is_null"),
        ("NOT payload.nul", "NOT of a JSON null is false (EMQX)"),
    ];
    let mut text = String::new();
    for (condition, label) in cases {
        let rules =
            RuleSet::compile(&one(&format!("SELECT 1 AS one FROM \"t\" WHERE {condition}")), &tables())
                .unwrap();
        let outputs = rules.evaluate(&event("t", P.as_bytes()));
        let verdict = match outputs.as_slice() {
            [] => "filtered".to_owned(),
            [Output::Forward { .. }] => "kept".to_owned(),
            [Output::DeadLetter { reason, .. }] => format!("dead letter ({reason})"),
            other => format!("{other:?}"),
        };
        text.push_str(&format!("{label}: {verdict}\n"));
    }
    expect![[r#"
        pass: kept
        fail: filtered
        NULL comparison: filtered
        NOT of a comparison with NULL (EMQX: the comparison is false): kept
        NULL OR TRUE: kept
        NULL AND FALSE: filtered
        IS NULL: kept
        IN: kept
        NOT IN: kept
        IN with NULL in the list: filtered
        LIKE: kept
        LIKE is case-sensitive: filtered
        ILIKE: kept
        NOT LIKE: kept
        regex_match: kept
        numeric string vs number: kept
        non-numeric string = number is an error (EMQX): dead letter (cannot compare string 'Hello' with integer 12: the string is not a number (EMQX fails here too))
        BETWEEN: kept
        boolean field as condition: kept
        single-quoted string literal: kept
        NULL != 1 is false (EMQX): filtered
        NULL = NULL is true (EMQX): kept
        NULL IN a list with NULL (EMQX lists:member): kept
        JSON null != 1 is true (EMQX's atom null is a value): kept
        JSON null = 'null' (EMQX compares an atom as its text): kept
        JSON null > 30 (Erlang's term order: numbers < atoms): kept
        JSON null = NULL is false: filtered
        JSON null = JSON null: kept
        is_null_var, not is_null: kept
        NOT of a JSON null is false (EMQX): filtered
    "#]]
    .assert_eq(&text);
}

fn tables() -> TableSources {
    TableSources::new().with_text("devices.csv", DEVICES_CSV)
}

fn event<'a>(topic: &'a str, payload: &'a [u8]) -> EventContext<'a> {
    EventContext {
        topic,
        payload,
        clientid: Some("c1"),
        username: None,
        qos: 1,
        timestamp_ms: 1_708_671_600_123,
        event_id: 42,
        hops: 0,
        peerhost: None,
        retain: false,
        dup: false,
        pub_props: None,
        lifecycle: None,
    }
}

#[test]
fn aliases_are_usable_in_where_and_later_columns() {
    check(
        &one(
            r#"SELECT payload.temp AS t, t * 2 AS double, clientid AS cid FROM "t" WHERE t > 30 AND cid = 'c1'"#,
        ),
        "t",
        P,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"t":31.5,"double":63.0,"cid":"c1"}
        "#]],
    );
    check(&one(r#"SELECT payload.temp AS t FROM "t" WHERE t > 40"#), "t", P, expect![[""]]);
}

#[test]
fn arithmetic_and_concatenation() {
    check_expr(
        "payload.n + 1",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":8}
    "#]],
    );
    check_expr(
        "payload.n - 10",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":-3}
    "#]],
    );
    check_expr(
        "payload.n * payload.temp",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":220.5}
    "#]],
    );
    check_expr(
        "payload.n / 2",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3.5}
    "#]],
    );
    check_expr(
        "payload.n % 4",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3}
    "#]],
    );
    check_expr(
        "-payload.neg",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3}
    "#]],
    );
    // EMQX's `'+'/2` (emqx_rule_funcs.erl): numbers add; with a string on either side, even
    // one spelling a number, the texts concatenate.
    check_expr(
        "payload.num_str + 1",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"121"}
    "#]],
    );
    // `'-'`, `'*'`, `'/'` have only `is_number` clauses: a numeric string fails the rule.
    check_expr(
        "payload.num_str * 2",
        P,
        expect![[r#"
            dead-letter[r] t: cannot multiply string '12' and integer 2 (EMQX fails here too: a string is not a number even when it spells one; convert it with float(x) or int(x))
        "#]],
    );
    check_expr(
        "'a' + 'b'",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"ab"}
    "#]],
    );
    check_expr(
        "payload.s || '-' || payload.n",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"Hello-7"}
    "#]],
    );
    check_expr(
        "payload.s || payload.missing",
        P,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"v":"Helloundefined"}
        "#]],
    );
    check_expr(
        "payload.missing + 1",
        P,
        expect![[r#"
            dead-letter[r] t: arithmetic on NULL (NULL and integer 1): EMQX fails the rule here too; guard with coalesce(x, 0) or WHERE x IS NOT NULL
        "#]],
    );
    check_expr(
        "9223372036854775807 + 1",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":9.223372036854776e+18}
    "#]],
    );
}

#[test]
fn case_when() {
    let sql = r#"SELECT CASE WHEN payload.temp > 40 THEN 'hot' WHEN payload.temp > 30 THEN 'warm' ELSE 'ok' END AS level,
                        CASE payload.n WHEN 1 THEN 'one' WHEN 7 THEN 'seven' END AS name,
                        CASE WHEN payload.missing > 1 THEN 'x' END AS none
                 FROM "t""#;
    check(
        &one(sql),
        "t",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"level":"warm","name":"seven","none":null}
    "#]],
    );
}

#[test]
fn type_mismatches_are_dead_letters() {
    check_expr(
        "payload.s * 2",
        P,
        expect![[r#"
        dead-letter[r] t: cannot multiply string 'Hello' and integer 2
    "#]],
    );
    check(
        &one(r#"SELECT 1 AS one FROM "t" WHERE payload.s > 3"#),
        "t",
        P,
        expect![[r#"
            dead-letter[r] t: cannot compare string 'Hello' with integer 3: the string is not a number (EMQX fails here too)
        "#]],
    );
    check(
        &one(r#"SELECT 1 AS one FROM "t" WHERE payload.n"#),
        "t",
        P,
        expect![[r#"
        dead-letter[r] t: expected a boolean condition, got integer 7
    "#]],
    );
    check_expr(
        "payload.n / 0",
        P,
        expect![[r#"
        dead-letter[r] t: division by zero
    "#]],
    );
    check_expr(
        "sqrt(payload.neg)",
        P,
        expect![[r#"
        dead-letter[r] t: sqrt: argument out of domain (result is NaN)
    "#]],
    );
    check_expr(
        "upper(payload.n)",
        P,
        expect![[r#"
        dead-letter[r] t: upper: expected a string, got integer 7
    "#]],
    );
}

#[test]
fn math_functions() {
    check_expr(
        "abs(payload.neg)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3}
    "#]],
    );
    check_expr(
        "abs(-1.5)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1.5}
    "#]],
    );
    check_expr(
        "round(2.5)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3}
    "#]],
    );
    check_expr(
        "round(-2.5)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":-3}
    "#]],
    );
    check_expr(
        "floor(payload.temp)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":31}
    "#]],
    );
    check_expr(
        "ceil(payload.temp)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":32}
    "#]],
    );
    check_expr(
        "sqrt(16)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":4.0}
    "#]],
    );
    check_expr(
        "power(2, 10)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1024.0}
    "#]],
    );
    check_expr(
        "pow(9, 0.5)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3.0}
    "#]],
    );
    check_expr(
        "greatest(3, payload.n, 5.5, payload.missing)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":7}
    "#]],
    );
    check_expr(
        "least(3, payload.n, 'x')",
        P,
        expect![[r#"
        dead-letter[r] t: cannot compare string 'x' with integer 3
    "#]],
    );
    check_expr(
        "least('b', 'a')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"a"}
    "#]],
    );
    check_expr(
        "fmod(7.5, 2)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1.5}
    "#]],
    );
    check_expr(
        "exp(1)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":2.718281828459045}
    "#]],
    );
    check_expr(
        "log(exp(2))",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":2.0}
    "#]],
    );
    check_expr(
        "log10(1000)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3.0}
    "#]],
    );
    check_expr(
        "log2(8)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3.0}
    "#]],
    );
    check_expr(
        "log(0)",
        P,
        expect![[r#"
        dead-letter[r] t: log: argument out of domain (result is -inf)
    "#]],
    );
    check_expr(
        "sin(0) + cos(0) + tan(0) + asin(0) + acos(1) + atan(0) + sinh(0) + cosh(0) + tanh(0)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":2.0}
    "#]],
    );
}

#[test]
fn conversion_and_type_functions() {
    check_expr(
        "int(payload.temp)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":31}
    "#]],
    );
    check_expr(
        "int(-1.5)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":-2}
    "#]],
    );
    check_expr(
        "int('42')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":42}
    "#]],
    );
    check_expr(
        "int(true)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1}
    "#]],
    );
    check_expr(
        "int('abc')",
        P,
        expect![[r#"
        dead-letter[r] t: int: cannot convert string 'abc'
    "#]],
    );
    check_expr(
        "float(payload.n)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":7.0}
    "#]],
    );
    check_expr(
        "float('3.14159', 2)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3.14}
    "#]],
    );
    check_expr(
        "str(payload.temp)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"31.5"}
    "#]],
    );
    check_expr(
        "str(payload.obj)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"{\"a\":{\"b\":true}}"}
    "#]],
    );
    check_expr(
        "str(1.0)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"1.0"}
    "#]],
    );
    check_expr(
        "bool('true')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":true}
    "#]],
    );
    check_expr(
        "bool(0)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":false}
    "#]],
    );
    check_expr(
        "bool('yes')",
        P,
        expect![[r#"
        dead-letter[r] t: bool: cannot convert string 'yes'
    "#]],
    );
    check_expr(
        "coalesce(payload.missing, payload.nul, 'fallback')",
        P,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"v":null}
        "#]],
    );
    check_expr(
        "is_null(payload.missing)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":true}
    "#]],
    );
    check_expr(
        "is_not_null(payload.n)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":true}
    "#]],
    );
    check_expr(
        "[is_str(payload.s), is_num(payload.n), is_int(payload.temp), is_float(payload.temp), is_bool(true), is_map(payload.obj), is_array(payload.arr)]",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":[true,true,false,true,true,true,true]}
    "#]],
    );
}

#[test]
fn string_functions() {
    check_expr(
        "lower(payload.s)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"hello"}
    "#]],
    );
    check_expr(
        "upper(payload.s)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"HELLO"}
    "#]],
    );
    check_expr(
        "concat(payload.s, ' ', payload.n, ' ', true)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"Hello 7 true"}
    "#]],
    );
    check_expr(
        "concat(payload.s, payload.missing)",
        P,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"v":"Helloundefined"}
        "#]],
    );
    check_expr(
        "substr(payload.s, 1)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"ello"}
    "#]],
    );
    check_expr(
        "substr(payload.s, 1, 3)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"ell"}
    "#]],
    );
    check_expr(
        "substr('héllo', 1, 2)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"él"}
    "#]],
    );
    check_expr(
        "substr(payload.s, 10)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":""}
    "#]],
    );
    check_expr(
        "split('a/b//c', '/')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":["a","b","c"]}
    "#]],
    );
    check_expr(
        "split('a/b/c', '/', 'leading')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":["a","b/c"]}
    "#]],
    );
    check_expr(
        "split('a/b/c', '/', 'trailing')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":["a/b","c"]}
    "#]],
    );
    check_expr(
        "replace('a-b-c', '-', '+')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"a+b+c"}
    "#]],
    );
    check_expr(
        "replace('a-b-c', '-', '+', 'trailing')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"a-b+c"}
    "#]],
    );
    check_expr(
        "trim('  x  ') || '|' || ltrim('  x  ') || '|' || rtrim('  x  ') || '|'",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"x|x  |  x|"}
    "#]],
    );
    check_expr(
        "regex_match(payload.s, 'l+')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":true}
    "#]],
    );
    check_expr(
        "regex_replace(payload.s, '(l+)', '[\\1]')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"He[ll]o"}
    "#]],
    );
    check_expr(
        "regex_replace(payload.s, '[aeiou]', '*')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"H*ll*"}
    "#]],
    );
    check_expr(
        "regex_match(payload.s, payload.pattern)",
        r#"{"s":"abc","pattern":"^a"}"#,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":true}
    "#]],
    );
    check_expr(
        "regex_match(payload.s, payload.pattern)",
        r#"{"s":"abc","pattern":"("}"#,
        expect![[r#"
        dead-letter[r] t: regex_match: invalid regular expression: regex parse error:
            (
            ^
        error: unclosed group
    "#]],
    );
    check_expr(
        "strlen('héllo')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":5}
    "#]],
    );
    check_expr(
        "find('a/b/c', '/')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"/b/c"}
    "#]],
    );
    check_expr(
        "find('a/b/c', '/', 'trailing')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"/c"}
    "#]],
    );
    check_expr(
        "find('abc', 'x')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":""}
    "#]],
    );
    check_expr(
        "reverse('abc')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"cba"}
    "#]],
    );
    check_expr(
        "length(payload.arr)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":3}
    "#]],
    );
    check_expr(
        "nth(2, payload.arr)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":20}
    "#]],
    );
    check_expr(
        "contains(20, payload.arr)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":true}
    "#]],
    );
}

#[test]
fn time_functions() {
    check_expr(
        "now_timestamp()",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1708671600}
    "#]],
    );
    check_expr(
        "now_timestamp('millisecond')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1708671600123}
    "#]],
    );
    check_expr(
        "now('millisecond')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1708671600123}
    "#]],
    );
    check_expr(
        "unix_ts_to_rfc3339(1708671600)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"2024-02-23T07:00:00Z"}
    "#]],
    );
    check_expr(
        "unix_ts_to_rfc3339(timestamp, 'millisecond')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"2024-02-23T07:00:00.123Z"}
    "#]],
    );
    check_expr(
        "rfc3339_to_unix_ts('2024-02-23T15:00:00+08:00')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1708671600}
    "#]],
    );
    check_expr(
        "rfc3339_to_unix_ts('2024-02-23T07:00:00.5Z', 'millisecond')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1708671600500}
    "#]],
    );
    check_expr(
        "rfc3339_to_unix_ts('yesterday')",
        P,
        expect![[r#"
        dead-letter[r] t: rfc3339_to_unix_ts: `yesterday` is not an RFC 3339 timestamp (e.g. `2024-02-23T07:00:00Z`)
    "#]],
    );
    check_expr(
        "format_date('millisecond', '+08:00', '%Y-%m-%d %H:%M:%S.%3N%:z', timestamp)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"2024-02-23 15:00:00.123+08:00"}
    "#]],
    );
    check_expr(
        "format_time(timestamp)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"2024-02-23T07:00:00.123Z"}
    "#]],
    );
    check_expr(
        "parse_time('2024-02-23T07:00:00.123Z')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":1708671600123}
    "#]],
    );
}

#[test]
fn encoding_functions() {
    check_expr(
        "base64_encode('hello')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"aGVsbG8="}
    "#]],
    );
    check_expr(
        "base64_decode('aGVsbG8=')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"hello"}
    "#]],
    );
    check_expr(
        "base64_decode('not base64!')",
        P,
        expect![[r#"
        dead-letter[r] t: base64_decode: Invalid symbol 32, offset 3.
    "#]],
    );
    check_expr(
        "bin2hexstr('AB')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"4142"}
    "#]],
    );
    check_expr(
        "hex_encode('AB')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"4142"}
    "#]],
    );
    check_expr(
        "hexstr2bin('4142')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"AB"}
    "#]],
    );
    check_expr(
        "hex_decode('4142')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"AB"}
    "#]],
    );
    check_expr(
        "base64_encode(hexstr2bin('FF00'))",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"/wA="}
    "#]],
    );
    check_expr(
        "json_encode(payload.obj)",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":"{\"a\":{\"b\":true}}"}
    "#]],
    );
    check_expr(
        "json_decode('{\"k\": [1, 2]}')",
        P,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":{"k":[1,2]}}
    "#]],
    );
    check_expr(
        "json_decode(payload.s)",
        P,
        expect![[r#"
        dead-letter[r] t: json_decode: expected value at line 1 column 1
    "#]],
    );
}

#[test]
fn lookup_enriches_from_tables() {
    check(
        &one(r#"SELECT payload.device AS device, lookup('devices', payload.device, 'site') AS site,
                       lookup('devices', payload.device).max_temp AS max_temp,
                       lookup('devices', 'nope', 'site') AS unknown
                FROM "t" WHERE payload.temp < lookup('devices', payload.device, 'max_temp')"#),
        "t",
        P,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"device":"d1","site":"plant-a","max_temp":80,"unknown":null}
        "#]],
    );
    let toml_table = "[[table]]\nname = \"reg\"\nfile = \"devices.toml\"\nkey = \"device\"\n\n[[table]]\nname = \"inline\"\n[table.rows.d1]\nline = 4\n\n[[rule]]\nname = \"r\"\nsql = '''SELECT lookup('reg', topic(2), 'site') AS site, lookup('inline', topic(2), 'line') AS line FROM \"s/+\"'''\n[[rule.action]]\ntype = \"forward\"\n";
    check(
        toml_table,
        "s/d1",
        "{}",
        expect![[r#"
        forward[r] s/d1 qos=1 prio=5 {"site":"plant-a","line":4}
    "#]],
    );
}

#[test]
fn actions_templates_and_formats() {
    let rules = r##"
[[table]]
name = "devices"
file = "devices.csv"

[[rule]]
name = "hot"
sql = '''SELECT topic(2) AS device, lookup('devices', topic(2), 'site') AS site, payload.temp AS temp
         FROM "sensors/+/temp" WHERE payload.temp > 30'''

[[rule.action]]
type = "forward"
topic = "sites/${site}/alerts/${device}"
qos = 2
priority = 1
ttl = "1h"

[[rule.action]]
type = "forward"
topic = "raw/${device}"
format = "raw"

[[rule.action]]
type = "forward"
format = "cbor"
qos = 0

[[rule.action]]
type = "republish"
topic = "local/${device}/hot"

[[rule.action]]
type = "drop"

[[rule]]
name = "all"
sql = 'SELECT payload.temp AS temp FROM "sensors/#"'
[[rule.action]]
type = "forward"

[[rule]]
name = "off"
enabled = false
sql = 'SELECT * FROM "#"'
[[rule.action]]
type = "forward"
"##;
    check(
        rules,
        "sensors/d1/temp",
        r#"{"temp":31.5}"#,
        expect![[r#"
            forward[hot] sites/plant-a/alerts/d1 qos=2 prio=1 ttl=3600s {"device":"d1","site":"plant-a","temp":31.5}
            forward[hot] raw/d1 qos=1 prio=5 {"temp":31.5}
            forward[hot] sensors/d1/temp qos=0 prio=5 cbor:{"device":"d1","site":"plant-a","temp":31.5}
            republish[hot] local/d1/hot qos=1 hops=1 {"device":"d1","site":"plant-a","temp":31.5}
            dropped[hot]
            forward[all] sensors/d1/temp qos=1 prio=5 {"temp":31.5}
        "#]],
    );
    check(
        rules,
        "sensors/d9/temp",
        r#"{"temp":31.5}"#,
        expect![[r#"
        dead-letter[hot] sensors/d9/temp: topic template: `${site}` is NULL
        forward[hot] raw/d9 qos=1 prio=5 {"temp":31.5}
        forward[hot] sensors/d9/temp qos=0 prio=5 cbor:{"device":"d9","site":null,"temp":31.5}
        republish[hot] local/d9/hot qos=1 hops=1 {"device":"d9","site":null,"temp":31.5}
        dropped[hot]
        forward[all] sensors/d9/temp qos=1 prio=5 {"temp":31.5}
    "#]],
    );
    check(rules, "other", r#"{"temp":31.5}"#, expect![[""]]);
}

#[test]
fn dead_letter_actions_send_events_there_on_purpose() {
    let rules = r#"
[[rule]]
name = "no-temp"
sql = 'SELECT topic(2) AS device FROM "sensors/+/temp" WHERE payload.temp IS NULL'
[[rule.action]]
type = "dead_letter"
reason = "no temperature from ${device} (${clientid}, ${map_size(payload)} fields)"

[[rule]]
name = "quarantine"
sql = 'SELECT 1 AS one FROM "sensors/quarantined/#"'
[[rule.action]]
type = "dead_letter"
[[rule.action]]
type = "forward"
topic = "audit/quarantine"
"#;
    check(
        rules,
        "sensors/d1/temp",
        r#"{"humidity":3,"x":1}"#,
        expect![[r#"
        dead-letter-action[no-temp] sensors/d1/temp: no temperature from d1 (c1, 2 fields)
    "#]],
    );
    check(rules, "sensors/d1/temp", r#"{"temp":3}"#, expect![[""]]);
    check(
        rules,
        "sensors/quarantined/temp",
        "{}",
        expect![[r#"
        dead-letter-action[no-temp] sensors/quarantined/temp: no temperature from quarantined (c1, 0 fields)
        dead-letter-action[quarantine] sensors/quarantined/temp: dead_letter action
        forward[quarantine] audit/quarantine qos=1 prio=5 {"one":1}
    "#]],
    );
    // A reason that cannot be rendered is a failure of its own.
    let failing_reason = "[[rule]]\nname = \"r\"\nsql = 'SELECT 1 AS one FROM \"t\"'\n[[rule.action]]\ntype = \"dead_letter\"\nreason = '${sqrt(-1)}'\n";
    check(
        failing_reason,
        "t",
        "{}",
        expect![[r#"
        dead-letter[r] t: reason template: `${sqrt(-1)}`: sqrt: argument out of domain (result is NaN)
    "#]],
    );
    check(
        "[[rule]]\nname = \"r\"\nsql = 'SELECT 1 AS one FROM \"t\"'\n[[rule.action]]\ntype = \"dead_letter\"\ntopic = \"x\"\n",
        "t",
        "{}",
        expect![[r#"
            error: invalid rules file: TOML parse error at line 4, column 1
              |
            4 | [[rule.action]]
              | ^^^^^^^^^^^^^^^
            unknown field `topic`, expected `reason`
        "#]],
    );
}

#[test]
fn payload_templates_write_the_payload_as_given() {
    let rules = r#"
[[table]]
name = "devices"
file = "devices.csv"

[[rule]]
name = "fan"
sql = 'SELECT topic(2) AS device, payload.temp AS temp FROM "sensors/+/temp" WHERE payload.temp > 30'
[[rule.action]]
type = "republish"
topic = "actuators/${device}/fan"
payload = '{"cmd":"fan_on"}'
[[rule.action]]
type = "forward"
topic = "alerts/${lookup('devices', device, 'site')}/${upper(device)}"
payload = '''{"device":"${device}","temp":${temp},"f":${temp * 1.8 + 32},"site":${lookup('devices', device)},"missing":${payload.missing},"who":"${clientid}"}'''
[[rule.action]]
type = "forward"
topic = "text/${device}"
payload = '''${device} is at ${temp} °C
since ${format_time(timestamp)}'''
"#;
    check(
        rules,
        "sensors/d1/temp",
        r#"{"temp":31.5}"#,
        expect![[r#"
        republish[fan] actuators/d1/fan qos=1 hops=1 {"cmd":"fan_on"}
        forward[fan] alerts/plant-a/D1 qos=1 prio=5 {"device":"d1","temp":31.5,"f":88.7,"site":{"device":"d1","site":"plant-a","line":1,"max_temp":80},"missing":null,"who":"c1"}
        forward[fan] text/d1 qos=1 prio=5 d1 is at 31.5 °C
        since 2024-02-23T07:00:00.123Z
    "#]],
    );
    // An expression that fails fails its action only.
    check(
        rules,
        "sensors/d9/temp",
        r#"{"temp":31.5}"#,
        expect![[r#"
        republish[fan] actuators/d9/fan qos=1 hops=1 {"cmd":"fan_on"}
        dead-letter[fan] sensors/d9/temp: topic template: `${lookup('devices', device, 'site')}` is NULL
        forward[fan] text/d9 qos=1 prio=5 d9 is at 31.5 °C
        since 2024-02-23T07:00:00.123Z
    "#]],
    );
    let both = "[[rule]]\nname = \"r\"\nsql = 'SELECT 1 AS one FROM \"t\"'\n[[rule.action]]\ntype = \"forward\"\npayload = 'x'\nformat = \"raw\"\n";
    check(
        both,
        "t",
        "{}",
        expect![[r#"
        error: rule `r`: action[0]: give `format` or a `payload` template, not both (a template is sent as written)
    "#]],
    );
}

#[test]
fn template_expressions_read_the_event_and_compile_once_with_carets() {
    // Only a template reads the payload: it is decoded for it, field by field.
    let rules = "[[rule]]\nname = \"r\"\nsql = 'SELECT 1 AS one FROM \"s/#\"'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"by-device/${payload.dev}/${topic(2)}/${hops}\"\n";
    check(
        rules,
        "s/x",
        r#"{"dev":"d7","other":[1,2]}"#,
        expect![[r#"
        forward[r] by-device/d7/x/0 qos=1 prio=5 {"one":1}
    "#]],
    );
    check(
        rules,
        "s",
        r#"{"dev":"d7"}"#,
        expect![[r#"
        dead-letter[r] s: topic template: `${topic(2)}` is NULL
    "#]],
    );
    let bad = |topic: &str| {
        format!(
            "[[rule]]\nname = \"r\"\nsql = 'SELECT 1 AS one FROM \"t\"'\n[[rule.action]]\ntype = \"forward\"\ntopic = '''{topic}'''\n"
        )
    };
    check(
        &bad("a/${topik(2)}/${one}"),
        "t",
        "{}",
        expect![[r#"
            error: line 6, column 16: rule `r`: action[0].topic `a/${topik(2)}/${one}`: unknown function `topik`; did you mean `topic`?
              |
            6 | a/${topik(2)}/${one}
              |     ^^^^^
        "#]],
    );
    check(
        &bad("a/${1 +}/${one two}/${'}'}"),
        "t",
        "{}",
        expect![[r#"
            error: line 6, column 19: rule `r`: action[0].topic `a/${1 +}/${one two}/${'}'}`: syntax error: Expected: an expression, found: EOF
              |
            6 | a/${1 +}/${one two}/${'}'}
              |        ^
        "#]],
    );
    check(
        &bad("${one two}"),
        "t",
        "{}",
        expect![[r#"
            error: line 6, column 18: rule `r`: action[0].topic `${one two}`: expected one expression, found `two` after it
              |
            6 | ${one two}
              |       ^^^
        "#]],
    );
    check(
        &bad("${one"),
        "t",
        "{}",
        expect![[r#"
        error: rule `r`: action[0].topic: template `${one`: `${` without a closing `}`
    "#]],
    );
    check(
        &bad("x/${one}\n${\n  upper(nope)}"),
        "t",
        "{}",
        expect![[r#"
            error: line 8, column 9: rule `r`: action[0].topic `x/${one}…`: unknown field `nope`; did you mean `hops`?
              |
            8 |   upper(nope)}
              |         ^^^^
        "#]],
    );
}

#[test]
fn hop_limit_stops_republish_loops() {
    let rules = "max_hops = 2\n[[rule]]\nname = \"echo\"\nsql = 'SELECT payload FROM \"loop/#\"'\n[[rule.action]]\ntype = \"republish\"\ntopic = \"loop/again\"\nqos = 0\n";
    check(
        rules,
        "loop/a",
        "{}",
        expect![[r#"
            republish[echo] loop/again qos=0 hops=1 {"payload":"{}"}
        "#]],
    );
    check(
        rules,
        "hops=1 loop/a",
        "{}",
        expect![[r#"
            republish[echo] loop/again qos=0 hops=2 {"payload":"{}"}
        "#]],
    );
    check(
        rules,
        "hops=2 loop/a",
        "{}",
        expect![[r#"
        loop-prevented[echo] loop/again hops=2
    "#]],
    );
}

#[test]
fn failures_are_dead_letters_and_other_rules_still_run() {
    let rules = r#"
[[rule]]
name = "strict"
payload = "json"
sql = 'SELECT payload.a AS a FROM "t"'
[[rule.action]]
type = "forward"

[[rule]]
name = "lenient"
sql = 'SELECT payload AS p FROM "t"'
[[rule.action]]
type = "forward"

[[rule]]
name = "meta-only"
payload = "cbor"
sql = 'SELECT clientid FROM "t"'
[[rule.action]]
type = "forward"

[[rule]]
name = "template"
sql = 'SELECT topic(9) AS site FROM "t"'
[[rule.action]]
type = "forward"
topic = "x/${site}"
[[rule.action]]
type = "drop"
"#;
    check(
        rules,
        "t",
        "{broken",
        expect![[r#"
        dead-letter[strict] t: payload is not valid JSON: key must be a string at line 1 column 2
        forward[lenient] t qos=1 prio=5 {"p":"{broken"}
        forward[meta-only] t qos=1 prio=5 {"clientid":"c1"}
        dead-letter[template] t: topic template: `${site}` is NULL
        dropped[template]
    "#]],
    );
}

#[test]
fn cbor_and_raw_payloads() {
    let rules = r#"
[[rule]]
name = "cbor"
payload = "cbor"
sql = 'SELECT payload.temp AS temp, payload.bin AS bin FROM "t"'
[[rule.action]]
type = "forward"
format = "cbor"
"#;
    check(
        rules,
        "t",
        r#"cbor:{"temp": 21.5, "bin": "x"}"#,
        expect![[r#"
        forward[cbor] t qos=1 prio=5 cbor:{"temp":21.5,"bin":"x"}
    "#]],
    );
    check(
        rules,
        "t",
        r#"{"temp": 21.5}"#,
        expect![[r#"
        dead-letter[cbor] t: payload is not valid CBOR: unexpected end of data
    "#]],
    );
    // Auto-detection: CBOR by its first byte, JSON if it parses, otherwise raw text or bytes.
    let auto = &one(r#"SELECT payload AS p, is_str(payload) AS text FROM "t""#);
    check(
        auto,
        "t",
        r#"cbor:{"a": [1, 2]}"#,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"p":{"a":[1,2]},"text":false}
    "#]],
    );
    check(
        auto,
        "t",
        "42",
        expect![[r#"
            forward[r] t qos=1 prio=5 {"p":"42","text":true}
        "#]],
    );
    check(
        auto,
        "t",
        "plain text",
        expect![[r#"
        forward[r] t qos=1 prio=5 {"p":"plain text","text":true}
    "#]],
    );
    check(
        auto,
        "t",
        "hex:fffe00",
        expect![[r#"
        forward[r] t qos=1 prio=5 {"p":"//4A","text":false}
    "#]],
    );
    let raw = "[[rule]]\nname = \"raw\"\npayload = \"raw\"\nsql = 'SELECT payload AS p FROM \"t\"'\n[[rule.action]]\ntype = \"forward\"\n";
    check(
        raw,
        "t",
        r#"{"a":1}"#,
        expect![[r#"
        forward[raw] t qos=1 prio=5 {"p":"{\"a\":1}"}
    "#]],
    );
}

#[test]
fn empty_rule_set_is_valid() {
    check("", "t", "{}", expect![[""]]);
    assert!(RuleSet::empty().is_empty());
}

#[test]
fn compile_errors_point_at_the_sql() {
    check(
        &one(r#"SELECT payload.temp FROM "t" WHERE"#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 44: rule `r`: syntax error: Expected: an expression, found: EOF
          |
        7 | SELECT payload.temp FROM "t" WHERE
          |                                   ^
    "#]],
    );
    check(
        &one(r#"SELECT rond(payload.temp) AS r FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 17: rule `r`: unknown function `rond`; did you mean `round`?
          |
        7 | SELECT rond(payload.temp) AS r FROM "t"
          |        ^^^^
    "#]],
    );
    // In a template, whose names are the rule's own columns and fields, an unknown name
    // stays an error (in the statement it reads as NULL, with a warning).
    check(
        &one(r#"SELECT topic AS t FROM "t""#)
            .replace("type = \"forward\"\n", "type = \"forward\"\ntopic = \"x/${topik}\"\n"),
        "t",
        "{}",
        expect![[r#"
            error: line 10, column 14: rule `r`: action[0].topic `x/${topik}`: unknown field `topik`; did you mean `topic`?
               |
            10 | x/${topik}
               |     ^^^^^
        "#]],
    );
    check(
        &one(r##"SELECT 1 AS one FROM "sensors/#/temp""##),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 31: rule `r`: topic filter `sensors/#/temp`: `#` must be the last level and stand alone (e.g. `sensors/#`)
          |
        7 | SELECT 1 AS one FROM "sensors/#/temp"
          |                      ^^^^^^^^^^^^^^^^
    "#]],
    );
    check(
        &one(r#"SELECT 1 AS one FROM sensors"#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 31: rule `r`: write the topic filter in double quotes: FROM "sensors"
          |
        7 | SELECT 1 AS one FROM sensors
          |                      ^^^^^^^
    "#]],
    );
    check(
        &one(r#"SELECT lookup('device', clientid) AS d FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 24: rule `r`: unknown table `device`; did you mean `devices`?
          |
        7 | SELECT lookup('device', clientid) AS d FROM "t"
          |               ^^^^^^^^
    "#]],
    );
    check(
        &one(r#"SELECT lookup('devices', clientid, 'sit') AS d FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 45: rule `r`: table `devices` has no column `sit`; did you mean `site`?
          |
        7 | SELECT lookup('devices', clientid, 'sit') AS d FROM "t"
          |                                    ^^^^^
    "#]],
    );
    check(
        &one(r#"SELECT payload.arr[0] AS d FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 29: rule `r`: indexes start at 1, as in EMQX: [1] is the first element, [-1] the last
          |
        7 | SELECT payload.arr[0] AS d FROM "t"
          |                    ^
    "#]],
    );
    check(
        &one(r#"SELECT round(1, 2, 3) AS d FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 17: rule `r`: `round` takes 1 argument(s), got 3
          |
        7 | SELECT round(1, 2, 3) AS d FROM "t"
          |        ^^^^^^^^^^^^^
    "#]],
    );
    check(
        &one(r#"SELECT regex_match(payload.s, '(') AS d FROM "t""#),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 40: rule `r`: invalid regular expression: regex parse error:
            (
            ^
        error: unclosed group
          |
        7 | SELECT regex_match(payload.s, '(') AS d FROM "t"
          |                               ^^^
    "#]],
    );
    check(
        &one("SELECT payload.a AS a,\n       uper(payload.b) AS b\nFROM \"t\"\nWHERE lower(clientid, 'x')"),
        "t",
        "{}",
        expect![[r#"
            error: line 8, column 8: rule `r`: unknown function `uper`; did you mean `upper`?
              |
            8 |        uper(payload.b) AS b
              |        ^^^^
            line 10, column 7: rule `r`: `lower` takes 1 argument(s), got 2
               |
            10 | WHERE lower(clientid, 'x')
               |       ^^^^^^^^^^^^^^^^^^^
        "#]],
    );
}

#[test]
fn long_operator_chains_are_refused_not_overflowed() {
    let chain = vec!["1"; 5000].join(" + ");
    check(
        &one(&format!("SELECT {chain} AS v FROM \"t\"")),
        "t",
        "{}",
        expect![[r#"
        error: rule `r`: the statement has 4999 operators; at most 100 are allowed (split the rule)
    "#]],
    );
    let chain = vec!["payload.a = 1"; 3000].join(" AND ");
    check(
        &one(&format!("SELECT 1 AS v FROM \"t\" WHERE {chain}")),
        "t",
        "{}",
        expect![[r#"
        error: rule `r`: the statement has 5999 operators; at most 100 are allowed (split the rule)
    "#]],
    );
    let nested = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
    check(
        &one(&format!("SELECT {nested} AS v FROM \"t\"")),
        "t",
        "{}",
        expect![[r#"
        error: rule `r`: syntax error: recursion limit exceeded
    "#]],
    );
    let mut doubling = String::from("SELECT payload.x AS a0");
    for idx in 1..40 {
        doubling.push_str(&format!(", a{} + a{} AS a{idx}", idx - 1, idx - 1));
    }
    check(
        &one(&format!("{doubling} FROM \"t\"")),
        "t",
        "{}",
        expect![[r#"
        error: line 7, column 239: rule `r`: expression too large (more than 20000 nodes or 160 levels deep after expanding aliases)
          |
        7 | SELECT payload.x AS a0, a0 + a0 AS a1, a1 + a1 AS a2, a2 + a2 AS a3, a3 + a3 AS a4, a4 + a4 AS a5, a5 + a5 AS a6, a6 + a6 AS a7, a7 + a7 AS a8, a8 + a8 AS a9, a9 + a9 AS a10, a10 + a10 AS a11, a11 + a11 AS a12, a12 + a12 AS a13, a13 + a13 AS a14, a14 + a14 AS a15, a15 + a15 AS a16, a16 + a16 AS a17, a17 + a17 AS a18, a18 + a18 AS a19, a19 + a19 AS a20, a20 + a20 AS a21, a21 + a21 AS a22, a22 + a22 AS a23, a23 + a23 AS a24, a24 + a24 AS a25, a25 + a25 AS a26, a26 + a26 AS a27, a27 + a27 AS a28, a28 + a28 AS a29, a29 + a29 AS a30, a30 + a30 AS a31, a31 + a31 AS a32, a32 + a32 AS a33, a33 + a33 AS a34, a34 + a34 AS a35, a35 + a35 AS a36, a36 + a36 AS a37, a37 + a37 AS a38, a38 + a38 AS a39 FROM "t"
          |                                                                                                                                                                                                                                      ^^^^^^^^^
        line 7, column 491: rule `r`: expression too large (more than 20000 nodes or 160 levels deep after expanding aliases)
          |
        7 | SELECT payload.x AS a0, a0 + a0 AS a1, a1 + a1 AS a2, a2 + a2 AS a3, a3 + a3 AS a4, a4 + a4 AS a5, a5 + a5 AS a6, a6 + a6 AS a7, a7 + a7 AS a8, a8 + a8 AS a9, a9 + a9 AS a10, a10 + a10 AS a11, a11 + a11 AS a12, a12 + a12 AS a13, a13 + a13 AS a14, a14 + a14 AS a15, a15 + a15 AS a16, a16 + a16 AS a17, a17 + a17 AS a18, a18 + a18 AS a19, a19 + a19 AS a20, a20 + a20 AS a21, a21 + a21 AS a22, a22 + a22 AS a23, a23 + a23 AS a24, a24 + a24 AS a25, a25 + a25 AS a26, a26 + a26 AS a27, a27 + a27 AS a28, a28 + a28 AS a29, a29 + a29 AS a30, a30 + a30 AS a31, a31 + a31 AS a32, a32 + a32 AS a33, a33 + a33 AS a34, a34 + a34 AS a35, a35 + a35 AS a36, a36 + a36 AS a37, a37 + a37 AS a38, a38 + a38 AS a39 FROM "t"
          |                                                                                                                                                                                                                                                                                                                                                                                                                                                                                                  ^^^^^^^^^
    "#]],
    );
    // A chain near the operator limit inside deep nesting, on a 2 MiB (debug) test stack.
    let chain = vec!["payload.n"; 99].join(" + ");
    let nested = format!("{}{chain}{}", "abs(".repeat(14), ")".repeat(14));
    check(
        &one(&format!("SELECT {nested} AS v FROM \"t\" WHERE v > 0")),
        "t",
        r#"{"n": 1}"#,
        expect![[r#"
        forward[r] t qos=1 prio=5 {"v":99}
    "#]],
    );
}

#[test]
fn rules_file_errors_name_the_rule_and_key() {
    check(
        "[[rule]]\nname = \"a\"\nsql = 'SELECT 1 AS x FROM \"t\"'\nsqll = 1\n",
        "t",
        "{}",
        expect![[r#"
        error: invalid rules file: TOML parse error at line 4, column 1
          |
        4 | sqll = 1
          | ^^^^
        unknown field `sqll`, expected one of `name`, `sql`, `enabled`, `payload`, `action`, `max_groups`, `event_time`, `late_tolerance`, `idle_timeout`, `late`
    "#]],
    );
    check(
        "[[rule]]\nname = \"a\"\nsql = 'SELECT 1 AS x FROM \"t\"'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"x/${y}\"\npriority = 12\nqos = 3\n",
        "t",
        "{}",
        expect![[r#"
            error: line 6, column 14: rule `a`: action[0].topic `x/${y}`: unknown field `y`; did you mean `x`?
              |
            6 | x/${y}
              |     ^
            rule `a`: action[0].qos = 3: QoS is 0, 1 or 2
            rule `a`: action[0].priority = 12: priorities are 0 (most urgent) to 9
        "#]],
    );
    check(
        "[[rule]]\nname = \"a\"\nsql = 'SELECT 1 AS x FROM \"t\"'\n",
        "t",
        "{}",
        expect![[r#"
            error: rule `a`: no actions; add `[[rule.action]]` with `type = "forward"`, "republish", "drop" or "dead_letter"
        "#]],
    );
    check(
        "[[rule]]\nname = \"a\"\nsql = 'SELECT 1 AS x FROM \"t\"'\n[[rule.action]]\ntype = \"forwrd\"\n",
        "t",
        "{}",
        expect![[r#"
            error: invalid rules file: TOML parse error at line 5, column 8
              |
            5 | type = "forwrd"
              |        ^^^^^^^^
            unknown variant `forwrd`, expected one of `forward`, `republish`, `drop`, `dead_letter`
        "#]],
    );
    check(
        "[[table]]\nname = \"t1\"\nfile = \"missing.csv\"\n[[rule]]\nname = \"a\"\nsql = 'SELECT 1 AS x FROM \"t\"'\n[[rule.action]]\ntype = \"drop\"\n[[rule]]\nname = \"a\"\nsql = 'SELECT 1 AS x FROM \"t\"'\n[[rule.action]]\ntype = \"drop\"\n",
        "t",
        "{}",
        expect![[r#"
            error: table `t1`: the text of `missing.csv` was not supplied (TableSources::with_text)
            rule `a`: another rule has the same name; names must be unique
        "#]],
    );
}

#[test]
fn flat_rows_replace_repeated_names_in_place() {
    // Rows of one-level columns are built from a layout worked out at compile time; a
    // repeated name keeps its first place and takes the last value, as `Value::insert` does.
    check(
        &format!(
            "{}[[rule.action]]\ntype = \"republish\"\ntopic = \"out/${{topic}}/${{a}}\"\nformat = \"cbor\"\n",
            one(
                r#"SELECT *, 'x' AS topic, 1 AS a, payload.n AS a, lookup('devices', payload.device) AS row FROM "t""#
            )
        ),
        "t",
        r#"{"n": 7, "device": "d1"}"#,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"id":42,"topic":"x","clientid":"c1","username":null,"qos":1,"timestamp":1708671600123,"payload":"{\"n\": 7, \"device\": \"d1\"}","a":7,"row":{"device":"d1","site":"plant-a","line":1,"max_temp":80}}
            republish[r] out/x/7 qos=1 hops=1 cbor:{"id":42,"topic":"x","clientid":"c1","username":null,"qos":1,"timestamp":1708671600123,"payload":"{\"n\": 7, \"device\": \"d1\"}","a":7,"row":{"device":"d1","site":"plant-a","line":1,"max_temp":80}}
        "#]],
    );
    // A nested column makes the row an object built column by column, as before.
    check(
        &one(r#"SELECT payload.obj.a AS payload, payload.obj.a.b, 2 AS n, 3 AS n FROM "t""#),
        "t",
        r#"{"obj": {"a": {"b": true, "c": 1}}}"#,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"payload":{"b":true,"c":1,"obj":{"a":{"b":null}}},"n":3}
        "#]],
    );
}

#[test]
fn field_decoding_matches_whole_decoding() {
    // Rule `r` alone reads only top-level fields, so the rule set decodes just those; next
    // to a rule that reads the whole payload, it decodes whole values. `r` must not notice.
    let r = r#"SELECT payload.a AS a, payload.b.c AS c, payload.l[-1] AS last, payload.d AS d, payload.é AS e FROM "t" WHERE payload.a IS NOT NULL OR payload.b IS NULL"#;
    let alone = RuleSet::compile(&one(r), &tables()).unwrap();
    let whole_rule = "[[rule]]\nname = \"whole\"\nsql = 'SELECT payload AS p FROM \"t\"'\n[[rule.action]]\ntype = \"drop\"\n";
    let with_whole = RuleSet::compile(&format!("{}{whole_rule}", one(r)), &tables()).unwrap();
    let payloads: &[&[u8]] = &[
        br#"{"a": 1, "b": {"c": [1, {"x": "y"}]}, "l": [1, 2, 3], "d": "text", "z": {"deep": [[[]]]}}"#,
        br#"{"a": 1, "a": {"twice": true}, "d": null, "d": "last wins"}"#,
        br#"{"\u0061": "escaped key", "d": "\u00e9\n\"", "\u00e9": 1, "a\"b": 2}"#,
        "{\"é\": \"unescaped\", \"a\": -0.0, \"b\": 12345678901234567890123}".as_bytes(),
        br#"  {  "a" : [ ] , "b" : { } }  "#,
        br#"{}"#,
        br#"[{"a": 1}]"#,
        br#"42"#,
        br#""a""#,
        br#"null"#,
        br#"{"a": 1,}"#,
        br#"{"a": 1} trailing"#,
        b"{\"a\": \"\xff\"}",
        b"not json at all",
        b"",
    ];
    for payload in payloads {
        let outputs = |rules: &RuleSet| {
            let outputs: Vec<String> =
                rules.evaluate(&event("t", payload)).iter().filter(|o| o.rule() == "r").map(render).collect();
            outputs.join("\n")
        };
        assert_eq!(outputs(&alone), outputs(&with_whole), "{}", String::from_utf8_lossy(payload));
    }
}

#[test]
fn a_raw_rule_beside_field_decoding_sees_the_raw_payload() {
    let rules = format!(
        "{}[[rule]]\nname = \"raw\"\npayload = \"raw\"\nsql = 'SELECT payload.a AS a, 1 AS one FROM \"t\"'\n[[rule.action]]\ntype = \"forward\"\n",
        one(r#"SELECT payload.a AS a FROM "t""#)
    );
    check(
        &rules,
        "t",
        r#"{"a": 5}"#,
        expect![[r#"
            forward[r] t qos=1 prio=5 {"a":5}
            forward[raw] t qos=1 prio=5 {"a":null,"one":1}
        "#]],
    );
}

#[test]
fn explain_reports_each_matching_rule() {
    let rules = RuleSet::compile(&one(r#"SELECT payload.n AS n FROM "t" WHERE n > 5"#), &tables()).unwrap();
    let show = |payload: &[u8]| {
        let mut text = String::new();
        for trace in rules.explain(&event("t", payload)) {
            let outcome = match &trace.outcome {
                crate::Outcome::Selected { row } => format!("selected {}", row.to_json_string()),
                other => format!("{other:?}"),
            };
            text.push_str(&format!("{}: {outcome}\n", trace.rule));
            for output in &trace.outputs {
                text.push_str(&format!("  {}\n", render(output)));
            }
        }
        text
    };
    expect![[r#"
        r: selected {"n":7}
          forward[r] t qos=1 prio=5 {"n":7}
    "#]]
    .assert_eq(&show(br#"{"n": 7}"#));
    expect![[r#"
        r: Filtered
    "#]]
    .assert_eq(&show(br#"{"n": 1}"#));
    expect![[r#"
        r: Failed { reason: "cannot compare string 'x' with integer 5: the string is not a number (EMQX fails here too)" }
          dead-letter[r] t: cannot compare string 'x' with integer 5: the string is not a number (EMQX fails here too)
    "#]]
    .assert_eq(&show(br#"{"n": "x"}"#));
    assert!(rules.explain(&event("other", b"{}")).is_empty());
    assert_eq!(rules.rule_names().collect::<Vec<_>>(), ["r"]);
    assert_eq!(RuleSet::table_files(&one("x")).unwrap(), ["devices.csv"]);
}

#[test]
fn the_topic_index_evaluates_only_matching_rules() {
    let mut text = String::new();
    for idx in 0..1000 {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{idx}\"\nsql = 'SELECT {idx} AS n FROM \"site/{idx}/+\"'\n[[rule.action]]\ntype = \"drop\"\n"
        ));
    }
    let rules = RuleSet::compile(&text, &TableSources::new()).unwrap();
    assert_eq!(rules.len(), 1000);
    let outputs = rules.evaluate(&event("site/517/x", b"{}"));
    assert_eq!(outputs, [Output::Dropped { rule: "r517".into() }]);
}

#[test]
fn foreach_each_element_goes_through_the_actions_with_its_own_topic() {
    let rules = r#"
[[rule]]
name = "split"
sql = '''FOREACH payload.sensors AS s DO s.name AS name, s.v AS v, clientid INCASE s.idx > 1 FROM "plc/#"'''
[[rule.action]]
type = "forward"
topic = "sensors/${s.name}"
"#;
    let set = RuleSet::compile(rules, &tables()).unwrap();
    let payload =
        br#"{"sensors":[{"idx":1,"name":"a","v":1},{"idx":2,"name":"b","v":2},{"idx":3,"name":"c","v":3}]}"#;
    let outputs = set.evaluate(&event("plc/1", payload));
    let got: Vec<(String, String)> = outputs
        .iter()
        .map(|o| match o {
            Output::Forward { topic, payload, .. } => {
                (topic.clone(), String::from_utf8_lossy(payload).into_owned())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("sensors/b".to_owned(), r#"{"name":"b","v":2,"clientid":"c1"}"#.to_owned()),
            ("sensors/c".to_owned(), r#"{"name":"c","v":3,"clientid":"c1"}"#.to_owned()),
        ]
    );
    // The dry run shows every row; none kept is "filtered".
    let traces = set.explain(&event("plc/1", payload));
    match &traces[0].outcome {
        crate::Outcome::Selected { row: Value::Array(rows) } => assert_eq!(rows.len(), 2),
        other => panic!("unexpected {other:?}"),
    }
    let traces = set.explain(&event("plc/1", br#"{"sensors":[]}"#));
    assert_eq!(traces[0].outcome, crate::Outcome::Filtered);
}

#[test]
fn foreach_errors_name_the_clause() {
    for (sql, needle) in [
        (r#"FOREACH payload.s INCASE 1 DO x FROM "t""#, "FOREACH clauses go in this order"),
        (r#"FOREACH payload.s"#, "missing `FROM"),
        (r#"FOREACH payload.s DO item INCASE item > FROM "t""#, "Expected"),
    ] {
        let err = RuleSet::compile(&one(sql), &tables()).unwrap_err().to_string();
        assert!(err.contains(needle), "{sql}: {err}");
    }
    // An unknown name reads as NULL (EMQX's `undefined`) and is named by a warning.
    for (sql, needle) in [
        (r#"FOREACH payload.s DO nosuch FROM "t""#, "unknown field `nosuch`"),
        (r#"FOREACH payload.s AS s FROM "t" WHERE item = 1"#, "unknown field `item`"),
    ] {
        let rules = RuleSet::compile(&one(sql), &tables()).unwrap();
        let warnings: Vec<String> = rules.warnings().map(|w| w.to_string()).collect();
        assert!(warnings.iter().any(|w| w.contains(needle)), "{sql}: {warnings:?}");
    }
}

#[test]
fn warnings_name_never_true_comparisons_and_emqx_differences() {
    let warnings = |sql: &str| -> Vec<String> {
        RuleSet::compile(&one(sql), &tables()).unwrap().warnings().map(|w| w.to_string()).collect()
    };
    assert_eq!(warnings(r#"SELECT payload.t AS t, clientid FROM "s/#" WHERE t > 30"#), Vec::<String>::new());
    let got = warnings(
        r#"SELECT *, now_timestamp() AS now, unix_ts_to_rfc3339(timestamp) AS at, topik AS t, "celsius" AS c FROM "s/#" WHERE payload.x > NULL AND is_null(payload.y) AND payload.y = NULL AND payload.z + 1 > 'abc'"#,
    );
    let expect = [
        "unknown field `topik` reads as NULL on every event, as EMQX reads an unknown name as `undefined`; did you mean `topic`?",
        "unknown field `celsius` reads as NULL on every event, as EMQX reads an unknown name as `undefined`; EMQX reads a double-quoted word as a field name, not a string: write a string in single quotes ('text')",
        "`SELECT *` outputs",
        "`now_timestamp()` is the event's receive time",
        "`unix_ts_to_rfc3339` writes UTC",
        "an ordering comparison with NULL",
        "`= NULL` / `!= NULL`",
        "comparing a number with the text 'abc'",
    ];
    for needle in expect {
        assert!(
            got.iter().any(|w| w.starts_with("rule `r`: ") && w.contains(needle)),
            "no `{needle}` in {got:#?}"
        );
    }
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    // Once per rule, however often the rule does it.
    assert_eq!(warnings(r#"SELECT payload.a AS a FROM "s" WHERE a > NULL OR a < NULL"#).len(), 1);
    // An unknown name is not also a comparison with the NULL it reads as.
    assert_eq!(warnings(r#"SELECT 1 AS one FROM "s" WHERE node = 'n1' AND node > 1"#).len(), 1);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|i| serde_json::json!(i)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| serde_json::json!(f)),
            ".{0,8}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{1,3}|temp|n|s|arr", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A rule that touches every function with payload fields as arguments.
    fn kitchen_sink() -> RuleSet {
        let mut columns = Vec::new();
        for (idx, builtin) in crate::functions::BUILTINS.iter().enumerate() {
            let n_args = builtin.min_args.max(1).min(builtin.max_args);
            let args: Vec<String> = ["payload.a", "payload.temp", "payload.s", "payload.arr[1]"]
                .iter()
                .cycle()
                .skip(idx % 4)
                .take(n_args)
                .map(|s| s.to_string())
                .collect();
            let args = if builtin.max_args == 0 { String::new() } else { args.join(", ") };
            columns.push(format!("{}({args}) AS c{idx}", builtin.name));
        }
        let sql = format!(
            "SELECT {}, payload.a + payload.temp AS sum, payload.s || payload.n AS cat, lookup('devices', payload.s) AS row FROM \"#\" WHERE payload.temp > 1 OR payload.a IS NULL OR payload.s LIKE 'a%'",
            columns.join(", ")
        );
        let rules = format!("{}[[rule.action]]\ntype = \"forward\"\ntopic = \"x/${{c0}}\"\n", one(&sql));
        match RuleSet::compile(&rules, &tables()) {
            Ok(rules) => rules,
            Err(e) => panic!("{}", e.problems().join("\n").chars().take(2000).collect::<String>()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn evaluation_never_panics_on_json(json in arb_json()) {
            let rules = kitchen_sink();
            let bytes = serde_json::to_vec(&json).unwrap();
            let _ = rules.evaluate(&event("a/b", &bytes));
            let cbor = Value::from(json).to_cbor();
            let _ = rules.evaluate(&event("a/b", &cbor));
        }

        #[test]
        fn evaluation_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64), topic in "[a-z$/+#]{0,8}") {
            let _ = kitchen_sink().evaluate(&event(&topic, &bytes));
        }

        #[test]
        fn templates_never_panic(
            template in "([a-z/ ]|\\$\\{|\\}|'|\"|\\(|\\)|\\+|\\*|\\.|,|[0-9]|one|payload|topic|upper|\n){0,30}",
            payload in "[a-z{}\":0-9]{0,12}",
        ) {
            let toml = |key: &str| {
                format!("[[rule]]\nname = \"r\"\nsql = 'SELECT 1 AS one FROM \"#\"'\n[[rule.action]]\ntype = \"forward\"\n{key} = '''{template}'''\n")
            };
            for key in ["topic", "payload"] {
                if let Ok(rules) = RuleSet::compile(&toml(key), &tables()) {
                    let _ = rules.evaluate(&event("a/b", payload.as_bytes()));
                }
            }
        }

        #[test]
        fn compile_never_panics(text in ".{0,200}") {
            let _ = RuleSet::compile(&text, &tables());
        }

        #[test]
        fn foreach_yields_one_row_per_element(
            arr in arb_json(),
            alias in prop::option::of("s|item|x"),
            doeach in prop::option::of("(item|s|x|payload\\.arr|clientid|topic)(\\.n|\\[1\\])?( AS [a-z]{1,3})?"),
        ) {
            let name = alias.clone().unwrap_or_else(|| "item".to_owned());
            let mut sql = "FOREACH payload.arr".to_owned();
            if let Some(alias) = &alias {
                sql.push_str(&format!(" AS {alias}"));
            }
            if let Some(doeach) = &doeach {
                sql.push_str(&format!(" DO {}", doeach.replace("item", &name).replace("s.", &format!("{name}.")).replace("x.", &format!("{name}."))));
            }
            sql.push_str(" FROM \"#\"");
            let Ok(rules) = RuleSet::compile(&one(&sql), &tables()) else {
                // Only a DO naming something that is not bound may fail to compile.
                prop_assert!(doeach.is_some(), "{sql} did not compile");
                return Ok(());
            };
            let bytes = serde_json::to_vec(&serde_json::json!({ "arr": arr })).unwrap();
            let outputs = rules.evaluate(&event("a/b", &bytes));
            let expected = match &arr { serde_json::Value::Array(items) => items.len(), _ => 0 };
            let forwards = outputs.iter().filter(|o| matches!(o, Output::Forward { .. })).count();
            prop_assert_eq!(forwards, expected, "{}", sql);
        }

        #[test]
        fn ranges_slice_as_emqx_range_get(n in 0usize..8, begin in -9i64..9, end in -9i64..9) {
            let sql = format!("SELECT payload.a[{begin}..{end}] AS v FROM \"#\"");
            let compiled = RuleSet::compile(&one(&sql), &tables());
            if begin == 0 || end == 0 {
                prop_assert!(compiled.is_err(), "{sql} compiled");
                return Ok(());
            }
            let rules = compiled.unwrap();
            let items: Vec<i64> = (0..n as i64).collect();
            let bytes = serde_json::to_vec(&serde_json::json!({ "a": items })).unwrap();
            let outputs = rules.evaluate(&event("a/b", &bytes));
            // EMQX: index/2 then lists:sublist/3.
            let len = n as i64;
            let at = |i: i64| if i < 0 { len + i + 1 } else { i };
            let (first, count) = (at(begin), at(end) - at(begin) + 1);
            let expected = if first < 1 || first > len + 1 || count < 0 {
                None
            } else {
                Some(items.iter().skip((first - 1) as usize).take(count as usize).copied().collect::<Vec<_>>())
            };
            match (&outputs[..], expected) {
                ([Output::Forward { payload, .. }], Some(expected)) => {
                    let row: serde_json::Value = serde_json::from_slice(payload).unwrap();
                    prop_assert_eq!(&row["v"], &serde_json::json!(expected), "{}", sql);
                }
                ([Output::DeadLetter { .. }], None) => {}
                (other, expected) => prop_assert!(false, "{sql} on {n} elements: {other:?}, expected {expected:?}"),
            }
        }

        #[test]
        fn compile_never_panics_on_foreach(
            sql in "FOREACH( |payload|\\.|\\[|\\]|-?[0-9]|item|s|AS|,|DO|INCASE|FROM|WHERE|\"#\"|\\(|\\)|=|>|\\.\\.|json_decode|NOT|AND|'a'){0,30}",
            json in arb_json(),
        ) {
            if let Ok(rules) = RuleSet::compile(&one(&sql), &tables()) {
                let bytes = serde_json::to_vec(&json).unwrap();
                let _ = rules.evaluate(&event("a/b", &bytes));
            }
        }

        #[test]
        fn compile_never_panics_on_sql(sql in "(SELECT|FROM|WHERE|payload|\\.|\\[|\\]|-?[0-9]|'[a-z%]*'|\"[a-z/+#]*\"|[a-z_]+|\\(|\\)|,| |=|<|>|\\+|\\*|/|\\|\\||AND|OR|NOT|CASE|WHEN|THEN|END|IN|LIKE|AS|IS|NULL|=~|~| div | mod |FOREACH|DO|INCASE|\\.\\.|\\[-0\\]|\\[0\\]|AS a\\.b|AS c\\[1\\]\\.d|AS x\\[-1\\]){0,40}") {
            let _ = RuleSet::compile(&one(&sql), &tables());
        }
    }
}

/// EMQX's message metadata: `peerhost`, `flags`, `pub_props` (field names and shapes from
/// emqx_rule_events.erl: `printable_maps` turns 'User-Property' into a map and adds
/// 'User-Property-Pairs'; the flags map holds `retain` and `dup`).
mod metadata {
    use crate::{EventContext, Output, PubProps, RuleSet, TableSources};

    fn forwarded(sql: &str, event: &EventContext<'_>) -> Result<Vec<String>, String> {
        let toml =
            format!("[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\n");
        let rules = RuleSet::compile(&toml, &TableSources::new()).map_err(|e| e.to_string())?;
        Ok(rules
            .evaluate(event)
            .into_iter()
            .map(|o| match o {
                Output::Forward { payload, .. } => String::from_utf8(payload).unwrap(),
                other => format!("{other:?}"),
            })
            .collect())
    }

    fn props() -> PubProps {
        PubProps {
            content_type: Some("application/json".to_owned()),
            message_expiry_interval: Some(30),
            user_properties: vec![
                ("site".to_owned(), "plant-a".to_owned()),
                ("line".to_owned(), "1".to_owned()),
                ("site".to_owned(), "plant-b".to_owned()),
            ],
            ..PubProps::default()
        }
    }

    #[test]
    fn peerhost_and_its_function_forms() {
        let mut event = EventContext::new("t/1", b"{}");
        event.peerhost = Some("192.0.2.7");
        let out = forwarded("SELECT peerhost, peerhost() AS p, clientip() AS c FROM \"t/#\"", &event);
        assert_eq!(out.unwrap(), [r#"{"peerhost":"192.0.2.7","p":"192.0.2.7","c":"192.0.2.7"}"#]);
        let out = forwarded("SELECT 1 AS one FROM \"t/#\" WHERE peerhost = '192.0.2.8'", &event);
        assert_eq!(out.unwrap(), Vec::<String>::new());
        // An event the gateway made itself has no peer.
        let out = forwarded("SELECT peerhost FROM \"t/#\"", &EventContext::new("t/1", b"{}"));
        assert_eq!(out.unwrap(), [r#"{"peerhost":null}"#]);
    }

    #[test]
    fn flags_as_map_path_and_function() {
        let mut event = EventContext::new("t/1", b"{}");
        event.retain = true;
        let sql = "SELECT flags, flags.retain AS r, flag('dup') AS d, flags() AS f FROM \"t/#\"";
        assert_eq!(
            forwarded(sql, &event).unwrap(),
            [r#"{"flags":{"retain":true,"dup":false},"r":true,"d":false,"f":{"retain":true,"dup":false}}"#]
        );
        let out = forwarded("SELECT 1 AS one FROM \"t/#\" WHERE flags.retain = false", &event);
        assert_eq!(out.unwrap(), Vec::<String>::new());
        let out = forwarded("SELECT flag('sys') AS s FROM \"t/#\"", &event);
        assert_eq!(out.unwrap(), [r#"{"s":null}"#]);
        assert!(
            forwarded("SELECT flag(topic) AS s FROM \"t/#\"", &event).unwrap_err().contains("flag(name)")
        );
    }

    #[test]
    fn user_properties_as_emqx_shows_them() {
        let props = props();
        let mut event = EventContext::new("t/1", b"{}");
        event.pub_props = Some(&props);
        let sql = "SELECT pub_props.'User-Property'.site AS site, pub_props.'Content-Type' AS ct, \
                   pub_props.'Message-Expiry-Interval' AS exp, pub_props.'User-Property-Pairs' AS pairs \
                   FROM \"t/#\" WHERE pub_props.'User-Property'.line = '1'";
        assert_eq!(
            forwarded(sql, &event).unwrap(),
            [concat!(
                r#"{"site":"plant-b","ct":"application/json","exp":30,"pairs":"#,
                r#"[{"key":"site","value":"plant-a"},{"key":"line","value":"1"},{"key":"site","value":"plant-b"}]}"#
            )]
        );
    }

    #[test]
    fn no_properties_is_an_empty_map() {
        let event = EventContext::new("t/1", b"{}");
        let sql = "SELECT pub_props, pub_props.'User-Property'.site AS site FROM \"t/#\"";
        assert_eq!(forwarded(sql, &event).unwrap(), [r#"{"pub_props":{},"site":null}"#]);
    }

    #[test]
    fn plain_fields_still_have_no_paths() {
        let err =
            forwarded("SELECT peerhost.x AS x FROM \"t/#\"", &EventContext::new("t/1", b"{}")).unwrap_err();
        assert!(err.contains("`peerhost` has no fields"), "{err}");
    }
}

/// A JSON `null` is a value (EMQX's atom `null`), a missing field NULL (`undefined`); both
/// are written `null` in JSON output, and a topic template writes the value's text while a
/// NULL fails the action, as a topic level cannot be empty.
#[test]
fn json_null_and_null_in_output_and_templates() {
    let rules = r#"
[[rule]]
name = "r"
sql = '''SELECT payload.x AS x, payload.missing AS m, is_null(x) AS x_is_null, is_null(m) AS m_is_null FROM "t/#"'''
[[rule.action]]
type = "forward"
[[rule.action]]
type = "republish"
topic = "out/${x}"
payload = '{"x":${x},"m":${m},"text":"${str(x)}/${str(m)}"}'
[[rule.action]]
type = "republish"
topic = "out/${m}"
"#;
    check(
        rules,
        "t/1",
        r#"{"x":null}"#,
        expect![[r#"
            forward[r] t/1 qos=1 prio=5 {"x":null,"m":null,"x_is_null":false,"m_is_null":true}
            republish[r] out/null qos=1 hops=1 {"x":null,"m":null,"text":"null/undefined"}
            dead-letter[r] t/1: topic template: `${m}` is NULL
        "#]],
    );
}
