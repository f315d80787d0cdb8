"""Device meshes (``mapjax.sharding``): mesh specs and their errors, logical axis names on every parameter and the
rules that map them to mesh axes, and sharded sampling, scoring and rewards giving the unsharded results.

This process has one CPU device, so in-process tests use one-device meshes (the sharded code path, on one
device), ``AbstractMesh`` for layouts, and error cases. One subprocess with eight host devices
(the ``host_devices`` fixture) checks that ``data=8``, ``data=2,fsdp=4`` and ``fsdp=2,model=4`` meshes give the tokens,
log-probabilities and reward scores of ``mesh=None``, and that the weights and KV caches really are split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_DECODERS, build_tiny_model, make_word_tokenizer, tiny_hf_config
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from mapjax import sharding
from mapjax.errors import MapjaxError, MeshError
from mapjax.generate import generate, sequence_logprobs, token_logprobs
from mapjax.models import export_pretrained, from_pretrained, model_class
from mapjax.rewards import get_reward
from mapjax.rewards.base import reward_takes_option
from mapjax.rewards.batching import padded_batches
from mapjax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    as_mesh,
    axis_size,
    logical_spec,
    mesh_spec,
    parameter_sharding,
    parameter_specs,
    parse_mesh_spec,
    round_up_rows,
    row_multiple,
    shard_model_state,
    shard_rows,
)

PROMPTS = ["w5 w6 w7", "w9", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19", "w20 w21"]
SHORT = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]   # one length bucket: one program of each kind


# --------------------------------------------------------------------------------------------------------- #
# Mesh specs
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("text, expected", [
    ("data=8", {"data": 8}),
    ("data=2,fsdp=4", {"data": 2, "fsdp": 4}),
    (" fsdp = 2 , model=4 ", {"fsdp": 2, "model": 4}),
    ("model=1,data=3", {"model": 1, "data": 3}),
])
def test_parse_mesh_spec(text, expected):
    assert parse_mesh_spec(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "the mesh spec is empty"),
    ("   ", "the mesh spec is empty"),
    ("data", "part 'data' is not AXIS=SIZE"),
    ("data=2,", "part '' is not AXIS=SIZE"),
    ("batch=8", "unknown mesh axis 'batch'; the axes are data, fsdp, model"),
    ("data=two", "the size of axis 'data' must be an integer >= 1, got 'two'"),
    ("data=2.5", "the size of axis 'data' must be an integer >= 1, got '2.5'"),
    ("data=0", "the size of axis 'data' must be an integer >= 1, got '0'"),
    ("data=-1", "the size of axis 'data' must be an integer >= 1, got '-1'"),
    ("data=2,data=4", "names axis 'data' twice"),
])
def test_bad_mesh_specs_are_named(text, message):
    with pytest.raises(MeshError, match=message):
        parse_mesh_spec(text)
    with pytest.raises(MeshError, match=message):
        as_mesh(text)


def test_mesh_error_is_a_mapjax_value_error():
    assert issubclass(MeshError, MapjaxError) and issubclass(MeshError, ValueError)


def test_as_mesh_coerces_every_form_to_one_auto_mesh():
    assert as_mesh(None) is None
    from_text, from_mapping = as_mesh("data=1"), as_mesh({"data": 1})
    assert isinstance(from_text, Mesh) and dict(from_text.shape) == {"data": 1}
    assert from_text == from_mapping
    assert all(kind == AxisType.Auto for kind in from_text.axis_types)
    # axes come out in MESH_AXES order whatever order they were written in
    assert as_mesh("model=1,fsdp=1,data=1").axis_names == MESH_AXES
    explicit = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,))
    coerced = as_mesh(explicit)
    assert coerced.axis_names == ("fsdp",) and coerced.axis_types == (AxisType.Auto,)
    assert as_mesh(from_text) is from_text
    assert as_mesh("data=1", devices=jax.local_devices()) == from_text
    assert as_mesh(mesh_spec(from_text)) == from_text and mesh_spec(None) == ""
    assert mesh_spec(as_mesh("fsdp=1,data=1")) == "data=1,fsdp=1"


def test_as_mesh_errors_name_the_bad_value():
    with pytest.raises(MeshError, match="mesh data=3 needs 3 devices, this process has 1"):
        as_mesh("data=3")
    with pytest.raises(MeshError, match=r"mesh data=2,fsdp=2 needs 4 devices, 1 were given"):
        as_mesh({"fsdp": 2, "data": 2}, devices=jax.devices())
    with pytest.raises(MeshError, match="mesh axis 'data' must have an integer size >= 1, got 1.5"):
        as_mesh({"data": 1.5})
    with pytest.raises(MeshError, match="must have an integer size >= 1, got True"):
        as_mesh({"data": True})
    with pytest.raises(MeshError, match="unknown mesh axis 'x'"):
        as_mesh({"x": 1})
    with pytest.raises(MeshError, match="the mesh has no axes"):
        as_mesh({})
    with pytest.raises(MeshError, match="unknown mesh axis 'tensor'"):
        as_mesh(jax.make_mesh((1,), ("tensor",)))
    with pytest.raises(MeshError, match="got int"):
        as_mesh(8)


def test_axis_sizes_and_row_multiples():
    mesh = AbstractMesh((2, 4, 2), MESH_AXES)
    assert axis_size(mesh, "fsdp") == 4 and axis_size(None, "data") == 1
    assert axis_size(AbstractMesh((8,), ("data",)), "model") == 1
    assert row_multiple(mesh) == 8 and row_multiple(None) == 1
    assert row_multiple(AbstractMesh((4,), ("model",))) == 1
    assert [round_up_rows(rows, mesh) for rows in (1, 8, 9)] == [8, 8, 16]
    assert round_up_rows(5, None) == 5


def test_one_device_placement_and_its_errors():
    mesh = as_mesh("data=1")
    untouched = {"rows": np.ones(3)}
    assert shard_rows(untouched, None) is untouched and sharding.replicate(untouched, None) is untouched
    placed = shard_rows({"rows": np.arange(6).reshape(3, 2), "step": np.int32(4)}, mesh)
    assert placed["rows"].sharding.mesh == mesh and placed["step"].shape == ()
    np.testing.assert_array_equal(placed["rows"], np.arange(6).reshape(3, 2))
    assert shard_rows(placed, mesh)["rows"] is placed["rows"]   # already placed: nothing moves
    assert sharding.replicate(np.ones(2), mesh).sharding.spec == P()


# --------------------------------------------------------------------------------------------------------- #
# Logical axes and rules
# --------------------------------------------------------------------------------------------------------- #
def test_rules_shard_only_what_divides_and_use_each_mesh_axis_once():
    mesh = AbstractMesh((2, 2, 4), MESH_AXES)
    assert logical_spec(("vocab", "embed"), (100, 32), mesh) == P("model", "fsdp")
    assert logical_spec(("vocab", "embed"), (50257, 32), mesh) == P(None, "fsdp")   # odd vocab stays whole
    assert logical_spec(("embed", "embed"), (32, 32), mesh) == P("fsdp")             # fsdp taken by dim 0
    assert logical_spec(("batch", "kv_heads", "length", "kv"), (8, 2, 16, 8), mesh) == P(("data", "fsdp"))
    assert logical_spec(("batch",), (6,), mesh) == P()                               # 6 rows: not over 4 devices
    assert logical_spec(("norm",), (32,), mesh) == P()
    assert logical_spec((None, "unknown"), (32, 32), mesh) == P()
    # size-1 axes are dropped, so a one-device mesh lays nothing out
    assert logical_spec(("vocab", "embed"), (100, 32), AbstractMesh((1, 1), ("fsdp", "model"))) == P()
    # the first usable rule wins: embed falls back to data where fsdp does not divide
    rules = (("embed", "fsdp"), ("embed", "data"))
    assert logical_spec(("embed",), (6,), AbstractMesh((2, 4), ("data", "fsdp")), rules) == P("data")
    with pytest.raises(MeshError, match="2 logical axes"):
        logical_spec(("vocab", "embed"), (100,), mesh)
    with pytest.raises(MeshError, match="unknown mesh axis 'tensor'"):
        logical_spec(("embed",), (8,), mesh, rules=(("embed", "tensor"),))
    with pytest.raises(MeshError, match="sharding rule 0 must be"):
        logical_spec(("embed",), (8,), mesh, rules=("embed",))


def _abstract(cls, config):
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def _all_architectures():
    """(name, abstract model) for every tiny model the model tests define: decoders, families, encoders."""
    from test_models_encoders import TINY_MODELS
    from test_models_families import FAMILIES, hf_config

    models = []
    for name, (architecture, _, _) in TINY_DECODERS.items():
        cls = model_class(architecture)
        models.append((name, cls, cls.config_from_hf(tiny_hf_config(name))))
    for name, (architecture, _, _) in FAMILIES.items():
        cls = model_class(architecture)
        models.append((name, cls, cls.config_from_hf(hf_config(name))))
    for name, (architecture, make_config, _) in TINY_MODELS.items():
        cls = model_class(architecture)
        models.append((name, cls, cls.config_from_hf(make_config())))
    return models


def test_every_parameter_of_every_port_has_logical_axes():
    from mapjax.models.registry import supported_architectures

    covered = set()
    for name, cls, config in _all_architectures():
        covered.add(cls.architecture)
        for path, variable in nnx.to_flat_state(nnx.state(_abstract(cls, config), nnx.Param)):
            axes = sharding.logical_axes(variable)
            assert axes is not None, f"{name}: {'.'.join(map(str, path))} has no logical axes"
            assert len(axes) == len(variable.get_value().shape), (name, path, axes)
            assert set(axes) <= {rule for rule, _ in DEFAULT_RULES} | {None}, (name, path, axes)
    assert covered == set(supported_architectures()), "a registered architecture has no tiny model to check"


def test_layouts_on_a_large_abstract_mesh():
    """A Llama's layout on fsdp=2, model=4 without the devices: heads, MLP and vocab over model, embed over
    fsdp, norms replicated; every sharded dimension divisible by its mesh axes."""
    model = build_tiny_model("llama")     # heads 4 x head_dim 8, vocab 100, MLP 64, hidden 32
    mesh = AbstractMesh((2, 4), ("fsdp", "model"))
    specs = {".".join(map(str, path)): variable.get_value()
             for path, variable in nnx.to_flat_state(parameter_specs(nnx.state(model), mesh))}
    assert specs["layers.0.q_proj.weight"] == P("model", "fsdp")
    assert specs["layers.0.o_proj.weight"] == P("fsdp", "model")
    assert specs["layers.0.down_proj.weight"] == P("fsdp", "model")
    assert specs["embed_tokens.weight"] == P("model", "fsdp")
    assert specs["lm_head.weight"] == P("model", "fsdp")
    assert specs["norm.weight"] == P()
    sizes = dict(mesh.shape)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        spec = specs[".".join(map(str, path))]
        for dim, axes in zip(variable.get_value().shape, spec):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            assert dim % int(np.prod([sizes[axis] for axis in axes])) == 0


def test_unnamed_parameters_go_over_fsdp_on_their_largest_dimension():
    mesh = AbstractMesh((4,), ("fsdp",))
    tree = {"matrix": jnp.zeros((6, 16)), "vector": jnp.zeros((16,)), "odd": jnp.zeros((3, 5))}
    specs = parameter_specs(tree, mesh)
    assert specs == {"matrix": P(None, "fsdp"), "vector": P(), "odd": P()}


def test_logical_axes_survive_loading_split_merge_and_the_optimizer(tmp_path):
    model = build_tiny_model("llama_gqa_tied")
    export_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)          # abstract build + set_value from the checkpoint tensors
    graphdef, state = nnx.split(loaded)
    merged = nnx.merge(graphdef, state)
    for candidate in (loaded, merged):
        assert sharding.logical_axes(candidate.layers[0].k_proj.weight) == ("kv_heads", "embed")
        assert sharding.logical_axes(candidate.embed_tokens.weight) == ("vocab", "embed")
        assert sharding.logical_axes(candidate.norm.weight) == ("norm",)
    optimizer = nnx.Optimizer(loaded, optax.adam(1e-3), wrt=nnx.Param)
    moments = [variable for path, variable in nnx.to_flat_state(nnx.state(optimizer))
               if path[-3:] == ("layers", 0, "q_proj") or path[-4:-1] == ("layers", 0, "q_proj")]
    assert moments and all(sharding.logical_axes(variable) == ("heads", "embed") for variable in moments)


def test_parameter_sharding_is_a_tree_like_the_state():
    model = build_tiny_model("gpt2")
    mesh = as_mesh("data=1")
    state = nnx.state(model)
    shardings = parameter_sharding(state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    assert parameter_sharding(state, None) is None and shard_model_state(state, None) is state
    placed = shard_model_state(state, mesh)
    assert placed["transformer"]["wte"]["weight"].get_value().sharding.mesh == mesh
    pure = nnx.to_pure_dict(shardings)     # what an orbax restore target takes
    assert pure["transformer"]["wte"]["weight"].mesh == mesh


# --------------------------------------------------------------------------------------------------------- #
# One-device meshes: the sharded path gives the unsharded results; mesh=None moves nothing
# --------------------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_policy():
    return build_tiny_model("llama_gqa_tied"), make_word_tokenizer()


ONE_DEVICE_OPTIONS = dict(num_samples=2, max_new_tokens=5, batch_size=4, seed=7)


@pytest.mark.slow
def test_one_device_mesh_samples_and_scores_as_without_one(tiny_policy):
    model, tokenizer = tiny_policy
    plain = generate(model, tokenizer, SHORT, **ONE_DEVICE_OPTIONS)
    meshed = generate(model, tokenizer, SHORT, mesh="data=1", **ONE_DEVICE_OPTIONS)
    np.testing.assert_array_equal(meshed.tokens, plain.tokens)
    np.testing.assert_allclose(meshed.logprobs, plain.logprobs, atol=1e-5)
    rows = [plain.row_tokens(row) for row in range(len(plain.texts))]
    prompts = [SHORT[index] for index in plain.prompt_index]
    for ours, theirs in zip(sequence_logprobs(model, tokenizer, prompts, rows, mesh={"data": 1}),
                            sequence_logprobs(model, tokenizer, prompts, rows)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_mesh_none_takes_the_single_device_path(tiny_policy, monkeypatch):
    model, tokenizer = tiny_policy

    def refuse(*_):
        raise AssertionError("mesh=None placed an array")

    monkeypatch.setattr(sharding, "_put", refuse)
    generate(model, tokenizer, SHORT, **ONE_DEVICE_OPTIONS)     # the programs compiled above: nothing new
    token_logprobs(model, [[1, 5, 6, 7]])
    with pytest.raises(AssertionError, match="placed an array"):
        token_logprobs(model, [[1, 5, 6, 7]], mesh="data=1")


def test_bad_mesh_is_refused_before_any_work(tiny_policy):
    model, tokenizer = tiny_policy
    with pytest.raises(MeshError, match="needs 4 devices, this process has 1"):
        generate(model, tokenizer, PROMPTS, mesh="data=4")
    with pytest.raises(MeshError, match="unknown mesh axis"):
        token_logprobs(model, [[1, 2, 3]], mesh="rows=1")


def test_padded_batches_hold_a_multiple_of_the_row_multiple():
    rows = [[1] * length for length in (3, 1, 4, 1, 5, 9, 2)]
    batches = list(padded_batches(rows, batch_size=4, cap=16, pad_id=0, multiple=3))
    assert [ids.shape[0] for _, ids, _ in batches] == [6, 3]   # batch_size 4 rounds up to 6
    assert sorted(np.concatenate([indices for indices, _, _ in batches])) == list(range(len(rows)))
    with pytest.raises(Exception, match="multiple must be a positive integer"):
        list(padded_batches(rows, batch_size=4, cap=16, pad_id=0, multiple=0))


@pytest.mark.parametrize("name", ["classifier", "humor", "positive", "reward_model", "gpt2-helpful",
                                  "gpt2-harmless", "coherence", "coherence-simcse", "perplexity"])
def test_model_rewards_take_a_mesh_option(name):
    assert reward_takes_option(name, "mesh")


def test_text_rewards_take_no_mesh_option():
    assert not reward_takes_option("sentiment", "mesh") and not reward_takes_option("diversity", "mesh")


def _classifier_folder(directory):
    cls = model_class("BertForSequenceClassification")
    from test_models_encoders import TINY_MODELS

    model = cls.from_config(cls.config_from_hf(TINY_MODELS["BertForSequenceClassification"][1]()), seed=2)
    model.classifier.weight.set_value(model.classifier.weight.get_value() * 30.0)
    export_pretrained(model, directory)
    make_word_tokenizer(directory)
    return directory


@pytest.mark.slow
def test_one_device_mesh_reward_scores_as_without_one(tmp_path, tiny_policy):
    folder = _classifier_folder(tmp_path)
    prompts, answers = ["w10 w11", "w20", "w30 w31 w32"], ["w40", "w50 w51 w52 w53", "w60"]
    plain = get_reward("classifier", model_id_or_path=str(folder), batch_size=2)(prompts, answers)
    meshed = get_reward("classifier", model_id_or_path=str(folder), batch_size=2, mesh="data=1")
    np.testing.assert_allclose(meshed(prompts, answers), plain, atol=1e-5)
    assert meshed.model.classifier.weight.get_value().sharding.mesh == meshed.mesh   # laid out in place
    model, tokenizer = tiny_policy
    perplexity = get_reward("perplexity", model=model, tokenizer=tokenizer, mesh="data=1")
    np.testing.assert_allclose(perplexity(prompts, answers),
                               get_reward("perplexity", model=model, tokenizer=tokenizer)(prompts, answers),
                               atol=1e-5)
    with pytest.raises(MeshError, match="needs 2 devices"):
        get_reward("classifier", model_id_or_path=str(folder), mesh="data=2")


# --------------------------------------------------------------------------------------------------------- #
# Eight host devices, one subprocess
# --------------------------------------------------------------------------------------------------------- #
EIGHT_DEVICES = r'''
import tempfile
import numpy as np
import jax
from flax import nnx
from conftest import build_tiny_model, make_word_tokenizer
from test_sharding import PROMPTS, SHORT, _classifier_folder
from mapjax.generate import generate, prefill_cache, token_logprobs
from mapjax.rewards import get_reward
from mapjax.sharding import as_mesh, shard_model_state, shard_rows
from mapjax.errors import MeshError

assert jax.device_count() == 8
tokenizer = make_word_tokenizer()
RESULT = {"generate": {}, "specs": {}, "cache": {}}


def spec_of(array):
    return [list(axes) if isinstance(axes, tuple) else axes for axes in array.sharding.spec]


def compare(name, prompts, options, meshes, score_mesh):
    model = build_tiny_model(name)
    plain = generate(model, tokenizer, prompts, **options)
    sequences = [list(plain.prompt_tokens[plain.prompt_index[row]]) + list(plain.row_tokens(row))
                 for row in range(len(plain.texts))]
    plain_scores = token_logprobs(model, sequences, batch_size=32)
    for spec in meshes:
        got = generate(model, tokenizer, prompts, mesh=spec, **options)
        RESULT["generate"][f"{name} {spec}"] = dict(
            tokens=bool(np.array_equal(got.tokens, plain.tokens) and np.array_equal(got.lengths, plain.lengths)),
            logprobs=float(np.abs(got.logprobs - plain.logprobs).max()))
    scores = token_logprobs(model, sequences, batch_size=32, mesh=score_mesh)
    RESULT["generate"][f"{name} token_logprobs {score_mesh}"] = dict(
        tokens=True, logprobs=float(max(np.abs(a - b).max() for a, b in zip(scores, plain_scores))))
    mesh = as_mesh("fsdp=2,model=4")
    graphdef, state = nnx.split(model)
    placed = nnx.merge(graphdef, shard_model_state(state, mesh))
    RESULT["specs"][name] = {".".join(map(str, path)): spec_of(variable.get_value())
                             for path, variable in nnx.to_flat_state(nnx.state(placed))}
    cache = prefill_cache(model, graphdef, shard_model_state(state, mesh), [[1, 5, 6, 7]] * 4, 0, 4, mesh=mesh)
    RESULT["cache"][name] = dict(keys=spec_of(cache.keys[0]), slot_mask=spec_of(cache.slot_mask))


# GPT-2: 5 prompts x 4 samples = 20 rows in one call of 32, prefilled in two groups of different widths; scored
# with its fused q/k/v split over model.
compare("gpt2", PROMPTS + ["w30 w31"], dict(num_samples=4, max_new_tokens=6, batch_size=32, seed=3),
        ["data=2,fsdp=4"], "data=2,fsdp=2,model=2")
# Llama, grouped-query (2 kv heads: whole on model=4): 6 rows, in batches of 4 unsharded and of 8 (filler rows
# added) on the meshes.
compare("llama_gqa_tied", SHORT, dict(num_samples=2, max_new_tokens=6, batch_size=4, seed=5),
        ["data=8", "fsdp=2,model=4"], "fsdp=2,model=4")

folder = _classifier_folder(tempfile.mkdtemp())
prompts, answers = ["w10 w11", "w20", "w30 w31 w32"], ["w40", "w50 w51 w52 w53", "w60"]
plain = get_reward("classifier", model_id_or_path=folder, batch_size=2)(prompts, answers)
reward = get_reward("classifier", model_id_or_path=folder, batch_size=2, mesh="data=2,fsdp=2,model=2")
RESULT["reward"] = dict(diff=float(np.abs(reward(prompts, answers) - plain).max()),
                        scale=float(np.abs(plain).max()),
                        specs={".".join(map(str, path)): spec_of(variable.get_value())
                               for path, variable in nnx.to_flat_state(nnx.state(reward.model))})

from mapjax.models import from_pretrained
loaded = from_pretrained(folder, mesh="fsdp=2,model=4")   # each weight straight onto its devices
plain_loaded = from_pretrained(folder)
RESULT["loaded"] = dict(
    spec=spec_of(loaded.bert.encoder.blocks[0].attention.query.weight.get_value()),
    diff=float(max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
                   zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(plain_loaded))))))

errors = []
try:
    shard_rows(np.zeros((6, 3)), as_mesh("data=8"))
except MeshError as error:
    errors.append(str(error))
try:
    as_mesh("data=3")
except MeshError as error:
    errors.append(str(error))
RESULT["errors"] = errors
'''


@pytest.fixture(scope="module")
def eight_devices(host_devices):
    return host_devices.result(EIGHT_DEVICES, devices=8)


@pytest.mark.slow
def test_sharded_sampling_and_scoring_match_one_device(eight_devices):
    results = eight_devices["generate"]
    assert set(results) == {"gpt2 data=2,fsdp=4", "gpt2 token_logprobs data=2,fsdp=2,model=2",
                            "llama_gqa_tied data=8", "llama_gqa_tied fsdp=2,model=4",
                            "llama_gqa_tied token_logprobs fsdp=2,model=4"}
    for layout, result in results.items():
        assert result["tokens"], f"{layout}: the tokens differ from the unsharded call"
        assert result["logprobs"] <= 1e-5, f"{layout}: log-probabilities off by {result['logprobs']}"


@pytest.mark.slow
def test_weights_and_caches_are_really_split(eight_devices):
    llama, gpt2 = eight_devices["specs"]["llama_gqa_tied"], eight_devices["specs"]["gpt2"]
    assert llama["layers.0.q_proj.weight"] == ["model", "fsdp"]
    assert llama["layers.0.k_proj.weight"] == ["model", "fsdp"]   # 2 kv heads x 8 = 16 columns divide by 4
    assert llama["embed_tokens.weight"] == ["model", "fsdp"]
    assert llama["layers.0.input_layernorm.weight"] == []
    assert gpt2["transformer.h.0.c_attn.weight"] == ["model", "fsdp"]
    assert gpt2["transformer.h.0.c_fc.weight"] == ["model", "fsdp"]
    assert gpt2["transformer.h.0.mlp_c_proj.weight"] == ["fsdp", "model"]
    assert gpt2["transformer.wpe.weight"] == [None, "fsdp"]
    # rows over fsdp; kv heads over model where they divide it (GPT-2: 4 heads), whole where not (2 kv heads)
    assert eight_devices["cache"]["gpt2"] == {"keys": ["fsdp", "model"], "slot_mask": ["fsdp"]}
    assert eight_devices["cache"]["llama_gqa_tied"]["keys"] == ["fsdp"]


@pytest.mark.slow
def test_sharded_reward_scores_match_one_device(eight_devices):
    reward = eight_devices["reward"]
    assert reward["scale"] > 0.1 and reward["diff"] <= 1e-5 * max(1.0, reward["scale"])
    specs = reward["specs"]
    assert specs["bert.encoder.blocks.0.attention.query.weight"] == ["model", "fsdp"]
    assert specs["bert.encoder.blocks.0.output.weight"] == ["fsdp", "model"]
    assert specs["classifier.weight"] == [None, "fsdp"]


@pytest.mark.slow
def test_multidevice_errors_name_the_counts(eight_devices):
    rows_error, count_error = eight_devices["errors"]
    assert "a batch of 6 rows" in rows_error and "pad it to a multiple of 8 rows" in rows_error
    assert count_error == "mesh data=3 needs 3 devices, this process has 8"


@pytest.mark.slow
def test_a_checkpoint_loads_straight_onto_a_mesh(eight_devices):
    """``from_pretrained(..., mesh=)`` places every weight by its logical axes while loading (no whole copy on
    one device first) and loads the same values."""
    loaded = eight_devices["loaded"]
    assert loaded["spec"] == ["model", "fsdp"]
    assert loaded["diff"] == 0.0
