"""Markdown tables from `llmint8 bench` JSON, for bench/results: `llmint8 bench ... | python bench/bench_table.py`.

Layer mode: one table per weight shape, a row per token count m, a column per variant, each cell
"median ms (speed-up vs bf16)". Model mode: a row per variant, tokens/s and speed-up per phase.
The machine line (CPU model, flags, threads, torch) and the GEMM plan come first.
"""

import json
import sys


def machine_line(document: dict) -> str:
    m = document["machine"]
    return f"Machine: {m['cpu']}, flags {' '.join(m['cpu_flags'])}, {m['threads']} threads, torch {m['torch']} (capability {m['torch_cpu_capability']})."


def layer_tables(document: dict) -> list[str]:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in document["rows"]):
        rows = [r for r in document["rows"] if r["shape"] == shape]
        variants = list(dict.fromkeys(r["row"] for r in rows))
        lines += [f"### {shape} (median ms, speed-up vs bf16)", "", "| m | " + " | ".join(variants) + " |", "| ---: |" + " ---: |" * len(variants)]
        for m in dict.fromkeys(r["tokens"] for r in rows):
            cells = {r["row"]: f"{r['median_ms']:.3g} ({r['speedup_vs_16bit']:.2f}×)" for r in rows if r["tokens"] == m}
            lines.append(f"| {m} | " + " | ".join(cells.get(v, "") for v in variants) + " |")
        lines.append("")
    return lines


def model_table(document: dict) -> list[str]:
    phases = [("prefill", str(n), f"prefill {n}") for n in document["prompt_tokens"]] + [("decode", str(b), f"decode ×{b}") for b in document["batches"]]
    lines = [f"### {document['model']}, {document['dtype']} compute (tokens/s, speed-up vs the 16-bit model)", "",
             "| variant | " + " | ".join(p[2] for p in phases) + " | weights MiB |", "| --- |" + " ---: |" * (len(phases) + 1)]
    for name, row in document["results"].items():
        cells = [f"{row[phase][size]['tokens_per_s']:.1f} ({row[phase][size]['speedup']:.2f}×)" for phase, size, _ in phases]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['weight_mib']:.1f} |")
    return lines + [""]


def main() -> None:
    document = json.load(sys.stdin)
    lines = [machine_line(document), ""]
    lines += model_table(document) if document["mode"] == "model" else layer_tables(document)
    lines += [f"int8 GEMM plan: {shape}: {plan}" for shape, plan in document["int8_gemm"]["plans"].items()]
    lines += [f"Note: {note}" for note in document["notes"]]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
