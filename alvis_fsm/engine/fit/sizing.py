"""Will a model fit, and on which GPUs: pure functions, no I/O.

From a snapshot's ``config.json`` text and its weight bytes, estimate what a
vLLM server needs per GPU (``estimate``), pick GPUs for ``--gpus auto``
(``choose``), warn before submitting when the catalog's context cannot fit
(``context_warning``), and read vLLM's own verdict when it refuses one
(``parse_kv_refusal``). The caller fetches the inputs (config text, sizes,
``sinfo`` lines, ``sbatch --test-only`` answers) over ssh.

The estimate is deliberately simple and errs on the large side; what it
approximates, and why, is said where it happens:

- per GPU: weights / count + KV cache / count + a fixed margin must fit in
  ``gpu_memory_utilization`` × memory, vLLM's own budget;
- weights are split evenly by tensor parallelism (norms and other small
  replicated tensors are ignored: well under 1 % of any model here);
- the KV cache must hold ``max_model_len`` tokens for one request, which is
  what vLLM checks at start-up (the check ``parse_kv_refusal`` reads);
- "GB" is 10⁹ bytes throughout, the unit the GPU sizes are sold in.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alvis_fsm.cluster import syntax
from alvis_fsm.errors import ConfigError

GB = 10**9
# vLLM's defaults that size a sliding-window layer's share: its V1
# scheduler's max_num_batched_tokens for the OpenAI server (2048; larger on
# some GPUs, then the margin absorbs it) and its KV block size.
SCHEDULED_TOKENS = 2048
BLOCK_TOKENS = 16

# What vLLM stores the KV cache in by default ("--kv-cache-dtype auto"):
# the model's dtype, except that float32 checkpoints are served in 16 bit
# (vLLM's "--dtype auto" picks a 16-bit type for them). So 2 bytes unless
# the user asks for an fp8 cache.
_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 2,
    "fp32": 2,
    "float": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
}


@dataclass(frozen=True)
class Footprint:
    """What one model needs, independent of the GPUs.

    ``kv_token_bytes`` is the KV cache of one token in one attention layer
    (K and V, all KV heads); full-attention layers keep every token,
    sliding-window layers at most ``sliding_reserve`` of them."""

    weight_bytes: int
    attention_heads: int
    kv_heads: int
    kv_token_bytes: int
    full_layers: int
    sliding_layers: int = 0
    sliding_window: int = 0
    # MLA (DeepSeek-style) caches one latent vector per token that every
    # tensor-parallel rank keeps whole: it is not split across GPUs.
    kv_replicated: bool = False
    max_position_embeddings: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def sliding_reserve(self) -> int:
        """Tokens vLLM reserves per sliding-window layer: the window plus one
        scheduled batch plus a block (its SlidingWindowSpec.max_memory_usage_bytes:
        the window may start mid-block, and chunked prefill adds a batch)."""
        return (
            self.sliding_window - 1 + SCHEDULED_TOKENS + BLOCK_TOKENS if self.sliding_layers else 0
        )

    def kv_bytes(self, tokens: int) -> int:
        """KV cache bytes for one request of ``tokens`` tokens, all GPUs together."""
        window = min(tokens, self.sliding_reserve)
        return self.kv_token_bytes * (self.full_layers * tokens + self.sliding_layers * window)

    @property
    def kv_bytes_per_token(self) -> int:
        """What each further token of context costs once past any sliding window."""
        return self.kv_token_bytes * self.full_layers

    def kv_bytes_per_gpu(self, tokens: int, count: int) -> int:
        """Each GPU's share with ``count``-way tensor parallelism. vLLM gives
        each rank kv_heads / count heads, and a whole head to every rank when
        there are more ranks than KV heads (the heads are replicated)."""
        total = self.kv_bytes(tokens)
        if self.kv_replicated:
            return total
        heads_per_gpu = max(1, self.kv_heads // count)
        return math.ceil(total * heads_per_gpu / self.kv_heads)


# -- reading a snapshot -----------------------------------------------------------


def weight_bytes(index_json: str | None, file_sizes: Mapping[str, int]) -> int:
    """Bytes of the weights: the safetensors index's ``metadata.total_size``
    (the tensors' own bytes) when there is a usable index, else the sum of the
    ``*.safetensors`` files in the snapshot's top directory. Subdirectories
    are never counted: Hugging Face snapshots may carry a second copy of the
    weights (gpt-oss has ``original/`` and ``metal/``) that vLLM does not load."""
    if index_json:
        try:
            total = json.loads(index_json).get("metadata", {}).get("total_size")
        except (json.JSONDecodeError, AttributeError):
            total = None
        if isinstance(total, int | float) and not isinstance(total, bool) and total > 0:
            return int(total)
    return sum(
        size
        for name, size in file_sizes.items()
        if "/" not in name.strip("/") and name.endswith(".safetensors")
    )


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal wrappers (Llava, Gemma 3, Mistral 3, ...) keep the language
    # model's shape under text_config; the KV cache is the language model's.
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def _get(config: Mapping[str, Any], text: Mapping[str, Any], *keys: str) -> Any:
    for source in (text, config):
        for key in keys:
            value = source.get(key)
            if value is not None:
                return value
    return None


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"config.json: {what} is missing or not a positive number ({value!r})")
    return int(value)


def dtype_bytes(name: Any, kv_cache_dtype: str = "auto") -> tuple[int, str | None]:
    """Bytes per KV cache element, and a note when the name was not understood."""
    if kv_cache_dtype != "auto":
        return (1, None) if kv_cache_dtype.startswith("fp8") else (2, None)
    if name is None:
        return 2, None
    key = str(name).removeprefix("torch.").lower()
    if key in _DTYPE_BYTES:
        return _DTYPE_BYTES[key], None
    return 2, f"unknown dtype {name!r}: assumed 16-bit"


def _parse_config(config: str | Mapping[str, Any]) -> Mapping[str, Any]:
    """``config.json`` as a mapping (text is parsed), or refused in words."""
    if isinstance(config, str):
        try:
            parsed = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config.json is not valid JSON: {exc}") from exc
    else:
        parsed = config
    if not isinstance(parsed, Mapping):
        raise ConfigError("config.json is not a JSON object")
    return parsed


def _layer_kinds(
    parsed: Mapping[str, Any], text: Mapping[str, Any], layers: int, notes: list[str]
) -> tuple[int, int, int]:
    """(full-attention layers, sliding-window layers, the window); how
    sliding windows were counted goes into ``notes``."""
    # Sliding-window layers are counted as such only when config.json says
    # which layers they are (``layer_types``, as gpt-oss, Gemma 3 and recent
    # Qwen configs do). A bare ``sliding_window`` (Mistral 7B v0.1, Qwen with
    # use_sliding_window) is counted as full attention: too large for contexts
    # past the window, never too small. Other layer kinds (linear attention,
    # Mamba) are counted as full attention too, for the same reason.
    full, sliding, window = layers, 0, 0
    layer_types = _get(parsed, text, "layer_types")
    raw_window = _get(parsed, text, "sliding_window")
    enabled = _get(parsed, text, "use_sliding_window") is not False
    if isinstance(layer_types, list) and raw_window and enabled:
        sliding = sum(1 for t in layer_types[:layers] if t == "sliding_attention")
        if sliding:
            window = _positive_int(raw_window, "sliding_window")
            full = layers - sliding
            notes.append(f"{sliding} of {layers} layers keep only the last {window} tokens")
    elif raw_window and enabled:
        notes.append("sliding_window without layer_types: counted as full attention")
    return full, sliding, window


def estimate(
    config: str | Mapping[str, Any], weight_bytes: int, kv_cache_dtype: str = "auto"
) -> Footprint:
    """The footprint of a model from its ``config.json`` (text or parsed)
    and its weight bytes (see ``weight_bytes``)."""
    parsed = _parse_config(config)
    text = _text_config(parsed)
    notes: list[str] = []

    layers = _positive_int(
        _get(parsed, text, "num_hidden_layers", "n_layer", "num_layers"), "num_hidden_layers"
    )
    heads = _positive_int(
        _get(parsed, text, "num_attention_heads", "n_head"), "num_attention_heads"
    )
    # Absent means plain multi-head attention: one KV head per query head.
    kv_heads = _positive_int(
        _get(parsed, text, "num_key_value_heads") or heads, "num_key_value_heads"
    )
    head_dim_raw = _get(parsed, text, "head_dim")
    if head_dim_raw is None:
        hidden = _positive_int(_get(parsed, text, "hidden_size", "n_embd"), "hidden_size")
        head_dim = hidden // heads
    else:
        head_dim = _positive_int(head_dim_raw, "head_dim")
    size, note = dtype_bytes(_get(parsed, text, "torch_dtype", "dtype"), kv_cache_dtype)
    if note:
        notes.append(note)

    kv_lora_rank = _get(parsed, text, "kv_lora_rank")
    if kv_lora_rank:
        # MLA: one compressed latent (plus the rotary part) per token and
        # layer, shared by all heads, no separate K and V.
        rope_dim = int(_get(parsed, text, "qk_rope_head_dim") or 0)
        token_bytes = (_positive_int(kv_lora_rank, "kv_lora_rank") + rope_dim) * size
        replicated = True
    else:
        token_bytes = kv_heads * head_dim * 2 * size  # K and V
        replicated = False

    full, sliding, window = _layer_kinds(parsed, text, layers, notes)

    max_pos = _get(parsed, text, "max_position_embeddings")
    return Footprint(
        weight_bytes=int(weight_bytes),
        attention_heads=heads,
        kv_heads=kv_heads,
        kv_token_bytes=token_bytes,
        full_layers=full,
        sliding_layers=sliding,
        sliding_window=window,
        kv_replicated=replicated,
        max_position_embeddings=int(max_pos) if isinstance(max_pos, int) else None,
        notes=tuple(notes),
    )


# -- GPUs ---------------------------------------------------------------------------

GPU_TYPE_PATTERN = rf"^({syntax.GPU_TYPE}) ([0-9]+(?:\.[0-9]+)?)GB x([1-9][0-9]*)$"
_GPU_TYPE = re.compile(GPU_TYPE_PATTERN)


@dataclass(frozen=True)
class GpuType:
    name: str  # as SLURM names it: the TYPE of --gpus-per-node TYPE:N
    memory_gb: float
    per_node: int

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GB)


def parse_gpu_type(text: str) -> GpuType:
    """``"A40 48GB x4"`` -> GpuType("A40", 48, 4)."""
    m = _GPU_TYPE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not 'TYPE <GB>GB x<GPUs per node>', e.g. 'A40 48GB x4'")
    return GpuType(m.group(1), float(m.group(2)), int(m.group(3)))


@dataclass(frozen=True)
class Budget:
    """vLLM's share of each GPU and what is kept free beyond the estimate."""

    gpu_memory_utilization: float
    margin_gb: float

    def usable_bytes(self, gpu: GpuType) -> int:
        """Bytes per GPU for weights + KV cache."""
        return int(gpu.memory_bytes * self.gpu_memory_utilization - self.margin_gb * GB)


def tp_allows(fp: Footprint, count: int) -> bool:
    """vLLM's tensor parallelism splits attention heads evenly: the count must
    divide the attention heads, and the KV heads must split or replicate evenly."""
    return (
        count >= 1
        and fp.attention_heads % count == 0
        and (fp.kv_heads % count == 0 or count % fp.kv_heads == 0)
    )


def free_bytes_for_kv(fp: Footprint, gpu: GpuType, count: int, budget: Budget) -> int:
    """Bytes per GPU left for the KV cache once the weights are loaded (may be negative)."""
    return budget.usable_bytes(gpu) - math.ceil(fp.weight_bytes / count)


def fits(fp: Footprint, gpu: GpuType, count: int, tokens: int, budget: Budget) -> bool:
    return fp.kv_bytes_per_gpu(tokens, count) <= free_bytes_for_kv(fp, gpu, count, budget)


def max_tokens(fp: Footprint, gpu: GpuType, count: int, budget: Budget) -> int:
    """The longest context one request can have on ``count`` GPUs (0: the
    weights alone do not fit). KV bytes grow monotonically with tokens, so a
    binary search is exact."""
    if free_bytes_for_kv(fp, gpu, count, budget) < 0:
        return 0
    low, high = 0, 1
    while fits(fp, gpu, count, high, budget) and high < 2**40:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if fits(fp, gpu, count, mid, budget):
            low = mid
        else:
            high = mid
    return low


def smallest_count(fp: Footprint, gpu: GpuType, tokens: int, budget: Budget) -> int | None:
    """The fewest GPUs of one node of this type that hold the model with a
    ``tokens`` context and that tensor parallelism allows; None if none does."""
    for count in range(1, gpu.per_node + 1):
        if tp_allows(fp, count) and fits(fp, gpu, count, tokens, budget):
            return count
    return None


# -- the choice -----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeFree:
    node: str
    free: int
    total: int


def free_by_node(sinfo_lines: Iterable[str], gpu_type: str) -> list[NodeFree]:
    """Free GPUs of one type on each node, from the agent's
    ``node|gres|gres_used|state`` lines (``Agent.gpus``), most free first.
    Each line goes through ``slurm.free_gpus`` so a node that is down or
    drained counts as nothing free, as everywhere else."""
    from alvis_fsm.cluster.slurm import free_gpus

    out: list[NodeFree] = []
    for line in sinfo_lines:
        free, total, _ = free_gpus([line], gpu_type)
        if total:
            out.append(NodeFree(line.split("|", 1)[0], free, total))
    return sorted(out, key=lambda n: (-n.free, n.node))


ExpectedStart = Mapping[str, str] | Callable[[str], str | None]


@dataclass(frozen=True)
class Choice:
    gpu: GpuType
    count: int
    reason: str

    @property
    def gpus(self) -> str:
        return f"{self.gpu.name}:{self.count}"


def _gb(n: int | float) -> str:
    value = n / GB
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _need(fp: Footprint, tokens: int) -> str:
    return f"{_gb(fp.weight_bytes)} GB of weights + {_gb(fp.kv_bytes(tokens))} GB of KV cache for {tokens} tokens"


def choose(
    fp: Footprint,
    tokens: int,
    types: Sequence[GpuType],
    budget: Budget,
    sinfo_lines: Sequence[str] = (),
    expected_start: ExpectedStart | None = None,
) -> Choice:
    """``--gpus auto``: for each type (in preference order) the smallest
    count that fits; of those, the first that some node has free now; else
    the one ``sbatch --test-only`` expects to start first (``expected_start``
    maps a ``TYPE:N`` request to its start time as SLURM prints it,
    ``YYYY-MM-DDTHH:MM:SS``, which sorts as text); else the first that fits.
    Raises ConfigError, with the numbers, when no type can hold the model."""
    candidates: list[tuple[GpuType, int]] = []
    for gpu in types:
        count = smallest_count(fp, gpu, tokens, budget)
        if count is not None:
            candidates.append((gpu, count))
    if not candidates:
        raise _too_large(fp, tokens, types, budget)
    need = _need(fp, tokens)

    for gpu, count in candidates:
        nodes = free_by_node(sinfo_lines, gpu.name)
        if nodes and nodes[0].free >= count:
            best = nodes[0]
            return Choice(
                gpu,
                count,
                f"{gpu.name}:{count} — {need}; {best.free} of "
                f"{best.total} {gpu.name} free now on {best.node}",
            )

    if expected_start is not None:
        lookup = expected_start.get if isinstance(expected_start, Mapping) else expected_start
        starts = [(lookup(f"{gpu.name}:{count}"), i) for i, (gpu, count) in enumerate(candidates)]
        known = sorted((start, i) for start, i in starts if start)
        if known:
            start, i = known[0]
            gpu, count = candidates[i]
            return Choice(
                gpu,
                count,
                f"{gpu.name}:{count} — {need}; none free now, expected to start first ({start})",
            )

    gpu, count = candidates[0]
    return Choice(
        gpu,
        count,
        f"{gpu.name}:{count} — {need}; none free now and no start "
        "estimate: the first type in fit.gpu_types that fits",
    )


def _too_large(fp: Footprint, tokens: int, types: Sequence[GpuType], budget: Budget) -> ConfigError:
    lines = []
    for gpu in types:
        counts = [c for c in range(1, gpu.per_node + 1) if tp_allows(fp, c)]
        count = max(counts) if counts else 0
        if not count:
            lines.append(
                f"{gpu.name}: no count up to {gpu.per_node} divides the "
                f"{fp.attention_heads} attention heads"
            )
            continue
        usable = budget.usable_bytes(gpu) * count
        longest = max_tokens(fp, gpu, count, budget)
        lines.append(
            f"{gpu.name}:{count}: {_gb(usable)} GB usable "
            f"({count} × {gpu.memory_gb:g} GB × {budget.gpu_memory_utilization:g} − "
            f"{budget.margin_gb:g} GB margin each); "
            + (
                f"room for {longest} tokens of context"
                if longest
                else "the weights alone do not fit"
            )
        )
    return ConfigError(
        f"The model does not fit on one node of any GPU type: it needs {_need(fp, tokens)}",
        hint="Lower max_model_len in the catalog, use a quantized variant of the model, or add"
        " a larger GPU type to fit.gpu_types / fit.auto_types.",
        details="\n".join(lines) or "(no GPU types configured)",
    )


# -- before submitting, and after vLLM refused ---------------------------------------------


def context_warning(
    fp: Footprint, gpu: GpuType, count: int, tokens: int, budget: Budget
) -> str | None:
    """A one-line warning when ``tokens`` of context (the catalog's
    max_model_len) cannot fit on ``count`` GPUs of this type; None if it fits."""
    if fits(fp, gpu, count, tokens, budget):
        return None
    spec = f"{gpu.name}:{count}"
    longest = max_tokens(fp, gpu, count, budget)
    if longest == 0:
        return (
            f"{spec} cannot hold the weights: {_gb(fp.weight_bytes)} GB against "
            f"{_gb(budget.usable_bytes(gpu) * count)} GB usable; expect CUDA out of memory"
        )
    return (
        f"max_model_len {tokens} needs {_gb(fp.kv_bytes(tokens))} GB of KV cache, more than "
        f"{spec} has left after the weights; about {longest} tokens fit"
    )


_ESTIMATED = re.compile(r"estimated maximum model length is (\d+)")
# V0's wording of the same refusal, still printed by some code paths.
_V0 = re.compile(r"maximum number of tokens that can be stored in KV cache \((\d+)\)")


def parse_kv_refusal(text: str) -> int | None:
    """The context length vLLM says would fit, from its refusal
    ("... the estimated maximum model length is M. Try increasing
    `gpu_memory_utilization` ..."); None if ``text`` holds no such refusal."""
    for pattern in (_ESTIMATED, _V0):
        found = pattern.findall(text)
        if found:
            return int(found[-1])
    return None


_TEST_ONLY = re.compile(r"Job \d+ to start at (\S+) using")


def parse_test_only(text: str) -> str | None:
    """The expected start from ``sbatch --test-only`` (on stderr:
    "sbatch: Job 123 to start at 2026-11-27T13:05:00 using 16 processors on
    nodes alvis4-12 in partition alvis"), as SLURM prints it; None if absent."""
    m = _TEST_ONLY.search(text)
    return m.group(1) if m else None


# -- the fit table of docs/concepts/how-it-works.md ----------------------------------------------


@dataclass(frozen=True)
class TableRow:
    model: str
    footprint: Footprint
    tokens: int  # the context to fit, e.g. the catalog's max_model_len


def render_table(rows: Sequence[TableRow], types: Sequence[GpuType], budget: Budget) -> str:
    """A Markdown table: per model its weights, KV cache per 1000 tokens, the
    fewest GPUs of each type that hold it, and what ``--gpus auto`` picks
    when every type is free (docs/concepts/how-it-works.md's, checked by a unit test)."""
    lines = [
        "| Model | Weights | KV cache per 1k tokens | Context | Fewest GPUs per type"
        " | `auto` picks (all free) | KV room there (tokens) |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for row in rows:
        fp = row.footprint
        per_type = []
        for gpu in types:
            count = smallest_count(fp, gpu, row.tokens, budget)
            per_type.append(f"{gpu.name}:{count}" if count else f"{gpu.name}: no")
        kv = f"{fp.kv_bytes_per_token * 1000 / 10**6:.1f} MB"
        if fp.sliding_layers:
            fixed = fp.kv_token_bytes * fp.sliding_layers * fp.sliding_reserve
            kv += f" (+{fixed / 10**6:.1f} MB for windows)"
        try:
            choice = choose(fp, row.tokens, types, budget)
        except ConfigError:
            pick, room = "does not fit", "–"
        else:
            pick = f"`{choice.gpus}`"
            room = f"{max_tokens(fp, choice.gpu, choice.count, budget):,}"
        lines.append(
            f"| {row.model} | {fp.weight_bytes / GB:.1f} GB | {kv} | {row.tokens:,}"
            f" | {' · '.join(per_type)} | {pick} | {room} |"
        )
    return "\n".join(lines) + "\n"
