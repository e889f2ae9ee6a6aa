//! Which module may know which: the supervisor is the core, the control socket one
//! of its clients. The supervisor speaks its own types (`supervisor::VmState`,
//! `StopOutcome`, its status) and `control::server` translates them to the wire, so a
//! change of the wire format never reaches the lifecycle code (issue 10, "one
//! back-arrow"). A merge that re-exported the protocol's enums from the supervisor
//! undid this once; this test keeps it undone.

use std::path::Path;

#[test]
fn the_supervisor_never_names_the_control_layer() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/supervisor");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            assert!(
                !code.contains("control::") && !code.contains("protocol::"),
                "{}:{}: the supervisor names the control layer: {line}",
                path.display(),
                n + 1
            );
        }
    }
    assert!(files >= 5, "read {files} files under {}", dir.display());
}
