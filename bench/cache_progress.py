"""How far the full-set perplexity runs in a cache have come, with interim deltas.

    python bench/cache_progress.py gemma3-270m --bos text [--cache bench/full-sets-cache]

For every variant cached for this model and protocol (WikiText-2 unless --dataset): windows done,
and its perplexity and delta against the 16-bit baseline over the windows both have done. The
windows are the same for every variant, so an interim delta is an honest partial result; it is
reported as such (with its window count) until `eval-ppl` reads the complete set back.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from llmint8_cli import data, models
from llmint8_cli.evaluation.perplexity import IGNORE, WindowCache, make_windows, tokenize
from llmint8_cli.evaluation.variants import BASELINE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bos", default="window", choices=("window", "text"))
    parser.add_argument("--cache", default=str(Path(__file__).parent / "full-sets-cache"))
    args = parser.parse_args()

    source = models.resolve(args.model)
    ids, bos_id = tokenize(models.load_tokenizer(source), data.load_text(args.dataset, args.data_dir).text, args.bos)
    windows = make_windows(ids, args.seq_len, None, bos_id)
    scored = (windows.labels[:, 1:] != IGNORE).sum(dim=1).tolist()
    files = sorted(Path(args.cache).glob(f"*-{models.fingerprint(source)}/*/ppl-{windows.digest()}.jsonl"))
    done = {path.parent.name: WindowCache(path.parent, windows).load() for path in files}
    baseline = next((nll for name, nll in done.items() if name.startswith(f"{BASELINE}-")), {})

    def ppl(nll: dict[int, float], over: set[int]) -> float:
        return math.exp(sum(nll[i] for i in over) / sum(scored[i] for i in over))

    report = {"model": source.label, "bos": args.bos, "windows": len(scored), "digest": windows.digest(), "variants": {}}
    for name, nll in done.items():
        common = set(nll) & set(baseline)
        row = {"windows_done": len(nll), "ppl": round(ppl(nll, set(nll)), 4) if nll else None}
        if common:
            row.update(common_windows=len(common), delta_pct_over_common=round(100 * (ppl(nll, common) / ppl(baseline, common) - 1), 3))
        report["variants"][name] = row
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
