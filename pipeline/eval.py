"""Held-out quality: perplexity, KL divergence from the reference and top-1 agreement.

Every model is scored on the same token windows, each window on its own (no carried
context); perplexity is exp(mean NLL over all predicted tokens). KL(ref ‖ model) and
top-1 agreement are computed per token against the reference, in the same pass, so
comparisons between models are paired (MEASURE.md).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from workers.result import QuantSpec
from workers.rtn import rtn_quantize


def load_reference(path: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    return model.eval()


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose linears (by module name) carry the given weights."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, weight in weights.items():
        modules[name].weight.data = weight.to(modules[name].weight.dtype)
    return out


def rtn_weights(model: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """RTN-dequantized weights of every linear inside the decoder layers (lm_head stays)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}.":
            out[name] = rtn_quantize(module.weight.data, spec).dequantize()
    return out


def evaluate(
    models: dict[str, nn.Module], windows: torch.Tensor, reference: str, batch_size: int = 2
) -> dict[str, dict]:
    """Perplexity of each model; KLD and top-1 agreement against ``reference``."""
    names = list(models)
    nll = dict.fromkeys(names, 0.0)
    kld_sum = dict.fromkeys(names, 0.0)
    kld_tokens: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    agree = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    count = 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            targets = ids[:, 1:]
            logps = {}
            for n in [reference] + [m for m in names if m != reference]:
                t = time.perf_counter()
                logits = models[n](input_ids=ids).logits[:, :-1].float()
                seconds[n] += time.perf_counter() - t
                logp = torch.log_softmax(logits, dim=-1)
                nll[n] += float(-logp.gather(-1, targets.unsqueeze(-1)).sum())
                if n == reference:
                    logps[n] = logp
                    ref_top = logp.argmax(-1)
                    ref_p = logp.exp()
                else:
                    kld = (ref_p * (logps[reference] - logp)).sum(-1)
                    kld_sum[n] += float(kld.sum())
                    kld_tokens[n].append(kld.flatten())
                    agree[n] += int((logp.argmax(-1) == ref_top).sum())
                del logits, logp
            count += targets.numel()
    out = {}
    for n in names:
        row = {"ppl": math.exp(nll[n] / count), "tokens": count, "forward_s": seconds[n]}
        if n == reference:
            row.update(kld=0.0, kld_p99=0.0, top1=1.0)
        else:
            allk = torch.cat(kld_tokens[n])
            row.update(
                kld=kld_sum[n] / count, kld_p99=float(torch.quantile(allk[:100000], 0.99)), top1=agree[n] / count
            )
        out[n] = row
    ref_ppl = out[reference]["ppl"]
    for row in out.values():
        row["ppl_increase"] = (row["ppl"] - ref_ppl) / ref_ppl
    return out
