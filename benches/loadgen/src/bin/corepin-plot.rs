//! corepin-plot: draws SVG plots from the benchmark harness's results JSON.
//!
//! Input: {"meta": {...}, "echo": [{"server", "conns", "size", "msgs_per_sec",
//! "server_cpu_us_per_msg", "cdf": [[us, q], ...], ...}, ...],
//! "files"/"https": [{"server", "config", "file", "size", "server_cpu_us_per_req", ...}], ...}.
//! Writes into --out-dir:
//!   echo_throughput_<size>.svg, echo_cpu_<size>.svg,
//!   echo_latency_cdf_<size>_<conns>.svg (conns = 128 if present, else the largest),
//!   files_cpu_vs_nginx.svg, https_cpu_vs_nginx.svg (server CPU per request of each server
//!   relative to nginx's, by request kind),
//!   h3_cpu_vs_quinn.svg (from "h3": [{"server", "size", "conns", "server_cpu_us_per_req",
//!   "server_cpu_us_per_mb", "vs_peer", ...}]: server CPU per request, or per MB for bodies of
//!   1 MiB and more, relative to the "quinn-tokio" peer's; the paired "vs_peer" ratios when
//!   every row has one),
//!   ingest_cpu_vs_socket.svg and ingest_pps.svg (from "ingest": [{"source", "layout", "size",
//!   "corepin_ns_per_pkt", "pps", ...}]: corepin's CPU per datagram relative to the socket
//!   source's, and datagrams/s taken, per layout and payload size).
//! Prints the path of every file written. Plots that cannot be drawn are
//! skipped with a note on stderr. Bad input: one error line, exit 1.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "corepin-plot", about = "Draw SVG plots from corepin's benchmark results JSON")]
struct Cli {
    /// Results JSON written by the benchmark harness.
    #[arg(long)]
    input: PathBuf,
    /// Directory to write the SVG files into (created if missing).
    #[arg(long)]
    out_dir: PathBuf,
}

const W: u32 = 900;
const H: u32 = 560;
const PREFERRED_CDF_CONNS: u64 = 128;
/// The server the `h3` plot divides by: quinn + h3 on tokio (benches/peers, corepin-peer-h3).
const H3_REFERENCE: &str = "quinn-tokio";
/// The source the `ingest` plot divides by: corepin's own SO_REUSEPORT + recvmmsg sockets.
const INGEST_REFERENCE: &str = "socket (recvmmsg)";

/// One echo result, reduced to what the plots use.
#[derive(Clone, Debug)]
struct EchoPoint {
    server: String,
    conns: u64,
    size: u64,
    msgs_per_sec: Option<f64>,
    cpu_us_per_msg: Option<f64>,
    cdf: Vec<(f64, f64)>,
}

fn note(msg: impl AsRef<str>) {
    eprintln!("corepin-plot: note: {}", msg.as_ref());
}

fn main() {
    // Plotters should not panic on the inputs we give it, but a panic must
    // still end as one clear error line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("corepin-plot: internal error: {msg}");
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(&cli)) {
        Ok(Ok(written)) => {
            if written == 0 {
                eprintln!("corepin-plot: no plot could be drawn from {}", cli.input.display());
            }
        }
        Ok(Err(e)) => {
            eprintln!("corepin-plot: error: {e:#}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(1),
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

fn uint(v: &Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64)),
        _ => None,
    }
}

fn parse_cdf(v: &Value) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    if let Some(arr) = v.get("cdf").and_then(Value::as_array) {
        for p in arr {
            if let Some(pair) = p.as_array() {
                if pair.len() >= 2 {
                    if let (Some(us), Some(q)) = (pair[0].as_f64(), pair[1].as_f64()) {
                        if us.is_finite() && q.is_finite() && us > 0.0 && (0.0..=1.0).contains(&q) {
                            out.push((us, q));
                        }
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.total_cmp(&b.0)));
    out
}

fn load(path: &Path) -> Result<Vec<EchoPoint>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let root: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    if !root.is_object() {
        bail!("{}: top level is not a JSON object", path.display());
    }
    let echo = match root.get("echo") {
        None | Some(Value::Null) => {
            note("input has no \"echo\" results; nothing to plot");
            return Ok(Vec::new());
        }
        Some(Value::Array(a)) => a,
        Some(_) => bail!("{}: \"echo\" is not an array", path.display()),
    };
    let mut raw = Vec::new();
    for (i, r) in echo.iter().enumerate() {
        let server = r.get("server").and_then(Value::as_str);
        let conns = uint(r, "conns");
        let size = uint(r, "size");
        let (Some(server), Some(conns), Some(size)) = (server, conns, size) else {
            note(format!("echo[{i}]: missing or bad \"server\", \"conns\" or \"size\"; skipped"));
            continue;
        };
        raw.push(EchoPoint {
            server: server.to_string(),
            conns,
            size,
            msgs_per_sec: num(r, "msgs_per_sec"),
            cpu_us_per_msg: num(r, "server_cpu_us_per_msg"),
            cdf: parse_cdf(r),
        });
    }
    // Repeated runs of the same (server, size, conns): average the numbers,
    // keep the first CDF.
    // (size, server, conns) -> (first result, all msgs_per_sec, all cpu values)
    type Merged = BTreeMap<(u64, String, u64), (EchoPoint, Vec<f64>, Vec<f64>)>;
    let mut merged: Merged = BTreeMap::new();
    for p in raw {
        let key = (p.size, p.server.clone(), p.conns);
        let e = merged.entry(key).or_insert_with(|| (p.clone(), Vec::new(), Vec::new()));
        e.1.extend(p.msgs_per_sec);
        e.2.extend(p.cpu_us_per_msg);
        if e.0.cdf.is_empty() && !p.cdf.is_empty() {
            e.0.cdf = p.cdf;
        }
    }
    let mean = |v: &[f64]| if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) };
    let mut out = Vec::new();
    for ((size, server, conns), (mut p, t, c)) in merged {
        if t.len() > 1 || c.len() > 1 {
            note(format!(
                "{server}, size {size}, {conns} conns: {} results, plotting their mean",
                t.len().max(c.len())
            ));
        }
        p.msgs_per_sec = mean(&t);
        p.cpu_us_per_msg = mean(&c);
        out.push(p);
    }
    Ok(out)
}

/// One request kind of the files/https workloads: its label and each server's CPU per request.
type VsNginx = Vec<(String, Vec<(String, f64)>)>;

/// The `files` or `https` results of `root`, grouped by request kind (file and connection
/// reuse), in the order first seen; servers in the order first seen.
fn load_vs_nginx(root: &Value, key: &str) -> VsNginx {
    let mut out: VsNginx = Vec::new();
    let Some(rows) = root.get(key).and_then(Value::as_array) else { return out };
    for (i, r) in rows.iter().enumerate() {
        let (Some(server), Some(cpu)) = (r.get("server").and_then(Value::as_str), num(r, "server_cpu_us_per_req"))
        else {
            note(format!("{key}[{i}]: missing \"server\" or \"server_cpu_us_per_req\"; skipped"));
            continue;
        };
        let size = uint(r, "size").map(size_label).unwrap_or_else(|| "?".into());
        let kind = match r.get("config").and_then(Value::as_str) {
            Some("handshake") => format!("{size}, new connection each"),
            Some("default") | None => format!("{size}, keep-alive"),
            Some(other) => format!("{size}, {other}"),
        };
        let at = match out.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                out.push((kind, Vec::new()));
                out.len() - 1
            }
        };
        out[at].1.push((server.to_string(), cpu));
    }
    out
}

/// Grouped bars: per request kind, each server's CPU per request divided by nginx's.
fn plot_vs_nginx(dir: &Path, key: &str, groups: &VsNginx) -> Result<Option<PathBuf>> {
    let title = if key == "https" {
        "HTTPS: server CPU per request relative to nginx (lower is better)"
    } else {
        "Files: server CPU per request relative to nginx (lower is better)"
    };
    plot_relative(dir, &format!("{key}_cpu_vs_nginx"), title, "nginx", "server CPU per request / nginx's", groups)
}

/// The `h3` results of `root`, grouped by request kind (body size and connections): each
/// server's CPU per request, or per MB for bodies of 1 MiB and more.
fn load_h3(root: &Value) -> VsNginx {
    let mut out: VsNginx = Vec::new();
    let Some(rows) = root.get("h3").and_then(Value::as_array) else { return out };
    // bench.py records each server's ratio to the peer paired round by round ("vs_peer", the
    // peer's own being 1); the bars show those when every row has one, so they match the
    // tables, and otherwise (an older file) each server's CPU over the peer's.
    let paired = rows.iter().all(|r| num(r, "vs_peer").is_some());
    for (i, r) in rows.iter().enumerate() {
        let (Some(server), Some(size), Some(conns)) =
            (r.get("server").and_then(Value::as_str), uint(r, "size"), uint(r, "conns"))
        else {
            note(format!("h3[{i}]: missing \"server\", \"size\" or \"conns\"; skipped"));
            continue;
        };
        let per_mb = size >= 1 << 20;
        let cpu = if paired {
            num(r, "vs_peer")
        } else if per_mb {
            num(r, "server_cpu_us_per_mb")
        } else {
            num(r, "server_cpu_us_per_req")
        };
        let Some(cpu) = cpu else {
            note(format!("h3[{i}]: no server CPU figure; skipped"));
            continue;
        };
        // The big body's label stays short: the groups share 900 pixels.
        let kind = if per_mb {
            format!("{}, per MB", size_label(size))
        } else {
            format!("{}, {conns} conn{}", size_label(size), if conns == 1 { "" } else { "s" })
        };
        let at = match out.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                out.push((kind, Vec::new()));
                out.len() - 1
            }
        };
        out[at].1.push((server.to_string(), cpu));
    }
    out
}

/// The `ingest` results of `root`, grouped by layout and payload size: each source's `key`
/// figure, times `scale`.
fn load_ingest(root: &Value, key: &str, scale: f64) -> VsNginx {
    let mut out: VsNginx = Vec::new();
    let Some(rows) = root.get("ingest").and_then(Value::as_array) else { return out };
    for (i, r) in rows.iter().enumerate() {
        let (Some(source), Some(layout), Some(size)) =
            (r.get("source").and_then(Value::as_str), r.get("layout").and_then(Value::as_str), uint(r, "size"))
        else {
            note(format!("ingest[{i}]: missing \"source\", \"layout\" or \"size\"; skipped"));
            continue;
        };
        let Some(v) = num(r, key) else {
            note(format!("ingest[{i}]: no \"{key}\"; skipped"));
            continue;
        };
        let kind = format!("{layout}, {}", size_label(size));
        let at = match out.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                out.push((kind, Vec::new()));
                out.len() - 1
            }
        };
        out[at].1.push((source.to_string(), v * scale));
    }
    out
}

/// Grouped bars: per request kind, each server's CPU divided by that of `reference` (the
/// line at 1.0). Kinds without a `reference` result are left out.
fn plot_relative(
    dir: &Path,
    stem: &str,
    title: &str,
    reference: &str,
    y_desc: &str,
    groups: &VsNginx,
) -> Result<Option<PathBuf>> {
    let ratios: VsNginx = groups
        .iter()
        .filter_map(|(kind, servers)| {
            let base = servers.iter().find(|(s, _)| s == reference).map(|(_, v)| *v).filter(|v| *v > 0.0)?;
            Some((kind.clone(), servers.iter().map(|(s, v)| (s.clone(), v / base)).collect()))
        })
        .collect();
    if ratios.is_empty() {
        note(format!("{stem}: no request kind has a {reference} result; {stem}.svg skipped"));
        return Ok(None);
    }
    plot_grouped(dir, stem, title, y_desc, &ratios, Some(1.0))
}

/// Grouped bars: per kind, one bar per series (in the order first seen), and a horizontal
/// line at `line` when given.
fn plot_grouped(
    dir: &Path,
    stem: &str,
    title: &str,
    y_desc: &str,
    ratios: &VsNginx,
    line: Option<f64>,
) -> Result<Option<PathBuf>> {
    let mut servers: Vec<String> = Vec::new();
    for (_, rs) in ratios {
        for (s, _) in rs {
            if !servers.contains(s) {
                servers.push(s.clone());
            }
        }
    }
    let g = ratios.len() as f64;
    let ymax = ratios
        .iter()
        .flat_map(|(_, rs)| rs.iter().map(|(_, v)| *v))
        .fold(line.unwrap_or(0.0), f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.2;
    let path = dir.join(format!("{stem}.svg"));
    {
        let root = SVGBackend::new(&path, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..g, 0f64..ymax)
            .map_err(plot_err)?;
        let labels: Vec<String> = ratios.iter().map(|(k, _)| k.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * ratios.len() + 1)
            .x_label_formatter(&|x: &f64| {
                let centre = x - 0.5;
                if (centre - centre.round()).abs() < 1e-6 && centre >= 0.0 {
                    labels.get(centre.round() as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_desc)
            .y_label_formatter(&|v: &f64| format!("{v:.1}"))
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(plot_err)?;
        let width = 0.8 / servers.len() as f64;
        for (si, server) in servers.iter().enumerate() {
            let color = series_color(si);
            let bars: Vec<Rectangle<(f64, f64)>> = ratios
                .iter()
                .enumerate()
                .filter_map(|(gi, (_, rs))| {
                    let v = rs.iter().find(|(s, _)| s == server)?.1;
                    let x0 = gi as f64 + 0.1 + si as f64 * width;
                    Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled()))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(plot_err)?
                .label(server.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        }
        if let Some(y) = line {
            chart.draw_series(LineSeries::new(vec![(0.0, y), (g, y)], BLACK.stroke_width(1))).map_err(plot_err)?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Some(path))
}

fn run(cli: &Cli) -> Result<usize> {
    let text = std::fs::read_to_string(&cli.input).with_context(|| format!("reading {}", cli.input.display()))?;
    let root: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cli.input.display()))?;
    let points = load(&cli.input)?;
    std::fs::create_dir_all(&cli.out_dir)
        .with_context(|| format!("creating output directory {}", cli.out_dir.display()))?;
    let sizes: BTreeSet<u64> = points.iter().map(|p| p.size).collect();
    let mut written = 0usize;
    let mut emit = |res: Result<Option<PathBuf>>, what: String| match res {
        Ok(Some(path)) => {
            println!("{}", path.display());
            written += 1;
        }
        Ok(None) => {}
        Err(e) => note(format!("{what}: could not draw: {e:#}")),
    };
    for &size in &sizes {
        let pts: Vec<&EchoPoint> = points.iter().filter(|p| p.size == size).collect();
        emit(plot_by_conns(&cli.out_dir, size, &pts, Metric::Throughput), format!("throughput, size {size}"));
        emit(plot_by_conns(&cli.out_dir, size, &pts, Metric::Cpu), format!("cpu, size {size}"));
        emit(plot_cdf(&cli.out_dir, size, &pts), format!("latency CDF, size {size}"));
    }
    for key in ["files", "https"] {
        let groups = load_vs_nginx(&root, key);
        if !groups.is_empty() {
            emit(plot_vs_nginx(&cli.out_dir, key, &groups), format!("{key} against nginx"));
        }
    }
    let h3 = load_h3(&root);
    if !h3.is_empty() {
        let title = "HTTP/3: server CPU per request relative to quinn + h3 on tokio (lower is better)";
        let y_desc = "server CPU per request (or MB) / the quinn peer's";
        emit(
            plot_relative(&cli.out_dir, "h3_cpu_vs_quinn", title, H3_REFERENCE, y_desc, &h3),
            "h3 against quinn".into(),
        );
    }
    let cpu = load_ingest(&root, "corepin_ns_per_pkt", 1.0);
    if !cpu.is_empty() {
        let title = "UDP ingest: corepin CPU per datagram vs the socket source (lower is better)";
        let y_desc = "corepin CPU per datagram / the socket source's";
        emit(
            plot_relative(&cli.out_dir, "ingest_cpu_vs_socket", title, INGEST_REFERENCE, y_desc, &cpu),
            "ingest against sockets".into(),
        );
    }
    let pps = load_ingest(&root, "pps", 1e-6);
    if !pps.is_empty() {
        let title = "UDP ingest on veth: datagrams taken per second (higher is better)";
        emit(
            plot_grouped(&cli.out_dir, "ingest_pps", title, "million datagrams per second", &pps, None),
            "ingest datagrams/s".into(),
        );
    }
    Ok(written)
}

#[derive(Clone, Copy, PartialEq)]
enum Metric {
    Throughput,
    Cpu,
}

fn series_color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 10] = [
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
    COLORS[i % COLORS.len()]
}

/// Short human form: 1234567 -> "1.23M".
fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e12 {
        return format!("{v:.1e}");
    }
    let (d, s) = if a >= 1e9 {
        (1e9, "G")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let x = v / d;
    let t = if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    // "1.20" -> "1.2", "2.00" -> "2"
    let t = if t.contains('.') { t.trim_end_matches('0').trim_end_matches('.').to_string() } else { t };
    format!("{t}{s}")
}

fn size_label(size: u64) -> String {
    if size >= 1 << 20 && size % (1 << 20) == 0 {
        format!("{} MiB", size >> 20)
    } else if size >= 1024 && size % 1024 == 0 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotters: {e:?}")
}

/// The series legend, in the same style on every plot.
fn draw_legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(plot_err)
}

/// Throughput or CPU per message against connections (categorical x axis).
fn plot_by_conns(dir: &Path, size: u64, pts: &[&EchoPoint], metric: Metric) -> Result<Option<PathBuf>> {
    let value = |p: &EchoPoint| match metric {
        Metric::Throughput => p.msgs_per_sec,
        Metric::Cpu => p.cpu_us_per_msg,
    };
    let (what, file, title, ylabel) = match metric {
        Metric::Throughput => (
            "msgs_per_sec",
            format!("echo_throughput_{size}.svg"),
            format!("Echo throughput, {} messages", size_label(size)),
            "messages / s",
        ),
        Metric::Cpu => (
            "server_cpu_us_per_msg",
            format!("echo_cpu_{size}.svg"),
            format!("Server CPU per message, {} messages", size_label(size)),
            "server CPU µs / message",
        ),
    };
    let usable: Vec<(&EchoPoint, f64)> =
        pts.iter().filter_map(|p| value(p).filter(|v| *v >= 0.0).map(|v| (*p, v))).collect();
    if usable.is_empty() {
        note(format!("size {size}: no result has \"{what}\"; {file} skipped"));
        return Ok(None);
    }
    let conns: Vec<u64> = usable.iter().map(|(p, _)| p.conns).collect::<BTreeSet<_>>().into_iter().collect();
    let idx = |c: u64| conns.iter().position(|&x| x == c).unwrap_or(0) as i32;
    let mut by_server: BTreeMap<&str, Vec<(i32, f64)>> = BTreeMap::new();
    for (p, v) in &usable {
        by_server.entry(p.server.as_str()).or_default().push((idx(p.conns), *v));
    }
    let ymax = usable.iter().map(|(_, v)| *v).fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.2 } else { 1.0 };
    let n = conns.len() as i32;
    let xy: Vec<(f64, f64)> = usable.iter().map(|(p, v)| (idx(p.conns) as f64, *v)).collect();
    let legend_pos = legend_corner(&xy, (n - 1).max(1) as f64, ymax);

    let path = dir.join(&file);
    {
        let root = SVGBackend::new(&path, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        // Categorical x axis: one evenly spaced slot per connection count.
        let x_range = (0i32..(n - 1)).into_segmented();
        let mut chart = ChartBuilder::on(&root)
            .caption(&title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x_range, 0f64..ymax)
            .map_err(plot_err)?;
        let conns_for_fmt = conns.clone();
        let ylabel_fmt = move |v: &f64| match metric {
            Metric::Throughput => human(*v),
            Metric::Cpu => {
                let t = format!("{v:.3}");
                t.trim_end_matches('0').trim_end_matches('.').to_string()
            }
        };
        chart
            .configure_mesh()
            .x_desc("connections")
            .y_desc(ylabel)
            .x_labels(conns.len() + 1)
            .x_label_formatter(&|x: &SegmentValue<i32>| match x {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                    .ok()
                    .and_then(|i| conns_for_fmt.get(i))
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                SegmentValue::Last => String::new(),
            })
            .y_label_formatter(&ylabel_fmt)
            .y_labels(8)
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(plot_err)?;
        for (i, (server, mut line)) in by_server.into_iter().enumerate() {
            line.sort_by_key(|a| a.0);
            let color = series_color(i);
            let line: Vec<(SegmentValue<i32>, f64)> =
                line.into_iter().map(|(x, y)| (SegmentValue::CenterOf(x), y)).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(server)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(line.iter().map(|(x, y)| Circle::new((x.clone(), *y), 4, color.filled())))
                .map_err(plot_err)?;
        }
        draw_legend(&mut chart, legend_pos)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Some(path))
}

/// Picks the plot corner with the fewest data points near it for the legend
/// (upper corners preferred). `xmax`/`ymax` are the ends of the axes (from 0).
fn legend_corner(pts: &[(f64, f64)], xmax: f64, ymax: f64) -> SeriesLabelPosition {
    let count = |left: bool, top: bool| {
        pts.iter()
            .filter(|(x, y)| {
                let fx = x / xmax;
                let fy = y / ymax;
                let in_x = if left { fx <= 0.4 } else { fx >= 0.6 };
                let in_y = if top { fy >= 0.7 } else { fy <= 0.3 };
                in_x && in_y
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperLeft, count(true, true)),
        (SeriesLabelPosition::UpperRight, count(false, true)),
        (SeriesLabelPosition::LowerRight, count(false, false)),
        (SeriesLabelPosition::LowerLeft, count(true, false)),
    ]
    .into_iter()
    .min_by_key(|(_, c)| *c)
    .map(|(p, _)| p)
    .unwrap_or(SeriesLabelPosition::UpperLeft)
}

/// Latency CDF per server at one connection count (128 if present, else the largest).
fn plot_cdf(dir: &Path, size: u64, pts: &[&EchoPoint]) -> Result<Option<PathBuf>> {
    let with_cdf: Vec<&EchoPoint> = pts.iter().copied().filter(|p| !p.cdf.is_empty()).collect();
    if with_cdf.is_empty() {
        note(format!("size {size}: no result has a usable \"cdf\"; latency CDF skipped"));
        return Ok(None);
    }
    let conns = if with_cdf.iter().any(|p| p.conns == PREFERRED_CDF_CONNS) {
        PREFERRED_CDF_CONNS
    } else {
        with_cdf.iter().map(|p| p.conns).max().unwrap_or(0)
    };
    let sel: Vec<&EchoPoint> = with_cdf.into_iter().filter(|p| p.conns == conns).collect();
    let xmin = sel.iter().flat_map(|p| p.cdf.iter().map(|c| c.0)).fold(f64::INFINITY, f64::min);
    let xmax = sel.iter().flat_map(|p| p.cdf.iter().map(|c| c.0)).fold(0.0f64, f64::max);
    if !(xmin.is_finite() && xmax.is_finite() && xmin > 0.0) {
        note(format!("size {size}: latency values unusable; latency CDF skipped"));
        return Ok(None);
    }
    // Pad the log range a little; keep it non-empty.
    let (lo, hi) = (xmin / 1.25, (xmax * 1.25).max(xmin * 2.0));

    let file = format!("echo_latency_cdf_{size}_{conns}.svg");
    let path = dir.join(&file);
    {
        let root = SVGBackend::new(&path, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Echo round-trip latency CDF, {} messages, {conns} connection{}",
                    size_label(size),
                    if conns == 1 { "" } else { "s" }
                ),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("round-trip latency (µs, log scale)")
            .x_labels(20)
            .y_desc("quantile")
            .x_label_formatter(&|v: &f64| {
                if *v >= 100.0 {
                    human(*v)
                } else if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
            .y_label_formatter(&|v: &f64| format!("{v:.1}"))
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(plot_err)?;
        for (i, p) in sel.iter().enumerate() {
            let color = series_color(i);
            chart
                .draw_series(LineSeries::new(p.cdf.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(p.server.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Some(path))
}
