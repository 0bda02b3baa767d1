"""Where llm.int8's loss lies and what smoothing removes: a fake-quant ablation on a perplexity slice (issue #27).

    python bench/fidelity_ablation.py MODEL WINDOWS CONFIGS_JSON [DATASET] [SEQ_LEN]
    python bench/fidelity_ablation.py smollm2-135m 40 '[{}, {"xfp":1}, {"alpha":0.5}, {"alpha":0.5,"only":["down_proj"]}]'

Each config replaces every quantizable linear by a simulation of llm.int8 in fp32 (int8 values
rounded and rescaled, not an int8 GEMM; the same quantization maps, stored columns from the
default calibration, run-time outliers per sequence):
  alpha: per-feature smoothing strength (none: plain llm.int8)   xfp / wfp: keep X / W unquantized
  zp: zeropoint activation rows   thr: run-time threshold   budget: store the top fraction of columns
  only: quantize only the layers whose name holds one of these words
Prints one line per config: ppl and delta against the fp32 model. Exploration only: the product's
numbers come from `llmint8 eval-ppl`, which runs the real kernels.
"""
import copy
import dataclasses
import json
import sys
import time

import torch
from torch import nn
from llmint8_cli import data, models, activations
from llmint8_cli.checkpoint.quantize import QuantizeOptions, calibration_batches
from llmint8_cli.evaluation.perplexity import make_windows, perplexity, tokenize
from llmint8_cli.nn.convert import as_linear, quantizable_layers, replace_module

torch.set_grad_enabled(False)

def qdq_rows(v):
    a = v.abs().amax(-1, keepdim=True)
    s = a / 127
    return torch.where(s > 0, torch.round(v / torch.where(s > 0, s, 1)).clamp(-127, 127) * s, torch.zeros_like(v))

def qdq_zp(v):
    lo = v.amin(-1, keepdim=True).clamp(max=0); hi = v.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 254
    sd = torch.where(s > 0, s, 1)
    z = -127 - torch.round(lo / sd)
    q = (torch.round(v / sd) + z).clamp(-127, 127)
    return torch.where(s > 0, (q - z) * s, torch.zeros_like(v))

class Sim(nn.Module):
    def __init__(self, lin, cfg, colmax, thr=6.0):
        super().__init__()
        W = lin.weight.float()
        k = W.shape[1]
        self.bias = None if lin.bias is None else lin.bias.float()
        stored = colmax >= cfg.get("store_thr", thr)
        budget = cfg.get("budget")
        if budget:
            nb = max(int(budget * k), int(stored.sum()))
            top = torch.topk(colmax * (W.abs().amax(0) if cfg.get("budget_w") else 1), nb).indices
            stored = torch.zeros(k, dtype=torch.bool); stored[top] = True
        s = torch.ones(k)
        a = cfg.get("alpha")
        if a is not None:
            wmax = W.abs().amax(0).clamp(min=1e-5)
            s = colmax.clamp(min=1e-5) ** a / wmax ** (1 - a)
            s = s.clamp(min=cfg.get("smin", 0))
            s[stored] = 1.0
        self.inv = 1.0 / s
        Ws = W * s
        Wq = Ws.clone(); Wq[:, stored] = 0
        self.Wd = Wq if cfg.get("wfp") else qdq_rows(Wq)
        self.Wmix = self.Wd.clone(); self.Wmix[:, stored] = Ws[:, stored]
        self.stored = stored
        self.thr = thr
        self.xfp = cfg.get("xfp", False)
        self.zp = cfg.get("zp", False)
        self.thr = cfg.get("thr", thr)
    def forward(self, x):
        dt = x.dtype
        xs = x.float() * self.inv
        big = (xs.abs() >= self.thr).any(dim=-2, keepdim=True) | self.stored  # per sequence
        xi = xs.masked_fill(big, 0)
        xq = xi if self.xfp else (qdq_zp(xi) if self.zp else qdq_rows(xi))
        y = xq @ self.Wd.T + xs.masked_fill(~big, 0) @ self.Wmix.T
        if self.bias is not None: y = y + self.bias
        return y.to(dt)

def main():
    spec = sys.argv[1]; windows_n = int(sys.argv[2]); cfgs = json.loads(sys.argv[3])
    dataset = sys.argv[4] if len(sys.argv) > 4 else "wikitext2"
    seq = int(sys.argv[5]) if len(sys.argv) > 5 else 512
    src = models.resolve(spec)
    tok = models.load_tokenizer(src)
    base = models.load_model(src, dtype=torch.float32)
    text = data.load_text(dataset, "../shared/data")
    ids, bos = tokenize(tok, text.text, "window")
    w = make_windows(ids, seq, bos_id=bos, max_tokens=windows_n * seq)
    w = dataclasses.replace(w, input_ids=w.input_ids[:windows_n], labels=w.labels[:windows_n])
    opts = QuantizeOptions(data_dir="../shared/data")
    batches, info = calibration_batches(tok, opts)
    names = [n for n, _ in quantizable_layers(base)]
    stats = activations.collect(base, batches, names, 6.0)
    print("calib", info, file=sys.stderr)
    t = time.time(); b = perplexity(base, w).ppl
    print(f"fp32 {b:.4f} ({time.time()-t:.0f}s)", file=sys.stderr, flush=True)
    for cfg in cfgs:
        m = copy.deepcopy(base)
        for n, mod in list(quantizable_layers(m)):
            if cfg.get("only") and not any(o in n for o in cfg["only"]): continue
            replace_module(m, n, Sim(as_linear(mod), cfg, stats.col_max[n]))
        t = time.time(); p = perplexity(m, w).ppl
        print(f"{json.dumps(cfg)} ppl {p:.4f} {100*(p/b-1):+.3f}% ({time.time()-t:.0f}s)", flush=True)
if __name__ == "__main__":
    main()
