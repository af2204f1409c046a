//! Architecture invariant: the storage crate knows no async runtime and no other Wharf crate.

#[test]
fn storage_depends_on_no_runtime_and_no_other_wharf_crate() {
    let manifest = include_str!("../Cargo.toml");
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("has dependencies");
    let dependencies = dependencies.split("\n[").next().unwrap_or_default();
    for forbidden in ["tokio", "async-std", "futures", "wharf-"] {
        assert!(
            !dependencies.contains(forbidden),
            "wharf-storage must not depend on {forbidden}"
        );
    }
}
