//! Architecture invariant: the client depends on `wharf-protocol` and on no other Wharf crate.

#[test]
fn client_depends_on_no_wharf_crate_but_the_protocol() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let wharf_dependencies: Vec<&str> = manifest
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("wharf-"))
        .filter_map(|line| line.split(['.', ' ', '=']).next())
        .collect();
    assert_eq!(wharf_dependencies, ["wharf-protocol"]);
}
