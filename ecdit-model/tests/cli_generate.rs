//! `ecdit generate`, `ecdit inspect` and `ecdit eval` as a user runs them,
//! on a model trained for a few steps here (the commands' plumbing, not the
//! bundled model's quality), and their bad-input errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ecdit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecdit"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(args)
        .output()
        .expect("run ecdit")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A smoke model trained for 4 steps, exported.
fn trained(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    let o = ecdit(&[
        "train",
        "--quiet",
        "--threads",
        "2",
        "--config",
        "configs/train/smoke-ec.json",
        "--steps",
        "4",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    run
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    (info.width, info.height)
}

#[test]
fn generate_inspect_and_eval_run_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trained(tmp.path());
    let m = model.to_str().unwrap();
    let out = tmp.path().join("grid.png");
    let o = ecdit(&[
        "generate",
        "a photo of two circles",
        "-n",
        "4",
        "--steps",
        "3",
        "--model",
        m,
        "--scale",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // A 2x2 grid of 16x16 images at scale 2 with 2-pixel gaps.
    let (w, h) = png_size(&out);
    assert!(w >= 64 && h >= 64 && w == h, "{w}x{h}");

    let dir = tmp.path().join("inspect");
    let o = ecdit(&[
        "inspect",
        "a photo of a red circle",
        "--steps",
        "2",
        "--model",
        m,
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inspect.json")).unwrap()).unwrap();
    let records = json["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "one record per step");
    let layer = &records[0]["layers"][0];
    let counts: u64 = layer["experts_per_patch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    // Expert choice: each of E experts takes C = f_c * T / E patches, so the counts sum to f_c * T.
    assert_eq!(counts, 2 * 64, "capacity factor 2 over 64 patches");
    let shares: f64 = layer["word_compute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    assert!(
        (shares - 1.0).abs() < 1e-3,
        "the words' shares of compute sum to 1: {shares}"
    );
    assert!(dir.join("experts_block1_step01.png").is_file() && dir.join("image.png").is_file());
    // The overview: a row per MoE layer, the image and both steps' maps in each.
    let moe_layers = records[0]["layers"].as_array().unwrap().len();
    let (ow, oh) = png_size(&dir.join("overview.png"));
    assert_eq!(
        ow as usize * moe_layers,
        oh as usize * 3,
        "{ow}x{oh} for {moe_layers} layers"
    );
    // One concentration per step and layer, each finite where defined.
    let conc = json["object_concentration"].as_array().unwrap();
    assert_eq!(conc.len(), 2);
    assert!(conc.iter().all(|s| s.as_array().unwrap().len() == moe_layers));

    let eval_dir = tmp.path().join("eval");
    let o = ecdit(&[
        "eval",
        "--model",
        m,
        "--limit",
        "6",
        "--steps",
        "2",
        "--json",
        "-o",
        eval_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let line = String::from_utf8_lossy(&o.stdout);
    let report: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let overall = report["overall"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&overall));
    assert!(report.get("single_object").is_some() && report.get("color_attr").is_some());
    assert!(eval_dir.join("results.json").is_file());
}

#[test]
fn bad_inputs_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trained(tmp.path());
    let m = model.to_str().unwrap();
    // An empty prompt is an unconditional sample, and it says so.
    let o = ecdit(&[
        "generate",
        "",
        "--steps",
        "1",
        "--model",
        m,
        "-o",
        tmp.path().join("u.png").to_str().unwrap(),
    ]);
    assert!(o.status.success() && text(&o).contains("unconditional"), "{}", text(&o));
    // Unknown words: a warning naming them and the known words.
    let o = ecdit(&[
        "generate",
        "a photo of a red zebra",
        "--steps",
        "1",
        "--model",
        m,
        "-o",
        tmp.path().join("z.png").to_str().unwrap(),
    ]);
    let msg = text(&o);
    assert!(
        o.status.success() && msg.contains("zebra") && msg.contains("known words") && msg.contains("circle"),
        "{msg}"
    );
    // A malformed prompts file: the error names the line.
    let bad = tmp.path().join("prompts.jsonl");
    std::fs::write(&bad, "{\"tag\": \"single_object\", \"prompt\": \"a photo of a circle\", \"include\": [{\"class\": \"circle\", \"count\": 1}]}\n{not json\n").unwrap();
    let o = ecdit(&["eval", "--model", m, "--prompts", bad.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("prompts.jsonl:2"),
        "{}",
        text(&o)
    );
    // A model directory with files missing.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = ecdit(&["generate", "a circle", "--model", empty.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("model.safetensors is missing"),
        "{}",
        text(&o)
    );
    // An output path that cannot be written.
    let o = ecdit(&[
        "generate",
        "a circle",
        "--steps",
        "1",
        "--model",
        m,
        "-o",
        "/nonexistent-dir/x.png",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("/nonexistent-dir"),
        "{}",
        text(&o)
    );
}
