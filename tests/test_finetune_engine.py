"""The one finetuning engine: its shape (one optimizer, one update, no two-way imports), checkpoints keyed by
parameter path, LoRA runs of the weighted and GRPO routes (trainable counts, exact resume, merged and PEFT
exports against transformers / peft) and the metrics trail of a killed-and-resumed run."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.errors import FinetuneError
from mapjax.finetune import FinetuneConfig, OnlineConfig, finetune, finetune_online
from mapjax.finetune.metrics import WALL_CLOCK_FIELDS, read_metrics
from mapjax.models import from_pretrained
from mapjax.pool import RewardPool

PACKAGE = Path(__file__).resolve().parents[1] / "mapjax" / "finetune"
PROMPTS = ["w5 w17 w33", "w8", "w40 w41 w42 w43"]
LAM = np.array([1.5, 0.5])


class Killed(Exception):
    pass


class Words:
    """A value of a continuation: its number of words, or of words below w50 (``low``)."""

    def __init__(self, name: str, low: bool = False):
        self.name, self.low = name, low

    def __call__(self, prompts, continuations):
        return np.array([sum(1 for word in text.split() if not self.low or int(word[1:]) < 50)
                         for text in continuations], np.float32)


def make_pool() -> RewardPool:
    rng = np.random.RandomState(0)
    generations = [tuple(" ".join(f"w{rng.randint(3, 100)}" for _ in range(rng.randint(2, 7))) for _ in range(4))
                   for _ in PROMPTS]
    return RewardPool(rng.normal(size=(len(PROMPTS), 4, 2)), np.ones((len(PROMPTS), 4), bool), ("a", "b"),
                      prompts=tuple(PROMPTS), generations=tuple(generations))


@pytest.fixture(scope="module")
def llama(tiny_policy_folder, word_tokenizer):
    directory = tiny_policy_folder("llama")
    return directory, from_pretrained(directory), word_tokenizer()


# --------------------------------------------------------------------------------------------------------- #
# The package's shape
# --------------------------------------------------------------------------------------------------------- #
def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def test_one_optimizer_and_one_update_serve_every_route():
    calls: dict[str, list[str]] = {}
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("adamw", "value_and_grad", "apply_updates"):
                calls.setdefault(node.attr, []).append(name)
    assert calls["adamw"] == ["engine"]
    assert calls["apply_updates"] == ["engine"]
    assert calls["value_and_grad"] == ["engine"]


def test_no_two_way_import_no_private_import_no_module_over_800_lines():
    imports: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 800, name
        imports[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mapjax"):
                for alias in node.names:
                    assert not alias.name.startswith("_"), f"{name} imports {node.module}.{alias.name}"
                if node.module.startswith("mapjax.finetune."):
                    imports[name].add(node.module.rsplit(".", 1)[1])
                elif node.module == "mapjax.finetune":
                    imports[name].update(alias.name for alias in node.names)
    for name, used in imports.items():
        for other in used:
            if other in imports and other != "__init__":
                assert name not in imports[other], f"{name} and {other} import each other"


# --------------------------------------------------------------------------------------------------------- #
# Checkpoints by parameter path
# --------------------------------------------------------------------------------------------------------- #
def _checkpoint_meta(folder: Path) -> tuple[Path, dict]:
    steps = sorted((folder / "checkpoints").iterdir(), key=lambda path: int(path.name))
    return steps[-1], json.loads((steps[-1] / "meta" / "metadata").read_text())


@pytest.mark.slow
def test_checkpoints_are_keyed_by_parameter_path_and_old_or_renamed_ones_are_refused(llama, tmp_path):
    _, model, tokenizer = llama
    config = FinetuneConfig(batch_size=4, steps=2, save_every=1)
    finetune(model, tokenizer, make_pool(), LAM, config=config, out=tmp_path / "run", progress=False, export=False)
    step_folder, meta = _checkpoint_meta(tmp_path / "run")
    assert meta["format"] == 2
    assert "layers.0.q_proj.weight" in meta["parameters"]
    # an older mapjax's checkpoint (no format: leaf-order keys) is refused with the fix
    (step_folder / "meta" / "metadata").write_text(json.dumps({**meta, "format": None}))
    with pytest.raises(FinetuneError, match="older mapjax.*--overwrite"):
        finetune(model, tokenizer, make_pool(), LAM, config=config, out=tmp_path / "run", progress=False)
    # a checkpoint whose parameter names differ (a renamed submodule) is refused, naming them
    renamed = [key.replace("q_proj", "query") for key in meta["parameters"]]
    (step_folder / "meta" / "metadata").write_text(json.dumps({**meta, "parameters": renamed}))
    with pytest.raises(FinetuneError, match="does not hold this model's parameters: missing .*q_proj"):
        finetune(model, tokenizer, make_pool(), LAM, config=config, out=tmp_path / "run", progress=False)


# --------------------------------------------------------------------------------------------------------- #
# LoRA runs
# --------------------------------------------------------------------------------------------------------- #


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))).logits, np.float64)


@pytest.mark.slow
def test_lora_weighted_run_resumes_exactly_and_exports_merged_and_peft(llama, tmp_path):
    import torch
    import transformers
    from peft import PeftModel

    directory, model, tokenizer = llama
    config = FinetuneConfig(batch_size=4, grad_accum=2, steps=4, save_every=2, learning_rate=5e-2, seed=1,
                            lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v", "down"), lora_dropout=0.1)

    def run(out, callback=None):
        return finetune(model, tokenizer, make_pool(), LAM, config=config, out=out, callback=callback,
                        progress=False)

    straight = run(tmp_path / "straight")
    # the trainable count is the rank arithmetic over the adapted projections
    layer = model.layers[0]
    per_layer = sum(2 * (linear.in_features + linear.out_features)
                    for linear in (layer.q_proj, layer.v_proj, layer.down_proj))
    assert straight.trainable_parameters == per_layer * len(model.layers)

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_after_3)
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, straight.model)),
                    jax.tree.leaves(jax.tree.map(np.asarray, resumed.model))):
        np.testing.assert_array_equal(a, b)
    # only the adapters are in the checkpoints
    _, meta = _checkpoint_meta(tmp_path / "killed")
    assert meta["parameters"] and all("lora" in key for key in meta["parameters"])
    # the metrics trail of the killed run equals the uninterrupted one's, line for line
    def stable(lines):
        return [{k: v for k, v in line.items() if k not in WALL_CLOCK_FIELDS} for line in lines]

    assert stable(read_metrics(tmp_path / "killed")) == stable(read_metrics(tmp_path / "straight"))
    assert [line["step"] for line in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4]

    ids = np.array([[1, 5, 17, 33, 40, 9]])
    ours = _logits(resumed.model, ids)
    assert np.abs(ours - _logits(model, ids)).max() > 1e-4   # training moved the policy
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "model",
                                                               torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = merged(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-5
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "killed" / "adapter").eval()
    with torch.no_grad():
        peft_logits = adapted(torch.tensor(ids)).logits.numpy()
    assert np.abs(peft_logits - ours).max() <= 1e-5


@pytest.mark.slow
def test_lora_grpo_run_trains_adapters_only_and_exports(llama, tmp_path):
    import torch
    import transformers

    directory, model, tokenizer = llama
    config = OnlineConfig(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=3, ppo_epochs=1,
                          learning_rate=1e-2, lora_rank=4, lora_targets="q,k,v,o", save_every=1)
    result = finetune_online(model, tokenizer, PROMPTS, [Words("words"), Words("low", low=True)], [0.5, 0.2],
                             method="grpo", config=config, out=tmp_path / "grpo", progress=False)
    layer = model.layers[0]
    per_layer = sum(4 * (linear.in_features + linear.out_features)
                    for linear in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    assert result.trainable_parameters == per_layer * len(model.layers)
    lines = read_metrics(tmp_path / "grpo")
    assert [line["step"] for line in lines] == [1, 2]
    for field in ("loss", "learning_rate", "grad_norm", "reward", "kl", "kl_coef", "clipfrac", "levels",
                  "step_time", "tokens_per_s"):
        assert field in lines[-1], field
    ids = np.array([[1, 5, 6, 3]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grpo" / "model",
                                                               torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = merged(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - _logits(result.model, ids)).max() <= 1e-5
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "grpo" / "adapter").eval()
    with torch.no_grad():
        assert np.abs(adapted(torch.tensor(ids)).logits.numpy() - theirs).max() <= 1e-5


def test_lora_settings_are_checked_before_any_work():
    with pytest.raises(FinetuneError, match="lora-rank|lora_rank"):
        FinetuneConfig(lora_rank=0).validate("weighted")
    with pytest.raises(FinetuneError, match=re.escape("give lora_rank")):
        FinetuneConfig(quantize_base="int8").validate("weighted")
    with pytest.raises(FinetuneError, match="quantize"):
        OnlineConfig(lora_rank=2, quantize_base="int3").validate("grpo")
    assert FinetuneConfig(lora_rank=2, lora_targets="q, v").adapters.targets == ("q", "v")


@pytest.mark.slow
def test_cli_qlora_run_writes_metrics_tensorboard_and_adapter(llama, tmp_path, capsys):
    from mapjax.cli import main

    directory, _, _ = llama
    named = make_pool()
    named = RewardPool(named.rewards, named.mask, ("diversity", "perplexity"), prompts=named.prompts,
                       generations=named.generations)
    pool_file = named.save(tmp_path / "pool.jsonl")
    argv = ["finetune", "--policy", str(directory), "--pool", str(pool_file), "--palette", "diversity>=q0.6",
            "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--eval-prompts", "0", "--quiet",
            "--lora-rank", "2", "--lora-targets", "q,v", "--quantize-base", "int8", "--tensorboard"]
    assert main(argv) == 0
    lines = read_metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == [1, 2]
    assert {"loss", "learning_rate", "grad_norm", "step_time", "tokens_per_s"} <= set(lines[0])
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"
    assert (tmp_path / "run" / "model" / "config.json").exists()
    # QLoRA without a rank is refused before any work, naming the fix
    capsys.readouterr()
    code = main(argv[:-8] + ["--quantize-base", "int8", "--out", str(tmp_path / "other")])
    assert code == 2 and "lora_rank" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


MESH_LORA = """
import jax, numpy as np
from conftest import build_tiny_model, make_word_tokenizer
from test_finetune_engine import LAM, make_pool
from mapjax.finetune import FinetuneConfig, finetune

config = FinetuneConfig(batch_size=8, grad_accum=2, steps=3, learning_rate=1e-2, lora_rank=2, lora_alpha=4.0,
                        quantize_base="int8", kl_coef=0.1, seed=2)
results = {}
for mesh in (None, "data=2,fsdp=2"):
    result = finetune(build_tiny_model("llama"), make_word_tokenizer(), make_pool(), LAM, config=config,
                      mesh=mesh, progress=False, export=False)
    results[mesh] = result
single, sharded = results[None], results["data=2,fsdp=2"]
ids = np.array([[1, 5, 17, 33, 40, 9, 12, 3]])
logits = [np.asarray(r.model(ids, np.ones_like(ids)).logits) for r in (single, sharded)]
from mapjax.finetune.engine import Engine
from mapjax.sharding import as_mesh

engine = Engine(build_tiny_model("llama"), config, 3, as_mesh("data=2,fsdp=2"))
frozen = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(engine.state.frozen)[0]}
qvalue = [leaf for key, leaf in frozen.items() if "q_proj" in key and "qvalue" in key][0]
RESULT = {"losses": [single.losses, sharded.losses], "difference": float(np.abs(logits[0] - logits[1]).max()),
          "trainable": [single.trainable_parameters, sharded.trainable_parameters],
          "qvalue": [str(qvalue.dtype), len(qvalue.sharding.device_set), str(qvalue.sharding.spec)]}
"""


@pytest.mark.slow
def test_qlora_run_on_a_mesh_equals_the_one_device_run(host_devices):
    result = host_devices.result(MESH_LORA, devices=4)
    single, sharded = result["losses"]
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
    assert result["difference"] <= 1e-5
    assert result["trainable"][0] == result["trainable"][1] > 0
    # the frozen int8 base stays sharded by its logical axes
    dtype, devices, spec = result["qvalue"]
    assert dtype == "int8" and devices == 4 and "fsdp" in spec
