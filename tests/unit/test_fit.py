"""The memory estimate and the GPU choice, against real models' config.json
files (tests/unit/fit_configs/, sources in SOURCES.md there). Expected
numbers are worked out by hand in the comments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alvis_fsm.engine.fit import sizing as fit
from alvis_fsm.engine.fit.sizing import Budget, GpuType, estimate, parse_gpu_type
from alvis_fsm.errors import ConfigError

CONFIGS = Path(__file__).parent / "fit_configs"

GPT_OSS_WEIGHTS = 13_761_316_904  # the three top-level shards (SOURCES.md)
QWEN3_8B_WEIGHTS = 16_381_470_720
LLAMA3_70B_WEIGHTS = 141_107_412_992

A40 = GpuType("A40", 48, 4)
A100 = GpuType("A100", 40, 4)
A100FAT = GpuType("A100fat", 80, 4)
V100 = GpuType("V100", 32, 4)
T4 = GpuType("T4", 16, 8)
AUTO = (A40, A100, A100FAT)  # the packaged fit.auto_types order
BUDGET = Budget(gpu_memory_utilization=0.9, margin_gb=3)
# 48 GB × 0.9 − 3 GB: what one A40 has for weights + KV cache.
A40_USABLE = 40_200_000_000


def config(name: str) -> str:
    return (CONFIGS / f"{name}.json").read_text()


def gpt_oss() -> fit.Footprint:
    return estimate(config("gpt-oss-20b"), GPT_OSS_WEIGHTS)


def qwen3() -> fit.Footprint:
    return estimate(config("qwen3-8b-base"), QWEN3_8B_WEIGHTS)


def llama70() -> fit.Footprint:
    return estimate(config("llama-3-70b"), LLAMA3_70B_WEIGHTS)


# -- the estimate against real configs ------------------------------------------------


def test_gpt_oss_20b() -> None:
    fp = gpt_oss()
    # 8 KV heads × head_dim 64 × (K and V) × 2 bytes (no torch_dtype: 16-bit).
    assert fp.kv_token_bytes == 8 * 64 * 2 * 2 == 2048
    # layer_types alternates sliding/full over 24 layers; the window is 128.
    assert (fp.full_layers, fp.sliding_layers, fp.sliding_window) == (12, 12, 128)
    assert fp.kv_bytes_per_token == 12 * 2048 == 24_576
    # vLLM reserves window − 1 + a 2048-token batch + a 16-token block per
    # sliding layer: 128 − 1 + 2048 + 16 = 2191 tokens.
    assert fp.sliding_reserve == 2191
    # 10000 tokens: (12 full layers × 10000 + 12 sliding layers × 2191) × 2048 B.
    assert fp.kv_bytes(10_000) == 2048 * (12 * 10_000 + 12 * 2191) == 299_606_016
    # Shorter than that: every layer holds every token.
    assert fp.kv_bytes(2000) == 2048 * 24 * 2000
    assert (fp.attention_heads, fp.kv_heads) == (64, 8)
    assert fp.max_position_embeddings == 131_072
    assert fp.notes == ("12 of 24 layers keep only the last 128 tokens",)


def test_qwen3_8b() -> None:
    fp = qwen3()
    # 36 layers × 8 KV heads × head_dim 128 × 2 × 2 bytes (bfloat16) = 144 KiB.
    assert fp.kv_bytes_per_token == 36 * 8 * 128 * 2 * 2 == 147_456
    assert fp.kv_bytes(32_768) == 147_456 * 32_768 == 4_831_838_208
    # use_sliding_window false and sliding_window null: all full attention, no note.
    assert (fp.full_layers, fp.sliding_layers, fp.notes) == (36, 0, ())
    assert (fp.attention_heads, fp.kv_heads) == (32, 8)


def test_llama3_70b() -> None:
    fp = llama70()
    # No head_dim in the config: hidden 8192 / 64 heads = 128.
    # 80 layers × 8 × 128 × 2 × 2 bytes = 320 KiB per token.
    assert fp.kv_bytes_per_token == 80 * 8 * 128 * 2 * 2 == 327_680
    assert fp.kv_bytes(8192) == 2_684_354_560
    assert fp.max_position_embeddings == 8192


@pytest.mark.parametrize(
    "vocab, hidden, layers, inter, heads, kv, head_dim, total",
    [
        # Qwen3-8B: untied embeddings, q/k norms of head_dim each.
        (151_936, 4096, 36, 12_288, 32, 8, 128, QWEN3_8B_WEIGHTS),
        # Llama 3 70B: untied embeddings, no q/k norms.
        (128_256, 8192, 80, 28_672, 64, 8, 128, LLAMA3_70B_WEIGHTS),
    ],
)
def test_published_weight_sizes_are_the_parameter_counts(
    vocab: int,
    hidden: int,
    layers: int,
    inter: int,
    heads: int,
    kv: int,
    head_dim: int,
    total: int,
) -> None:
    """The fixtures' total_size values are 2 bytes × the parameters of their shape."""
    qk_norms = 2 * head_dim if vocab == 151_936 else 0
    per_layer = (
        hidden * heads * head_dim * 2  # q_proj, o_proj
        + hidden * kv * head_dim * 2  # k_proj, v_proj
        + 3 * hidden * inter  # gate, up, down
        + 2 * hidden  # two RMSNorms
        + qk_norms
    )
    params = 2 * vocab * hidden + layers * per_layer + hidden  # + final norm
    assert 2 * params == total


# -- variants of config.json ----------------------------------------------------------------


BASE = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512}


def test_kv_heads_absent_means_multi_head() -> None:
    fp = estimate(BASE, 0)
    assert fp.kv_heads == 8
    assert fp.kv_token_bytes == 8 * (512 // 8) * 2 * 2


def test_text_config_nesting() -> None:
    # A multimodal wrapper: the language model under text_config, dtype outside.
    wrapped = {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "torch_dtype": "float16",
        "text_config": {**BASE, "num_key_value_heads": 2, "head_dim": 128},
        "vision_config": {"num_hidden_layers": 24, "num_attention_heads": 16, "hidden_size": 1024},
    }
    fp = estimate(json.dumps(wrapped), 0)
    assert (fp.full_layers, fp.kv_heads, fp.attention_heads) == (4, 2, 8)
    assert fp.kv_token_bytes == 2 * 128 * 2 * 2


@pytest.mark.parametrize(
    "key, name, size",
    [
        ("torch_dtype", "bfloat16", 2),
        ("dtype", "float16", 2),  # newer transformers write "dtype"
        ("torch_dtype", "float32", 2),  # vLLM serves float32 checkpoints in 16 bit
        ("torch_dtype", "torch.bfloat16", 2),
        ("dtype", "float8_e4m3fn", 1),
    ],
)
def test_dtype_names(key: str, name: str, size: int) -> None:
    fp = estimate({**BASE, key: name}, 0)
    assert fp.kv_token_bytes == 8 * 64 * 2 * size
    assert fp.notes == ()


def test_unknown_dtype_is_16_bit_with_a_note() -> None:
    fp = estimate({**BASE, "torch_dtype": "int3"}, 0)
    assert fp.kv_token_bytes == 8 * 64 * 2 * 2
    assert fp.notes == ("unknown dtype 'int3': assumed 16-bit",)


def test_fp8_kv_cache_halves_it() -> None:
    assert estimate(config("llama-3-70b"), 0, kv_cache_dtype="fp8").kv_bytes_per_token == 163_840


def test_bare_sliding_window_counts_as_full() -> None:
    fp = estimate({**BASE, "sliding_window": 4096}, 0)
    assert (fp.full_layers, fp.sliding_layers) == (4, 0)
    assert fp.notes == ("sliding_window without layer_types: counted as full attention",)


def test_sliding_layers_ignored_when_disabled() -> None:
    cfg = {
        **BASE,
        "sliding_window": 64,
        "use_sliding_window": False,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    assert estimate(cfg, 0).sliding_layers == 0


def test_mla_latent_is_not_split() -> None:
    # DeepSeek-V2-Lite's attention shape: 27 layers, kv_lora_rank 512, rope dim 64.
    cfg = {
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "hidden_size": 2048,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "torch_dtype": "bfloat16",
    }
    fp = estimate(cfg, 0)
    assert fp.kv_bytes_per_token == 27 * (512 + 64) * 2 == 31_104
    assert fp.kv_bytes_per_gpu(1000, 4) == fp.kv_bytes(1000)


@pytest.mark.parametrize(
    "bad",
    ["{", "[]", json.dumps({"num_attention_heads": 8}), json.dumps({**BASE, "hidden_size": 0})],
)
def test_unusable_config_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        estimate(bad, 0)


# -- weight bytes ----------------------------------------------------------------------


def test_weights_from_index_total_size() -> None:
    index = json.dumps({"metadata": {"total_size": QWEN3_8B_WEIGHTS}, "weight_map": {}})
    assert fit.weight_bytes(index, {"model-00001-of-00005.safetensors": 5}) == QWEN3_8B_WEIGHTS


@pytest.mark.parametrize("index", [None, "", "not json", "{}", '{"metadata": {"total_size": "x"}}'])
def test_weights_from_file_sizes_without_a_usable_index(index: str | None) -> None:
    sizes = {
        "model-00000-of-00002.safetensors": 4_625_017_896,
        "model-00001-of-00002.safetensors": 4_115_586_736,
        "model-00002-of-00002.safetensors": 5_020_712_272,
        "original/model.safetensors": 13_761_300_984,  # a second copy: not loaded
        "config.json": 1_806,
        "model.safetensors.index.json": 36_355,
    }
    assert fit.weight_bytes(index, sizes) == 4_625_017_896 + 4_115_586_736 + 5_020_712_272


# -- per-GPU arithmetic --------------------------------------------------------------------


def test_gpu_type_strings() -> None:
    assert parse_gpu_type("A100fat 80GB x4") == A100FAT
    assert parse_gpu_type("T4 16GB x8") == T4
    assert parse_gpu_type("H100 94.5GB x8").memory_bytes == 94_500_000_000
    for bad in ("A40 48 x4", "A40:48:4", "A40 48GB x0", " A40 48GB x4", "A 40 48GB x4"):
        with pytest.raises(ValueError):
            parse_gpu_type(bad)


def test_usable_bytes() -> None:
    assert BUDGET.usable_bytes(A40) == A40_USABLE
    assert Budget(0.95, 0).usable_bytes(A100FAT) == 76_000_000_000


@pytest.mark.parametrize(
    "count, allowed",
    [(1, True), (2, True), (3, False), (4, True), (8, True), (16, True), (5, False)],
)
def test_tp_must_divide_heads(count: int, allowed: bool) -> None:
    assert fit.tp_allows(llama70(), count) is allowed  # 64 heads, 8 KV heads


def test_tp_beyond_kv_heads_replicates_them() -> None:
    fp = estimate({**BASE, "num_key_value_heads": 2}, 0)
    # 4 ranks, 2 KV heads: each rank holds one whole head, half the cache.
    assert fp.kv_bytes_per_gpu(1000, 4) == fp.kv_bytes(1000) // 2
    assert fp.kv_bytes_per_gpu(1000, 2) == fp.kv_bytes(1000) // 2
    assert fit.tp_allows(fp, 4) and not fit.tp_allows(
        estimate({**BASE, "num_key_value_heads": 3}, 0), 2
    )


def test_max_tokens_gpt_oss_on_one_a40() -> None:
    # (40.2e9 − 13,761,316,904 − 12 × 2191 × 2048) / 24576 = 1,073,601.8
    assert fit.max_tokens(gpt_oss(), A40, 1, BUDGET) == 1_073_601


def test_max_tokens_llama70_on_four_a40() -> None:
    # Per GPU: 40.2e9 − 141,107,412,992 / 4 = 4,923,146,752 B for 2 of the 8
    # KV heads: 327,680 / 4 = 81,920 B a token -> 60,097 tokens.
    assert fit.max_tokens(llama70(), A40, 4, BUDGET) == 60_097
    assert fit.max_tokens(llama70(), A40, 2, BUDGET) == 0  # the weights alone do not fit


@pytest.mark.parametrize(
    "model, tokens, expected",
    [
        ("gpt", 10_000, {"A40": 1, "A100": 1, "A100fat": 1, "V100": 1, "T4": 2}),
        ("qwen", 32_768, {"A40": 1, "A100": 1, "A100fat": 1, "V100": 1, "T4": 2}),
        ("llama", 8192, {"A40": 4, "A100": None, "A100fat": 4, "V100": None, "T4": None}),
        # 61,000 tokens: just over what four A40s hold (60,097), under four A100fat's.
        ("llama", 61_000, {"A40": None, "A100": None, "A100fat": 4, "V100": None, "T4": None}),
    ],
)
def test_smallest_count(model: str, tokens: int, expected: dict[str, int | None]) -> None:
    fp = {"gpt": gpt_oss, "qwen": qwen3, "llama": llama70}[model]()
    got = {
        t.name: fit.smallest_count(fp, t, tokens, BUDGET) for t in (A40, A100, A100FAT, V100, T4)
    }
    assert got == expected


# -- choosing ------------------------------------------------------------------------------

# The agent's sinfo lines: node|gres|gres_used|state.
A40_FREE_2 = "alvis4-12|gpu:A40:4(S:0-1)|gpu:A40:2(IDX:0-1)|mix"
A40_FREE_0 = "alvis4-13|gpu:A40:4(S:0-1)|gpu:A40:4(IDX:0-3)|alloc"
A40_DRAINED = "alvis4-14|gpu:A40:4(S:0-1)|gpu:A40:0(IDX:N/A)|drained"
FAT_FREE_1 = "alvis5-01|gpu:A100fat:4(S:0-1)|gpu:A100fat:3(IDX:0-2)|mix"
A100_FREE_4 = "alvis4-40|gpu:A100:4(S:0-1)|gpu:A100:0(IDX:N/A)|idle"


def model_65gb() -> fit.Footprint:
    """The issue's 65 GB model: Llama 70B's shape at 65 GB of weights (an fp8-ish quant)."""
    return estimate(config("llama-3-70b"), 65_000_000_000)


def test_65gb_model_gets_two_a40s() -> None:
    # Per A40: 32.5 GB of weights + 2 of 8 KV heads of 8192 tokens (0.67 GB) ≤ 40.2 GB.
    choice = fit.choose(model_65gb(), 8192, AUTO, BUDGET, [A40_FREE_2, A40_FREE_0, FAT_FREE_1])
    assert choice.gpus == "A40:2"
    assert choice.reason == (
        "A40:2 — 65 GB of weights + 2.7 GB of KV cache for 8192 tokens;"
        " 2 of 4 A40 free now on alvis4-12"
    )


def test_65gb_model_gets_one_80gb_gpu_when_only_that_is_free() -> None:
    # 65 + 2.7 GB ≤ 80 × 0.9 − 3 = 69 GB; A100 (40 GB) would need all four.
    choice = fit.choose(model_65gb(), 8192, AUTO, BUDGET, [A40_FREE_0, A40_DRAINED, FAT_FREE_1])
    assert choice.gpus == "A100fat:1"
    assert choice.reason.endswith("; 1 of 4 A100fat free now on alvis5-01")


def test_a40_busy_a100_node_free() -> None:
    # Only an A100 node is free: the 65 GB model needs all four of its 40 GB GPUs.
    choice = fit.choose(model_65gb(), 8192, AUTO, BUDGET, [A100_FREE_4])
    assert choice.gpus == "A100:4"


def test_nothing_free_earliest_expected_start_wins() -> None:
    starts = {
        "A40:2": "2026-11-27T15:00:00",
        "A100:4": "2026-11-28T09:00:00",
        "A100fat:1": "2026-11-27T13:30:00",
    }
    choice = fit.choose(model_65gb(), 8192, AUTO, BUDGET, [A40_FREE_0], starts)
    assert choice.gpus == "A100fat:1"
    assert choice.reason.endswith("; none free now, expected to start first (2026-11-27T13:30:00)")
    asked: list[str] = []

    def test_only(gpus: str) -> str | None:
        asked.append(gpus)
        return "2026-11-27T14:00:00" if gpus == "A100:4" else None

    assert fit.choose(model_65gb(), 8192, AUTO, BUDGET, [], test_only).gpus == "A100:4"
    assert asked == ["A40:2", "A100:4", "A100fat:1"]


def test_no_information_takes_the_first_type_that_fits() -> None:
    choice = fit.choose(llama70(), 8192, AUTO, BUDGET, [], {})
    assert choice.gpus == "A40:4"
    assert "no start estimate" in choice.reason


def test_too_large_for_any_type_is_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        # 500,000 tokens: more than even four A100fat hold (411,659).
        fit.choose(llama70(), 500_000, AUTO, BUDGET)
    e = err.value
    assert e.message == (
        "The model does not fit on one node of any GPU type: it needs 141 GB of weights"
        " + 164 GB of KV cache for 500000 tokens"
    )
    assert e.details is not None
    assert e.details.splitlines() == [
        "A40:4: 161 GB usable (4 × 48 GB × 0.9 − 3 GB margin each); room for 60097 tokens of context",
        "A100:4: 132 GB usable (4 × 40 GB × 0.9 − 3 GB margin each); the weights alone do not fit",
        "A100fat:4: 276 GB usable (4 × 80 GB × 0.9 − 3 GB margin each); room for 411659 tokens of context",
    ]
    assert e.hint is not None and "max_model_len" in e.hint


def test_free_by_node_ignores_down_nodes_and_other_types() -> None:
    nodes = fit.free_by_node([A40_FREE_0, FAT_FREE_1, A40_FREE_2, A40_DRAINED], "A40")
    assert [(n.node, n.free, n.total) for n in nodes] == [
        ("alvis4-12", 2, 4),
        ("alvis4-13", 0, 4),
        ("alvis4-14", 0, 4),
    ]


# -- warnings and vLLM's answers ----------------------------------------------------------------


def test_context_warning() -> None:
    assert fit.context_warning(llama70(), A40, 4, 8192, BUDGET) is None
    assert fit.context_warning(llama70(), A40, 4, 131_072, BUDGET) == (
        "max_model_len 131072 needs 43 GB of KV cache, more than A40:4 has left after the"
        " weights; about 60097 tokens fit"
    )
    assert fit.context_warning(llama70(), A100FAT, 1, 8192, BUDGET) == (
        "A100fat:1 cannot hold the weights: 141 GB against 69 GB usable; expect CUDA out of memory"
    )


# facts.md: vLLM V1's refusal when max_model_len's KV cache does not fit.
V1_REFUSAL = (
    "(EngineCore_DP0 pid=4242) ValueError: To serve at least one request with the models's max"
    " seq len (131072), (6.00 GiB KV cache is needed, which is larger than the available KV"
    " cache memory (2.19 GiB). Based on the available memory, the estimated maximum model length"
    " is 47872. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when"
    " initializing the engine."
)


def test_parse_kv_refusal() -> None:
    assert fit.parse_kv_refusal(V1_REFUSAL) == 47_872
    log = (
        "INFO loading\n\x1b[31m"
        + V1_REFUSAL
        + "\x1b[0m\nRuntimeError: Engine core initialization failed."
    )
    assert fit.parse_kv_refusal(log) == 47_872
    v0 = (
        "ValueError: The model's max seq len (32768) is larger than the maximum number of tokens"
        " that can be stored in KV cache (20224). Try increasing `gpu_memory_utilization`"
    )
    assert fit.parse_kv_refusal(v0) == 20_224
    assert fit.parse_kv_refusal("torch.OutOfMemoryError: CUDA out of memory.") is None


def test_parse_test_only() -> None:
    text = (
        "sbatch: Job 5382690 to start at 2026-11-27T13:05:00 using 16 processors on nodes"
        " alvis4-12 in partition alvis\n"
    )
    assert fit.parse_test_only(text) == "2026-11-27T13:05:00"
    assert fit.parse_test_only("sbatch: error: Batch job submission failed") is None


# -- the fit table of docs/concepts/how-it-works.md -----------------------------------------------

FIT_PAGE = Path(__file__).resolve().parents[2] / "docs" / "concepts" / "how-it-works.md"
TABLE_START, TABLE_END = "<!-- fit-table:start -->\n", "<!-- fit-table:end -->"


def fit_table() -> str:
    from alvis_fsm.engine.settings.model import load_settings

    settings = load_settings().fit
    rows = [
        # The catalog's gpt-oss-20b entry asks for 10000 tokens.
        fit.TableRow("gpt-oss-20b", gpt_oss(), 10_000),
        fit.TableRow("Qwen3-8B", qwen3(), 32_768),
        fit.TableRow("Llama 3 70B", llama70(), 8192),
        # Llama 3.1 70B has Llama 3 70B's shape, with 128k positions.
        fit.TableRow("Llama 3.1 70B, 64k context", llama70(), 65_536),
    ]
    return fit.render_table(rows, settings.types(), settings.budget)


def test_fit_table_is_current() -> None:
    text = FIT_PAGE.read_text(encoding="utf-8")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    fresh = f"{head}{TABLE_START}{fit_table()}{TABLE_END}{tail}"
    if os.environ.get("UPDATE_GOLDEN") and fresh != text:
        FIT_PAGE.write_text(fresh, encoding="utf-8")
        text = fresh
    assert fresh == text, (
        "docs/concepts/how-it-works.md's fit table is stale: run with UPDATE_GOLDEN=1"
    )


def test_fit_table_numbers() -> None:
    table = fit_table()
    assert "| gpt-oss-20b | 13.8 GB | 24.6 MB (+53.8 MB for windows) | 10,000 |" in table
    assert "| Qwen3-8B | 16.4 GB | 147.5 MB | 32,768 |" in table
    # 64k tokens no longer fit four A40s (60,097): auto moves to A100fat.
    assert table.splitlines()[-1] == (
        "| Llama 3.1 70B, 64k context | 141.1 GB | 327.7 MB | 65,536"
        " | A40: no · A100: no · A100fat:4 | `A100fat:4` | 411,659 |"
    )
