"""Where llm.int8's loss lies and what smoothing removes: a fake-quant ablation on a perplexity slice (issue #27).

    python bench/fidelity_ablation.py MODEL WINDOWS CONFIGS_JSON [DATASET] [SEQ_LEN]
    python bench/fidelity_ablation.py smollm2-135m 40 '[{}, {"xfp":1}, {"alpha":0.5}, {"alpha":0.5,"only":["down_proj"]}]'

Each config replaces every quantizable linear by a simulation of llm.int8 in fp32 (int8 values
rounded and rescaled, not an int8 GEMM; the same quantization maps, stored columns from the
default calibration, run-time outliers per sequence):
  alpha: per-feature smoothing strength (none: plain llm.int8)   xfp / wfp: keep X / W unquantized
  zp: zeropoint activation rows   thr: run-time threshold   store_thr: calibration threshold of the
  stored columns (default 6)   budget: store the top fraction of columns
  only: quantize only the layers whose name holds one of these words
  rot: rotate the int8 part of X and W by a block-diagonal orthonormal matrix (Hadamard blocks of this size)
  gptq: round W with GPTQ's error compensation against the calibration inputs' Hessian
Prints one line per config: ppl, delta against the fp32 model, and the share of the linears'
multiply-accumulates that run in 16-bit (stored and run-time outlier columns). Exploration only: the product's
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

def rotation(k, b, seed=0):
    """Block-diagonal orthonormal k x k: Hadamard blocks of size b where b divides k, else random orthogonal."""
    if k % b == 0 and b & (b - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return torch.block_diag(*[h / b ** 0.5] * (k // b))
    g = torch.Generator().manual_seed(seed)
    sizes = [b] * (k // b) + ([k % b] if k % b else [])
    return torch.block_diag(*[torch.linalg.qr(torch.randn(n, n, generator=g))[0] for n in sizes])

def gptq(W, H, damp=0.01):
    """Round W's rows to int8 (per-row absmax scale fixed up front) compensating error through H (GPTQ)."""
    W = W.clone().double(); H = H.double().clone()
    scale = (W.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i:i+1]
        q = torch.round(w / scale).clamp(-127, 127) * scale
        Q[:, i:i+1] = q
        err = (w - q) / Hinv[i, i]
        W[:, i+1:] -= err @ Hinv[i:i+1, i+1:]
    return Q.float()

def qdq_zp(v):
    lo = v.amin(-1, keepdim=True).clamp(max=0); hi = v.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 254
    sd = torch.where(s > 0, s, 1)
    z = -127 - torch.round(lo / sd)
    q = (torch.round(v / sd) + z).clamp(-127, 127)
    return torch.where(s > 0, (q - z) * s, torch.zeros_like(v))

MACS = {"16-bit": 0, "all": 0}  # multiply-accumulates of the simulated linears, per config


class Sim(nn.Module):
    def __init__(self, lin, cfg, colmax, thr=6.0, hessian=None):
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
        self.R = rotation(k, cfg["rot"]) if cfg.get("rot") else None
        if self.R is not None:
            Wq = Wq @ self.R
        if cfg.get("gptq"):
            Hs = hessian * self.inv[:, None] * self.inv[None, :]
            Hs[stored, :] = 0; Hs[:, stored] = 0
            if self.R is not None:
                Hs = self.R.T.double() @ Hs @ self.R.double()
            self.Wd = gptq(Wq, Hs)
        else:
            self.Wd = Wq if cfg.get("wfp") else qdq_rows(Wq)
        self.Wmix = self.Wd @ self.R.T if self.R is not None else self.Wd.clone()
        self.Wmix[:, stored] = Ws[:, stored]
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
        if self.R is not None:
            xi = xi @ self.R
        MACS["16-bit"] += int(big.expand(*x.shape[:-2], 1, x.shape[-1]).sum()) * x.shape[-2] * self.Wd.shape[0]
        MACS["all"] += x[..., 0].numel() * x.shape[-1] * self.Wd.shape[0]
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
    hessians = {}
    if any(c.get("gptq") for c in cfgs):
        def add(name, x):
            x = x.detach().reshape(-1, x.shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + x.T @ x
        hs = [base.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: add(n, a[0])) for n in names]
        for b_ in batches:
            base(b_)
        for h in hs: h.remove()
    print("calib", info, file=sys.stderr)
    t = time.time(); b = perplexity(base, w).ppl
    print(f"fp32 {b:.4f} ({time.time()-t:.0f}s)", file=sys.stderr, flush=True)
    for cfg in cfgs:
        m = copy.deepcopy(base)
        for n, mod in list(quantizable_layers(m)):
            if cfg.get("only") and not any(o in n for o in cfg["only"]): continue
            replace_module(m, n, Sim(as_linear(mod), cfg, stats.col_max[n], hessian=hessians.get(n)))
        MACS.update({"16-bit": 0, "all": 0})
        t = time.time(); p = perplexity(m, w).ppl
        share = 100 * MACS["16-bit"] / max(MACS["all"], 1)
        print(f"{json.dumps(cfg)} ppl {p:.4f} {100*(p/b-1):+.3f}% 16-bit MACs {share:.2f}% ({time.time()-t:.0f}s)", flush=True)
if __name__ == "__main__":
    main()
