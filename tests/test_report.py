"""The trade-off report: Pareto frontiers, the page built from fixed records (structure and numbers),
the CLI, and the page opened in headless Chromium."""

import copy
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from quantlab import store
from quantlab.cli import cli
from quantlab.records import definitions
from quantlab.report import ReportSettings, load_results, render_report, write_report
from quantlab.report.pareto import pareto_front
from quantlab.sweep.publish import _run as published_run


def test_pareto_front_lower_and_higher_is_better():
    pts = [(100, 0.0), (50, 0.3), (50, 0.1), (60, 0.05), (70, 0.2), (None, 0.0), (20, None)]
    assert pareto_front(pts, higher_is_better=False) == [2, 3, 0]  # (50,0.3) and (70,0.2) dominated
    acc = [(100, 0.9), (50, 0.8), (60, 0.8), (40, 0.5)]
    assert pareto_front(acc, higher_is_better=True) == [3, 1, 0]
    assert pareto_front([(1, 1), (1, 1)], higher_is_better=True) == [0, 1]  # ties dominate neither


def _run(recipe, method, bits, params, kld, top1, weights, tok_s, quant_s, acc):
    return {
        "recipe": recipe, "method": method, "bits": bits, "params": params, "artifact": "x",
        "fidelity": {"kld_mean": kld, "top1_agreement": top1, "ppl": 40 + 100 * kld, "ppl_baseline": 40.0,
                     "ci95": {"kld_mean": [kld * 0.9, kld * 1.1], "top1_agreement": [top1 - 0.01, min(top1 + 0.01, 1)],
                              "ppl": [39.0, 41.0 + 100 * kld]}},
        "guard": {"ok": True, "reasons": []},
        "memory": {"weights_bytes": weights, "disk_bytes": weights + 1000, "peak_bytes": weights * 3},
        "latency": {"prefill_ms": 12.5, "decode_tok_s": {"1": tok_s, "8": tok_s * 5}, "skipped": None,
                    "detail": {"prefill_ms": {"iqr": 1.0}, "decode_tok_s": {"1": {"iqr": 0.5}, "8": {"iqr": 2.0}}}},
        "cost": {"quantize_wall_s": quant_s, "quantize_cpu_s": quant_s},
        "accuracy": {"tasks": {"arc_easy": {"metrics": {"acc": acc, "acc_norm": acc - 0.01},
                                            "stderr": {"acc": 0.05, "acc_norm": 0.05}, "n": 100, "n_total": 2376}}},
        "provenance": {"git_sha": "abc123", "versions": {"torch": "2.13.0"}, "device": {"device": "cpu"}},
    }


@pytest.fixture()
def results(tiny_dir):
    return {
        "model": {"ref": "tiny", "fingerprint": "f" * 64, "path": str(tiny_dir), "note": "random init", "params": 1},
        "run_set": "20260101T000000-abcdef", "device": "cpu", "text": {"name": "ref.txt"},
        "definitions": {"kld_mean": "mean KL"},
        "runs": [
            _run("fp", "fp", 32, {"dtype": "auto"}, 0.0, 1.0, 300_000, 50.0, 0.0, 0.6),
            _run("bnb-int8", "bnb", 8, {"quant_type": "int8", "double_quant": False, "compute_dtype": "auto"},
                 0.0123, 0.97, 120_000, 20.0, 1.5, 0.59),
            _run("rtn-w4-g32", "rtn", 4, {"bits": 4, "group_size": 32, "symmetric": True, "format": "torchao"},
                 0.2468, 0.71, 130_000, 30.0, 0.5, 0.41),
        ],
    }


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.titles_in_svg, self.h2, self.attrs = [], 0, [], []
        self._svg = 0
        self._in = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        self._svg += tag == "svg"
        self._in = tag

    def handle_endtag(self, tag):
        self._svg -= tag == "svg"

    def handle_data(self, data):
        if self._in == "h2":
            self.h2.append(data)
        if self._in == "title" and self._svg:
            self.titles_in_svg += 1


def test_report_structure_and_numbers(results):
    page = render_report(results, ReportSettings(max_kld=0.05))
    p = _Page()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert not [v for k, v in p.attrs if k in ("src", "href") and v and not v.startswith("#")]
    assert p.tags.count("svg") == 6  # 5 Pareto plots (KLD, top-1, accuracy, latency, cost) + memory bars
    assert p.titles_in_svg >= 5 * 3 + 3 * 2  # a tooltip per point and per bar
    assert p.h2[:3] == ["Quality against cost", "Memory: predicted beside measured", "Fit on a 32 GB GPU at context 4096, batch 1"]
    # Verdict: bnb-int8 is within tolerance and smaller than fp on the GPU; rtn-w4-g32 is out of tolerance.
    verdict = re.search(r"<div class='verdict'>(.*?)</div>", page).group(1)
    assert "<b>bnb-int8</b>" in verdict and "KLD 0.0123" in verdict
    # Numbers as results.json has them, formatted once.
    for text in ("0.0123 [0.0111, 0.0135]", "0.2468 [0.2221, 0.2715]", "0.970 [0.960, 0.980]", "20.0 ± 0.2",
                 "0.5900 ± 0.0980", "abc123", "random init"):
        assert text in page, text
    # Measured bytes beside the planner's prediction for the tiny model.
    assert f"{300_000 / 2**20:.2f}" in page


def test_report_writes_atomically_and_rejects_bad_input(results, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    out = write_report(load_results(results=str(src)), tmp_path / "r" / "report.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    # the page and the manifest that lists it as quantlab's (so the next report may replace it, and only it)
    assert sorted(f.name for f in out.parent.iterdir()) == [".quantlab-manifest.json", "report.html"]
    res = CliRunner().invoke(cli, ["report", "--results", str(src), "--out", str(tmp_path / "x.txt")], obj={})
    assert res.exit_code == 2 and "must be an .html file" in res.output and not (tmp_path / "x.txt").exists()
    res = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "y.html")], obj={})
    assert res.exit_code == 2 and "exactly one of --results" in res.output
    bad = copy.deepcopy(results)
    for run in bad["runs"]:
        del run["fidelity"]
    src.write_text(json.dumps(bad))
    res = CliRunner().invoke(cli, ["report", "--results", str(src), "--out", str(tmp_path / "z.html")], obj={})
    assert res.exit_code == 2 and "not a quantize-and-compare results.json" in res.output


def test_report_never_replaces_a_users_page_and_replaces_its_own(results, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>my own page</p>")
    res = CliRunner().invoke(cli, ["report", "--results", str(src), "--out", str(site / "index.html")], obj={})
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert f"--out {site / 'index.html'} exists and quantlab did not write it" in res.stderr
    assert (site / "index.html").read_text() == "<p>my own page</p>"
    for _ in range(2):  # a page quantlab wrote is its own to replace
        res = CliRunner().invoke(cli, ["report", "--results", str(src), "--out", str(site / "q.html")], obj={})
        assert res.exit_code == 0, res.output
    assert (site / "q.html").read_text().startswith("<!DOCTYPE html>")
    assert (site / "index.html").read_text() == "<p>my own page</p>"


def test_no_recipe_within_tolerance_says_so(results):
    page = render_report(results, ReportSettings(max_kld=0.05, gpu_mem=1000))
    assert "<div class='verdict none'>No recipe both fits" in page


FIT_FORMATS = ["fp", "gptq-w8", "gptq-w4-g64", "gptq-w4-g32"]
FIT_KLD = {"model.layers.0": {"fp": 0.0, "gptq-w8": 0.00123, "gptq-w4-g64": 0.0456, "gptq-w4-g32": 0.0321},
           "model.layers.1": {"fp": 0.0, "gptq-w8": 0.00234, "gptq-w4-g64": 0.0789, "gptq-w4-g32": 0.0654}}
FIT_CHOSEN = {"model.layers.0": "gptq-w8", "model.layers.1": "gptq-w4-g32"}


def _fit_run():
    """A fit run of the tiny model, its ``fit`` field shaped as ``quantlab.steps.fit.resolve_fit`` builds it."""
    params = {"weights_budget": 204800, "gpu_mem": None, "context": 4096, "batch": 1, "formats": FIT_FORMATS,
              "units": "block", "sensitivity_chunks": 8, "calibration": "c4_calibration", "samples": 64, "tokens": 256,
              "seed": 0, "allocation": [list(pair) for pair in FIT_CHOSEN.items()]}
    run = _run("fit-200KiB", "fit", 4, params, 0.0712, 0.93, 75_600, 35.0, 4.0, 0.55)
    units = [{"name": u, "block": i, "modules": [f"{u}.self_attn.q_proj", f"{u}.mlp.down_proj"]}
             for i, u in enumerate(FIT_KLD)]
    run["fit"] = {"sensitivity_table": "/home/q/sensitivity/abc/table.json",
                  "sensitivity_cost": {"quantize_wall_s": 3.5, "forwards_wall_s": 2.0},
                  "budget_bytes": 204_800,
                  "sensitivity": {"units": units, "formats": FIT_FORMATS, "granularity": "block", "kld": FIT_KLD,
                                  "text": {"name": "c4_calibration", "sha256": "0" * 64, "windows": 8,
                                           "window_tokens": 256}},
                  "predicted_bytes": 75_552, "predicted_kld": 0.00123 + 0.0654,
                  "units_per_format": {"fp": 0, "gptq-w8": 1, "gptq-w4-g64": 0, "gptq-w4-g32": 1},
                  "unit_formats": dict(FIT_CHOSEN), "fp_units": 0}
    return run


def _cells(page: str, kind: str) -> dict[str, tuple[str, str]]:
    """The heat map's cells (``heat``) or chosen marks (``chosen``): id -> (tooltip, the path's fill)."""
    found = re.findall(rf'<g id="({kind}-[a-z0-9-]+)"><title>([^<]*)</title>\s*<path [^>]*?style="fill: ?([^;"]+)',
                       page)
    return {gid: (tip, fill) for gid, tip, fill in found}


def test_a_fit_run_has_its_heat_map_and_predictions_beside_measurements(results):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, to_hex

    results["runs"].append(_fit_run())
    page = render_report(results, ReportSettings(max_kld=0.05))
    p = _Page()
    p.feed(page)
    assert "Fit to a budget" in p.h2 and p.tags.count("svg") == 7  # the heat map beside the 6 other charts
    assert "script" not in p.tags and "image" not in p.tags  # vector cells, no bitmap
    cells, marks = _cells(page, "heat"), _cells(page, "chosen")
    assert len(cells) == len(FIT_KLD) * len(FIT_FORMATS) and len(page.split('<g id="heat-')) - 1 == len(cells)
    logs = [math.log10(v) for row in FIT_KLD.values() for v in row.values() if v > 0]
    norm = Normalize(min(logs), max(logs))
    for i, (unit, row) in enumerate(FIT_KLD.items()):
        for j, fmt in enumerate(FIT_FORMATS):
            tip, fill = cells[f"heat-fit-200kib-sensitivity-per-unit-and-format-{i}-{j}"]
            assert tip.startswith(f"{unit} in {fmt}: KLD {row[fmt]:.3g} nats/token")
            assert tip.endswith("(chosen)") == (FIT_CHOSEN[unit] == fmt), tip
            want = "#ffffff" if row[fmt] == 0 else to_hex(colormaps["viridis"](norm(math.log10(row[fmt]))))
            assert fill == want, (unit, fmt, fill, want)
    assert sorted(t for t, _ in marks.values()) == [f"{u}: chosen {f}, KLD {FIT_KLD[u][f]:.3g} nats/token"
                                                    for u, f in FIT_CHOSEN.items()]
    assert all(fill == "none" for _, fill in marks.values())
    table = page[page.index("<h2>Fit to a budget</h2>"):]
    table = table[table.index("<table>"):table.index("</table>")]
    for text in ("fit-200KiB", "0.20<br><small>204,800 B</small>", "0.07<br><small>75,552 B</small>",
                 "<small>75,600 B</small>", "0.0666", "0.0712 [0.0641, 0.0783]", "1.07", "gptq-w8 1, gptq-w4-g64 0"):
        assert text in table, text
    assert "bnb-int8" not in table and "<td>fp</td>" not in table  # one row per fit run only


def test_a_fit_run_sits_on_the_pareto_plots_and_every_table(results):
    results["runs"].append(_fit_run())
    page = render_report(results, ReportSettings(max_kld=0.05))
    for chart in ("KLD vs weight memory", "Top-1 agreement vs weight memory", "KLD vs decode latency"):
        svg = next(s for s in page.split("<svg")[1:] if f">{chart}<" in s)
        assert "<title>fit-200KiB: " in svg, chart
    memory = page[page.index("<h2>Memory"):page.index("<h2>Fit on a")]
    gpu = page[page.index("<h2>Fit on a"):page.index("<h2>Fit to a budget")]
    assert re.search(r"<td>fit-200KiB</td><td>[0-9.]+</td><td>0\.07</td>", memory)  # predicted beside measured
    assert "<td>fit-200KiB</td>" in gpu and "<td>fit-200KiB</td>" in page[page.index("<h2>Fidelity"):]


def test_a_report_without_fit_runs_has_no_fit_section(results):
    page = render_report(results, ReportSettings(max_kld=0.05))
    assert "Fit to a budget" not in page and 'id="heat-' not in page and 'id="chosen-' not in page


def test_a_stored_fit_run_is_published_and_reported_with_its_fit(results, tmp_path):
    db = tmp_path / "q.db"
    model = {"ref": "tiny", "fingerprint": "f" * 64}
    fit_run = _fit_run()
    ids = {r["recipe"]: store.insert_run(db, {**r, "run_set": "rs", "model": model, "job_key": r["recipe"]})
           for r in (results["runs"][0], fit_run)}
    rows = {r["recipe"]: r for r in store.list_runs(db, "rs")}
    assert rows["fit-200KiB"]["fit"] == fit_run["fit"] and rows["fp"]["fit"] is None
    for name in ids:
        (tmp_path / name).mkdir()
    out = {name: published_run(SimpleNamespace(dir=tmp_path / name, recipe=SimpleNamespace(name=name)), rows[name],
                               tmp_path / "staging", tmp_path / "out") for name in ids}
    assert out["fit-200KiB"]["fit"] == fit_run["fit"] and "fit" not in out["fp"]
    assert "predicted_kld" in definitions(False, True)["fit"] and "fit" not in definitions(False)
    page = render_report({**results, "runs": list(out.values())}, ReportSettings())
    assert "<h2>Fit to a budget</h2>" in page and len(_cells(page, "chosen")) == len(FIT_CHOSEN)
    stored = render_report(load_results(run_set="rs", store=str(db)), ReportSettings())
    assert "<h2>Fit to a budget</h2>" in stored and "<small>75,552 B</small>" in stored


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = ("<script>(()=>{const r=[...document.querySelectorAll('svg')].map(s=>{const b=s.getBoundingClientRect();"
         "return [b.width,b.height]});const p=document.createElement('pre');p.id='probe';"
         "p.textContent=JSON.stringify(r);document.body.appendChild(p);})();</script>")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(results, tmp_path):
    page = write_report(results, tmp_path / "report.html")
    probe = tmp_path / "probe.html"  # the report plus a measuring script; the report itself has none
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
             "--window-size=1280,2400"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    sizes = json.loads(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom.stdout).group(1))
    assert len(sizes) == 6 and all(w > 100 and h > 100 for w, h in sizes), sizes
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "Failed to load" in ln]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
