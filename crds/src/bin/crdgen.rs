//! Writes imagegen's custom resource definitions as YAML files into a folder:
//! `crdgen charts/imagegen/crds`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: crdgen <OUT_DIR>");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    if let Err(err) = std::fs::create_dir_all(&out) {
        eprintln!("crdgen: cannot create {}: {err}", out.display());
        return ExitCode::FAILURE;
    }
    for (file, crd) in imagegen_crds::crds() {
        let path = out.join(file);
        if let Err(err) = std::fs::write(&path, imagegen_crds::crd_yaml(&crd)) {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}
