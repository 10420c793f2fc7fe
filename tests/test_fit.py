"""Fit checks before work: the longest pair's prompt + output against each engine's context,
counted with the real embedded tokenizer and chat template; contexts from configs and servers."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest

from pipeline.engines.context import model_context, server_context
from pipeline.engines.factory import engine_context
from pipeline.manifest import load_manifest
from stages.fit import fit_report, judge_fits, policy_fit, rewriter_fit
from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest


def long_manifest(tmp_path, **sections):
    write_jsonl(tmp_path / "corpus.jsonl", wiki_documents(6, words=200))
    data = base_manifest(tmp_path / "out", [str(tmp_path / "corpus.jsonl")],
                         shard={"suffix_tokens": 32, "min_prefix_tokens": 16, "max_prefix_tokens": 1920,
                                "pairs_per_document": 2},
                         executor={"tasks": 1, "workers": 1})
    data["rewriter"] = {"model": "embedded"}
    data["judge"] = {"model": "embedded"}
    data["rollouts"] = {"count": 2}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return write_manifest(tmp_path / "m.yaml", data)


def test_the_defaults_fit_the_paper_bounds_on_the_embedded_models(tmp_path):
    m = load_manifest(long_manifest(tmp_path, shard={"suffix_tokens": 128}))
    report = fit_report(m)
    assert [f.engine for f in report] == ["rewriter", "judge safety (choice_prob)", "judge quality (likelihood)",
                                          "policy (rollouts)"]
    assert all(f.fits for f in report), [f.line() for f in report]
    # The embedded model's own context (its config), and the window bounds the prefix part.
    assert all(f.context.tokens == 8192 and f.context.source == "model config" for f in report)
    assert report[0].parts["prefix"] == 1024 and report[2].parts["prefix"] == 1024
    assert report[3].parts == {"prefix": 1920, "output": 128}


def test_a_rewriter_that_cannot_fit_names_the_fix_and_the_fix_fits(tmp_path):
    m = load_manifest(long_manifest(tmp_path), ["rewriter.max_model_len=1024", "rewrite.prefix_tokens=null"])
    fit = rewriter_fit(m)
    assert not fit.fits and fit.parts["prefix"] == 1920 and fit.affected is None
    assert f"set rewrite.prefix_tokens to at most {fit.prefix_room}" in fit.line()
    assert f"set rewriter.max_model_len to at least {fit.longest}" in fit.line() and "own context is 8,192" in fit.line()
    fixed = rewriter_fit(load_manifest(long_manifest(tmp_path), ["rewriter.max_model_len=1024",
                                                                  f"rewrite.prefix_tokens={fit.prefix_room}"]))
    assert fixed.fits and fixed.longest <= 1024


def test_judge_fit_per_criterion_and_mode(tmp_path):
    m = load_manifest(long_manifest(tmp_path), ["judge.max_model_len=900", "judging.quality.mode=verdict",
                                                "judging.factuality.mode=choice_prob"])
    fits = {f.engine: f for f in judge_fits(m)}
    assert set(fits) == {"judge safety (choice_prob)", "judge quality (verdict)", "judge factuality (choice_prob)"}
    assert fits["judge safety (choice_prob)"].fits and "prefix" not in fits["judge safety (choice_prob)"].parts
    quality = fits["judge quality (verdict)"]
    assert not quality.fits and quality.parts["candidates"] == 2 * 32
    assert quality.parts["output"] == m.judging.max_new_tokens + 8
    assert f"set judging.prefix_tokens to at most {quality.prefix_room}" in quality.line()
    # A classifier makes no judge call: nothing to fit.
    m = load_manifest(long_manifest(tmp_path), ["judging.safety.mode=classifier"])
    assert [f.engine for f in judge_fits(m)] == ["judge quality (likelihood)"]


def test_affected_pairs_are_counted_on_the_pairs_table(tmp_path):
    path = long_manifest(tmp_path)
    run_sip("shard", "-m", str(path))
    m = load_manifest(path, ["rollouts.max_model_len=200"])
    pairs = pl.read_parquet(str(tmp_path / "out" / "shard" / "*.parquet"))
    fit = policy_fit(m, [len(ids) for ids in pairs["prefix_ids"]])
    expected = sum(len(ids) + 32 > 200 for ids in pairs["prefix_ids"])
    assert 0 < expected < len(pairs)
    assert fit.pairs == len(pairs) and fit.affected == expected
    # fit_report reads the lengths itself (the split points), and `sip manifest check` prints it.
    assert next(f for f in fit_report(m, ("policy",))).affected == expected
    out = run_sip("manifest", "check", str(path), "--set", "rollouts.max_model_len=200").stdout
    assert f"policy (rollouts): longest 1,952 tokens (1,920 prefix + 32 output); context 200 (manifest): DOES NOT FIT: " \
           f"{expected:,} of {len(pairs):,} pairs will be too_long; set rollouts.max_model_len to at least 1952" in out
    # The stage warns before it starts, and a dry run shows the fit.
    dry = run_sip("rollout", "-m", str(path), "--set", "rollouts.max_model_len=200", "--dry-run").stdout
    assert "rollout: policy (rollouts): longest 1,952 tokens" in dry and "DOES NOT FIT" in dry


def test_model_context_reads_each_config_form(tmp_path):
    for name, config, expected in [("llama", {"max_position_embeddings": 4096}, 4096), ("gpt2", {"n_positions": 1024}, 1024),
                                   ("multimodal", {"text_config": {"max_position_embeddings": 32768}}, 32768),
                                   ("silent", {"hidden_size": 8}, None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert model_context(tmp_path / name) == expected
    (tmp_path / "lit").mkdir()
    (tmp_path / "lit" / "model_config.yaml").write_text("block_size: 256\n")
    assert model_context(tmp_path / "lit") == 256


@pytest.fixture()
def models_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"data": [{"id": "other", "max_model_len": 2048}, {"id": "judge", "max_model_len": 32768}]}
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_an_endpoints_context_comes_from_its_server(tmp_path, models_server):
    assert server_context(models_server, "judge") == 32768 and server_context(models_server + "/v1", "other") == 2048
    assert server_context(models_server, "absent") is None
    assert server_context("http://127.0.0.1:9", "judge", timeout_s=1) is None  # nothing listens there
    m = load_manifest(long_manifest(tmp_path, judge={"model": models_server, "served_name": "judge"},
                                    judging={"quality": {"mode": "verdict"}, "safety": {"mode": "verdict"}}))
    context = engine_context(m, m.judge, "judge")
    assert (context.tokens, context.source) == (32768, "server")
    fits = judge_fits(m)
    assert all(f.fits and f.context.tokens == 32768 for f in fits)
    assert "counted with the policy tokenizer" in fits[0].line()


def test_what_a_stage_would_refuse_and_what_can_never_fit_are_said_plainly(tmp_path):
    from stages.fit import fit_lines

    m = load_manifest(long_manifest(tmp_path), ["rollouts.max_model_len=100000", "rewriter.max_model_len=200"])
    lines = fit_lines(m, ("rewriter", "policy"))
    assert any(line.startswith("policy: REFUSED") and "more than the policy's context (8192" in line for line in lines)
    rewriter = next(line for line in lines if line.startswith("rewriter:"))
    assert "DOES NOT FIT: no pair fits: the parts beside the prefix alone need" in rewriter
