"""The `ossrt` command line: make-checkpoint, generate, info (in-process and as a console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ossrt import __version__
from ossrt.cli import main
from ossrt.engine import SamplingParams, generate
from ossrt.harmony import get_tokenizer
from ossrt.model import GptOssConfig, load_model, preset, read_checkpoint

PROMPT = "The capital of France is"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the vocabulary cache out of the user's home; undo ossrt's env side effect."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSRT_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
        get_tokenizer.cache_clear()
        yield
        get_tokenizer.cache_clear()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "D"
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt_orig(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_orig") / "D"
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3",
                 "--layout", "original"]) == 0
    return out


def _run_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["generate", *args, "--json"]) == 0
    out, _ = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_make_checkpoint(ckpt):
    assert (ckpt / "config.json").is_file()
    assert (ckpt / "model.safetensors.index.json").is_file()
    ck = read_checkpoint(ckpt)
    assert ck.config == preset("tiny")
    assert ck.layout == "hf"


def test_make_checkpoint_reports_on_stderr(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "1",
                 "--layout", "both"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "wrote" in captured.err and "seed 1" in captured.err
    assert (out / "config.json").is_file() and (out / "original" / "config.json").is_file()


def test_make_checkpoint_from_config_file(tmp_path):
    cfg = preset("tiny").replace(vocab_size=512, num_hidden_layers=2)
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps(cfg.to_hf_dict()))
    assert main(["make-checkpoint", "--config", str(cfg_file), "--out", str(tmp_path / "a")]) == 0
    assert read_checkpoint(tmp_path / "a").config == cfg
    # A reference-layout config.json is recognised too.
    cfg_file.write_text(json.dumps(cfg.to_original_dict()))
    assert main(["make-checkpoint", "--config", str(cfg_file), "--out", str(tmp_path / "b")]) == 0
    assert read_checkpoint(tmp_path / "b").config == cfg


def test_make_checkpoint_sharded(tmp_path):
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path),
                 "--max-shard-gb", "0.02"]) == 0
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    read_checkpoint(tmp_path)


def test_generate_json_matches_engine(ckpt, capsys):
    res = _run_json(capsys, "--model", str(ckpt), "--prompt", PROMPT, "--temperature", "0",
                    "--max-tokens", "8")
    assert {"prompt_token_ids", "token_ids", "text", "finish_reason"} <= res.keys()
    tok = get_tokenizer()
    prompt = tok.encode(PROMPT)
    assert res["prompt_token_ids"] == prompt
    direct = generate(load_model(ckpt), prompt,
                      SamplingParams(temperature=0, max_tokens=8, stop_token_ids=tok.stop_token_ids))
    assert res["token_ids"] == direct.token_ids
    assert res["finish_reason"] == direct.finish_reason
    assert res["text"] == tok.decode(direct.token_ids)
    assert 1 <= len(res["token_ids"]) <= 8
    assert len(res["token_ids"]) == 8 or res["finish_reason"] == "stop"
    assert all(0 <= t < preset("tiny").vocab_size for t in res["token_ids"])


def test_greedy_generation_equals_uncached_argmax(ckpt):
    """The cached decode loop picks what a full forward over the whole sequence would pick."""
    model = load_model(ckpt, "float32")
    prompt = get_tokenizer().encode(PROMPT)
    got = generate(model, prompt, SamplingParams(temperature=0, max_tokens=6)).token_ids
    seq = list(prompt)
    for _ in range(6):
        logits = model.logits(model(torch.tensor([seq]))[0, -1])
        seq.append(int(torch.argmax(logits)))
    assert got == seq[len(prompt):]


def test_same_seed_same_sample(ckpt, capsys):
    args = ["--model", str(ckpt), "--prompt", PROMPT, "--temperature", "1", "--max-tokens", "8"]
    a = _run_json(capsys, *args, "--seed", "11")
    b = _run_json(capsys, *args, "--seed", "11")
    c = _run_json(capsys, *args, "--seed", "12")
    assert a["token_ids"] == b["token_ids"]
    assert a["text"] == b["text"]
    assert a["token_ids"] != c["token_ids"]


def test_sampling_at_temperature_1_is_not_greedy(ckpt, capsys):
    args = ["--model", str(ckpt), "--prompt", PROMPT, "--max-tokens", "8"]
    greedy = _run_json(capsys, *args, "--temperature", "0")["token_ids"]
    samples = {tuple(_run_json(capsys, *args, "--temperature", "1", "--seed", str(s))["token_ids"])
               for s in range(3)}
    assert samples != {tuple(greedy)}


def test_generate_text_mode(ckpt, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--prompt", PROMPT, "--temperature", "0",
                 "--max-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    tok = get_tokenizer()
    direct = generate(load_model(ckpt), tok.encode(PROMPT),
                      SamplingParams(temperature=0, max_tokens=5, stop_token_ids=tok.stop_token_ids))
    assert out == tok.decode(direct.token_ids) + "\n"
    assert "prompt tokens" in err and f"{len(direct.token_ids)} generated" in err


def test_generate_float32(ckpt, capsys):
    res = _run_json(capsys, "--model", str(ckpt), "--prompt", PROMPT, "--temperature", "0",
                    "--max-tokens", "4", "--dtype", "float32")
    tok = get_tokenizer()
    direct = generate(load_model(ckpt, "float32"), tok.encode(PROMPT),
                      SamplingParams(temperature=0, max_tokens=4, stop_token_ids=tok.stop_token_ids))
    assert res["token_ids"] == direct.token_ids


def test_original_layout(ckpt, ckpt_orig, capsys):
    assert (ckpt_orig / "original" / "config.json").is_file()
    assert not (ckpt_orig / "config.json").exists()
    common = ["--prompt", PROMPT, "--temperature", "0", "--max-tokens", "8"]
    ref = _run_json(capsys, "--model", str(ckpt), *common)
    auto = _run_json(capsys, "--model", str(ckpt_orig), *common)
    explicit = _run_json(capsys, "--model", str(ckpt_orig), "--layout", "original", *common)
    assert auto["token_ids"] == explicit["token_ids"] == ref["token_ids"]


def test_layout_not_present_is_an_error(ckpt, capsys):
    rc = main(["generate", "--model", str(ckpt), "--layout", "original", "--prompt", "x"])
    assert rc == 2
    assert "original/config.json" in capsys.readouterr().err


def test_info(ckpt, ckpt_orig, capsys):
    capsys.readouterr()
    assert main(["info", "--model", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    tiny = preset("tiny")
    assert info["layout"] == "hf"
    assert GptOssConfig(**{**info["config"], "layer_types": tuple(info["config"]["layer_types"])}) == tiny
    assert info["parameters"] == tiny.num_parameters()
    assert info["config"]["sliding_window"] == 16
    assert main(["info", "--model", str(ckpt_orig)]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "original"


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x"])  # --model is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def _console_script() -> list[str]:
    exe = Path(sys.executable).with_name("ossrt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ossrt.cli"]


def test_console_script_generate(ckpt, capsys, tmp_path):
    env = dict(os.environ, OSSRT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TIKTOKEN_ENCODINGS_BASE", None)
    r = subprocess.run([*_console_script(), "generate", "--model", str(ckpt), "--prompt", PROMPT,
                        "--json", "--temperature", "0", "--max-tokens", "8"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    sub = json.loads(lines[0])
    inproc = _run_json(capsys, "--model", str(ckpt), "--prompt", PROMPT, "--temperature", "0",
                       "--max-tokens", "8")
    assert sub["token_ids"] == inproc["token_ids"]
    assert sub["prompt_token_ids"] == inproc["prompt_token_ids"]
    assert "Traceback" not in r.stderr


def test_bench_reports_every_phase(ckpt, capsys, monkeypatch):
    from ossrt import bench

    prefills: list[int] = []
    real = bench._prefill
    monkeypatch.setattr(bench, "_prefill",
                        lambda engine, n, seed=1: prefills.append(n) or real(engine, n, seed))
    capsys.readouterr()
    assert main(["bench", "--model", str(ckpt), "--prompt-tokens", "24", "--decode-tokens", "5",
                 "--decode-prompt-tokens", "8", "--concurrency", "1,3", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert prefills == [24, 24]  # an untimed warm-up, then the timed prefill
    assert res["prefill"]["prompt_tokens"] == 24 and res["prefill"]["prefill_tok_s"] > 0
    assert [d["concurrency"] for d in res["decode"]] == [1, 3]
    for d in res["decode"]:
        assert d["decode_steps"] == 5  # every sequence decoded its tokens together
        assert d["decode_tok_s_aggregate"] == pytest.approx(
            d["decode_tok_s_per_seq"] * d["concurrency"], rel=0.01)
    assert res["peak_rss_gib"] > 0 and res["load_s"] >= 0
    from ossrt.model import kernels, load_model
    from ossrt.model.membw import step_bytes
    if kernels.available():  # the bandwidth bound of each decode figure
        rate = res["read_gb_s"]
        assert 0 < rate["before"]["min"] <= rate["before"]["median"] <= rate["before"]["max"]
        assert rate["after"]["median"] > 0
        cfg = load_model(ckpt, "bfloat16").cfg
        for d in res["decode"]:
            assert d["bytes_per_step_gb"] == pytest.approx(
                step_bytes(cfg, d["concurrency"], 8).total / 1e9, abs=1e-3)
            assert d["of_bound"] == pytest.approx(d["decode_tok_s_aggregate"] / d["bound_tok_s"],
                                                  rel=0.01)
            lo, hi = (min(r["min"] for r in rate.values()), max(r["max"] for r in rate.values()))
            per_step = step_bytes(cfg, d["concurrency"], 8).total / 1e9 / d["concurrency"]
            assert lo / per_step * 0.99 <= d["bound_tok_s"] <= hi / per_step * 1.01
