//! The configuration of transformations (the engine's tests are in `engine/tests.rs`;
//! through the binary: `tests/transformations.rs`).

use super::*;

fn destination(extra: &str) -> DestinationConfig {
    toml::from_str(&format!(
        "id = \"hook\"\ntype = \"webhook\"\nsources = [\"web\"]\nurl = \"http://127.0.0.1:9/\"\n{extra}\n"
    ))
    .unwrap()
}

fn transformations(text: &str) -> Result<Vec<TransformationConfig>, String> {
    #[derive(serde::Deserialize)]
    struct T {
        transformations: Vec<TransformationConfig>,
    }
    toml::from_str::<T>(text)
        .map(|t| t.transformations)
        .map_err(|e| e.to_string())
}

const MASK: &str = "[[transformations]]\nid = \"mask\"\ncode = \"export function transformEvent(e) { return e; }\"\n";

#[test]
fn a_destination_lists_transformations_in_order() {
    let d = destination(r#"transformations = ["mask", "mask"]"#);
    assert_eq!(d.transformations, vec!["mask", "mask"]);
    let t = transformations(MASK).unwrap();
    validate(&t, &TransformSettings::default(), &[d]).unwrap();
    assert!(destination("").transformations.is_empty());
}

#[test]
fn an_unknown_transformation_is_an_error_naming_it() {
    let d = destination(r#"transformations = ["mask", "nope"]"#);
    let t = transformations(MASK).unwrap();
    let e = validate(&t, &TransformSettings::default(), &[d])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"nope\"") && e.contains("\"hook\""), "{e}");
}

#[test]
fn file_or_code_exactly_one_and_unknown_keys_refused() {
    let both = transformations("[[transformations]]\nid = \"x\"\ncode = \"1\"\nfile = \"x.js\"\n")
        .unwrap();
    let e = validate(&both, &TransformSettings::default(), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"x\"") && e.contains("exactly one"), "{e}");
    let neither = transformations("[[transformations]]\nid = \"y\"\n").unwrap();
    assert!(validate(&neither, &TransformSettings::default(), &[]).is_err());
    let e = transformations("[[transformations]]\nid = \"z\"\ncode = \"1\"\ntimeout = \"1s\"\n")
        .unwrap_err();
    assert!(e.contains("timeout"), "{e}");
}

#[test]
fn relative_files_are_read_from_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.js"),
        "export function transformEvent(e) { return e; }",
    )
    .unwrap();
    let mut t = transformations("[[transformations]]\nid = \"m\"\nfile = \"m.js\"\n").unwrap();
    assert!(sources(&t).is_err(), "read from the working directory");
    resolve_files(&mut t, dir.path());
    assert!(sources(&t).unwrap()[0].code.contains("transformEvent"));
}
