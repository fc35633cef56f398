#!/usr/bin/env python3
"""The Python (PyTorch eager) reference the speed targets are ratios to.

The issues quote a Python implementation's images/s on "this machine", but the
machines these runs get differ (AVX-512 Xeons, AVX2 EPYCs; 160 to 200 GFLOP/s),
so moev_bench runs this script on the machine it measures and prints its ratios
against these figures, measured alongside its own. Same models, batch, threads
and LibTorch build (Debian's python3-torch 1.13 wraps the same libtorch):

  vmoe-tiny:         ViT, width 128, 6 blocks, 4 heads, patch 4, MLP 256,
                     MoE E=8, K=2, C=1.05 in blocks 3 and 5, routing groups of 8
                     images, importance + load auxiliary losses;
  convnext-moe-tiny: ConvNeXt, stem 2, dims 32/64/128, depths 2/2/4, MoE E=8,
                     K=2 in the last two blocks;
  resnest-mb-tiny:   Sun et al.'s multi-branch ResNeSt at 28 px: a stem of two
                     3x3 convs (32 wide) around a blur pool, stages 32/64/128
                     of one split-attention block (radix 2), the first two
                     shared, the last one and a head per branch, N = 3,
                     stochastic depth 0.1; trained as moev trains it, every
                     branch against the target plus 0.2 times the diversity
                     loss, evaluated on the mean of the branch logits.

It is written as a PyTorch user would write it in eager mode: nn.Modules, a
V-MoE router with K-major capacity by cumulative sums, experts as stacked
weights run one at a time on their gathered tokens, torch.optim.AdamW. It is
not part of moev; it exists to be measured against. `--precision bf16` runs
forward passes under torch.autocast("cpu", torch.bfloat16), the mixed precision
a PyTorch user would reach for (fp32 weights, bf16 matmuls and convolutions),
to compare against moev's model.precision = "bf16".

Prints one JSON line: {"model", "precision", "threads", "train_img_s", "eval_img_s",
"matmul_gflops"} (the last: fp32 1024^3 matmul speed around the run, see matmul_gflops).
Usage: python3 bench/python_reference.py --model vmoe-tiny --threads 2 [--precision bf16]
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoE(nn.Module):
    def __init__(self, d, h, experts=8, k=2, capacity=1.05, group_images=8):
        super().__init__()
        self.e, self.k, self.c, self.group_images = experts, k, capacity, group_images
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, d, h) * d ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(experts, h))
        self.w2 = nn.Parameter(torch.randn(experts, h, d) * h ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(experts, d))
        self.aux = None

    def forward(self, x):  # x: [B, N, D]
        b, n, d = x.shape
        g = min(self.group_images, b)
        xt = x.reshape(-1, d)
        logits = self.router(xt.float())
        noisy = logits + torch.randn_like(logits) / self.e if self.training else logits
        gates = noisy.softmax(-1)
        topv, topi = gates.topk(self.k, -1)  # [T, K]
        # K-major priority within each group of g images: position of every
        # (token, choice) in its expert's queue, all first choices first.
        s = g * n
        groups = xt.shape[0] // s
        onehot = F.one_hot(topi.view(groups, s, self.k).transpose(1, 2).reshape(groups, self.k * s),
                           self.e)  # [G, K*S, E]
        pos = (onehot.cumsum(1) - 1) * onehot
        pos = pos.sum(-1).view(groups, self.k, s).transpose(1, 2).reshape(-1, self.k)  # [T, K]
        cap = math.ceil(self.k * s * self.c / self.e)
        keep = pos < cap
        if self.training:
            imp = gates.sum(0)
            self.aux = (imp.std() / imp.mean()) ** 2
            thr = noisy.topk(self.k, -1).values[:, -1:]
            p = 1 - torch.distributions.Normal(0.0, 1.0 / self.e).cdf(thr - logits)
            load = p.sum(0)
            self.aux = 0.005 * self.aux + 0.005 * (load.std() / load.mean()) ** 2
        out = torch.zeros_like(xt)
        for e in range(self.e):
            sel = (topi == e) & keep
            tok, choice = sel.nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = F.gelu(xt[tok] @ self.w1[e] + self.b1[e])
            y = (h @ self.w2[e] + self.b2[e]) * topv[tok, choice].unsqueeze(1).to(x.dtype)
            out = out.index_add(0, tok, y)
        return out.view(b, n, d)


class Block(nn.Module):
    def __init__(self, d, heads, mlp, moe):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = MoE(d, mlp) if moe else nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class VMoE(nn.Module):
    def __init__(self, d=128, depth=6, heads=4, patch=4, mlp=256, moe_blocks=(3, 5)):
        super().__init__()
        self.embed = nn.Conv2d(1, d, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (28 // patch) ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, mlp, i in moe_blocks) for i in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


class LN(nn.LayerNorm):
    # CPU autocast in 1.13 hands LayerNorm the bf16 output of a convolution
    # with fp32 weights, which it refuses: normalise in fp32.
    def forward(self, x):
        return super().forward(x.float())


class ConvNeXtBlock(nn.Module):
    def __init__(self, d, moe):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = LN(d, eps=1e-6)
        self.mlp = MoE(d, 4 * d) if moe else nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.gamma = nn.Parameter(torch.full((d,), 1e-6))

    def forward(self, x):
        t = self.norm(self.dw(x).permute(0, 2, 3, 1))
        b, h, w, d = t.shape
        t = self.mlp(t.reshape(b, h * w, d)).view(b, h, w, d) * self.gamma
        return x + t.permute(0, 3, 1, 2)


class ChannelsLN(LN):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtMoE(nn.Module):
    def __init__(self, dims=(32, 64, 128), depths=(2, 2, 4), stem=2):
        super().__init__()
        total, layers, block = sum(depths), [nn.Conv2d(1, dims[0], stem, stem), ChannelsLN(dims[0], eps=1e-6)], 0
        for s, (d, n) in enumerate(zip(dims, depths)):
            if s > 0:
                layers += [ChannelsLN(dims[s - 1], eps=1e-6), nn.Conv2d(dims[s - 1], d, 2, 2)]
            for _ in range(n):
                layers.append(ConvNeXtBlock(d, block >= total - 2))
                block += 1
        self.features = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], 10)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean((2, 3))))


def blur_pool(x):
    # Zhang 2019's [1 2 1] x [1 2 1] / 16 filter at stride 2, reflect-padded.
    k1 = torch.tensor([1.0, 2.0, 1.0]) / 4
    k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3).contiguous()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k.to(x.dtype), stride=2, groups=x.shape[1])


class SplitAttention(nn.Module):
    def __init__(self, w, radix=2):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(w, w * radix, 3, padding=1, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(w * radix)
        inter = max(w * radix // 4, 16)
        self.fc1, self.bn1, self.fc2 = nn.Conv2d(w, inter, 1), nn.BatchNorm2d(inter), nn.Conv2d(inter, w * radix, 1)

    def forward(self, x):
        b, w = x.shape[:2]
        splits = F.relu(self.bn0(self.conv(x))).view(b, self.radix, w, *x.shape[2:])
        gap = splits.sum(1).mean((2, 3), keepdim=True)
        a = self.fc2(F.relu(self.bn1(self.fc1(gap)))).view(b, self.radix, w, 1, 1).softmax(1)
        return (splits * a).sum(1)


class ResNeStBlock(nn.Module):
    def __init__(self, cin, cout, stride, drop_path):
        super().__init__()
        w = cout // 4
        self.stride, self.drop_path = stride, drop_path
        self.conv1, self.bn1, self.attn = nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), SplitAttention(w)
        self.conv3, self.bn3 = nn.Conv2d(w, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        t = self.attn(F.relu(self.bn1(self.conv1(x))))
        if self.stride > 1:
            t = blur_pool(t)
        t = self.bn3(self.conv3(t))
        if self.training and self.drop_path > 0:
            t = t * (torch.rand(x.shape[0], 1, 1, 1) >= self.drop_path).to(t.dtype) / (1 - self.drop_path)
        s = x if self.shortcut is None else self.shortcut(blur_pool(x) if self.stride > 1 else x)
        return F.relu(s + t)


class MultiBranchResNeSt(nn.Module):
    def __init__(self, branches=3, shared=2, dims=(32, 64, 128), stem=32, drop_path=0.1):
        super().__init__()
        self.stem1 = nn.Sequential(nn.Conv2d(1, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        self.stem2 = nn.Sequential(nn.Conv2d(stem, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())

        def stage(s):
            return ResNeStBlock(stem if s == 0 else dims[s - 1], dims[s], 2 if s > 0 else 1,
                                drop_path * s / (len(dims) - 1))
        self.shared = nn.Sequential(*[stage(s) for s in range(shared)])
        self.branches = nn.ModuleList(nn.Sequential(*[stage(s) for s in range(shared, len(dims))])
                                      for _ in range(branches))
        self.heads = nn.ModuleList(nn.Linear(dims[-1], 10) for _ in range(branches))

    def forward(self, x):  # -> N x [B, 10]
        x = self.shared(self.stem2(blur_pool(self.stem1(x))))
        return [h(b(x).mean((2, 3))) for b, h in zip(self.branches, self.heads)]


def diversity_loss(logits):
    # Sun et al.'s -sum_i KL(p_i || p_mean), as moev computes it.
    lp = torch.stack([l.float().log_softmax(1) for l in logits])
    log_mean = torch.logsumexp(lp, 0) - math.log(len(logits))
    return -(lp.exp() * (lp - log_mean)).sum(2).sum(0).mean()


def fastest_ms(fn, rounds, steps):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def matmul_gflops(n=1024, calls=5):
    """fp32 matmul GFLOP/s (fastest of a few calls), as moev_bench measures its peak: the
    machine's speed at the time of this run, so moev_bench can compare runs made in
    different phases of a noisy machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vmoe-tiny", choices=["vmoe-tiny", "convnext-moe-tiny", "resnest-mb-tiny"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    bf16 = a.precision == "bf16"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = {"vmoe-tiny": VMoE, "convnext-moe-tiny": ConvNeXtMoE, "resnest-mb-tiny": MultiBranchResNeSt}[a.model]()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x, y = torch.randn(a.batch, 1, 28, 28), torch.randint(0, 10, (a.batch,))

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        if isinstance(logits, list):  # branches: each against the target, plus the diversity loss
            loss = sum(F.cross_entropy(l.float(), y, label_smoothing=0.1) for l in logits) + 0.2 * diversity_loss(logits)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss = loss + sum(m.aux for m in moes if m.aux is not None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def eval_step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            if isinstance(logits, list):  # the mean of the branch logits, as moev's forward
                torch.stack(logits).mean(0)

    peak_before = matmul_gflops()
    model.train()
    train_ms = fastest_ms(train_step, a.rounds, a.steps)
    model.eval()
    eval_ms = fastest_ms(eval_step, a.rounds, 2 * a.steps)
    peak = max(peak_before, matmul_gflops())
    print(json.dumps({"model": a.model, "precision": a.precision, "threads": torch.get_num_threads(),
                      "train_img_s": a.batch / train_ms * 1e3, "eval_img_s": a.batch / eval_ms * 1e3,
                      "matmul_gflops": peak}))


if __name__ == "__main__":
    main()
