"""Make the lab's tiny REAL model offline: alvislab/tiny-real.

Run by tests/lab/up with the real vLLM's Python (/opt/alvis-lab-vllm), which
has numpy, safetensors, tokenizers and transformers:

    python make_model.py HUB REVISION

writes HUB/models--alvislab--tiny-real/snapshots/REVISION/ (and refs/main),
as the Hugging Face cache lays out a download, so `models --discover --add`
finds it like any other snapshot. Nothing is downloaded:

- config.json: a small Llama (LlamaForCausalLM), sized so that its KV cache
  is large per token (4 layers x 8 KV heads x 64 x K,V x 4 bytes = 16 KiB):
  with VLLM_CPU_KVCACHE_SPACE=1 (GiB) the real engine holds 65536 tokens, and
  refuses a longer --max-model-len as a full GPU does (the auto-fit test);
- model.safetensors: random weights (fixed seed), float32;
- tokenizer.json: a byte-level BPE tokenizer (vocabulary 512) trained here
  with `tokenizers` on a small made-up text;
- tokenizer_config.json with a chat template, generation_config.json;
- alvis-lab.json: {"engine": "real"}, which tells the lab's apptainer shim to
  run the real vLLM for this snapshot (tests/lab/bin/apptainer).

Idempotent: a complete snapshot (its files, written last: alvis-lab.json) is
left as it is. The snapshot is built in a temporary directory and renamed
into place, so a failed run leaves nothing half-made.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ORG, NAME = "alvislab", "tiny-real"
VOCAB = 512
HIDDEN = 512
INTERMEDIATE = 1024
LAYERS = 4
HEADS = 8
KV_HEADS = 8
# Longer than a 1 GiB CPU KV cache holds (65536 tokens at 16 KiB a token).
MAX_POSITIONS = 262144
SEED = 20251203
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MARK = {"engine": "real"}


def corpus() -> list[str]:
    """A made-up text for the tokenizer to learn merges from (deterministic)."""
    words = [
        "the",
        "a",
        "cluster",
        "node",
        "job",
        "queue",
        "model",
        "token",
        "server",
        "client",
        "laptop",
        "tunnel",
        "socket",
        "gateway",
        "request",
        "answer",
        "stream",
        "chat",
        "completion",
        "context",
        "cache",
        "memory",
        "engine",
        "start",
        "stop",
        "wait",
        "ready",
        "fail",
        "retry",
        "key",
        "route",
        "user",
        "login",
        "compute",
        "slurm",
        "vllm",
        "hello",
        "world",
        "alvis",
        "lab",
        "tiny",
        "real",
        "test",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
    ]
    lines = []
    for i in range(2000):
        n = 5 + i % 11
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(n)) + ".")
    return lines


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return str(tok.to_str())


def weights() -> dict[str, object]:
    import numpy as np

    rng = np.random.default_rng(SEED)
    head_dim = HIDDEN // HEADS

    def rand(*shape: int) -> object:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    t: dict[str, object] = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rand(HEADS * head_dim, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * head_dim, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * head_dim, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * head_dim)
        t[p + "mlp.gate_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
        t[p + "mlp.up_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
        t[p + "mlp.down_proj.weight"] = rand(HIDDEN, INTERMEDIATE)
        t[p + "input_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    t["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    t["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return t


def config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": SPECIALS.index("<s>"),
        "eos_token_id": SPECIALS.index("</s>"),
        "torch_dtype": "float32",
    }


def build(snap: Path) -> None:
    from safetensors.numpy import save_file

    save_file(weights(), str(snap / "model.safetensors"), metadata={"format": "pt"})  # type: ignore[arg-type]
    (snap / "config.json").write_text(json.dumps(config(), indent=2) + "\n")
    (snap / "tokenizer.json").write_text(tokenizer_json())
    (snap / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "model_max_length": MAX_POSITIONS,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    (snap / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
            indent=2,
        )
        + "\n"
    )
    (snap / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config()["bos_token_id"],
                "eos_token_id": config()["eos_token_id"],
            }
        )
        + "\n"
    )
    # Last: its presence says the snapshot is complete.
    (snap / "alvis-lab.json").write_text(json.dumps(MARK) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: make_model.py HUB REVISION", file=sys.stderr)
        return 2
    hub, rev = Path(argv[0]), argv[1]
    repo = hub / f"models--{ORG}--{NAME}"
    snap = repo / "snapshots" / rev
    if (snap / "alvis-lab.json").is_file() and len(list((repo / "snapshots").iterdir())) == 1:
        return 0
    (repo / "snapshots").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-real.", dir=repo / "snapshots"))
    try:
        build(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if snap.exists():
            shutil.rmtree(snap)
        os.rename(tmp, snap)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # One snapshot only: an older recipe's goes (`models --discover` lists each).
    for other in (repo / "snapshots").iterdir():
        if other.name != rev:
            shutil.rmtree(other, ignore_errors=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    print(f"made {snap}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
