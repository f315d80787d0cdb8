"""The newer families against transformers' PyTorch classes, same random weights: forward and sampling throughput.

One row per family: Qwen2.5, Mistral, Phi-3, Gemma 2, Gemma 3 (causal-LM forward, logits included, and top-k
sampling through ``mapjax.generate`` vs ``transformers``' ``generate``), and two reward models, a Qwen2 sequence
classifier and a DeBERTa-v3 regression head with 3 outputs (scoring forward).

Shapes are the real configs' per-layer shapes, cut down where two CPU cores demand it; every cut is printed:

- Qwen2.5-0.5B and Gemma-3-1B layers as they are (896 and 1152 wide, their heads, rope, windows, soft-caps);
- Mistral-7B, Phi-3-mini and Gemma-2-2B with widths divided (by 4, 4 and 2) but their head sizes, grouped
  key/value heads, sliding windows, longrope and soft-caps kept;
- DeBERTa-v3-base layers (768 wide, 256 position buckets, shared keys);
- ``--layers`` layers each (Gemma 3: its real 5-local-1-global pattern needs 6) and a ``--vocab``-token
  vocabulary (the real 150k-260k vocabularies would make the output head the whole benchmark).

Sampling: ``--batch`` prompts of 8 to 24 random tokens, top-k 50, temperature 1, ``--new-tokens`` tokens, EOS
ignored on both sides; mapjax's first call (compilation) is excluded and reported apart.

    python benchmarks/models_families.py [--device auto|cpu|gpu] [--batch 8] [--seq 128] [--new-tokens 32]
        [--repeats 3] [--layers 4] [--vocab 32000] [--dtype float32|bfloat16] [--only qwen2,gemma3,...]
        [--no-sampling]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.suite_models import word_tokenizer  # noqa: E402  (the one word-level tokenizer)


@dataclasses.dataclass(frozen=True)
class Family:
    """One benchmarked config: the transformers class and config fields, and what was cut from the real one."""

    name: str
    architecture: str
    config_class: str
    fields: dict[str, Any]
    cuts: str
    causal: bool = True


def families(layers: int, vocab: int) -> list[Family]:
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=4096)
    return [
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", dict(
            common, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
            num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6),
            f"Qwen2.5-0.5B layers; {layers} of 24 layers"),
        Family("mistral", "MistralForCausalLM", "MistralConfig", dict(
            common, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers, num_attention_heads=8,
            num_key_value_heads=2, head_dim=128, sliding_window=4096, rope_theta=1e4),
            f"Mistral-7B widths / 4 (head 128, 4:1 GQA, window 4096); {layers} of 32 layers"),
        Family("phi3", "Phi3ForCausalLM", "Phi3Config", dict(
            common, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=8,
            num_key_value_heads=8, original_max_position_embeddings=4096, max_position_embeddings=131072,
            sliding_window=262144, rope_parameters=dict(rope_type="longrope", rope_theta=1e4,
                                                         short_factor=[1.0 + i / 48 for i in range(48)],
                                                         long_factor=[1.0 + i / 4 for i in range(48)])),
            f"Phi-3-mini-128k widths / 4 (head 96, longrope); {layers} of 32 layers"),
        Family("gemma2", "Gemma2ForCausalLM", "Gemma2Config", dict(
            common, hidden_size=1152, intermediate_size=4608, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
            f"Gemma-2-2B widths / 2 (head 256, 2:1 GQA, soft-caps, local/global); {layers} of 26 layers"),
        Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", dict(
            common, hidden_size=1152, intermediate_size=6912, num_hidden_layers=max(layers, 6),
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
            query_pre_attn_scalar=256, rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
            f"Gemma-3-1B layers (5 local : 1 global, window 512); {max(layers, 6)} of 26 layers"),
        Family("qwen2_reward", "Qwen2ForSequenceClassification", "Qwen2Config", dict(
            common, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
            num_key_value_heads=2, rope_theta=1e6, num_labels=1),
            f"Qwen2.5-0.5B layers, 1-output score head; {layers} of 24 layers", causal=False),
        Family("deberta_v3_reward", "DebertaV2ForSequenceClassification", "DebertaV2Config", dict(
            vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
            num_attention_heads=12, max_position_embeddings=512, relative_attention=True,
            position_biased_input=False, pos_att_type=["p2c", "c2p"], share_att_key=True,
            norm_rel_ebd="layer_norm", position_buckets=256, layer_norm_eps=1e-7, num_labels=3,
            id2label={0: "helpfulness", 1: "correctness", 2: "verbosity"}, problem_type="regression"),
            f"DeBERTa-v3-base layers, 3-output regression head; {layers} of 12 layers", causal=False),
    ]


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
def build_pair(family: Family, dtype: str, directory: Path, device: str) -> tuple[Any, Any]:
    """(torch model, mapjax model) with the same seeded random weights (saved once, loaded by mapjax)."""
    import jax.numpy as jnp
    import torch
    import transformers

    from mapjax.models import from_pretrained

    torch.manual_seed(0)
    config = getattr(transformers, family.config_class)(**family.fields)
    torch_model = getattr(transformers, family.architecture)(config).eval()
    torch_model.save_pretrained(str(directory))
    model = from_pretrained(directory, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    if dtype == "bfloat16":
        torch_model = torch_model.to(torch.bfloat16)
    return torch_model.to(device), model


def random_prompts(count: int, vocab: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{token}" for token in rng.integers(3, vocab, size=rng.integers(8, 25)))
            for _ in range(count)]


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #
def forward_rates(torch_model: Any, model: Any, batch: int, seq: int, vocab: int, repeats: int, device: str
                  ) -> tuple[float, float, float]:
    """(mapjax tokens/s, PyTorch tokens/s, max |difference| of the outputs) for one ``batch x seq`` forward."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from benchmarks.models import median_seconds

    ids = np.random.default_rng(1).integers(3, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: _output(nnx.merge(graphdef, state)(ids, mask)))
    device_ids, device_mask = jnp.asarray(ids), jnp.asarray(mask)
    ours = np.asarray(forward(state, device_ids, device_mask).astype(jnp.float32))   # compile + warm-up
    torch_ids = torch.tensor(ids, dtype=torch.long, device=device)
    torch_mask = torch.tensor(mask, dtype=torch.long, device=device)

    def run_torch():
        with torch.inference_mode():
            logits = torch_model(input_ids=torch_ids, attention_mask=torch_mask).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return logits

    theirs = run_torch().float().cpu().numpy()
    seconds = median_seconds({"mapjax": lambda: forward(state, device_ids, device_mask).block_until_ready(),
                              "pytorch": run_torch}, repeats)
    tokens = batch * seq
    return tokens / seconds["mapjax"], tokens / seconds["pytorch"], float(np.abs(ours - theirs).max())


def sampling_rates(torch_model: Any, model: Any, tokenizer: Any, prompts: list[str], new_tokens: int,
                   repeats: int, device: str) -> tuple[float, float, float]:
    """(mapjax tokens/s, PyTorch tokens/s, mapjax first-call seconds) for top-k 50 sampling."""
    import torch

    from mapjax.generate import generate

    options = dict(max_new_tokens=new_tokens, top_k=50, temperature=1.0, batch_size=len(prompts), eos_token_id=[])
    start = time.perf_counter()
    generate(model, tokenizer, prompts, seed=0, **options)
    first_call = time.perf_counter() - start
    ours = min(_timed(lambda seed=seed: generate(model, tokenizer, prompts, seed=seed, **options))
               for seed in range(1, repeats + 1))

    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    batch = {name: encoded[name].to(device) for name in ("input_ids", "attention_mask")}

    def run_torch(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = torch_model.generate(**batch, do_sample=True, top_k=50, temperature=1.0, top_p=1.0,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens

    run_torch(0)   # warm-up
    theirs = min(_timed(lambda seed=seed: run_torch(seed)) for seed in range(1, repeats + 1))
    tokens = len(prompts) * new_tokens
    return tokens / ours, tokens / theirs, first_call - ours


def family_benchmark_cases(args: argparse.Namespace, layers: int = 4, vocab: int = 32000) -> list[Any]:
    """Forward rows for ``benchmarks/models.py`` (its ``BenchmarkCase``; ``args`` carries ``batch``, ``seq``,
    ``dtype`` and ``device``): one per family, the same configs as this script's table."""
    import tempfile

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.models import BenchmarkCase, torch_device, torch_forward

    ids = np.random.default_rng(1).integers(3, vocab, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    cases = []
    for family in families(layers, vocab):
        built: dict[str, Any] = {}

        def pair(family: Family = family, built: dict[str, Any] = built) -> tuple[Any, Any]:
            if not built:
                with tempfile.TemporaryDirectory() as directory:
                    built["pair"] = build_pair(family, args.dtype, Path(directory), torch_device(args.device))
            return built["pair"]

        def make_jax(pair: Callable[[], tuple[Any, Any]] = pair) -> Callable[[], Any]:
            graphdef, state = nnx.split(pair()[1])
            forward = jax.jit(lambda state, ids, mask: _output(nnx.merge(graphdef, state)(ids, mask)))
            device_ids, device_mask = jnp.asarray(ids), jnp.asarray(mask)
            forward(state, device_ids, device_mask).block_until_ready()
            return lambda: forward(state, device_ids, device_mask).block_until_ready()

        cases.append(BenchmarkCase(
            name=f"{family.architecture} ({family.cuts}) forward {args.dtype} ({args.batch}x{args.seq})",
            unit="tokens/s", work_per_call=args.batch * args.seq, make_jax=make_jax,
            make_torch=lambda pair=pair: torch_forward(pair()[0], ids, mask, torch_device(args.device),
                                                       args.dtype)))
    return cases


def _output(model_output: Any) -> Any:
    """A causal LM's logits or a classifier's scores."""
    return model_output.logits if hasattr(model_output, "logits") else model_output


def _timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--only", default="", help="comma-separated family names")
    parser.add_argument("--no-sampling", action="store_true", help="forward rows only")
    args = parser.parse_args(argv)

    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"   # before the first jax import
    import tempfile

    import jax
    import torch

    from benchmarks.models import torch_device

    jax.config.update("jax_default_matmul_precision", "highest")   # full float32 on GPU too, as PyTorch
    device = torch_device(args.device)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU")
    selected = [family for family in families(args.layers, args.vocab)
                if not args.only or family.name in args.only.split(",")]
    if not selected:
        raise SystemExit(f"--only {args.only!r} names no family; names: "
                         f"{[family.name for family in families(args.layers, args.vocab)]}")
    tokenizer = word_tokenizer(args.vocab)
    prompts = random_prompts(args.batch, args.vocab)
    forward_rows, sampling_rows = [], []
    for family in selected:
        with tempfile.TemporaryDirectory() as directory:
            torch_model, model = build_pair(family, args.dtype, Path(directory), device)
        jax_rate, torch_rate, difference = forward_rates(torch_model, model, args.batch, args.seq, args.vocab,
                                                         args.repeats, device)
        forward_rows.append((family, jax_rate, torch_rate, difference))
        print(f"{family.name}: forward mapjax {jax_rate:,.0f} tokens/s, PyTorch {torch_rate:,.0f} tokens/s, "
              f"max |difference| {difference:.1e}", file=sys.stderr)
        if family.causal and not args.no_sampling:
            jax_rate, torch_rate, compile_seconds = sampling_rates(torch_model, model, tokenizer, prompts,
                                                                   args.new_tokens, args.repeats, device)
            sampling_rows.append((family, jax_rate, torch_rate, compile_seconds))
            print(f"{family.name}: sampling mapjax {jax_rate:,.0f} tokens/s, PyTorch {torch_rate:,.0f} tokens/s",
                  file=sys.stderr)

    where = (f"JAX {jax.__version__} {jax.default_backend()}, PyTorch {torch.__version__} on {device} "
             f"({torch.get_num_threads()} threads), {os.cpu_count()} CPU cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end")
    print(f"\n{args.dtype}, forward {args.batch}x{args.seq} tokens, {args.vocab}-token vocabulary; {where}\n")
    print("| family | shape | mapjax tokens/s | PyTorch tokens/s | PyTorch time / mapjax time | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for family, jax_rate, torch_rate, difference in forward_rows:
        print(f"| {family.architecture} | {family.cuts} | {jax_rate:,.0f} | {torch_rate:,.0f} "
              f"| {jax_rate / torch_rate:.2f}x | {difference:.1e} |")
    if sampling_rows:
        print(f"\nSampling: {args.batch} prompts (8-24 tokens), top-k 50, {args.new_tokens} new tokens\n")
        print("| family | mapjax compile (s) | mapjax tokens/s | PyTorch generate tokens/s | mapjax / PyTorch |")
        print("|---|---:|---:|---:|---:|")
        for family, jax_rate, torch_rate, compile_seconds in sampling_rows:
            print(f"| {family.architecture} | {compile_seconds:.1f} | {jax_rate:,.0f} | {torch_rate:,.0f} "
                  f"| {jax_rate / torch_rate:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
