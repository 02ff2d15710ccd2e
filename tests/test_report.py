"""`compress report`: one self-contained HTML page per plan; checked as text and, when Chromium is installed, in a
headless browser (screenshot kept under test-artifacts/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from compressor.checkpoint import EVAL_FILENAME
from compressor.cli import main
from compressor.errors import PlanError
from compressor.plan import PATTERN_TYPES, PLAN_FILENAME, DensePattern, Pattern, Plan, WindowPattern
from compressor.report import write_report
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
LENGTHS = [1024, 4096]


def mixed_plan() -> Plan:
    """2 layers x 4 heads: window and dense heads, attention quant on layer 1, linear precisions on layer 1, the
    search's candidates (attention: flagged "chosen"; linear: a Pareto list with a separate chosen point)."""
    plan = Plan.dense(tiny_model("llama"))
    plan.layers[0].attention.heads = [WindowPattern(0, 0.1, 64), DensePattern(), WindowPattern(128, 0.02, 16),
                                      WindowPattern(0, 0.3, 64)]
    plan.layers[1].attention.heads[2] = WindowPattern(512, 0.0, 64)
    plan.layers[1].attention.quant = {"variant": "sage-int8"}
    modules = ["self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"]
    plan.layers[1].linear = {m: {"precision": p} for m, p in zip(modules, ["w8a8-int8", "bf16", "w4a8"])}
    plan.recipe = {"name": "mixed-test", "description": "windows, dense heads and quantization",
                   "resolved": {"attention": {"method": "moa", "density": 0.5}}}
    plan.calibration = {"data": "corpus", "samples": 1, "lengths": [256], "seed": 0, "date": "2025-01-01T00:00:00+00:00",
                        "software": {"compressor": "0.1.0", "torch": "2.x"}}
    plan.predicted = {"lengths": LENGTHS, "density": {str(n): plan.density(n) for n in LENGTHS}}
    sensitivity = {"precisions": ["bf16", "w8a8-int8", "w4a8"],
                   "layers": [{"layer": 1, "module": m, "params": 4096, "kl": [0.0, 0.01 * k + 0.01, 0.1 * k + 0.1],
                               "answer_loss": [0.0, 0.1, 0.2]} for k, m in enumerate(modules)]}
    plan.search = {
        "attention": {"candidates": [{"density": d, "estimated_loss": 1 - d, "measured_loss": 1.1 - d, "chosen": d == 0.5}
                                     for d in (0.3, 0.5, 0.7)]},
        "linear": {"chosen": {"budget": 8, "avg_bits": 8.0, "cost": 0.125, "kl": 0.06},
                   "pareto": [{"budget": b, "avg_bits": float(b), "cost": 1 / b, "kl": 0.5 / b} for b in (4, 8, 16)],
                   "sensitivity": sensitivity},
    }
    return plan


EVAL_RESULTS = {
    "model": "tiny", "tasks": ["perplexity", "passkey"], "lengths": [1024, 2048], "samples": 2, "seed": 1,
    "results": {"dense": {"perplexity": {"1024": 12.1, "2048": 11.8}, "passkey": {"1024": 1.0, "2048": 0.9}},
                "plan": {"perplexity": {"1024": 12.6, "2048": 12.4}, "passkey": {"1024": 0.95, "2048": 0.7}}},
    "density": {"1024": 0.6, "2048": 0.5}, "software": {"torch": "2.x"}, "date": "2025-01-02T00:00:00+00:00",
}


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory) -> Path:
    """A compressed-model folder holding the mixed plan and eval results, with its report written."""
    folder = tmp_path_factory.mktemp("mixed")
    mixed_plan().save(folder / PLAN_FILENAME)
    (folder / EVAL_FILENAME).write_text(json.dumps(EVAL_RESULTS))
    return write_report(folder)


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    parts = re.split(r'<section id="([^"]+)">', page)
    return {parts[k]: parts[k + 1] for k in range(1, len(parts), 2)}


def figure_count(html: str) -> int:
    return html.count("<svg") + len(re.findall(r"<img[^>]+src=\"data:", html))


def test_report_is_written_beside_the_plan(mixed_report):
    assert mixed_report.name == "report.html" and (mixed_report.parent / PLAN_FILENAME).is_file()


def test_every_section_that_applies_has_its_figure(mixed_report):
    found = {name: figure_count(body) for name, body in sections(mixed_report.read_text()).items()}
    expected = {"attention": len(LENGTHS), "density": 1, "linear": 1, "search": 1, "evaluation": 1}
    assert {k: found.get(k) for k in expected} == expected


def test_page_references_nothing_outside_itself(mixed_report):
    page = mixed_report.read_text()
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert references and [r for r in references if "http" in r or not r.startswith(("#", "data:"))] == []


def test_page_shows_provenance_quant_variant_and_chosen_candidate(mixed_report):
    page = mixed_report.read_text()
    for text in ("mixed-test", "2025-01-01", "sage-int8", "w4a8", 'class="chosen"', "plan − dense", "1,024 tokens"):
        assert text in page, text


def test_dense_plan_renders_and_says_it_changes_nothing(tmp_path):
    Plan.dense(tiny_model("llama")).save(tmp_path / PLAN_FILENAME)
    page = write_report(tmp_path, tmp_path / "dense.html").read_text()
    assert "This plan changes nothing" in page and "No eval_results.json" in page
    assert figure_count(sections(page)["attention"]) >= 1 and "linear" not in sections(page)


def test_other_pattern_types_are_coloured_by_their_threshold(tmp_path, monkeypatch):
    @dataclass(frozen=True)
    class ThresholdPattern(Pattern):  # stands in for XAttention's block-sparse heads
        type: ClassVar[str] = "xattention"
        tau: float = 0.9

    monkeypatch.setitem(PATTERN_TYPES, "xattention", ThresholdPattern)
    plan = Plan.dense(tiny_model("llama"))
    plan.layers[0].attention.heads[:2] = [ThresholdPattern(0.9), ThresholdPattern(0.95)]
    plan.predicted = {"lengths": [2048]}
    plan.save(tmp_path / PLAN_FILENAME)
    attention = sections(write_report(tmp_path).read_text())["attention"]
    assert figure_count(attention) == 1 and "<!-- xattention tau -->" in attention  # the colour bar's label


def test_folder_without_plan_is_refused_with_one_clear_line(tmp_path):
    with pytest.raises(PlanError, match="no plan at .*compression_plan.json"):
        write_report(tmp_path)


def test_plan_of_another_version_is_refused(tmp_path):
    doc = mixed_plan().to_dict() | {"version": 99}
    (tmp_path / PLAN_FILENAME).write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="version 99 is not supported"):
        write_report(tmp_path)


def test_cli_report_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compress: error: no plan at") and "\n" not in err


def test_cli_report_writes_the_page(tmp_path, capsys):
    plan = Plan.dense(tiny_model("llama"))
    plan.predicted = {"lengths": [1024]}
    plan.save(tmp_path / PLAN_FILENAME)
    target = tmp_path / "elsewhere.html"
    assert main(["report", str(tmp_path), "--output", str(target)]) == 0
    assert target.read_text().startswith("<!DOCTYPE html>")


# -- in a real browser -----------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root in a container; a fresh profile folder keeps runs independent
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def test_page_renders_in_headless_chromium(mixed_report, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium); the browser check needs it")
    url = mixed_report.resolve().as_uri()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(mixed_report, ARTIFACTS / "report.html")
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000", url)
    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", "--virtual-time-budget=5000",
                       "--window-size=1280,2000", url)
    root = re.search(r"<html[^>]*>", dom.stdout)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', root.group(0) if root else ""))
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    width, height = (int(v) for v in attrs.get("heatmap-size", "0x0").split("x"))
    assert attrs.get("loaded") == "true", dom.stderr[-2000:]
    assert (width > 200 and height > 100, attrs.get("errors"), console) == (True, None, [])
    assert shot.is_file() and shot.stat().st_size > 20_000
