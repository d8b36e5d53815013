"""Make the lab's tiny LoRA adapters offline (issue 35).

Run by tests/lab/up (with the real vLLM's Python, as make_model.py is; this
script needs only the standard library):

    python make_adapter.py DIR

writes DIR/<name>/ for each adapter below, laid out as PEFT's
`save_pretrained` lays out a LoRA adapter, so vLLM 0.11 loads it with
`--lora-modules name=DIR/<name>` or `POST /v1/load_lora_adapter`:

- adapter_config.json: PEFT's keys (`peft_type` "LORA", `r`, `lora_alpha`,
  `target_modules` ["q_proj", "v_proj"], `base_model_name_or_path`, `bias`
  "none", `task_type` "CAUSAL_LM", ...);
- adapter_model.safetensors: float32 weights under PEFT's key names
  (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`: r x
  in_features, `...lora_B.weight`: out_features x r), random (fixed seed);
- README.md (PEFT writes a model card too), written last: its presence, with
  this script's hash in it, says the adapter is complete and current.

Adapters: `tiny-real-r8` and `tiny-real-r16` for alvislab/tiny-real (the real
vLLM serves them; shapes from make_model.py: Llama, 4 layers, hidden 512, 8
heads of 64), `tiny-ok-r8` and `tiny-ok-r16` for alvislab/tiny-ok (lab-ok,
the stand-in's model: Llama 3.2 1B's shape, 16 layers, hidden 2048, 32 heads,
8 KV heads of 64; the stand-in reads the config and checks the files, never
the numbers).

Idempotent: a complete adapter of this recipe is left as it is; each is built
in a temporary directory beside it and renamed into place, so a failed run
leaves nothing half-made.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

SEED = 20251208
TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Base:
    """What a LoRA of q_proj and v_proj needs to know of its base model."""

    hf_id: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    def shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module."""
        heads = self.heads if module == "q_proj" else self.kv_heads
        return self.hidden, heads * self.head_dim


# As tests/lab/realvllm/make_model.py makes tiny-real, and tests/lab/up's
# tiny_config makes tiny-ok.
TINY_REAL = Base("alvislab/tiny-real", layers=4, hidden=512, heads=8, kv_heads=8, head_dim=64)
TINY_OK = Base("alvislab/tiny-ok", layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64)

# name -> (base, rank)
ADAPTERS: dict[str, tuple[Base, int]] = {
    "tiny-real-r8": (TINY_REAL, 8),
    "tiny-real-r16": (TINY_REAL, 16),
    "tiny-ok-r8": (TINY_OK, 8),
    "tiny-ok-r16": (TINY_OK, 16),
}


def recipe() -> str:
    """This script's hash: a changed recipe makes the adapters again."""
    return hashlib.sha1(Path(__file__).read_bytes()).hexdigest()


def adapter_config(base: Base, rank: int) -> dict[str, object]:
    """adapter_config.json as PEFT (0.13) writes it for a causal LM."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base.hf_id,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def tensor_shapes(base: Base, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT's key names and shapes: lora_A is r x in, lora_B is out x r."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(base.layers):
        for module in TARGETS:
            fan_in, fan_out = base.shape(module)
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{key}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{key}.lora_B.weight"] = (fan_out, rank)
    return shapes


def safetensors_bytes(tensors: dict[str, tuple[tuple[int, int], bytes]]) -> bytes:
    """The safetensors format: an 8-byte little-endian header length, the
    JSON header (padded with spaces to 8 bytes, as the library pads it), then
    the raw little-endian data in header order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, data) in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(d for _, d in tensors.values())


def weights(base: Base, rank: int, seed: int) -> bytes:
    """Random float32 weights (fixed seed), small as a trained LoRA's are."""
    rng = random.Random(seed)
    tensors: dict[str, tuple[tuple[int, int], bytes]] = {}
    for name, (rows, cols) in tensor_shapes(base, rank).items():
        values = array("f", (rng.gauss(0.0, 0.02) for _ in range(rows * cols)))
        if sys.byteorder != "little":
            values.byteswap()
        tensors[name] = ((rows, cols), values.tobytes())
    return safetensors_bytes(tensors)


def model_card(name: str, base: Base, rank: int, stamp: str) -> str:
    return (
        f"---\nbase_model: {base.hf_id}\nlibrary_name: peft\n---\n\n"
        f"# {name}\n\nA LoRA adapter (rank {rank}, q_proj and v_proj) of {base.hf_id} with "
        "random weights, made offline for the alvis-fsm lab by "
        "tests/lab/realvllm/make_adapter.py.\n\n"
        f"recipe: {stamp}\n"
    )


def build(where: Path, name: str, base: Base, rank: int, stamp: str) -> None:
    """Write one adapter's files into the directory `where`."""
    seed = SEED + sum(name.encode())
    (where / "adapter_model.safetensors").write_bytes(weights(base, rank, seed))
    (where / "adapter_config.json").write_text(
        json.dumps(adapter_config(base, rank), indent=2) + "\n"
    )
    # Last: its presence says the adapter is complete.
    (where / "README.md").write_text(model_card(name, base, rank, stamp))


def complete(target: Path, stamp: str) -> bool:
    card = target / "README.md"
    return card.is_file() and f"recipe: {stamp}\n" in card.read_text()


def make(root: Path, name: str, base: Base, rank: int, stamp: str) -> bool:
    """Make root/name unless a complete one of this recipe is there; True if made."""
    target = root / name
    if complete(target, stamp):
        return False
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build(tmp, name, base, rank, stamp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_adapter.py DIR", file=sys.stderr)
        return 2
    root, stamp = Path(argv[0]), recipe()
    for name, (base, rank) in ADAPTERS.items():
        if make(root, name, base, rank, stamp):
            print(f"made {root / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
