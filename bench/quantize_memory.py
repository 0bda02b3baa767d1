"""Peak memory and throughput of `llmint8 quantize` on a generated random-weight model.

    python bench/quantize_memory.py --size 13b --workdir /tmp/q13 [--calib-samples 0]
    python bench/quantize_memory.py --size 1b --workdir /tmp/q1 --calib-samples 8   # calibration bound

Writes a Llama config of the chosen size with random fp16 weights straight to sharded
safetensors (never the whole model in memory), then runs `llmint8 quantize` in a child process,
sampling its resident memory (VmRSS and VmHWM) until it ends. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmint8_cli.checkpoint.writer import Entry, Group, plan_shards, shard_names, write_shard

SIZES = {  # hidden, intermediate, layers, heads, vocab (Llama-style)
    "tiny": (512, 1408, 4, 8, 32000),
    "1b": (2048, 5504, 22, 16, 32000),
    "3b": (3200, 8640, 26, 32, 32000),
    "13b": (5120, 13824, 40, 40, 32000),
}


def make_source(folder: Path, size: str, tokenizer_from: Path, shard_bytes: int = 5 << 30) -> int:
    hidden, inter, layers, heads, vocab = SIZES[size]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "float16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    generator = torch.Generator().manual_seed(0)

    def produce(name, shape):
        if len(shape) == 1:
            return {name: torch.ones(shape, dtype=torch.float16)}
        return {name: (torch.randn(shape, generator=generator) * 0.02).half()}

    groups = [Group([Entry(n, torch.float16, s)], lambda n=n, s=s: produce(n, s)) for n, s in shapes.items()]
    shards = plan_shards(groups, shard_bytes)
    names = shard_names(len(shards))
    folder.mkdir(parents=True, exist_ok=True)
    for name, shard in zip(names, shards):
        write_shard(folder / name, shard)
    weight_map = {e.name: n for n, s in zip(names, shards) for g in s.groups for e in g.entries}
    total = sum(s.nbytes for s in shards)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any small tokenizer: calibration needs one
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)
    return total


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="13b")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--calib-samples", type=int, default=0)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--keep", action="store_true", help="keep the generated source and output")
    parser.add_argument("--tokenizer-from", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K",
                        help="folder whose tokenizer files the generated model gets (its ids must fit the vocab)")
    args = parser.parse_args()
    source, out = args.workdir / f"src-{args.size}", args.workdir / f"out-{args.size}"
    started = time.time()
    if not (source / "config.json").is_file():
        make_source(source, args.size, args.tokenizer_from)
    elif not (source / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(args.tokenizer_from / name, source / name)
    generated = time.time() - started
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    largest = max(torch.Size(s).numel() * 2 for s in [(SIZES[args.size][4], SIZES[args.size][0])])
    command = [sys.executable, "-m", "llmint8_cli", "quantize", str(source), str(out), "--force", "-q",
               "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len), "--calib-dataset", "c4"]
    started = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, *rss_kib(child.pid))
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass
        time.sleep(0.2)
    summary = json.loads(child.stdout.read() or "{}")
    seconds = time.time() - started
    print(json.dumps({
        "size": args.size, "command": " ".join(command), "exit_code": child.returncode,
        "source_bytes": source_bytes, "largest_tensor_bytes": largest, "generate_seconds": round(generated, 1),
        "quantize_seconds": round(seconds, 1), "source_mb_per_s": round(source_bytes / 1e6 / seconds, 1),
        "peak_rss_mib": round(peak / 1024, 1), "bound_mib": round((2**30 + largest) / 2**20, 1),
        "ratio_vs_fp16": summary.get("ratio_vs_fp16"), "calibration": summary.get("calibration"),
        "machine_ram_gib": round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1),
    }, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
