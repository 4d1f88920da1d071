"""Overhead of site-based fake quantization on CPU, beside Brevitas and torchao QAT.

Two models: torchvision ``vit_b_16`` (10 classes; batch 4 of 3x64x64 images, i.e.
4 x 17 tokens: all 86M weights of ViT-B take part at the smallest input that is still a
batch) and a GPT-2 built from a ``transformers`` config (4 layers, 256 wide, vocab 1024;
batch 8 x 128 token ids; the default attention, sdpa; ``use_cache=False``). On the
2-core machine these were written on, one fp32 forward took ~1.5 s (ViT) and ~0.9 s
(GPT-2), the whole script ~25 minutes; ``--vit-batch 1 --gpt2-batch 2`` makes calls ~4x
shorter (ViT's weight share of the work then grows). For each model this prints:

* fp32 forward, eval mode with autograd on: the reference of the rows below it;
* ``bw.wrap(model, {})`` (nothing to do: no hooks, no mode), then ``bw.set_plan(model,
  {"*": "int8"})``: every site's weight and activation int8 (weights unchanged between
  calls are reused, with their straight-through mask);
* the same under ``torch.no_grad()`` against fp32 under ``no_grad``: quantized weights
  are cached between calls;
* forward+backward in train mode with weight and activation int8 and gradient
  ``fixed16_8`` against fp32 forward+backward, and the same with an SGD step after each
  (the weights change, so every step quantizes them again: training's real cost);
* peers, where installed: Brevitas ``layerwise_quantize`` (its default layer map: int8
  per-tensor weights and inputs of Linear / Conv / MultiheadAttention, including q, k,
  v and the attention probabilities inside QuantMultiheadAttention) and torchao
  ``quantize_(model, QATConfig(...))`` (its default filter: ``nn.Linear`` only; int8
  per-channel symmetric weights, int8 per-token asymmetric activations), each with
  what fraction of the model's matmul weight layers and MAC inputs it quantizes.

Configurations alternate within each repetition (the order rotates), so load from other
processes hits all of them alike; each time is the median over repetitions and each
ratio the median of per-repetition ratios to the reference measured in that repetition,
in wall and in process CPU time. Targets are printed beside the figures, never asserted.

    python benchmarks/bench_sites.py [--quick] [--repeats 7] [--threads 2] [--models vit gpt2]
        [--passes forward backward] [--peers brevitas torchao] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import importlib.metadata
import io
import pstats
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn

import bitwidth as bw

INT8 = {"*": "int8"}
TRAIN_PLAN = {"*": bw.QuantSpec(weight="int8", activation="int8", gradient="fixed16_8")}


@dataclass
class Model:
    name: str
    model: nn.Module
    example: Any  # what bw.coverage calls the model with
    forward: Callable[[nn.Module], Any]
    loss: Callable[[nn.Module], torch.Tensor]


def vit(size: int, batch: int) -> Model:
    model = torchvision.models.vit_b_16(num_classes=10, image_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return Model(f"vit_b_16  batch {batch} x 3x{size}x{size}", model, x, lambda m: m(x),
                 lambda m: nn.functional.cross_entropy(m(x), y))


def gpt2(batch: int, seq: int) -> Model:
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos inside the small vocab only silence a config warning; they do not enter the forward.
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 1024, (batch, seq))
    name = f"gpt2 4x256  batch {batch} x {seq} tokens  attn={model.config._attn_implementation}"
    return Model(name, model, {"input_ids": ids, "use_cache": False},
                 lambda m: m(input_ids=ids, use_cache=False).logits,
                 lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss)


# ---------------------------------------------------------------------------- peers
def brevitas_peer(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # brevitas warns on import that an optional CUDA kernel is absent
        warnings.simplefilter("ignore")
        from brevitas.graph.quantize import layerwise_quantize

        return layerwise_quantize(model)


def torchao_peer(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model


PEERS = {"brevitas": (brevitas_peer, "brevitas"), "torchao": (torchao_peer, "torchao")}


def peer_sites(before: dict[str, type], model: nn.Module, table: Any) -> set[str]:
    """The sites (bitwidth's names) whose weight and input a peer quantizes: those of replaced modules."""
    replaced = {n for n, m in model.named_modules() if n in before and type(m) is not before[n]}

    def inside(site: str) -> bool:  # the layer, a parameter of it (in_proj_weight), or an op it runs
        module = site.partition(":")[0]
        return any(module == r or module.startswith(r + ".") for r in replaced)

    return {site for site in table["site"] if inside(site)}


def fractions(table: Any, quantized: set[str]) -> tuple[str, str]:
    """``k/N`` matmul weight layers, and the share of MAC inputs (bitwidth's coverage measure)."""
    layers = table[(table["kind"] == "weight") & (table["macs"] > 0)]
    k = sum(s in quantized for s in layers["site"])
    rows = table[table["kind"].isin(["weight", "activation"])]
    w = rows["macs"] * rows["inputs"]
    mac = float(w[rows["site"].isin(quantized)].sum() / w.sum()) if w.sum() else 0.0
    return f"{k}/{len(layers)}", f"{mac:.1%}"


# ---------------------------------------------------------------------------- timing
@dataclass
class Config:
    label: str
    ref: str  # label of the reference row
    target: float | None
    call: Callable[[], Any]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def block(fn: Callable[[], Any], steps: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps


def measure(configs: list[Config], steps: int, repeats: int, warmup: int) -> None:
    for cfg in configs:
        block(cfg.call, warmup)
    for i in range(repeats):
        order = configs[i % len(configs):] + configs[: i % len(configs)]
        for cfg in order if i % 2 == 0 else order[::-1]:
            w, c = block(cfg.call, steps)
            cfg.wall.append(w)
            cfg.cpu.append(c)


def table(title: str, configs: list[Config]) -> None:
    by = {c.label: c for c in configs}
    print(f"\n{title}")
    print(f"  {'configuration':58s} {'ms/call':>9s} {'x ref':>7s} {'x cpu':>7s} {'target':>7s}  met?")
    for c in configs:
        ref = by[c.ref]
        wall = statistics.median(a / b for a, b in zip(c.wall, ref.wall, strict=True))
        cpu = statistics.median(a / b for a, b in zip(c.cpu, ref.cpu, strict=True))
        target = f"<={c.target:g}" if c.target else ""
        met = ("yes" if wall <= c.target else "NO") if c.target else ("ref" if c is ref else "")
        print(f"  {c.label:58s} {statistics.median(c.wall) * 1e3:9.1f} {wall:7.2f} {cpu:7.2f} {target:>7s}  {met}")


def grad_step(m: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        m.zero_grad(set_to_none=True)
        loss(m).backward()

    return step


def train_step(m: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    """Forward, backward and an SGD step: the weights change, so a wrapped model quantizes them again."""
    opt = torch.optim.SGD(m.parameters(), lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(m).backward()
        opt.step()

    return step


def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return fn()

    return call


def profile(label: str, fn: Callable[[], Any], calls: int = 2, top: int = 14) -> None:
    fn()  # untimed: fills the weight cache where there is one
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).strip_dirs().sort_stats("tottime").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print(f"\n  cProfile, {label}, {calls} calls, by own time:")
    for ln in lines[start: start + top + 1]:
        print("   ", ln[:150])


# ---------------------------------------------------------------------------- one model
def bench(spec: Model, args: argparse.Namespace) -> None:
    base = spec.model.eval()
    print(f"\n=== {spec.name}")
    cov = bw.coverage(base, INT8, spec.example)
    print(f"bitwidth coverage of {{'*': 'int8'}}: {cov}")
    sites_table = cov.table

    empty = bw.wrap(copy.deepcopy(base), {})
    # Two int8 copies, so the autograd-on and no_grad rows each reuse only their own quantized weights.
    int8, int8_cached = bw.wrap(copy.deepcopy(base), {}), bw.wrap(copy.deepcopy(base), {})
    bw.set_plan(int8, INT8)
    bw.set_plan(int8_cached, INT8)
    trained = bw.wrap(copy.deepcopy(base).train(), {})
    bw.set_plan(trained, TRAIN_PLAN)
    fp32_train = copy.deepcopy(base).train()

    peers: dict[str, nn.Module] = {}
    for name, (make, dist) in PEERS.items():
        if name not in args.peers:
            continue
        try:
            m = copy.deepcopy(base)
            before = {n: type(x) for n, x in m.named_modules()}
            m = make(m).eval()
            with torch.no_grad():
                spec.forward(m)
            layers, macs = fractions(sites_table, peer_sites(before, m, sites_table))
            kinds = sorted({type(x).__name__ for n, x in m.named_modules() if n in before and type(x) is not before[n]})
            print(f"{name} {importlib.metadata.version(dist)}: quantizes {layers} matmul weight layers, {macs} of "
                  f"MAC inputs; replaced with {', '.join(kinds) or 'nothing'}")
            peers[name] = m
        except Exception as e:  # a peer that fails is reported, the benchmark goes on
            print(f"{name}: not measured ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if args.verbose:
                traceback.print_exc()
    fw = spec.forward
    fwd = [Config("fp32 forward (eval, autograd on)", "fp32 forward (eval, autograd on)", None, lambda: fw(base)),
           Config("bitwidth wrap(model, {})", "fp32 forward (eval, autograd on)", 1.05, lambda: fw(empty)),
           Config("bitwidth {'*': 'int8'} (quantized weights reused)", "fp32 forward (eval, autograd on)", 2.5,
                  lambda: fw(int8))]
    fwd += [Config(f"{n} int8", "fp32 forward (eval, autograd on)", None, lambda m=m: fw(m)) for n, m in peers.items()]
    ng = [Config("fp32 forward, no_grad", "fp32 forward, no_grad", None, no_grad(lambda: fw(base))),
          Config("bitwidth wrap(model, {}), no_grad", "fp32 forward, no_grad", 1.05, no_grad(lambda: fw(empty))),
          Config("bitwidth {'*': 'int8'}, no_grad (weights cached)", "fp32 forward, no_grad", 2.5,
                 no_grad(lambda: fw(int8_cached)))]
    ng += [Config(f"{n} int8, no_grad", "fp32 forward, no_grad", None, no_grad(lambda m=m: fw(m)))
           for n, m in peers.items()]
    peers_train = {n: copy.deepcopy(m).train() for n, m in peers.items()}
    bwd = [Config("fp32 forward+backward (train)", "fp32 forward+backward (train)", None,
                  grad_step(fp32_train, spec.loss)),
           Config("bitwidth w/a int8, g fixed16_8 forward+backward", "fp32 forward+backward (train)", 3.0,
                  grad_step(trained, spec.loss))]
    bwd += [Config(f"{n} int8 forward+backward", "fp32 forward+backward (train)", None, grad_step(m, spec.loss))
            for n, m in peers_train.items()]
    # A training step changes every weight, so each step quantizes them afresh.
    stepped, fp32_stepped = copy.deepcopy(trained), copy.deepcopy(fp32_train)
    bwd += [Config("fp32 training step (fwd+bwd+SGD)", "fp32 training step (fwd+bwd+SGD)", None,
                   train_step(fp32_stepped, spec.loss)),
            Config("bitwidth w/a int8, g fixed16_8 training step", "fp32 training step (fwd+bwd+SGD)", 3.0,
                   train_step(stepped, spec.loss))]
    threads = torch.get_num_threads()
    rep = f"{args.repeats} repetitions x {args.steps} calls, {threads} threads"
    if "forward" in args.passes:
        measure(fwd + ng, args.steps, args.repeats, args.warmup)
        table(f"{spec.name}: forward ({rep})", fwd + ng)
    if "backward" in args.passes:
        measure(bwd, args.steps, args.repeats, args.warmup)
        table(f"{spec.name}: forward+backward ({rep})", bwd)
    if args.profile:
        profile("bitwidth {'*': 'int8'} forward, autograd on", lambda: fw(int8))
        profile("bitwidth {'*': 'int8'} forward, no_grad", no_grad(lambda: fw(int8_cached)))
        profile("bitwidth train plan forward+backward", grad_step(trained, spec.loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small inputs, 2 repetitions of 1 call")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions (each runs every configuration once)")
    parser.add_argument("--steps", type=int, default=1, help="calls per configuration per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per configuration first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", choices=("vit", "gpt2"), default=("vit", "gpt2"))
    parser.add_argument("--peers", nargs="*", choices=tuple(PEERS), default=tuple(PEERS))
    parser.add_argument("--passes", nargs="+", choices=("forward", "backward"), default=("forward", "backward"))
    parser.add_argument("--vit-size", type=int, default=64)
    parser.add_argument("--vit-batch", type=int, default=4)
    parser.add_argument("--gpt2-batch", type=int, default=8)
    parser.add_argument("--gpt2-seq", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="cProfile bitwidth's int8 rows after the tables")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of peers that fail")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 1
        args.vit_size, args.vit_batch, args.gpt2_batch, args.gpt2_seq = 32, 1, 2, 32
    torch.set_num_threads(args.threads)
    versions = []
    for dist in ("torch", "torchvision", "transformers", "brevitas", "torchao"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    print(f"{', '.join(versions)}; bitwidth {bw.__version__}; cpu, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    makers = {"vit": lambda: vit(args.vit_size, args.vit_batch), "gpt2": lambda: gpt2(args.gpt2_batch, args.gpt2_seq)}
    for name in args.models:
        try:
            bench(makers[name](), args)
        except Exception:  # one model failing must not hide the other's figures
            print(f"\n{name}: failed")
            traceback.print_exc()


if __name__ == "__main__":
    main()
