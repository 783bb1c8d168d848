//! The self-contained HTML report: sortable tables, inline SVG charts and sample browsers. No
//! scripts or styles are fetched, so it opens offline and can be attached to a CI run as is.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::compare::Comparison;
use crate::leaderboard::{direction, fmt_value, summary_grid, Entry};
use crate::results::Run;

/// Report settings.
#[derive(Clone, Debug)]
pub struct HtmlOptions {
    pub title: String,
    /// Sample rows per task in the browsers (the Parquet files have them all).
    pub max_samples: usize,
}

impl Default for HtmlOptions {
    fn default() -> Self {
        HtmlOptions {
            title: "moeval report".into(),
            max_samples: 300,
        }
    }
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}th:after{content:' \\2195';color:#aaa}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.charts{display:flex;flex-wrap:wrap;gap:18px}.chart{border:1px solid #eee;padding:6px}
.prompt{max-width:520px;white-space:pre-wrap;font-family:monospace;font-size:12px;max-height:8em;overflow:auto}
.muted{color:#777}input.filter{margin:4px 0;padding:3px;width:320px}details{margin:6px 0}summary{cursor:pointer}";

const SCRIPT: &str = "document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>{
const t=th.closest('table'),b=t.tBodies[0],i=th.cellIndex,asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const rows=[...b.rows];rows.sort((x,y)=>{const a=x.cells[i],c=y.cells[i];if(!a||!c)return 0;
const va=a.dataset.v??a.textContent,vc=c.dataset.v??c.textContent,na=parseFloat(va),nc=parseFloat(vc);
const r=(!isNaN(na)&&!isNaN(nc))?na-nc:va.localeCompare(vc);return asc?r:-r});rows.forEach(r=>b.appendChild(r))}));
document.querySelectorAll('input.filter').forEach(inp=>inp.addEventListener('input',()=>{const q=inp.value.toLowerCase();
document.getElementById(inp.dataset.table).tBodies[0].querySelectorAll('tr').forEach(r=>{
r.style.display=r.textContent.toLowerCase().includes(q)?'':'none'})}));";

/// A signed change short enough for a heatmap cell: `+0.0123`, `-2.59e5`.
fn signed(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e3 || v.abs() < 1e-4) {
        format!("{v:+.2e}")
    } else {
        format!("{v:+.4}")
    }
}

/// A bar: (label, value, stderr).
pub type Bar = (String, f64, Option<f64>);

/// A horizontal bar chart with error bars.
pub fn bar_chart(title: &str, bars: &[Bar]) -> String {
    let (lw, bw, rh, top) = (190.0, 230.0, 20.0, 26.0);
    let h = top + rh * bars.len() as f64 + 8.0;
    let vals: Vec<f64> = bars
        .iter()
        .flat_map(|b| [b.1, b.1 + b.2.unwrap_or(0.0)])
        .filter(|v| v.is_finite())
        .collect();
    let max = vals.iter().cloned().fold(0.0f64, f64::max);
    let min = vals.iter().cloned().fold(0.0f64, f64::min);
    let span = if max - min > 0.0 { max - min } else { 1.0 };
    let x = |v: f64| lw + (v - min) / span * bw;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{h}' role='img'><title>{t}</title>\
<text x='4' y='16' font-size='13' font-weight='bold'>{t}</text>",
        lw + bw + 70.0,
        t = esc(title)
    );
    for (i, (label, v, se)) in bars.iter().enumerate() {
        let y = top + rh * i as f64;
        let short: String = label.chars().take(30).collect();
        let _ = write!(
            s,
            "<text x='{}' y='{}' font-size='11' text-anchor='end'>{}</text>",
            lw - 4.0,
            y + 13.0,
            esc(&short)
        );
        if v.is_finite() {
            let (x0, x1) = (x(0.0).min(x(*v)), x(0.0).max(x(*v)));
            let _ = write!(
                s,
                "<rect x='{x0:.1}' y='{:.1}' width='{:.1}' height='14' fill='#4e79a7'><title>{}: {}</title></rect>",
                y + 2.0,
                (x1 - x0).max(0.5),
                esc(label),
                num(*v)
            );
            if let Some(se) = se.filter(|s| s.is_finite() && *s > 0.0) {
                let _ = write!(
                    s,
                    "<line x1='{:.1}' x2='{:.1}' y1='{:.1}' y2='{:.1}' stroke='#222'/>",
                    x(v - se),
                    x(v + se),
                    y + 9.0,
                    y + 9.0
                );
            }
            let _ = write!(
                s,
                "<text x='{:.1}' y='{}' font-size='10'>{}</text>",
                x1.max(x(v + se.unwrap_or(0.0))) + 4.0,
                y + 13.0,
                num(*v)
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// A heatmap of score changes: rows (task, metric), columns opt-out masks; blue = better,
/// red = worse (in the metric's direction), scaled per row because tasks have different units.
/// `higher_is_better(task, metric)` colours each row: better is blue, worse red.
pub fn heatmap(
    title: &str,
    cols: &[String],
    rows: &[(String, String, Vec<Option<f64>>)],
    higher_is_better: impl Fn(&str, &str) -> bool,
) -> String {
    let (lw, cw, rh, top) = (230.0, 86.0, 22.0, 44.0);
    let w = lw + cw * cols.len() as f64 + 10.0;
    let h = top + rh * rows.len() as f64 + 8.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img'><title>{t}</title>\
<text x='4' y='16' font-size='13' font-weight='bold'>{t}</text>",
        t = esc(title)
    );
    for (j, c) in cols.iter().enumerate() {
        let _ = write!(
            s,
            "<text x='{:.1}' y='{}' font-size='11' text-anchor='middle'>{}</text>",
            lw + cw * j as f64 + cw / 2.0,
            top - 6.0,
            esc(c)
        );
    }
    for (i, (task, metric, vals)) in rows.iter().enumerate() {
        let y = top + rh * i as f64;
        let _ = write!(
            s,
            "<text x='{}' y='{}' font-size='11' text-anchor='end'>{} ({})</text>",
            lw - 4.0,
            y + 15.0,
            esc(task),
            esc(metric)
        );
        let scale = vals
            .iter()
            .flatten()
            .map(|v| v.abs())
            .fold(0.0f64, f64::max);
        let sign = if higher_is_better(task, metric) {
            1.0
        } else {
            -1.0
        };
        for (j, v) in vals.iter().enumerate() {
            let x = lw + cw * j as f64;
            let (fill, text) = match v {
                Some(v) if v.is_finite() => {
                    let g = if scale > 0.0 { sign * v / scale } else { 0.0 };
                    let a = (g.abs() * 0.85 + 0.05).min(0.9);
                    let rgb = if g >= 0.0 { "33,102,172" } else { "178,24,43" };
                    (format!("rgba({rgb},{a:.2})"), signed(*v))
                }
                _ => ("#eee".to_string(), "-".to_string()),
            };
            let _ = write!(
                s,
                "<rect x='{x:.1}' y='{y:.1}' width='{}' height='{}' fill='{fill}' stroke='#fff'><title>{} {} {}: {text}</title></rect>\
<text x='{:.1}' y='{:.1}' font-size='10' text-anchor='middle'>{text}</text>",
                cw - 1.0,
                rh - 1.0,
                esc(task),
                esc(metric),
                esc(&cols[j]),
                x + cw / 2.0,
                y + 14.0
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// Splits `metric[field=value]` into (metric, field, value); None for anything else.
fn per_group(metric: &str) -> Option<(&str, &str, &str)> {
    let (base, rest) = metric.split_once('[')?;
    let inner = rest.strip_suffix(']')?;
    if inner.contains(',') {
        return None;
    }
    let (f, v) = inner.split_once('=')?;
    Some((base, f, v))
}

/// Builds `index.html`.
pub fn render(
    runs: &[Run],
    entries: &[Entry],
    comparisons: &[(String, String, Vec<Comparison>)],
    opts: &HtmlOptions,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1>",
        t = esc(&opts.title)
    );
    // Runs.
    h.push_str("<h2>Runs</h2><table class='sortable'><thead><tr><th>run</th><th>model</th><th>weights hash</th><th>masks</th><th>tasks</th><th>moeval</th><th>git</th><th>start</th><th>end</th><th>threads</th></tr></thead><tbody>");
    for r in runs {
        let m = &r.manifest;
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td title='{}'>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class='n'>{}</td></tr>",
            esc(&m.run_id),
            esc(&m.model.id),
            esc(&m.model.weights_hash),
            esc(&m.model.weights_hash.chars().take(12).collect::<String>()),
            esc(&r.masks().join(", ")),
            m.tasks.len(),
            esc(&m.moeval_version),
            esc(m.git_revision.as_deref().unwrap_or("-")),
            esc(&m.start_time),
            esc(m.end_time.as_deref().unwrap_or("-")),
            m.threads
        );
    }
    h.push_str("</tbody></table>");

    // Leaderboard: (model, mask, retrieval) x task.
    let (cols, rows) = summary_grid(entries);
    h.push_str("<h2>Leaderboard</h2><p class='muted'>Primary metric of each task, value ± standard error (↓: lower is better). Click a header to sort.</p><table class='sortable' id='leaderboard'><thead><tr><th>run</th><th>model</th><th>mask</th><th>retrieval</th>");
    for (t, m) in &cols {
        let arrow = if direction(entries, t, m) { "" } else { " ↓" };
        let _ = write!(
            h,
            "<th>{}<br><span class='muted'>{}{arrow}</span></th>",
            esc(t),
            esc(m)
        );
    }
    h.push_str("</tr></thead><tbody>");
    for r in &rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            esc(&r.run_id),
            esc(&r.model_id),
            esc(&r.mask),
            esc(&r.retrieval)
        );
        for (t, m) in &cols {
            let e = entries
                .iter()
                .find(|e| r.holds(e) && &e.task == t && &e.metric == m);
            match e {
                Some(e) => {
                    let _ = write!(
                        h,
                        "<td class='n' data-v='{}'>{}</td>",
                        e.value.unwrap_or(f64::NAN),
                        esc(&fmt_value(e.value, e.stderr))
                    );
                }
                None => h.push_str("<td></td>"),
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");

    // Scores per task and model.
    h.push_str("<h2>Scores per task</h2><div class='charts'>");
    for (t, m) in &cols {
        let bars: Vec<(String, f64, Option<f64>)> = entries
            .iter()
            .filter(|e| &e.task == t && &e.metric == m)
            .map(|e| {
                (
                    match e.retrieval.as_str() {
                        "none" => format!("{} {}", e.model_id, e.mask),
                        r => format!("{} {} {r}", e.model_id, e.mask),
                    },
                    e.value.unwrap_or(f64::NAN),
                    e.stderr,
                )
            })
            .collect();
        let arrow = if direction(entries, t, m) {
            ""
        } else {
            " (lower is better)"
        };
        let _ = write!(
            h,
            "<div class='chart'>{}</div>",
            bar_chart(&format!("{t}: {m}{arrow}"), &bars)
        );
    }
    h.push_str("</div>");

    // Opt-out matrix per run with several masks.
    let sweeps: Vec<&Run> = runs.iter().filter(|r| r.masks().len() > 1).collect();
    if !sweeps.is_empty() {
        h.push_str("<h2>Opt-out matrix</h2><p class='muted'>Change in each task's primary metric when the expert is opted out, against the run's full mask. Blue: better, red: worse; colours are scaled per row.</p><div class='charts'>");
        for r in sweeps {
            let masks = r.masks();
            let full = &masks[0];
            let others: Vec<String> = masks[1..].to_vec();
            let mut rows: Vec<(String, String, Vec<Option<f64>>)> = Vec::new();
            for e in entries
                .iter()
                .filter(|e| e.run_id == r.manifest.run_id && e.primary && &e.mask == full)
            {
                let vals = others
                    .iter()
                    .map(|o| {
                        let x = entries.iter().find(|x| {
                            x.run_id == e.run_id
                                && &x.mask == o
                                && x.task == e.task
                                && x.metric == e.metric
                        })?;
                        Some(x.value? - e.value?)
                    })
                    .collect();
                rows.push((e.task.clone(), e.metric.clone(), vals));
            }
            let _ = write!(
                h,
                "<div class='chart'>{}</div>",
                heatmap(
                    &format!(
                        "{} ({}): score change per opt-out",
                        r.manifest.run_id, r.manifest.model.id
                    ),
                    &others,
                    &rows,
                    |t, m| r.higher_is_better(t, m),
                )
            );
        }
        h.push_str("</div>");
    }

    // Per-group accuracy (CALM gender / race, or any group_by field).
    let mut groups = String::new();
    for r in runs {
        let masks = r.masks();
        let Some(full) = masks.first() else { continue };
        let mut by_task: BTreeMap<(&str, &str, &str), Vec<Bar>> = BTreeMap::new();
        for m in r.metrics.iter().filter(|m| &m.mask == full) {
            let Some((base, field, value)) = per_group(&m.metric) else {
                continue;
            };
            let primary = entries
                .iter()
                .any(|e| e.run_id == m.run_id && e.task == m.task && e.primary && e.metric == base);
            if !primary || field == "template_idx" || field == "source_dataset" {
                continue;
            }
            by_task
                .entry((m.task.as_str(), base, field))
                .or_default()
                .push((value.to_string(), m.value.unwrap_or(f64::NAN), m.stderr));
        }
        for ((task, base, field), bars) in by_task {
            let _ = write!(
                groups,
                "<div class='chart'>{}</div>",
                bar_chart(
                    &format!("{} {task}: {base} by {field}", r.manifest.model.id),
                    &bars
                )
            );
        }
    }
    if !groups.is_empty() {
        let _ = write!(h, "<h2>Per-group accuracy</h2><p class='muted'>Full mask of each run; error bars are one standard error.</p><div class='charts'>{groups}</div>");
    }

    // Paired comparisons.
    if !comparisons.is_empty() {
        h.push_str("<h2>Paired comparisons</h2><p class='muted'>B − A on the samples both share (same task, document and prompt). 95% CI: paired bootstrap (1000 resamples); p: McNemar's exact test for 0/1 metrics, else the paired bootstrap.</p><input class='filter' data-table='comparisons' placeholder='filter'><table class='sortable' id='comparisons'><thead><tr><th>A</th><th>B</th><th>task</th><th>metric</th><th>n</th><th>A</th><th>B</th><th>B − A</th><th>95% CI</th><th>p</th><th>test</th></tr></thead><tbody>");
        for (a, b, cs) in comparisons {
            for c in cs {
                let d = &c.diff;
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class='n'>{}</td><td class='n'>{}</td><td class='n'>{}</td><td class='n' data-v='{}'>{:+.4}</td><td class='n'>[{:+.4}, {:+.4}]</td><td class='n' data-v='{}'>{}</td><td>{}</td></tr>",
                    esc(a), esc(b), esc(&c.task), esc(&c.metric), d.n, num(d.mean_a), num(d.mean_b),
                    d.diff, d.diff, d.ci_low, d.ci_high, c.p_value, num(c.p_value), c.test
                );
            }
        }
        h.push_str("</tbody></table>");
    }

    // All headline metrics.
    h.push_str("<h2>All metrics</h2><input class='filter' data-table='metrics' placeholder='filter (task, metric, mask...)'><table class='sortable' id='metrics'><thead><tr><th>run</th><th>model</th><th>mask</th><th>retrieval</th><th>task</th><th>metric</th><th>value</th><th>stderr</th><th>n</th></tr></thead><tbody>");
    for e in entries {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class='n' data-v='{}'>{}</td><td class='n'>{}</td><td class='n'>{}</td></tr>",
            esc(&e.run_id), esc(&e.model_id), esc(&e.mask), esc(&e.retrieval), esc(&e.task), esc(&e.metric),
            e.value.unwrap_or(f64::NAN), num(e.value.unwrap_or(f64::NAN)), num(e.stderr.unwrap_or(f64::NAN)), e.n
        );
    }
    h.push_str("</tbody></table>");

    // Sample browsers.
    h.push_str("<h2>Samples</h2>");
    let mut tasks: Vec<&str> = Vec::new();
    for r in runs {
        for s in &r.samples {
            if !tasks.contains(&s.task.as_str()) {
                tasks.push(&s.task);
            }
        }
    }
    for (ti, task) in tasks.iter().enumerate() {
        let rows: Vec<_> = runs
            .iter()
            .flat_map(|r| r.samples.iter().filter(|s| s.task == *task))
            .collect();
        let shown = rows.len().min(opts.max_samples);
        let mut metric_names: Vec<&str> = Vec::new();
        for s in &rows[..shown] {
            for (m, _) in &s.metrics {
                if !metric_names.contains(&m.as_str()) {
                    metric_names.push(m);
                }
            }
        }
        let id = format!("samples-{ti}");
        let _ = write!(
            h,
            "<details><summary>{} — {} samples{}</summary><input class='filter' data-table='{id}' placeholder='filter'><table class='sortable' id='{id}'><thead><tr><th>run</th><th>mask</th><th>doc</th><th>prompt</th><th>target</th><th>prediction</th><th>attributes</th>",
            esc(task),
            rows.len(),
            if shown < rows.len() { format!(" (first {shown} shown; all are in samples.parquet)") } else { String::new() }
        );
        for m in &metric_names {
            let _ = write!(h, "<th>{}</th>", esc(m));
        }
        h.push_str("</tr></thead><tbody>");
        for s in &rows[..shown] {
            let attrs: Vec<String> = s
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class='n'>{}</td><td><div class='prompt'>{}</div></td><td>{}</td><td>{}</td><td>{}</td>",
                esc(&s.run_id), esc(&s.mask), s.doc_id, esc(&s.prompt), esc(&s.target),
                esc(s.prediction.as_deref().unwrap_or("")), esc(&attrs.join(" "))
            );
            for m in &metric_names {
                let v = s.metrics.iter().find(|(n, _)| n == m).map(|x| x.1);
                let _ = write!(h, "<td class='n'>{}</td>", v.map(num).unwrap_or_default());
            }
            h.push_str("</tr>");
        }
        h.push_str("</tbody></table></details>");
    }
    let _ = writeln!(h, "<script>{SCRIPT}</script></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_groups() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(
            per_group("acc[gender=male]"),
            Some(("acc", "gender", "male"))
        );
        assert_eq!(per_group("acc[t=1,gender=male]"), None);
        assert_eq!(per_group("acc"), None);
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let b = bar_chart(
            "t <x>",
            &[("a".into(), 0.5, Some(0.1)), ("b".into(), f64::NAN, None)],
        );
        assert!(b.starts_with("<svg") && b.ends_with("</svg>") && b.contains("t &lt;x&gt;"));
        assert_eq!(b.matches("<rect").count(), 1);
        let m = heatmap(
            "h",
            &["-e1".into(), "-e2".into()],
            &[("t".into(), "acc".into(), vec![Some(-0.1), None])],
            |_, _| true,
        );
        assert!(m.contains("rgba(178,24,43") && m.contains("-0.1000") && m.contains("#eee"));
        // Lower-is-better metrics flip the colour: a rise in perplexity is red.
        let p = heatmap(
            "h",
            &["-e1".into()],
            &[("t".into(), "word_perplexity".into(), vec![Some(3.0)])],
            |_, m| tasks::metrics::higher_is_better(m),
        );
        assert!(p.contains("rgba(178,24,43"));
    }
}
