"""The `compress` command end to end on a tiny local model, and its answers to bad input."""

import json
import subprocess
import sys

import pytest
import torch

import compressor
from compressor.cli import main
from compressor.plan import PLAN_FILENAME, Plan


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and one error line on stderr (progress lines may precede it), no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("compress: error:"), proc.stderr
    return errors[0]


def test_compress_load_show_export_and_eval_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tiny-window"
    assert main(["--model", str(tiny_model_dir), "--recipe", "window", "--output", str(out), "--no-report",
                 "--set", "attention.density=0.3"]) == 0
    logged = capsys.readouterr()
    stages = [line for line in (logged.out + logged.err).splitlines() if line.startswith("stages: ")]
    assert len(stages) == 1 and "load " in stages[0] and "attention:window " in stages[0] and ", save " in stages[0]
    plan = Plan.load(out)
    assert plan.recipe["name"] == "window" and plan.recipe["source"]["attention"]["density"] == 0.3
    assert 0.2 < plan.density(4096) <= 0.3
    assert plan.calibration["software"]["transformers"]
    model, tokenizer = compressor.load(str(out), device="cpu")
    assert model.config._attn_implementation == "compressor"
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    assert main(["show", str(out), "--lengths", "512,4096"]) == 0
    assert "window(sink=64" in capsys.readouterr().out
    assert main(["export-plan", str(out), "--output", str(tmp_path / "plan.json")]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["format"] == "compressor.plan"

    assert main(["eval", "--model", str(out), "--tasks", "perplexity,passkey", "--lengths", "256", "--samples", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results["results"]) == {"dense", "plan"}
    assert results["results"]["plan"]["perplexity"]["256"] > 1.0
    assert (out / "eval_results.json").is_file()


def test_existing_output_is_refused_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _one_error_line(_run("--model", str(tiny_model_dir), "--recipe", "dense", "--output", str(out)))
    assert "already exists" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_run_leaves_nothing_half_written(tiny_model_dir, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.nn.Module, "save_pretrained", broken_save, raising=False)
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    out = tmp_path / "half"
    with pytest.raises(RuntimeError, match="disk full"):
        compressor.compress(str(tiny_model_dir), "window", str(out), report=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "no-such-model", "--recipe", "window"], "unknown model 'no-such-model'"),
        (["--model", "smollm2-135", "--recipe", "window"], "did you mean `smollm2-135m`"),
        (["--model", "/nonexistent/model.gguf", "--recipe", "window"], "model file not found"),
        (["--model", "smollm2-135m", "--recipe", "windw"], "did you mean `window`"),
        (["--model", "smollm2-135m", "--recipe", "window", "--dtype", "fp12"], "unknown dtype 'fp12'"),
    ],
)
def test_bad_input_gets_one_clear_line(args, expected):
    assert expected in _one_error_line(_run(*args))


def test_malformed_recipe_names_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("attention:\n  method: window\n  densty: 0.3\n")
    assert "attention.densty" in _one_error_line(_run("--model", "smollm2-135m", "--recipe", str(recipe)))


def test_hub_id_offline_fails_in_one_line(monkeypatch):
    proc = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "--model", "nobody-here/not-a-model", "--recipe", "dense"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert "could not load model 'nobody-here/not-a-model' from the Hugging Face hub" in _one_error_line(proc)


def test_plan_that_does_not_match_the_model_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from tests.conftest import tiny_model

    plan = Plan.dense(tiny_model("llama"))
    plan.layers = plan.layers[:1]
    plan.model.num_hidden_layers = 1
    out = tmp_path / "mismatch"
    shutil.copytree(tiny_model_dir, out)
    plan.save(out / PLAN_FILENAME)
    line = _one_error_line(_run("eval", "--model", str(out), "--lengths", "64", "--samples", "1", "--tasks", "perplexity"))
    assert "num_hidden_layers: plan 1 vs model 2" in line


def test_length_beyond_the_context_is_refused(tiny_model_dir):
    line = _one_error_line(_run("eval", "--model", str(tiny_model_dir), "--lengths", "100000", "--tasks", "perplexity"))
    assert "exceeds the model's context of 4096" in line
