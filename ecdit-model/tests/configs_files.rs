//! Shipped configs: every one parses, validates and round-trips; lookup by
//! name and path; clear errors for bad files and unknown names.

use ecdit_model::config::ModelConfig;
use ecdit_model::config_files::{list_configs, load_config, resolve_config_in, ConfigError};
use ecdit_model::train::config::TrainConfig;
use std::path::PathBuf;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

#[test]
fn every_shipped_config_parses_and_round_trips() {
    let all = list_configs(&configs_dir());
    assert!(all.len() >= 22, "found only {} configs", all.len());
    for (name, path) in &all {
        // Training configs (configs/train) hold a model: they resolve as such.
        if path.starts_with(configs_dir().join("train")) {
            let train = TrainConfig::resolve(path.to_str().unwrap()).unwrap_or_else(|e| panic!("{e}"));
            let text = serde_json::to_string_pretty(&train).unwrap();
            assert_eq!(
                serde_json::from_str::<TrainConfig>(&text).unwrap(),
                train,
                "{}",
                path.display()
            );
            continue;
        }
        let cfg = load_config(path).unwrap_or_else(|e| panic!("{e}"));
        let text = serde_json::to_string_pretty(&cfg).unwrap();
        let back: ModelConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, cfg, "{}", path.display());
        // The text-conditioned family shipped here is named after its files.
        let rel = path.strip_prefix(configs_dir()).unwrap().to_string_lossy().into_owned();
        if !(rel.starts_with("paper") || rel.starts_with("small") || rel == "tiny-ec.json") {
            continue;
        }
        assert_eq!(&cfg.name, name, "{} names itself '{}'", path.display(), cfg.name);
    }
}

#[test]
fn the_paper_family_and_small_configs_are_shipped() {
    let names: Vec<String> = list_configs(&configs_dir()).into_iter().map(|(n, _)| n).collect();
    let mut want = vec![
        "ec-dit-m-64e",
        "gshard-xxl-16e",
        "gshard-xxl-32e",
        "tiny-ec",
        "ec-s-8e",
        "dense-s",
        "tc-s-8e",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    for size in ["xl", "xxl", "3xl"] {
        for e in [8, 16, 32] {
            want.push(format!("ec-dit-{size}-{e}e"));
        }
    }
    for size in ["xl", "xxl", "3xl", "m"] {
        want.push(format!("dense-{size}"));
    }
    for w in want {
        assert!(names.contains(&w), "config {w} missing");
    }
    let m = load_config(&configs_dir().join("paper/ec-dit-m-64e.json")).unwrap();
    assert_eq!((m.depth, m.hidden, m.moe.as_ref().unwrap().experts), (38, 3072, 64));
    let tiny = load_config(&configs_dir().join("tiny-ec.json")).unwrap();
    assert_eq!(
        (tiny.input_size, tiny.hidden, tiny.depth, tiny.tokens()),
        (16, 64, 4, 64)
    );
    let s = load_config(&configs_dir().join("small/ec-s-8e.json")).unwrap();
    assert_eq!((s.hidden, s.depth, s.heads, s.tokens()), (384, 12, 6, 256));
}

#[test]
fn resolves_bare_names_and_paths() {
    let dirs = [configs_dir()];
    let (path, cfg) = resolve_config_in("ec-dit-xl-32e", &dirs).unwrap();
    assert!(path.ends_with("paper/ec-dit-xl-32e.json"));
    assert_eq!(cfg.hidden, 1152);
    let direct = configs_dir().join("small/dense-s.json");
    let (p2, cfg2) = resolve_config_in(direct.to_str().unwrap(), &dirs).unwrap();
    assert_eq!((p2, cfg2.name.as_str()), (direct, "dense-s"));
}

#[test]
fn unknown_name_lists_close_names() {
    let err = resolve_config_in("ec-dit-xl-31e", &[configs_dir()]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::NotFound { .. }), "{msg}");
    assert!(
        msg.contains("ec-dit-xl-31e") && msg.contains("did you mean") && msg.contains("ec-dit-xl-32e"),
        "{msg}"
    );
    let err = resolve_config_in("zzzzzzzzzzzzzzzzzzzzzzzzz", &[configs_dir()])
        .unwrap_err()
        .to_string();
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn bad_files_name_the_file_and_position() {
    let dir = std::env::temp_dir().join(format!("ecdit-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read_to_string(configs_dir().join("tiny-ec.json")).unwrap();

    let syntax = dir.join("syntax.json");
    std::fs::write(&syntax, "{\n  \"name\": \"x\",\n  oops\n}").unwrap();
    let msg = load_config(&syntax).unwrap_err().to_string();
    assert!(msg.contains("syntax.json") && msg.contains("line 3"), "{msg}");

    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, good.replacen("\"depth\"", "\"dpeth\"", 1)).unwrap();
    let msg = load_config(&unknown).unwrap_err().to_string();
    assert!(
        msg.contains("unknown.json") && msg.contains("dpeth") && msg.contains("column"),
        "{msg}"
    );

    let invalid = dir.join("invalid.json");
    std::fs::write(&invalid, good.replacen("\"heads\": 4", "\"heads\": 3", 1)).unwrap();
    let msg = load_config(&invalid).unwrap_err().to_string();
    assert!(msg.contains("invalid.json") && msg.contains("heads"), "{msg}");

    let msg = load_config(&dir.join("absent.json")).unwrap_err().to_string();
    assert!(msg.contains("absent.json"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
