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

#[test]
fn docs_policy_states_md_lists_every_detailed_state() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/policy-states.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    for c in tenon_core::policy::state::CommonState::ALL {
        assert!(doc.contains(&format!("| `{}` |", c.as_str())), "docs/policy-states.md lacks the state {c:?}");
    }
    for (policy, state, common) in tenon_core::policy::state::DETAILED_STATES {
        let row = format!("| {policy} | `{state}` | `{}` |", common.as_str());
        assert!(doc.contains(&row), "docs/policy-states.md lacks the row {row:?}");
    }
}
