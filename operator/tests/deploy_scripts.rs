//! The deployment scripts and examples that cannot run here (they need Docker, kind or a
//! served model) are at least well-formed: shell scripts parse with `bash -n`, Python files
//! parse, the e2e script says plainly where it runs, and its workflow runs it.

use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    // Read when the test runs, not when it was built: a test binary reused from another
    // checkout carries that checkout's folder.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("the operator crate sits in the workspace")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_root().join(relative))
        .unwrap_or_else(|e| panic!("{relative}: {e}"))
}

#[test]
fn shell_scripts_parse() {
    for script in [
        "tests/e2e/kind.sh",
        "examples/http/curl.sh",
        "scripts/chart-check.sh",
    ] {
        let output = Command::new("bash")
            .arg("-n")
            .arg(repo_root().join(script))
            .output()
            .expect("bash runs");
        assert!(
            output.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = read(script);
        assert!(
            text.lines().any(|l| l.trim() == "set -euo pipefail"),
            "{script} does not stop at the first error"
        );
    }
}

#[test]
fn python_files_parse() {
    let python = std::env::var("IMAGEGEN_PYTHON").unwrap_or_else(|_| "python3".into());
    for file in ["examples/openai_client.py", "tests/e2e/make_tiny_model.py"] {
        let output = Command::new(&python)
            .args([
                "-c",
                "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])",
            ])
            .arg(repo_root().join(file))
            .output()
            .unwrap_or_else(|e| panic!("{python} does not run: {e}"));
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn kind_script_says_where_it_runs_and_the_workflow_runs_it() {
    let script = read("tests/e2e/kind.sh");
    let note_at = script
        .find("not run in this repository's CI")
        .expect("kind.sh says that it is not run in this repository's CI");
    // The note comes before any work (the first cluster command).
    let first_work = script
        .find("kind create cluster")
        .expect("kind.sh creates a cluster");
    assert!(note_at < first_work);
    for step in [
        "docker build -f \"$root/docker/operator.Dockerfile\"",
        "docker build -f \"$root/docker/runtime.Dockerfile\"",
        "kind load docker-image",
        "tests/e2e/values-kind.yaml",
        "--for=jsonpath='{.status.phase}'=Succeeded",
        "loratraining/e2e-person",
        "helm test",
        "scripts/c2pa-test-cert.sh",
        "caBX",
        "kind delete cluster",
    ] {
        assert!(script.contains(step), "kind.sh lacks {step}");
    }

    let workflow: serde_yaml::Value =
        serde_yaml::from_str(&read(".github/workflows/e2e-kind.yml")).expect("workflow YAML");
    let steps = workflow["jobs"]["kind"]["steps"]
        .as_sequence()
        .expect("the kind job has steps");
    assert!(steps
        .iter()
        .any(|s| s["run"].as_str() == Some("tests/e2e/kind.sh")));
}

#[test]
fn dockerfiles_build_non_root_images_without_build_tools() {
    for file in ["docker/operator.Dockerfile", "docker/runtime.Dockerfile"] {
        let text = read(file);
        let stages: Vec<&str> = text.split("\nFROM ").skip(1).collect();
        assert!(stages.len() >= 2, "{file}: not multi-stage");
        let last = stages[stages.len() - 1];
        assert!(
            last.contains("USER 65532:65532"),
            "{file}: the final stage runs as root"
        );
        for tool in ["cargo ", "rustc", "pip ", "gcc", "build-essential"] {
            assert!(!last.contains(tool), "{file}: the final stage has {tool}");
        }
    }
    let runtime = read("docker/runtime.Dockerfile");
    assert!(
        runtime.contains("torch==2.11.0"),
        "tch 0.24 needs torch 2.11.0"
    );
    assert!(runtime.contains("LIBTORCH_USE_PYTORCH=1"));
}
