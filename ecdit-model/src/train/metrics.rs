//! Training metrics: `RUN/metrics.csv`, one row per logged step.
//!
//! Header: `step,loss,lr,grad_norm,images_per_sec,val_loss,moe{b}_unchosen,moe{b}_max_experts,...`
//! (`val_loss` is NaN on rows without a validation pass).
//! with one pair of columns per MoE block `b`. Floats are written in Rust's shortest form
//! that parses back to the same bits (`NaN` and `inf` included), so a row round-trips.
//!
//! A line counts only once its newline is written: a run killed mid-row leaves a last line
//! without one, which readers ignore and `MetricsLog::open` drops. On resume, rows logged
//! after the checkpoint (by the run that died) are dropped too, so steps never repeat.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "metrics.csv";
const FIXED: [&str; 6] = ["step", "loss", "lr", "grad_norm", "images_per_sec", "val_loss"];

/// Routing statistics of one MoE layer at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeMetrics {
    /// The transformer block index of the MoE layer.
    pub block: usize,
    /// Fraction of tokens that no expert chose.
    pub unchosen: f64,
    /// The most experts that chose any one token.
    pub max_experts: f64,
}

/// One logged training step.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// The optimiser step.
    pub step: u64,
    /// Training loss.
    pub loss: f64,
    /// Learning rate.
    pub lr: f64,
    /// Global gradient norm (before clipping).
    pub grad_norm: f64,
    /// Throughput.
    pub images_per_sec: f64,
    /// Loss of the fixed held-out batch (NaN when not measured at this step).
    pub val_loss: f64,
    /// Per MoE layer (block index): fraction of tokens no expert chose, max experts on one token.
    pub moe: Vec<MoeMetrics>,
}

/// What went wrong with a metrics file, and where.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A file-system operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A line does not parse.
    #[error("{}:{line}: {reason}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number (the header is line 1).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file was written for other MoE blocks (another model config).
    #[error("{} has header {found:?} but this run writes {expected:?}; use another run directory", .path.display())]
    HeaderMismatch {
        /// The file.
        path: PathBuf,
        /// Its header.
        found: String,
        /// The header this run writes.
        expected: String,
    },
    /// A row handed to `append` does not fit the file's columns.
    #[error("row for step {step} does not fit {}: {reason}", .path.display())]
    BadRow {
        /// The file.
        path: PathBuf,
        /// The row's step.
        step: u64,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MetricsError {
    let path = path.to_path_buf();
    move |source| MetricsError::Io { op, path, source }
}

/// An open `metrics.csv`, appending one flushed row at a time.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    blocks: Vec<usize>,
    file: File,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.csv` for appending, creating it with its header if needed.
    /// With `resume_step`, rows with a larger step (written after that checkpoint by a run
    /// that was killed) are dropped first; without it every existing row is kept. A
    /// half-written last line is dropped either way. Rewrites are atomic (temp file,
    /// fsync, rename). A header for other MoE blocks is an error naming the file.
    pub fn open(run_dir: &Path, moe_blocks: &[usize], resume_step: Option<u64>) -> Result<Self, MetricsError> {
        let path = run_dir.join(FILE_NAME);
        let expected = header(moe_blocks);
        let text = match fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(MetricsError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        match text {
            // New, or killed before the header's newline: start the file.
            None => rewrite(&path, &format!("{expected}\n"))?,
            Some(text) if !text.contains('\n') => rewrite(&path, &format!("{expected}\n"))?,
            Some(text) => {
                let (found, _) = text.split_once('\n').unwrap_or((&text, ""));
                if found != expected {
                    return Err(MetricsError::HeaderMismatch {
                        path,
                        found: found.to_string(),
                        expected,
                    });
                }
                let (rows, partial) = parse_lines(&path, &text, moe_blocks)?;
                if partial {
                    tracing::warn!(path = %path.display(), "dropping a half-written last line");
                }
                let keep = |(_, row): &(&str, MetricsRow)| resume_step.is_none_or(|s| row.step <= s);
                let kept: Vec<&str> = rows.iter().filter(|r| keep(r)).map(|(line, _)| *line).collect();
                if kept.len() < rows.len() {
                    tracing::info!(
                        path = %path.display(),
                        dropped = rows.len() - kept.len(),
                        "dropping rows logged after the checkpoint resumed from"
                    );
                }
                if partial || kept.len() < rows.len() {
                    let mut out = format!("{expected}\n");
                    for line in kept {
                        out.push_str(line);
                        out.push('\n');
                    }
                    rewrite(&path, &out)?;
                }
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(MetricsLog {
            path,
            blocks: moe_blocks.to_vec(),
            file,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one row; its MoE entries must be the file's blocks, in order. The whole line
    /// goes to the OS in one write, so a crash loses at most the row being written.
    pub fn append(&mut self, row: &MetricsRow) -> Result<(), MetricsError> {
        let blocks: Vec<usize> = row.moe.iter().map(|m| m.block).collect();
        if blocks != self.blocks {
            return Err(MetricsError::BadRow {
                path: self.path.clone(),
                step: row.step,
                reason: format!("MoE blocks {blocks:?}, the file has {:?}", self.blocks),
            });
        }
        let mut line = format!(
            "{},{},{},{},{},{}",
            row.step,
            num(row.loss),
            num(row.lr),
            num(row.grad_norm),
            num(row.images_per_sec),
            num(row.val_loss)
        );
        for m in &row.moe {
            line.push_str(&format!(",{},{}", num(m.unchosen), num(m.max_experts)));
        }
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err("append to", &self.path))?;
        self.file.flush().map_err(io_err("flush", &self.path))
    }
}

/// Reads every complete row of a metrics file (an unterminated last line, a row still
/// being written, is ignored). Errors name the file and line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>, MetricsError> {
    let text = fs::read_to_string(path).map_err(io_err("read", path))?;
    let Some((head, _)) = text.split_once('\n') else {
        return Err(MetricsError::Parse {
            path: path.to_path_buf(),
            line: 1,
            reason: "no complete header line".into(),
        });
    };
    let blocks = parse_header(head).map_err(|reason| MetricsError::Parse {
        path: path.to_path_buf(),
        line: 1,
        reason,
    })?;
    let (rows, _) = parse_lines(path, &text, &blocks)?;
    Ok(rows.into_iter().map(|(_, row)| row).collect())
}

fn header(blocks: &[usize]) -> String {
    let mut cols: Vec<String> = FIXED.iter().map(|c| c.to_string()).collect();
    for b in blocks {
        cols.push(format!("moe{b}_unchosen"));
        cols.push(format!("moe{b}_max_experts"));
    }
    cols.join(",")
}

fn parse_header(head: &str) -> Result<Vec<usize>, String> {
    let cols: Vec<&str> = head.trim_end_matches('\r').split(',').collect();
    if cols.len() < FIXED.len() || cols[..FIXED.len()] != FIXED || !(cols.len() - FIXED.len()).is_multiple_of(2) {
        return Err(format!(
            "header {head:?} does not start with {} plus MoE column pairs",
            FIXED.join(",")
        ));
    }
    let mut blocks = Vec::new();
    for pair in cols[FIXED.len()..].chunks(2) {
        let block = pair[0]
            .strip_prefix("moe")
            .and_then(|s| s.strip_suffix("_unchosen"))
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|b| pair[1] == format!("moe{b}_max_experts"))
            .ok_or_else(|| {
                format!(
                    "columns {:?},{:?} are not a moe{{b}}_unchosen,moe{{b}}_max_experts pair",
                    pair[0], pair[1]
                )
            })?;
        blocks.push(block);
    }
    Ok(blocks)
}

/// Parsed rows with the lines they came from (kept verbatim when the file is rewritten).
type RawRows<'t> = Vec<(&'t str, MetricsRow)>;

/// The data rows of `text` (after the header) with their raw lines, and whether an
/// unterminated last line was left out.
fn parse_lines<'t>(path: &Path, text: &'t str, blocks: &[usize]) -> Result<(RawRows<'t>, bool), MetricsError> {
    let complete = text.ends_with('\n');
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last newline: "" or the unterminated line
    let mut rows = Vec::with_capacity(lines.len().saturating_sub(1));
    for (i, line) in lines.iter().enumerate().skip(1) {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let row = parse_row(line, blocks).map_err(|reason| MetricsError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        })?;
        rows.push((line, row));
    }
    Ok((rows, !complete))
}

fn parse_row(line: &str, blocks: &[usize]) -> Result<MetricsRow, String> {
    let fields: Vec<&str> = line.split(',').collect();
    let want = FIXED.len() + 2 * blocks.len();
    if fields.len() != want {
        return Err(format!("{} fields, the header has {want}", fields.len()));
    }
    let step = fields[0]
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("step {:?} is not a whole number", fields[0]))?;
    let f = |i: usize| -> Result<f64, String> {
        fields[i].trim().parse::<f64>().map_err(|_| {
            let col = match FIXED.get(i) {
                Some(name) => name.to_string(),
                None if i.is_multiple_of(2) => format!("moe{}_unchosen", blocks[(i - FIXED.len()) / 2]),
                None => format!("moe{}_max_experts", blocks[(i - FIXED.len()) / 2]),
            };
            format!("{col} {:?} is not a number (column {})", fields[i], i + 1)
        })
    };
    let moe = (blocks.iter().enumerate())
        .map(|(k, &block)| {
            Ok(MoeMetrics {
                block,
                unchosen: f(6 + 2 * k)?,
                max_experts: f(7 + 2 * k)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(MetricsRow {
        step,
        loss: f(1)?,
        lr: f(2)?,
        grad_norm: f(3)?,
        images_per_sec: f(4)?,
        val_loss: f(5)?,
        moe,
    })
}

/// Shortest round-trip text; exponent form outside a readable range (Display would print
/// 1e-20 as twenty zeros).
fn num(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 || !x.is_finite() || (1e-5..1e16).contains(&a) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// Replaces `path`'s contents atomically: temp file, fsync, rename, fsync the directory.
fn rewrite(path: &Path, contents: &str) -> Result<(), MetricsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let tmp = path.with_extension(format!("csv.tmp-{}", std::process::id()));
    let write = || -> Result<(), MetricsError> {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(contents.as_bytes()).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        #[cfg(unix)]
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))?;
        Ok(())
    };
    let result = write();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, blocks: &[usize]) -> MetricsRow {
        let s = step as f64;
        MetricsRow {
            step,
            loss: 1.0 / (1.0 + s) + 1e-9,
            lr: 3e-4 * (s / 100.0).min(1.0),
            grad_norm: 0.1 + s.sqrt(),
            images_per_sec: 123.456,
            val_loss: if step.is_multiple_of(2) { 0.5 } else { f64::NAN },
            moe: blocks
                .iter()
                .map(|&b| MoeMetrics {
                    block: b,
                    unchosen: 0.01 * b as f64 + 1e-20,
                    max_experts: 1.0 + b as f64,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip_keeps_every_bit() {
        let run = tempfile::tempdir().unwrap();
        let blocks = [1, 3];
        let mut log = MetricsLog::open(run.path(), &blocks, None).unwrap();
        let mut rows: Vec<MetricsRow> = (0..5).map(|i| row(i * 10, &blocks)).collect();
        rows[2].loss = f64::NAN;
        rows[3].grad_norm = f64::INFINITY;
        rows[4].lr = -0.0;
        for r in &rows {
            log.append(r).unwrap();
        }
        let text = fs::read_to_string(log.path()).unwrap();
        assert!(
            text.starts_with(
                "step,loss,lr,grad_norm,images_per_sec,val_loss,moe1_unchosen,moe1_max_experts,moe3_unchosen,moe3_max_experts\n"
            ),
            "{text}"
        );
        let back = read_metrics(log.path()).unwrap();
        assert_eq!(back.len(), rows.len());
        for (a, b) in rows.iter().zip(&back) {
            assert_eq!(a.step, b.step);
            for (x, y) in [
                (a.loss, b.loss),
                (a.lr, b.lr),
                (a.grad_norm, b.grad_norm),
                (a.images_per_sec, b.images_per_sec),
            ] {
                assert_eq!(x.to_bits(), y.to_bits(), "{x} vs {y}");
            }
            for (m, n) in a.moe.iter().zip(&b.moe) {
                assert_eq!(
                    (m.block, m.unchosen.to_bits(), m.max_experts.to_bits()),
                    (n.block, n.unchosen.to_bits(), n.max_experts.to_bits())
                );
            }
        }
        assert!(back.iter().all(|r| r.moe.iter().map(|m| m.block).eq(blocks)));
        // Reopening without a resume step keeps everything and appends after it.
        drop(log);
        let mut log = MetricsLog::open(run.path(), &blocks, None).unwrap();
        log.append(&row(50, &blocks)).unwrap();
        assert_eq!(read_metrics(log.path()).unwrap().len(), 6);
    }

    #[test]
    fn resume_drops_rows_after_the_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(run.path(), &[0], None).unwrap();
        for s in [10, 20, 30, 40, 50] {
            log.append(&row(s, &[0])).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(run.path(), &[0], Some(30)).unwrap();
        log.append(&row(40, &[0])).unwrap();
        let steps: Vec<u64> = read_metrics(log.path()).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![10, 20, 30, 40]);
        assert_eq!(fs::read_dir(run.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn half_written_last_line_is_dropped_on_open() {
        let run = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(run.path(), &[], None).unwrap();
        log.append(&row(10, &[])).unwrap();
        log.append(&row(20, &[])).unwrap();
        drop(log);
        let path = run.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"30,0.12").unwrap(); // killed mid-row
        drop(f);
        assert_eq!(read_metrics(&path).unwrap().len(), 2, "readers ignore it");
        let mut log = MetricsLog::open(run.path(), &[], None).unwrap();
        log.append(&row(30, &[])).unwrap();
        let steps: Vec<u64> = read_metrics(&path).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![10, 20, 30]);
        // Killed before even the header's newline.
        fs::write(&path, "step,lo").unwrap();
        let mut log = MetricsLog::open(run.path(), &[], None).unwrap();
        log.append(&row(40, &[])).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 1);
    }

    #[test]
    fn bad_line_is_reported_with_its_number() {
        let run = tempfile::tempdir().unwrap();
        let path = run.path().join(FILE_NAME);
        fs::write(
            &path,
            "step,loss,lr,grad_norm,images_per_sec,val_loss\n1,0.5,0.1,1,2,NaN\n2,0.4,oops,1,2,NaN\n3,0.3,0.1,1,2,NaN\n",
        )
        .unwrap();
        let err = read_metrics(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, MetricsError::Parse { line: 3, .. }), "{msg}");
        assert!(msg.contains("metrics.csv:3") && msg.contains("lr \"oops\""), "{msg}");
        assert!(MetricsLog::open(run.path(), &[], None)
            .unwrap_err()
            .to_string()
            .contains("metrics.csv:3"));
        fs::write(
            &path,
            "step,loss,lr,grad_norm,images_per_sec,val_loss,moe4_unchosen,moe4_max_experts\n1,0.5,0.1,1,2,NaN,0,x\n",
        )
        .unwrap();
        let msg = read_metrics(&path).unwrap_err().to_string();
        assert!(
            msg.contains(":2: moe4_max_experts \"x\" is not a number (column 8)"),
            "{msg}"
        );
        fs::write(&path, "step,loss,lr,grad_norm,images_per_sec,val_loss\n1,0.5,0.1\n").unwrap();
        assert!(read_metrics(&path)
            .unwrap_err()
            .to_string()
            .contains(":2: 3 fields, the header has 6"));
        fs::write(&path, "step,loss,moe\n1,2,3\n").unwrap();
        assert!(matches!(read_metrics(&path), Err(MetricsError::Parse { line: 1, .. })));
    }

    #[test]
    fn other_moe_blocks_are_refused() {
        let run = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(run.path(), &[1, 3], None).unwrap();
        let err = log.append(&row(1, &[1])).unwrap_err();
        assert!(matches!(err, MetricsError::BadRow { step: 1, .. }), "{err}");
        drop(log);
        let err = MetricsLog::open(run.path(), &[1, 2], None).unwrap_err();
        assert!(matches!(err, MetricsError::HeaderMismatch { .. }), "{err}");
        assert!(err.to_string().contains("metrics.csv"), "{err}");
    }

    #[test]
    fn numbers_stay_readable() {
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(3e-4), "0.0003");
        assert_eq!(num(1e-20), "1e-20");
        assert_eq!(num(f64::NAN), "NaN");
        assert_eq!(num(f64::NEG_INFINITY), "-inf");
        assert_eq!(num(12345.0), "12345");
    }
}
