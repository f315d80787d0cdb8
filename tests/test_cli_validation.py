"""Every argument is checked before a model is loaded: bad input exits 2 with one line naming it, an unreachable
palette exits 1, and in neither case is a policy loaded or an output written."""

from __future__ import annotations

import numpy as np
import pytest

from mapjax import RewardPool
from mapjax.cli import EXIT_BAD_INPUT, EXIT_NOT_REACHED, main

POLICY = "some-org/some-model"   # a hub id: looked up only when loaded, which these tests forbid


@pytest.fixture
def files(tmp_path):
    """A scored pool (diversity, sentiment) with texts, and a prompts file."""
    rng = np.random.default_rng(0)
    records = [{"prompt": f"p{i // 4}", "generated": f"text {i}", "diversity": float(rng.uniform(0.3, 1.0)),
                "sentiment": float(rng.uniform(-1, 1))} for i in range(80)]
    pool = RewardPool.from_records(records).save(tmp_path / "base.jsonl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w4\nw5 w6\n")
    return {"pool": pool, "prompts": prompts, "out": tmp_path / "result.jsonl", "folder": tmp_path}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def decode_argv(files, *extra, palette="diversity>=q0.6"):
    return ["decode", "--policy", POLICY, "--prompts", files["prompts"], "--palette", palette,
            "--pool", files["pool"], "--out", files["out"], *extra]


@pytest.mark.parametrize("change, message", [
    ({"--out": "result.csv"}, "unknown pool format '.csv'"),
    ({"--values": "diversity"}, "--palette constrains sentiment, which --values does not score"),
    ({"--values": "diversity,sentiment,diversity"}, "diversity more than once"),
    ({"--values": "diversity,sentiment,no-such-reward"}, "unknown reward 'no-such-reward'"),
    ({"--prompts": "missing.txt"}, "missing.txt"),
    ({"--pool": "missing.jsonl"}, "missing.jsonl: no such file"),
    ({"--k": "0"}, "--k: must be an integer >= 1"),
    ({"--count": "-1"}, "--count: must be an integer >= 1"),
    ({"--max-new-tokens": "0"}, "--max-new-tokens"),
    ({"--policy": "./no/such/folder"}, "./no/such/folder: no such file or folder"),
    ({"--palette": "diversity>>0.5"}, "diversity>>0.5"),
    ({"--palette": "humor>=q0.5"}, "humor"),
])
def test_decode_checks_every_argument_before_loading_a_model(capsys, files, no_model, change, message):
    argv = decode_argv(files, "--values", "diversity,sentiment", palette="diversity>=q0.6, sentiment>=q0.5")
    for flag, value in change.items():
        value = files["folder"] / value if flag in ("--out", "--prompts", "--pool") else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, out, err = run(capsys, *argv)
    assert code == EXIT_BAD_INPUT
    assert message in err and "Traceback" not in err
    assert not (files["folder"] / "result.jsonl").exists() and not (files["folder"] / "result.csv").exists()


def test_decode_refuses_an_existing_result_before_any_work(capsys, files, no_model):
    files["out"].write_text("keep me")
    code, out, err = run(capsys, *decode_argv(files))
    assert code == EXIT_BAD_INPUT and "exists; pass --overwrite" in err and out == ""
    assert files["out"].read_text() == "keep me"


@pytest.mark.slow
def test_decode_of_an_unreachable_palette_exits_1_without_a_model(capsys, files, no_model):
    code, out, _ = run(capsys, *decode_argv(files, palette="diversity>=q0.99, sentiment>=q0.99"))
    assert code == EXIT_NOT_REACHED
    assert "infeasible" in out and "mapjax adjust" in out
    assert not files["out"].exists()


@pytest.mark.parametrize("change, message", [
    ({"--values": "diversity,diversity"}, "diversity more than once"),
    ({"--values": "nope"}, "unknown reward 'nope'"),
    ({"--out": "pool.csv"}, "unknown pool format '.csv'"),
    ({"--temperature": "nan"}, "--temperature: must be a finite number"),
    ({"--top-p": "1.5"}, "--top-p: must lie in (0, 1]"),
    ({"--samples": "0"}, "--samples: must be an integer >= 1"),
    ({"--prompts": "missing.txt"}, "missing.txt"),
    ({"--policy": "missing.gguf"}, "missing.gguf: no such file or folder"),
])
def test_pool_checks_every_argument_before_loading_a_model(capsys, files, no_model, change, message):
    argv = ["pool", "--policy", POLICY, "--prompts", files["prompts"], "--values", "diversity",
            "--out", files["folder"] / "pool.jsonl", "--temperature", "1.0", "--top-p", "1.0", "--samples", "2"]
    for flag, value in change.items():
        value = files["folder"] / value if flag in ("--out", "--prompts") else value
        argv[argv.index(flag) + 1] = value
    code, _, err = run(capsys, *argv)
    assert code == EXIT_BAD_INPUT and message in err
    assert not (files["folder"] / "pool.jsonl").exists()


def test_pool_refuses_a_file_it_did_not_build(capsys, files, no_model):
    code, _, err = run(capsys, "pool", "--policy", POLICY, "--prompts", files["prompts"], "--values", "diversity",
                       "--out", files["pool"])
    assert code == EXIT_BAD_INPUT and "was not written by an unfinished build" in err


def finetune_argv(files, *extra, palette="diversity>=q0.6"):
    return ["finetune", "--policy", POLICY, "--pool", files["pool"], "--palette", palette,
            "--out", files["folder"] / "run", "--quiet", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--beta", "-1"], "--beta"),
    (["--kl", "nan"], "--kl"),
    (["--batch-size", "3", "--grad-accum", "2"], "batch_size 3 is not a multiple of grad_accum 2"),
    (["--eval-prompts", "-1"], "--eval-prompts"),
])
def test_finetune_checks_its_settings_before_loading_a_model(capsys, files, no_model, extra, message):
    code, _, err = run(capsys, *finetune_argv(files, *extra))
    assert code == EXIT_BAD_INPUT and message in err
    assert not (files["folder"] / "run").exists()


@pytest.mark.slow
def test_finetune_names_an_unknown_value_and_stops_at_an_unreachable_palette(capsys, files, no_model):
    code, _, err = run(capsys, *finetune_argv(files, palette="humor>=q0.5"))
    assert code == EXIT_BAD_INPUT and "humor" in err
    code, out, _ = run(capsys, *finetune_argv(files, palette="diversity>=q0.99, sentiment>=q0.99"))
    assert code == EXIT_NOT_REACHED and "not reachable" in out
    assert not (files["folder"] / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--values", "sentiment,sentiment"], "sentiment more than once"),
    (["--palette", "humor>=q0.7"], "does not score"),
    (["--k", "0"], "--k: must be an integer >= 1"),
    (["--pool-prompts", "1"], "--pool-prompts and --heldout-prompts must each be at least 2"),
    (["--pool-prompts", "400"], "exceed"),
])
def test_demo_checks_its_settings_before_loading_the_packaged_model(capsys, files, no_model, extra, message):
    code, _, err = run(capsys, "demo", "--out", files["folder"] / "demo", *extra)
    assert code == EXIT_BAD_INPUT and message in err
    assert not (files["folder"] / "demo").exists()


class Stop(Exception):
    """Raised where a command would load its policy: what it said before that is the test's subject."""


@pytest.mark.slow
def test_finetune_says_so_before_training_on_a_degenerate_lambda(capsys, tmp_path, monkeypatch):
    import mapjax.generate

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(mapjax.generate, "load_policy", stop)
    # Two samples per prompt, sentiment 0 and 1: asking for 0.999 is reachable only by a λ that puts almost all
    # the weight on one sample of each prompt.
    records = [{"prompt": f"p{i}", "generated": f"text {i} {j}", "sentiment": float(j), "diversity": 0.5}
               for i in range(10) for j in (0, 1)]
    pool = RewardPool.from_records(records).save(tmp_path / "pool.jsonl")
    with pytest.raises(Stop):
        main(["finetune", "--policy", POLICY, "--pool", str(pool), "--palette", "sentiment>=0.999",
              "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "λ = sentiment" in out and "warning: p_λ sits on about one sample per prompt" in out
