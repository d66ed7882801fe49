//! Golden files for signature rendering: each directory under `tests/fixtures/signatures/` holds a
//! template (`template.htm`, optionally `template.txt`) and `values.json`; the rendered `.htm`,
//! `.txt`, `.rtf` and the unknown placeholders must equal `expected.*` byte for byte.
//! `UPDATE_GOLDEN=1 cargo test -p tenon-core --test signature_golden` rewrites the expectations
//! (review the diff before committing it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tenon_core::policy::signatures::{render, Rendered};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/signatures")
}

fn render_case(name: &str) -> Rendered {
    let dir = fixtures().join(name);
    let html = std::fs::read_to_string(dir.join("template.htm")).unwrap();
    let txt = std::fs::read_to_string(dir.join("template.txt")).ok();
    let values: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.json")).unwrap()).unwrap();
    render(&html, txt.as_deref(), &values)
}

#[test]
fn golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<String> =
        std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    cases.sort();
    assert!(cases.len() >= 4, "fixtures missing: {cases:?}");
    for case in cases {
        let r = render_case(&case);
        let unknown: String = r.unknown.iter().map(|u| format!("{u}\n")).collect();
        for (file, got) in [
            ("expected.htm", &r.htm),
            ("expected.txt", &r.txt),
            ("expected.rtf", &r.rtf),
            ("expected-unknown.txt", &unknown),
        ] {
            let path = fixtures().join(&case).join(file);
            if update {
                std::fs::write(&path, got).unwrap();
                continue;
            }
            let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                want == got.as_bytes(),
                "{case}/{file} differs.\n--- expected\n{}\n--- got\n{got}",
                String::from_utf8_lossy(&want)
            );
        }
    }
}

#[test]
fn hostile_job_title_is_inert_in_html_and_intact_in_text() {
    let r = render_case("escaping");
    assert!(!r.htm.contains("<script>"));
    assert!(r.htm.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;R&amp;D&quot;"));
    assert!(r.txt.contains("<script>alert(1)</script> & \"R&D\""));
    assert!(r.rtf.contains("Smith & S\\u246?hne \\{AG\\}"));
}

#[test]
fn missing_fields_remove_their_lines() {
    let r = render_case("word-table");
    assert!(!r.htm.contains("Fax:") && !r.txt.contains("Fax") && !r.rtf.contains("Fax"));
    assert!(!r.htm.contains("B\u{fc}ro:") && !r.txt.contains("B\u{fc}ro"));
    assert!(r.txt.contains("Mobil: +49 170 1234567\r\n"));
    let r = render_case("br-lines");
    assert!(!r.htm.contains("Mobile:") && !r.htm.contains("Fax:") && r.htm.contains("Phone: +1 555 0100"));
}

#[test]
fn umlauts_and_cjk_survive_in_rtf() {
    let r = render_case("word-table");
    // Jürgen Größ; Vertrieb 東京.
    assert!(r.rtf.contains("J\\u252?rgen Gr\\u246?\\u223?"), "{}", r.rtf);
    assert!(r.rtf.contains("\\u26481?\\u20140?"));
    assert!(r.rtf.is_ascii());
    let r = render_case("text-template");
    // 😀 is a surrogate pair.
    assert!(r.rtf.contains("\\u-10179?\\u-8704?"));
}

#[test]
fn unknown_placeholder_is_reported() {
    assert_eq!(render_case("text-template").unknown, ["Graph_User_JobTitel"]);
    assert!(render_case("word-table").unknown.is_empty());
}
