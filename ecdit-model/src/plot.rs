//! Plots of training runs (`ecdit plot`): loss, gradient norm, learning rate and routing
//! statistics from each run's `metrics.csv`, one colour per run, written as PNG.
//!
//! Text is drawn with a bundled DejaVu Sans subset (assets/fonts), never system fonts: a
//! fresh CI machine may have none.

use crate::train::metrics::{read_metrics, MetricsError, MetricsRow};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-Latin1.ttf");
const FONT_FAMILY: &str = "sans-serif";

/// Colours for runs, in order (Tableau 10: distinct, and readable on white).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Size of the single-chart images.
pub const CHART_SIZE: (u32, u32) = (1200, 700);
/// Width of routing.png, and the height of each of its rows (one per MoE layer).
pub const ROUTING_WIDTH: u32 = 1200;
/// See [`ROUTING_WIDTH`].
pub const ROUTING_ROW_HEIGHT: u32 = 280;
const ROUTING_TITLE_HEIGHT: u32 = 50;

/// What went wrong while plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A run directory without metrics.
    #[error("{} has no metrics.csv (is it a training run directory?)", .dir.display())]
    NoMetrics {
        /// The directory given.
        dir: PathBuf,
    },
    /// A metrics file that does not parse.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The output directory could not be made.
    #[error("cannot create {}: {source}", .path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Drawing or encoding an image failed.
    #[error("cannot draw {}: {reason}", .path.display())]
    Draw {
        /// The image being written.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The bundled font did not load (a broken build).
    #[error("the bundled font does not load")]
    Font,
}

/// One run's metrics, named for the legend.
#[derive(Debug, Clone)]
pub struct Run {
    /// Legend name: the run directory's name.
    pub name: String,
    /// Its rows, in file order.
    pub rows: Vec<MetricsRow>,
}

/// Reads `dir/metrics.csv`.
pub fn load_run(dir: &Path) -> Result<Run, PlotError> {
    let path = dir.join("metrics.csv");
    if !path.is_file() {
        return Err(PlotError::NoMetrics { dir: dir.to_path_buf() });
    }
    let rows = read_metrics(&path)?;
    // "." or "runs/a/" should still give a name.
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(Run { name, rows })
}

/// Plots the runs in `run_dirs` into `out_dir` (created if needed) and returns the images
/// written: loss.png, grad_norm.png, lr.png and, when any run has MoE layers, routing.png.
pub fn plot_runs(run_dirs: &[PathBuf], out_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut runs = run_dirs.iter().map(|d| load_run(d)).collect::<Result<Vec<_>, _>>()?;
    // Two runs of the same name (a/run, b/run) get their paths as names instead.
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (run, dir) in runs.iter_mut().zip(run_dirs) {
        if names.iter().filter(|n| **n == run.name).count() > 1 {
            run.name = dir.display().to_string();
        }
    }
    plot(&runs, out_dir)
}

/// Plots already-loaded runs; see [`plot_runs`].
pub fn plot(runs: &[Run], out_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    register_bundled_font()?;
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    // (file, title, value, scale)
    type Chart = (&'static str, &'static str, fn(&MetricsRow) -> f64, Scale);
    let simple: [Chart; 3] = [
        ("loss", "training loss", |r| r.loss, Scale::LogIfPositive),
        ("grad_norm", "gradient norm", |r| r.grad_norm, Scale::LogIfPositive),
        ("lr", "learning rate", |r| r.lr, Scale::Linear),
    ];
    for (file, title, value, scale) in simple {
        let smooth = file != "lr"; // the schedule is exact; noisy quantities get an average
        let lines = runs_to_lines(
            runs,
            |r| r.rows.iter().map(|row| (row.step as f64, value(row))).collect(),
            smooth,
        );
        let panel = Panel {
            title: title.to_string(),
            y_desc: file.to_string(),
            lines,
            scale,
            legend: true,
        };
        let path = out_dir.join(format!("{file}.png"));
        draw_image(&path, CHART_SIZE, |root| draw_panel(root, &panel))?;
        written.push(path.clone());
    }

    let blocks: BTreeSet<usize> = runs
        .iter()
        .flat_map(|r| r.rows.iter().flat_map(|row| row.moe.iter().map(|m| m.block)))
        .collect();
    if blocks.is_empty() {
        tracing::info!("no MoE layers in these runs: no routing.png");
        return Ok(written);
    }
    let path = out_dir.join("routing.png");
    let height = ROUTING_TITLE_HEIGHT + ROUTING_ROW_HEIGHT * blocks.len() as u32;
    draw_image(&path, (ROUTING_WIDTH, height), |root| {
        let body = root
            .titled("routing per MoE layer (colour = run)", (FONT_FAMILY, 26))
            .map_err(|e| e.to_string())?;
        let cells = body.split_evenly((blocks.len(), 2));
        for (i, &block) in blocks.iter().enumerate() {
            let stat = |pick: fn(&crate::train::metrics::MoeMetrics) -> f64| {
                let lines = runs_to_lines(
                    runs,
                    |r| {
                        let points = r.rows.iter().filter_map(|row| {
                            row.moe
                                .iter()
                                .find(|m| m.block == block)
                                .map(|m| (row.step as f64, pick(m)))
                        });
                        points.collect()
                    },
                    false,
                );
                // A run without this layer gets no legend entry (colours stay by run index).
                lines.into_iter().filter(|l| !l.points.is_empty()).collect::<Vec<_>>()
            };
            let unchosen = Panel {
                title: format!("block {block}: tokens no expert chose"),
                y_desc: "fraction".into(),
                lines: stat(|m| m.unchosen),
                scale: Scale::Linear,
                legend: true, // per row: the runs that have this layer
            };
            let max_experts = Panel {
                title: format!("block {block}: most experts on one token"),
                y_desc: "experts".into(),
                lines: stat(|m| m.max_experts),
                scale: Scale::Linear,
                legend: false,
            };
            draw_panel(&cells[2 * i], &unchosen)?;
            draw_panel(&cells[2 * i + 1], &max_experts)?;
        }
        Ok(())
    })?;
    written.push(path.clone());
    Ok(written)
}

/// Registers the bundled face under plotters' generic family names, once per process.
fn register_bundled_font() -> Result<(), PlotError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = DONE.get_or_init(|| {
        ["sans-serif", "serif", "monospace"]
            .iter()
            .all(|family| register_font(family, FontStyle::Normal, FONT).is_ok())
    });
    if *ok {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    /// Log-y when every finite value is positive (a loss usually is).
    LogIfPositive,
}

struct Line {
    label: String,
    color: RGBColor,
    /// A light, thin line: the raw values under a moving average.
    faint: bool,
    points: Vec<(f64, f64)>,
}

struct Panel {
    title: String,
    y_desc: String,
    lines: Vec<Line>,
    scale: Scale,
    legend: bool,
}

/// One line per run (colour by index); with `smooth`, the raw values faint and a centred
/// moving average on top.
fn runs_to_lines(runs: &[Run], points: impl Fn(&Run) -> Vec<(f64, f64)>, smooth: bool) -> Vec<Line> {
    let mut lines = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let raw = points(run);
        if smooth && raw.len() >= 20 {
            let averaged = moving_average(&raw, (raw.len() / 50).clamp(2, 50));
            lines.push(Line {
                label: String::new(),
                color,
                faint: true,
                points: raw,
            });
            lines.push(Line {
                label: run.name.clone(),
                color,
                faint: false,
                points: averaged,
            });
        } else {
            lines.push(Line {
                label: run.name.clone(),
                color,
                faint: false,
                points: raw,
            });
        }
    }
    lines
}

/// Centred mean over `half` points either side, of finite values only.
fn moving_average(points: &[(f64, f64)], half: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let window = &points[i.saturating_sub(half)..(i + half + 1).min(points.len())];
            let finite: Vec<f64> = window.iter().map(|p| p.1).filter(|v| v.is_finite()).collect();
            let mean = if finite.is_empty() {
                f64::NAN
            } else {
                finite.iter().sum::<f64>() / finite.len() as f64
            };
            (points[i].0, mean)
        })
        .collect()
}

/// Draws into an RGB buffer and writes it as a PNG, atomically (temp file, rename), so a
/// viewer never sees half an image. Encoding with `png` directly spares the `image` crate.
fn draw_image<F>(path: &Path, (w, h): (u32, u32), draw: F) -> Result<(), PlotError>
where
    F: FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), String>,
{
    let fail = |reason: String| PlotError::Draw {
        path: path.to_path_buf(),
        reason,
    };
    let mut pixels = vec![255u8; w as usize * h as usize * 3];
    {
        let backend = BitMapBackend::with_buffer_and_format(&mut pixels, (w, h)).map_err(|e| fail(e.to_string()))?;
        let root = backend.into_drawing_area();
        draw(&root).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let tmp = path.with_extension(format!("png.tmp-{}", std::process::id()));
    let write = || -> Result<(), String> {
        let file = std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&pixels).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| format!("rename into place: {e}"))
    };
    write().map_err(|reason| {
        let _ = std::fs::remove_file(&tmp);
        fail(reason)
    })
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> Result<(), String> {
    let all = || {
        panel
            .lines
            .iter()
            .flat_map(|l| l.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    let x = padded(all().map(|p| p.0), 0.0);
    let log = panel.scale == Scale::LogIfPositive && all().next().is_some() && all().all(|p| p.1 > 0.0);
    if log {
        let y = padded(all().map(|p| p.1.ln()), 0.05);
        draw_chart(area, panel, x, (y.start.exp()..y.end.exp()).log_scale(), true)
    } else {
        draw_chart(area, panel, x, padded(all().map(|p| p.1), 0.05), false)
    }
}

/// A short axis label: four significant digits, no float noise ("0.7", "3e-5").
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || (1e-3..1e5).contains(&a) {
        let decimals = (3.0 - a.log10().floor()).clamp(0.0, 6.0) as usize;
        let text = format!("{v:.decimals$}");
        let text = if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.')
        } else {
            &text
        };
        text.to_string()
    } else {
        let text = format!("{v:.2e}");
        let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        format!("{mantissa}e{exp}")
    }
}

/// The range of `values` widened by `pad` of its span (an empty or flat range gets room).
fn padded(values: impl Iterator<Item = f64>, pad: f64) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    if lo == hi {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return lo - d..hi + d;
    }
    let d = (hi - lo) * pad;
    lo - d..hi + d
}

fn draw_chart<DB, Y>(area: &DrawingArea<DB, Shift>, panel: &Panel, x: Range<f64>, y: Y, log: bool) -> Result<(), String>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT_FAMILY, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    let y_desc = if log {
        format!("{} (log)", panel.y_desc)
    } else {
        panel.y_desc.clone()
    };
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .light_line_style(RGBColor(235, 235, 235))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick_label(*v))
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .draw()
        .map_err(err)?;
    for line in &panel.lines {
        let style = if line.faint {
            line.color.mix(0.3).stroke_width(1)
        } else {
            line.color.stroke_width(2)
        };
        // NaN, inf (and on a log axis, non-positive) values break the line rather than end the plot.
        let usable = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite() && (!log || p.1 > 0.0);
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for p in &line.points {
            match (usable(p), segments.last_mut()) {
                (true, Some(seg)) => seg.push(*p),
                (false, Some(seg)) if !seg.is_empty() => segments.push(Vec::new()),
                _ => {}
            }
        }
        for (k, seg) in segments.into_iter().enumerate() {
            let anno = chart.draw_series(LineSeries::new(seg, style)).map_err(err)?;
            if k == 0 && !line.label.is_empty() {
                let color = line.color;
                anno.label(line.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
    }
    if panel.legend && panel.lines.iter().any(|l| !l.label.is_empty()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::{MetricsLog, MoeMetrics};

    fn write_run(dir: &Path, blocks: &[usize], scale: f64, steps: u64) {
        let mut log = MetricsLog::open(dir, blocks, None).unwrap();
        for s in 0..steps {
            let t = s as f64;
            log.append(&MetricsRow {
                step: s * 10,
                loss: scale * (1.0 / (1.0 + 0.05 * t) + 0.05 * (t * 1.7).sin().abs()),
                lr: 1e-4 * (t / 20.0).min(1.0),
                grad_norm: if s == 7 { f64::NAN } else { 2.0 + (t * 0.3).cos() },
                images_per_sec: 100.0,
                val_loss: f64::NAN,
                moe: blocks
                    .iter()
                    .map(|&b| MoeMetrics {
                        block: b,
                        unchosen: 0.2 / (1.0 + t + b as f64),
                        max_experts: 1.0 + (s % 4) as f64,
                    })
                    .collect(),
            })
            .unwrap();
        }
    }

    /// Decodes the whole image (not just the header) and returns its size.
    fn png_size(path: &Path) -> (u32, u32) {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        assert!(pixels.iter().any(|&b| b != 255), "{} is blank", path.display());
        (frame.width, frame.height)
    }

    #[test]
    fn two_runs_make_decodable_pngs() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("run-a"), root.path().join("run-b"));
        write_run(&a, &[1, 3], 1.0, 120);
        write_run(&b, &[1], 0.8, 60); // other layers: routing.png shows the union
        let out = root.path().join("plots");
        let written = plot_runs(&[a.clone(), b], &out).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["loss.png", "grad_norm.png", "lr.png", "routing.png"]);
        for p in &written[..3] {
            assert_eq!(png_size(p), CHART_SIZE, "{}", p.display());
        }
        let routing_height = ROUTING_TITLE_HEIGHT + 2 * ROUTING_ROW_HEIGHT;
        assert_eq!(png_size(&written[3]), (ROUTING_WIDTH, routing_height));

        // Runs without MoE layers, with a single row, or none at all, still plot.
        let dense = root.path().join("dense");
        write_run(&dense, &[], 1.0, 1);
        let empty = root.path().join("empty");
        write_run(&empty, &[], 1.0, 0);
        let written = plot_runs(&[dense.clone(), empty], &dense).unwrap();
        assert_eq!(written.len(), 3);
        assert!(written.iter().all(|p| p.starts_with(&dense)));
    }

    #[test]
    fn missing_metrics_names_the_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("not-a-run");
        std::fs::create_dir(&dir).unwrap();
        let err = plot_runs(std::slice::from_ref(&dir), root.path()).unwrap_err();
        assert!(matches!(err, PlotError::NoMetrics { .. }), "{err}");
        assert!(err.to_string().contains("not-a-run"), "{err}");
    }

    #[test]
    fn tick_labels_are_short() {
        let got: Vec<String> = [0.0, 0.7000000000001, 0.25, 1.0, 1500.0, 3e-5, -2.5e7, 0.00123456]
            .map(tick_label)
            .to_vec();
        assert_eq!(got, ["0", "0.7", "0.25", "1", "1500", "3e-5", "-2.5e7", "0.001235"]);
    }

    #[test]
    fn moving_average_skips_non_finite_values() {
        let pts = [(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 5.0)];
        let avg = moving_average(&pts, 1);
        assert_eq!(avg.iter().map(|p| p.1).collect::<Vec<_>>(), vec![1.0, 2.0, 4.0, 4.0]);
    }
}
