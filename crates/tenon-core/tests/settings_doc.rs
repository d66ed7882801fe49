//! docs/settings.md is the schema's rendering: this test fails when the two drift apart.

#[test]
fn docs_settings_md_is_generated_from_the_schema() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/settings.md");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == tenon_core::schema::markdown(),
        "docs/settings.md is out of date with crates/tenon-core/src/schema.rs; regenerate it with \
         `cargo run -q -p tenonctl -- settings keys --markdown > docs/settings.md`"
    );
}
