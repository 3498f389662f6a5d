//! Feeds arbitrary UTF-8 to the rules compiler, both as a whole rules file and as the SQL
//! of one rule. Compilation must return `Ok` or `Err`, never panic or hang.
//!
//! Run: `cd rules/fuzz && cargo +nightly fuzz run parse_rules`

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_rules::{RuleSet, TableSources};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let tables = TableSources::new().with_text("devices.csv", "device,site\nd1,a\n");
    let _ = RuleSet::compile(text, &tables);
    let escaped = text.replace('\'', "");
    let rules = format!(
        "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n[[rule]]\nname = \"f\"\nsql = '''{escaped}'''\n[[rule.action]]\ntype = \"drop\"\n"
    );
    let _ = RuleSet::compile(&rules, &tables);
});
