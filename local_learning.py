#!/usr/bin/env python3
"""
local_learning.py -- supervised local learning in one file
===========================================================

End-to-end backpropagation (BP) keeps every activation of a network alive until the one backward pass reaches
it. Supervised *local learning* cuts the network into K gradient-isolated modules f_1..f_K. Module k reads the
detached output of module k-1, scores its own output with a small auxiliary network g_k and a local loss, and
backpropagates that loss at once:

    h_k = f_k(sg(h_{k-1}))                 sg = stop-gradient (detach): no gradient crosses a module boundary
    L_k = loss_k(g_k(h_k), y)              k < K: a local loss through the auxiliary net g_k
    L_K = CE(head(h_K), y)                 the last module owns the network's real head (ResNets: FC of GAP;
                                           ViTs: LayerNorm -> FC of the CLS token)

Module k runs forward -> local loss -> backward -> detach before module k+1 runs forward, so autograd frees
module k's activations first: peak activation memory is that of the largest module (plus its aux net), not of
the whole network. All modules and aux nets then take one shared SGD step.

Methods (--method; add-ons take --base, and chain: --method sgr --base man+dgl), each one class in section 5
---------------------------------------------------------------------------------------------------------------
    bp        end-to-end backpropagation (K = 1), the baseline every paper compares with
    greedy    Greedy supervised local learning: aux = GAP -> Linear, cross-entropy
    dgl       Decoupled Greedy Learning (Belilovsky et al., ICML 2020): the official "MLP-SR" aux net, CE
    predsim   PredSim (Noekland & Eidnes, ICML 2019): similarity matching + prediction, as in the AugLocal repo
    infopro   InfoPro (Wang et al., ICLR 2021): reconstruction decoder + SupCon/CE head, per-module lambdas;
              InfoPro* = --balanced-memory
    auglocal  AugLocal (Ma et al., ICLR 2024): aux nets built from uniformly sampled later layers, pyramidal depth
    man       add-on, MAN (Su et al., ECCV 2024): EMA + learnable copies of the next block feed the aux net
              (on ViTs MAN++'s: copies of the next group's first 2 blocks, s LB + (2 - s) EMA)
    mlaan     add-on, MLAAN (Zhang et al., AAAI 2025): independent + cascade aux nets, leap augmented module
    sgr       add-on, SGR (Yang et al., ICML 2024): reconcile each module's input gradient with the previous
              module's output gradient (double backward)

Run
---
    python local_learning.py --method dgl --dataset cifar10 --arch resnet32 --K 16
    python local_learning.py --method mlaan --base dgl --dataset folder --data-dir ../shared/data/cifar10-subset \\
        --norm cifar10 --batch-size 128 --lr 0.1 --epochs 5 --warmup-epochs 1
    python local_learning.py --method infopro --arch resnet110 --K 55 --bench 10 --batch-size 128  # speed + memory
    python local_learning.py --method man --arch vit_tiny --dataset cifar10   # MAN++ on a ViT: K = 4, AdamW
    torchrun --nproc_per_node=8 local_learning.py --method infopro --dataset imagenet --data-dir IMAGENET \\
        --arch resnet101 --K 2                                        # data parallel: InfoPro*'s ImageNet run
    torchrun --nproc_per_node=4 local_learning.py --pipeline --method dgl --arch resnet110 --K 55   # module parallel

Use it in your project (sections 3, 5, 7): any network as an ordered list of units plus a head
--------------------------------------------------------------------------------------------------
    net = LocalNet(units, head, ends=4, example_input=torch.zeros(1, 3, 224, 224))  # K=4 (or unit indices)
    # ours: LocalNet.resnet("resnet32", 10, ends, 32) or LocalNet.vit("vit_tiny", 10, [3, 6, 9, 12], 32)
    method = attach(net, "dgl")                       # or "man", base="dgl", ema_decay=0.99 -- options as keywords
    opt = torch.optim.SGD([*net.parameters(), *method.parameters()], lr=0.1, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        stats = forward_backward(net, method, Batch(x, y))   # forward -> local loss -> backward, per module
        opt.step()
Aux nets are sized from one dry run of the units. Greedy, DGL and SGR accept any features (maps, tokens,
vectors); InfoPro, PredSim and AugLocal's DGL head need C x H x W maps; AugLocal deep-copies later units (or
rebuilds them with a `block` factory); MAN copies the next unit; MLAAN needs our ResNets (its leap tables). Our ViTs
(`--arch vit_tiny|vit_small|vit_base`) run bp, greedy, dgl, auglocal, man and sgr, under their own protocol (AdamW).

Sections, in reading order: 1 config -> 2 data -> 3 backbone & splits -> 4 auxiliary nets -> 5 methods -> 6 memory
meter -> 7 training (the step, the epoch) -> 8 evaluation -> 9 distributed and pipelined execution (skip it on one
device) -> 10 main (the one training loop, results, --report). Recorded results and a reading guide: README.md.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if dist.is_available():
    # Imported here, before any process group exists, on purpose: torch.distributed.nn.functional binds the
    # current `group.WORLD` as a default argument of its collectives when it is first imported, and
    # FlopCounterMode and torch.compile import it lazily (through torch._dynamo). Imported after
    # init_process_group, it holds the group past destroy_process_group, so the group's gloo threads live on
    # into interpreter shutdown, where one can abort the process ("terminate called without an active
    # exception", pytorch/pytorch#179291) after a run that ended well.
    import torch.distributed.nn.functional  # noqa: F401


def first_line(e, limit=200):
    """The first line of an exception's message (library errors can span many lines)."""
    return (str(e).splitlines() or [""])[0][:limit]


class UserError(Exception):
    """A mistake in the command line or the data: printed as one line `error: ...`, exit status 2."""

# =============================================================================================================
# 1. Config
# =============================================================================================================
# Every flag has help text. Defaults that depend on the dataset, the paper's protocol or the method chain (batch,
# lr, epochs, warm-up, the methods' own options) are None here and decided once, in `resolve_config`, before
# anything is built: the printed config shows the values actually used.

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + error
        raise UserError(message)


def build_parser():
    p = _Parser(description="Supervised local learning: a ResNet or ViT trained as K gradient-isolated modules, each "
                "with its own aux net and local loss (BP, Greedy SL, DGL, PredSim, InfoPro, AugLocal; add-ons MAN, "
                "MLAAN, SGR), on CIFAR-10/100, SVHN, STL-10, ImageNet or any image folder; one device, torchrun data "
                "parallelism or --pipeline module parallelism.")
    _what_to_train(p.add_argument)
    _how_to_train(p.add_argument)
    _where_to_write(p.add_argument)
    for name, o in all_options().items():   # method options (section 5), each declared by its method
        if o.help is None:                     # (internal: resolved from other options)
            continue
        shown = "" if o.default is None or callable(o.default) or "(default" in o.help or o.type is bool \
            else f" (default {o.default})"
        kw = dict(action="store_true") if o.type is bool else dict(type=o.type, choices=o.choices) if o.type else \
            dict(choices=o.choices)
        p.add_argument(f"--{name.replace('_', '-')}", default=None, help=o.help + shown, **kw)
    return p


def _what_to_train(a):
    a("--method", default="dgl", choices=sorted(METHODS), help="training method (see the header docstring)")
    a("--dataset", default="cifar10", choices=sorted(DATASETS),
      help="cifar10 | cifar100 | svhn | stl10 (torchvision files, downloaded into --data-dir) | imagenet "
           "(ImageFolder DATA_DIR/train, DATA_DIR/val) | folder (any ImageFolder tree with train/ and val/)")
    a("--data-dir", default="./data", help="where the dataset files are (or are downloaded to)")
    a("--no-download", action="store_true", help="never try to download; fail at once naming the missing files")
    a("--norm", default=None, choices=["cifar10", "imagenet", "half"],
      help="--dataset folder only: normalisation + augmentation recipe (cifar10: CIFAR mean/std, reflect-pad 4, "
           "flip; half: mean=std=0.5, zero-pad 4, flip (STL-10's); imagenet: ImageNet mean/std). "
           "Default: inferred from image size (<=32 px cifar10, <=96 px half, else imagenet)")
    a("--test-subset", type=int, default=0, help="evaluate on the first N test images only (0 = all; folder "
      "trees: N images drawn with a fixed seed)")
    a("--subset", type=int, default=0, help="train on the first N training images only (0 = all; for folder "
      "trees, which list images class by class, N images drawn with a fixed seed)")
    a("--no-augment", action="store_true", help="disable training augmentation (crop/flip)")
    a("--arch", default="resnet32", choices=sorted(ARCHS, key=lambda s: (ARCHS[s][0], arch_key(s))) + list(VITS),
      help="backbone: CIFAR ResNets resnet20/32/44/56/110, torchvision-style ImageNet ResNets, or the Vision "
           "Transformers vit_tiny/small/base (patch 4 at 32 px, 8 at 96 px, 16 at 224 px; their own protocol)")
    a("--base", default=None,
      help="what an add-on wraps: --method man --base infopro|dgl (default infopro), --method mlaan --base "
           "greedy|dgl|infopro (default greedy, the official train.py's model); --method sgr --base any method, "
           "add-ons as a chain, e.g. man+dgl (default infopro)")
    a("--K", type=int, default=None, help="number of gradient-isolated modules (default: 1 for bp, else 16; "
      "ViTs: 4)")
    a("--ends", default=None, metavar="E1,E2,...", help="the split as the unit index at which each module ends (unit "
      "0 = the stem or patch embedding; the last = the final unit), instead of --K's table or even split")
    a("--balanced-memory", action="store_true",
      help="InfoPro* split tables (ResNet-110 on cifar10/stl10, K=2,3,4): fewer blocks in early modules")
    a("--print-splits", action="store_true", help="print which blocks each module owns and the aux-net "
      "input shapes, then exit")
    a("--print-config", action="store_true", help="print the resolved config (one line, then one JSON line of every "
      "resolved value) and exit without reading data")
    a("--protocol", default=None, choices=sorted(PROTOCOLS),
      help="train under the protocol of this paper's official script (epochs, batch, lr, warm-up, AugLocal's "
           "pyramid; on ImageNet that paper's ImageNet protocol); default: the method's own paper's (InfoPro's for "
           "the baselines bp, greedy, dgl, predsim and for sgr)")


def _how_to_train(a):
    a("--epochs", type=int, default=None, help="training epochs (default: the protocol's -- 160 for InfoPro's and "
      "the baselines, 400 for MAN, MLAAN and AugLocal; imagenet: the method's paper, e.g. 90)")
    a("--batch-size", type=int, default=None, help="the global batch (split over torchrun ranks); default 1024 "
      "(CIFAR, SVHN), 128 (STL-10); imagenet: the method's paper (e.g. 256)")
    a("--lr", type=float, default=None, help="initial learning rate (default 0.8 at batch 1024, 0.1 at 128; "
      "imagenet: the method's paper)")
    a("--optimizer", default=None, choices=["sgd", "adamw"], help="one optimizer over backbone and aux nets: sgd "
      "(Nesterov momentum 0.9, the ResNet originals') or adamw (betas 0.9/0.999, eps 1e-8, the ViT original's); "
      "default: sgd on ResNets, adamw on ViTs")
    a("--wd", type=float, default=None, help="weight decay, applied to every parameter as in the originals (default "
      "1e-4 with sgd, 0.05 with adamw)")
    a("--warmup-epochs", type=int, default=None,
      help="linear warm-up epochs of the per-epoch cosine schedule (default 10, the CIFAR originals; 0 on ImageNet)")
    a("--seed", type=int, default=0, help="random seed (CPU runs are bit-for-bit deterministic)")
    a("--device", default=None, help="cuda | mps | cpu (default: the first available, in that order)")
    a("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision (CUDA only)")
    a("--workers", type=int, default=4, help="DataLoader workers for large-image datasets (imagenet, big folders)")
    a("--mem-iters", type=int, default=2,
      help="training iterations per epoch measured by the activation-memory meter (it costs time)")
    a("--log-secs", type=float, default=30.0, help="seconds between progress lines within an epoch")
    a("--pipeline", action="store_true",
      help="module parallelism under torchrun: rank s trains a contiguous group of modules and passes activations "
           "on (section 9); default with several processes: data parallelism")
    a("--stages", default=None, metavar="N1,N2,...",
      help="--pipeline: modules per stage (default: balanced by the measured time of each module and its aux net)")
    a("--sync-bn", action="store_true", help="data parallel on CUDA: SyncBatchNorm (batch statistics over all ranks)")
    a("--compile", nargs="?", const="default", default=None, choices=["default", "max-autotune", "reduce-overhead"],
      help="torch.compile each module's step (module + aux net + local loss); modes: default, max-autotune, "
           "reduce-overhead (CUDA graphs, CUDA only). Off by default: on the CPUs measured it is slower than eager")
    a("--bench", type=int, default=0,
      help="benchmark: N timed training iterations on synthetic data of the dataset's shape, one JSON line, exit")


def _where_to_write(a):
    a("--save", default=None, help="checkpoint path, written atomically after every epoch (and on SIGTERM, SIGINT "
      "or SIGUSR1, which stop the run after the current step)")
    a("--save-every", type=int, default=0, metavar="N",
      help="also save every N training steps (0: at epoch ends only); --resume continues from the exact step")
    a("--resume", default=None, help="checkpoint to resume from (same command line otherwise)")
    a("--out", default=None, help="append the final JSON line to this file (e.g. results.jsonl)")
    a("--report", default=None, metavar="RESULTS",
      help="render a results.jsonl (from --out / run_all.sh) as Markdown tables in the papers' layout, then exit")
    a("--plot", default=None, metavar="OUT.png",
      help="--report: also draw test error against activation memory and against FLOPs (one point per run) and the "
           "per-module aux accuracies into this PNG (needs matplotlib)")
    a("--report-run", type=int, default=None, metavar="LINE",
      help="--report: line number (1-based) of the run whose per-module accuracies are tabulated (default: "
           "the last run with the most per-module accuracies)")


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# The training protocol behind each paper's numbers on CIFAR-10/100, SVHN and STL-10, where it differs from InfoPro's
# (the dataset table of section 2: 160 epochs, batch 1024 / lr 0.8 -- STL-10 128 / 0.1 -- and 10 warm-up epochs).
# On ImageNet each paper's own ImageNet protocol applies (`imagenet_protocol`, section 5).
PROTOCOLS = {
    "infopro": {},                                # InfoPro-Pytorch's train.py and comand.sh
    "man": dict(epochs=400),                      # MAN's train.py hard-codes 400 epochs
    "mlaan": dict(epochs=400),                    # MLAAN's train.py (whose Greedy-head model is MLAAN's default base)
    "auglocal": dict(epochs=400, pyramid=0.5),    # every command of AugLocal's run.sh
}


# The official ViT protocol (MAN++'s imagenet_DDP_vit.py and imagenet_DDP_vit_bp.py): AdamW with weight decay 0.05
# on every parameter, lr 1e-3 for the global batch 1024 (128 x 8 GPUs), 90 epochs, per-epoch cosine from epoch 0, no
# warm-up. ViT runs use it whatever the method and the dataset (there is no other ViT protocol to reproduce).
VIT_PROTOCOL = dict(batch_size=1024, lr=1e-3, epochs=90, warmup_epochs=0, optimizer="adamw")


def protocol_defaults(args, spec, chain):
    """Fill batch, lr, epochs, warm-up, the optimizer and the protocol's method options (AugLocal's pyramid) that were
    not given: from the protocol of the paper the run reproduces (--protocol, else the method's own; on ViTs the
    ViT protocol), else the dataset's. The default lr follows the batch linearly from the protocol's (lr0 * B / B0).
    Returns {flag: where it came from}."""
    imagenet = spec.schedule == "imagenet"
    if args.arch in VITS:
        owner, proto, label = None, VIT_PROTOCOL, "the official ViT protocol (MAN++)"
    elif imagenet:   # (the outermost method of the chain that has an ImageNet protocol)
        owner = args.protocol or next((n for n in chain if METHODS[n].imagenet_protocol), None)
        proto = dict(METHODS[owner].imagenet_protocol or {}) if owner else {}
        label = f"{owner}'s ImageNet protocol"
    else:
        owner = args.protocol or METHODS[args.method].protocol
        proto = {k: v for k, v in PROTOCOLS[owner].items() if k != "pyramid" or "auglocal" in chain}
        label = f"{owner} protocol"
    base = {**dict(batch_size=spec.batch, lr=spec.lr, epochs=spec.epochs, warmup_epochs=0 if imagenet else 10,
                   optimizer="sgd"), **proto}
    where = lambda key: label if key in proto else "ImageNet defaults" if imagenet else \
        f"{spec.name} defaults of the InfoPro protocol"
    sources = {}
    for key in ("batch_size", "epochs", "warmup_epochs", "pyramid", "optimizer"):
        if getattr(args, key) is None and key in base:
            setattr(args, key, base[key])
            sources[key] = where(key)
    if args.wd is None:
        args.wd, sources["wd"] = (0.05, "adamw's, the ViT protocol") if args.optimizer == "adamw" else \
            (1e-4, "sgd's, the ResNet originals")
    if args.lr is None and isinstance(args.batch_size, int):
        args.lr = base["lr"] * args.batch_size / base["batch_size"]
        scaled = args.batch_size != base["batch_size"]
        sources["lr"] = where("lr") + (f": {base['lr']:g} at batch {base['batch_size']} x {args.batch_size}/"
                                       f"{base['batch_size']}" if scaled else "")
    return sources


def check_values(args):
    """Every numeric flag in its range, and finite (--lr nan would fail only after an epoch)."""
    least = dict(batch_size=2, epochs=1, bench=0, subset=0, test_subset=0, mem_iters=0, lr=0, wd=0, warmup_epochs=0,
                 workers=0, log_secs=0, save_every=0, K=1)
    for name, lo in least.items():   # (batch >= 2: train-mode BatchNorm needs two samples)
        value = getattr(args, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if value < lo:
            raise UserError(f"--{name.replace('_', '-')} must be >= {lo}, got {value}")
    if args.subset == 1:
        raise UserError("--subset needs at least 2 images")


def check_paths(args):
    """Before any work: --save and --out are files in existing, writable folders; --resume is a readable file;
    --data-dir, where it exists, is a folder. (A run that cannot record its result must not train.)"""
    for flag, path in (("--save", args.save), ("--out", args.out)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserError(f"{flag} {path}: folder {folder} does not exist")
        if os.path.isdir(path) or (os.path.exists(path) and not os.path.isfile(path)):
            raise UserError(f"{flag} {path}: not a regular file (give the path of a file to write)")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
            if os.path.exists(path) and not os.access(path, os.W_OK):
                raise PermissionError("the file is read-only")
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot write there ({type(e).__name__}: {first_line(e)})")
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file")
    if args.resume and not os.access(args.resume, os.R_OK):
        raise UserError(f"--resume {args.resume}: not readable")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir}: not a folder")


def check_schedule(args, spec):
    """Refuse a schedule whose every epoch is at lr 0; warn (returns the lines) about one that trains epochs other
    than the originals' last at lr 0, or never comes near the lr asked for, and say how to change it."""
    E, W = args.epochs, args.warmup_epochs
    lrs = [lr_at(e, args.lr, E, W, spec.schedule) for e in range(1, E + 1)]
    if args.bench or args.lr == 0:
        return []
    if not any(lrs):
        raise UserError(f"--epochs {E} --warmup-epochs {W}: every epoch trains at lr 0 (the cosine schedule ends at 0 "
                        f"in the last epoch); train more epochs")
    zero, out = [e for e, lr in enumerate(lrs[:-1], 1) if lr == 0], []
    if zero:
        out.append(f"warning: epochs {zero} train at lr 0; more --epochs or fewer --warmup-epochs avoid it")
    if max(lrs) < 0.5 * args.lr:
        out.append(f"warning: the schedule never exceeds lr {max(lrs):.3g} of the --lr {args.lr:g} asked for "
                   f"({E} epochs with a {W}-epoch warm-up); use --warmup-epochs {max(0, E // 4)} or more --epochs")
    return out


def resolve_config(args):
    """Decide every default that depends on the dataset, the paper's protocol or the method chain, and check every
    value and path, before anything is built. Fills `args` in place (with `sources`, where each default came from,
    and `warnings`); returns (args, the DataSpec, the method options)."""
    if args.dataset == "folder":
        spec, args.norm = folder_spec(args.data_dir, args.norm)
    else:
        if args.norm:
            raise UserError("--norm applies to --dataset folder only")
        spec = DATASETS[args.dataset]
    if args.arch in VITS:                                 # (the ViT protocol's cosine counts from epoch 0)
        if args.protocol or args.balanced_memory:
            raise UserError(f"--{'protocol' if args.protocol else 'balanced-memory'} applies to ResNets; ViTs train "
                            f"under the official ViT protocol")
        spec = replace(spec, schedule="imagenet")
    chain = method_chain(args.method, args.base, args.arch)   # unknown or incompatible names fail here, in one line
    args.base = "+".join(chain[1:]) or None
    args.ends = parse_ends(args.ends, args.K)
    default_K = 4 if args.arch in VITS and METHODS[args.method].default_K > 1 else METHODS[args.method].default_K
    args.K = len(args.ends) if args.ends else default_K if args.K is None else args.K
    args.sources = protocol_defaults(args, spec, chain)
    check_values(args)
    check_paths(args)
    if args.stages and not args.pipeline:
        raise UserError("--stages sets the cut of --pipeline; add --pipeline (under torchrun)")
    if args.bench and (args.save or args.resume):
        raise UserError("--bench trains on synthetic data and saves nothing: drop --save/--resume")
    if args.save_every and not args.save:
        raise UserError("--save-every N saves to --save PATH: add --save")
    args.warnings = check_schedule(args, spec)
    opts = method_options(chain, {name: getattr(args, name) for name in option_flags()}, dataset=spec.name,
                          arch=args.arch, K=args.K, balanced_memory=args.balanced_memory, amp=args.amp,
                          sync_bn=args.sync_bn)
    return args, replace(spec, augment=not args.no_augment), opts


def parse_ends(text, K):
    """--ends "3,6,9,12" -> [3, 6, 9, 12] (checked against --K if both are given; LocalNet checks the rest)."""
    if text is None:
        return None
    try:
        ends = [int(e) for e in text.split(",")]
    except ValueError:
        raise UserError(f"--ends {text}: unit indices separated by commas, e.g. 3,6,9,12")
    if K is not None and K != len(ends):
        raise UserError(f"--ends {text} makes {len(ends)} modules but --K is {K}: give one of the two")
    return ends


def pick_device(name):
    """--device, else the first of cuda > mps > cpu that this machine has."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device (use cuda, cuda:N, mps or cpu)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

# =============================================================================================================
# 2. Data
# =============================================================================================================
# The small datasets (CIFAR, SVHN, STL-10, small-image folders) are held as ONE uint8 tensor on the training
# device and augmented there, a whole batch at a time: a random crop is "pad the batch, then gather each image's
# window at its own random offset", a flip is a masked `torch.where`. No PIL, no worker processes, no host-device
# copies in the training loop. Large images (ImageNet) use a classic DataLoader.

@dataclass(frozen=True)
class DataSpec:
    name: str
    classes: int
    size: int                     # image side S (inputs are 3 x S x S)
    mean: tuple
    std: tuple
    pad: int                      # random-crop padding (0 = no crop)
    pad_mode: str                 # 'reflect' (CIFAR) or 'constant' (zero padding: SVHN, STL-10)
    flip: bool                    # random horizontal flip (never for SVHN: digits are not mirror-symmetric)
    batch: int                    # protocol defaults
    lr: float
    epochs: int = 160
    large: bool = False           # True: DataLoader + RandomResizedCrop path (ImageNet-sized images)
    schedule: str = "cifar"       # how the originals count epochs in the cosine schedule (lr_at)
    augment: bool = True          # False: --no-augment


CIFAR_MEAN, CIFAR_STD = (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Augmentation and normalisation exactly as the InfoPro/MAN code: CIFAR reflect-pad 4 + crop + flip, SVHN zero-pad
# 2 + crop (no flip), STL-10 zero-pad 4 + crop 96 + flip, mean/std as below. CIFAR-100 is not in the originals; it
# takes CIFAR-10's recipe with its own (widely used) channel statistics.
DATASETS = {
    "cifar10": DataSpec("cifar10", 10, 32, CIFAR_MEAN, CIFAR_STD, 4, "reflect", True, 1024, 0.8),
    "cifar100": DataSpec("cifar100", 100, 32, (129.3 / 255, 124.1 / 255, 112.4 / 255),
                         (68.2 / 255, 65.4 / 255, 70.4 / 255), 4, "reflect", True, 1024, 0.8),
    "svhn": DataSpec("svhn", 10, 32, HALF, HALF, 2, "constant", False, 1024, 0.8),
    "stl10": DataSpec("stl10", 10, 96, HALF, HALF, 4, "constant", True, 128, 0.1),
    "imagenet": DataSpec("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, 0, "constant", True, 256, 0.1,
                         epochs=90, large=True, schedule="imagenet"),
    "folder": None,  # built from the folder itself by `folder_spec`
}
NORMS = {  # --norm recipes for --dataset folder
    "cifar10": dict(mean=CIFAR_MEAN, std=CIFAR_STD, pad_mode="reflect"),
    "half": dict(mean=HALF, std=HALF, pad_mode="constant"),
    "imagenet": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, pad_mode="reflect"),
}

# On-disk files each torchvision dataset class leaves in --data-dir (what we read, and what we name when absent).
TV_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test"]),
    "svhn": ("", ["train_32x32.mat", "test_32x32.mat"]),
    "stl10": ("stl10_binary", ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]),
}


@contextlib.contextmanager
def reading(path, what):
    """Turn any failure to parse a dataset file into one line that names the file and the remedy."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        reason = first_line(e)
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: {reason}); the file is corrupt or "
                        f"truncated -- delete it and run again to download it anew (torchvision checks the "
                        f"archive's md5), or replace it")


def _same_length(x, y):
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return x, y


def _read_cifar(folder, files, label_key):
    xs, ys = [], []
    for f in files:
        path = os.path.join(folder, f)
        with reading(path, "CIFAR batch"), open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
            x, y = _same_length(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
                                np.asarray(d[label_key], dtype=np.int64))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _read_svhn(path):
    from scipy.io import loadmat  # SVHN ships MATLAB files; scipy is needed for this dataset only
    with reading(path, "SVHN .mat file"):
        m = loadmat(path)
        x = np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1))   # stored H x W x C x N
        y = m["y"].astype(np.int64).reshape(-1) % 10              # digit 0 is stored as label 10
        return _same_length(x, y)


def _read_stl10(folder, split):
    xp, yp = (os.path.join(folder, f"{split}_{n}.bin") for n in "Xy")
    with reading(xp, "STL-10 image file"):
        x = np.fromfile(xp, dtype=np.uint8).reshape(-1, 3, 96, 96)
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2))         # stored column-major per channel
    with reading(yp, "STL-10 label file"):
        y = np.fromfile(yp, dtype=np.uint8).astype(np.int64) - 1  # 1..10 -> 0..9
        return _same_length(x, y)


def _download(name, root):
    """Fetch with the torchvision dataset classes (they verify the archive's md5). Both SVHN splits and both
    labelled STL-10 splits are fetched (the originals downloaded only SVHN's train split and crash without its
    test split). A stalled connection gives up after 60 s (the default timeout is restored after)."""
    import torchvision.datasets as tvd
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        if name in ("cifar10", "cifar100"):
            (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(root, train=True, download=True)
        elif name == "svhn":
            for split in ("train", "test"):
                tvd.SVHN(root, split=split, download=True)
        elif name == "stl10":
            tvd.STL10(root, split="train", download=True)
    finally:
        socket.setdefaulttimeout(timeout)


def load_torchvision(name, root, allow_download):
    """Read CIFAR-10/100, SVHN or STL-10 from torchvision's on-disk format as uint8 NCHW arrays.

    We read the files ourselves (a few lines each) instead of through the dataset classes: it is faster than
    building PIL images, and it loads any copy in the same format (md5 is checked on download, not on load)."""
    sub, files = TV_FILES[name]
    folder = os.path.join(root, sub) if sub else root
    missing = lambda: [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing() and allow_download:
        try:
            _download(name, root)
        except Exception as e:  # offline, proxy, disk full...: one line, no traceback
            raise UserError(f"{name}: missing {', '.join(missing())} in {folder} and the download failed "
                            f"({type(e).__name__}: {first_line(e)}); put torchvision's {name} files there (or point "
                            f"--data-dir at them)")
    if missing():
        raise UserError(f"{name}: missing {', '.join(missing())} in {folder}; put torchvision's {name} files there "
                        f"(or run without --no-download to fetch them)")
    if name == "cifar10":
        return _read_cifar(folder, files[:5], "labels"), _read_cifar(folder, ["test_batch"], "labels")
    if name == "cifar100":
        return _read_cifar(folder, ["train"], "fine_labels"), _read_cifar(folder, ["test"], "fine_labels")
    if name == "svhn":
        return _read_svhn(os.path.join(folder, files[0])), _read_svhn(os.path.join(folder, files[1]))
    return _read_stl10(folder, "train"), _read_stl10(folder, "test")


def load_image(path, convert=None):
    """One RGB image from disk (PIL); an unreadable file ends the run with one line naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:
        raise UserError(f"{path}: unreadable image ({type(e).__name__}: {first_line(e)}); "
                        f"delete or replace it")
    return convert(im) if convert else im


def _image_folders(root):
    dirs = [os.path.join(root, "train"), os.path.join(root, "val")]
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(f"missing folder {d}: expected an ImageFolder tree {root}/train/<class>/*.png|jpg and "
                            f"{root}/val/<class>/*; put the images there or point --data-dir at them")
    import torchvision.datasets as tvd
    # Image files only, and regular ones: a FIFO or a device named *.png would block the loader for ever.
    image = lambda p: p.lower().endswith(tvd.folder.IMG_EXTENSIONS) and os.path.isfile(p)
    try:
        train = tvd.ImageFolder(dirs[0], loader=load_image, is_valid_file=image)
        val = tvd.ImageFolder(dirs[1], loader=load_image, is_valid_file=image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{root}: {first_line(e)}")
    # Val labels follow the train folder's class order, whatever classes val happens to contain.
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise UserError(f"{dirs[1]} has classes not in {dirs[0]}: {', '.join(unknown[:5])}")
    val.samples = [(p, train.class_to_idx[val.classes[t]]) for p, t in val.samples]
    return train, val


def folder_spec(root, norm):
    """DataSpec for --dataset folder: classes from train/, size from the first image, recipe from --norm (default
    by image size); returns (spec, the norm used). Images over 96 px take the ImageNet path and protocol."""
    train, _ = _image_folders(root)
    if not train.samples:
        raise UserError(f"{root}/train has no images")
    if len(train.classes) < 2:
        raise UserError(f"{root}/train has one class ({train.classes[0]}): a classifier needs at least two")
    size = max(load_image(train.samples[0][0]).size)
    norm = norm or ("cifar10" if size <= 32 else "half" if size <= 96 else "imagenet")
    large = size > 96
    return DataSpec("folder", len(train.classes), 224 if large else size, NORMS[norm]["mean"], NORMS[norm]["std"],
                    pad=0 if large else 4, pad_mode=NORMS[norm]["pad_mode"], flip=True, batch=256 if large else 1024,
                    lr=0.1 if large else 0.8, epochs=90 if large else 160, large=large,
                    schedule="imagenet" if large else "cifar"), norm


def load_folder_uint8(ds, size):
    """Decode a small-image ImageFolder once into uint8 arrays (this is the only PIL in the program's fast path)."""
    x = np.empty((len(ds.samples), 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(ds.samples):
        a = load_image(path, np.asarray)
        if a.shape[:2] != (size, size):
            raise UserError(f"{path} is {a.shape[1]}x{a.shape[0]}; the small-image path needs every image to be "
                            f"{size}x{size} (like the first one)")
        x[i] = a.transpose(2, 0, 1)
    return x, np.asarray([t for _, t in ds.samples], dtype=np.int64)


def augment(x, spec, gen):
    """Batched on-device augmentation of float images in [0,1]: random crop via padding + per-image offsets, then
    random horizontal flip. Same distribution as torchvision's RandomCrop(S, padding=p) + RandomHorizontalFlip."""
    B, C, H, W = x.shape
    dev = x.device
    if spec.pad:
        p = spec.pad
        xp = F.pad(x, (p, p, p, p), mode=spec.pad_mode)
        dy = torch.randint(0, 2 * p + 1, (B,), device=dev, generator=gen)
        dx = torch.randint(0, 2 * p + 1, (B,), device=dev, generator=gen)
        rows = (dy[:, None] + torch.arange(H, device=dev))[:, None, :, None]       # B x 1 x H x 1
        cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, None, :]       # B x 1 x 1 x W
        x = xp[torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
               rows, cols]
    if spec.flip:
        m = torch.rand(B, device=dev, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def norm_tensors(spec, device):
    """The dataset's per-channel mean and std as 1 x 3 x 1 x 1 tensors on `device`."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (spec.mean, spec.std))


class DeviceLoader:
    """Batches from a uint8 image tensor living on the training device. A training loader (`gen` given: a
    torch.Generator on that device, saved in checkpoints so a resumed run sees the same batches) shuffles with a
    device randperm and augments; without `gen` the images come in order, as they are. An epoch is `new_order()`
    then `epoch(order)`; a run resumed in the middle of an epoch continues with `epoch(order, start)`."""
    least = 2   # train-mode BatchNorm cannot normalise a batch of one: a smaller last batch is dropped

    def __init__(self, images, labels, spec, batch_size, gen=None, channels_last=False):
        self.images, self.labels, self.spec, self.batch_size = images, labels, spec, batch_size
        self.gen, self.channels_last = gen, channels_last
        self.mean, self.std = norm_tensors(spec, images.device)

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        return self.epoch(self.new_order())

    def new_order(self):
        n, dev = len(self.labels), self.images.device
        if self.gen is None:
            return torch.arange(n, device=dev)
        return torch.randperm(n, device=dev, generator=self.gen)

    def epoch(self, order, start=0):
        """The epoch's batches of the images in `order`, from batch `start` on."""
        order, train = order.to(self.images.device), self.gen is not None
        for i in range(start * self.batch_size, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            if train and len(idx) < self.least:
                break
            x = self.images[idx].to(torch.get_default_dtype()).div_(255)   # (float32 unless a test asks float64)
            if train and self.spec.augment:
                x = augment(x, self.spec, self.gen)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


class GlobalBatches(torch.utils.data.Sampler):
    """The index lists of an epoch's batches in `order`, from batch `start` on (the last partial one dropped for
    training, as the originals' DataLoader(shuffle=True, drop_last=True); all kept in evaluation order)."""

    def __init__(self, n, batch_size, drop_last):
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.order, self.start = torch.arange(n), 0

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self):
        for i in range(self.start, len(self)):
            yield self.order[i * self.batch_size:(i + 1) * self.batch_size].tolist()


class HostLoader:
    """ImageNet-sized images: a torchvision DataLoader (workers decode JPEGs), moved to the device per batch. A
    training loader (`gen` given, a CPU generator) shuffles and augments: RandomResizedCrop 224 + flip; else
    Resize 256 + CenterCrop 224. `batches` yields each batch's indices (data parallelism shards them, section 9).
    (A resumed epoch continues with the same images; the workers' random crops are drawn anew.)"""

    def __init__(self, ds, spec, batch_size, workers, gen, device, channels_last=False):
        import torchvision.transforms as T
        norm = T.Normalize(spec.mean, spec.std)
        if gen is not None and spec.augment:
            ds.transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        else:
            ds.transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
        self.ds, self.spec, self.labels, self.batch_size, self.workers, self.gen = ds, spec, ds.targets, batch_size, \
            workers, gen
        self.device, self.channels_last = device, channels_last
        self.batches, self.dl = GlobalBatches(len(ds), batch_size, drop_last=gen is not None), None

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return self.epoch(self.new_order())

    def new_order(self):
        n = len(self.labels)
        return torch.randperm(n, generator=self.gen) if self.gen is not None else torch.arange(n)

    def epoch(self, order, start=0):
        base = getattr(self.batches, "batches", self.batches)    # (under section 9's sharding)
        base.order, base.start = order.cpu(), start
        if self.dl is None:   # built at the first epoch, after section 9 may have sharded the batches
            self.dl = torch.utils.data.DataLoader(self.ds, batch_sampler=self.batches, num_workers=self.workers,
                                                  pin_memory=self.device.type == "cuda",
                                                  persistent_workers=self.workers > 0)
        try:
            for x, y in self.dl:
                x = x.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        except UserError as e:   # raised in a worker process: the DataLoader wraps it in the worker's traceback
            raise UserError(str(e).rstrip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


def load_data(args, spec, device, gen, channels_last=False):
    """(train_loader, test_loader) of the resolved config; `channels_last`: batches in that memory format."""
    if spec.large:
        train, val = _image_folders(args.data_dir)
        for ds, n in ((train, args.subset), (val, args.test_subset)):
            if n:   # ImageFolder lists images class by class: a fixed shuffle first, so every class appears
                ds.samples = [ds.samples[i] for i in np.random.default_rng(0).permutation(len(ds.samples))[:n]]
                ds.targets = [t for _, t in ds.samples]
        host_gen = torch.Generator()
        host_gen.manual_seed(args.seed)
        return (HostLoader(train, spec, args.batch_size, args.workers, host_gen, device, channels_last),
                HostLoader(val, spec, args.batch_size, args.workers, None, device, channels_last))
    if spec.name == "folder":
        tr_ds, te_ds = _image_folders(args.data_dir)
        train, test = load_folder_uint8(tr_ds, spec.size), load_folder_uint8(te_ds, spec.size)
    else:
        train, test = load_torchvision(spec.name, args.data_dir, not args.no_download)
    (xtr, ytr), (xte, yte) = train, test
    for y, split in ((ytr, "training"), (yte, "test")):
        if len(y) and (y.min() < 0 or y.max() >= spec.classes):
            bad = sorted({int(v) for v in y if not 0 <= v < spec.classes})[:5]
            raise UserError(f"{spec.name} in {args.data_dir}: {split} labels {bad} outside 0..{spec.classes - 1}; the "
                            f"files are corrupt or of another dataset")
    pick = lambda n, k: np.random.default_rng(0).permutation(n)[:k] if spec.name == "folder" else np.arange(min(n, k))
    if args.test_subset:   # (ImageFolder lists images class by class: folders take a fixed shuffle first)
        keep = pick(len(yte), args.test_subset)
        xte, yte = xte[keep], yte[keep]
    if args.subset:
        keep = pick(len(ytr), args.subset)
        xtr, ytr = xtr[keep], ytr[keep]
    t = lambda a: torch.from_numpy(a).to(device)
    return (DeviceLoader(t(xtr), t(ytr), spec, args.batch_size, gen, channels_last),
            DeviceLoader(t(xte), t(yte), spec, args.batch_size, None, channels_last))


def synthetic_loader(spec, batch_size, n_batches, device, gen, channels_last=False):
    """--bench: random uint8 images of the dataset's shape, augmented exactly like real ones."""
    n = batch_size * n_batches
    g = torch.Generator(device=device)
    g.manual_seed(0)
    x = torch.randint(0, 256, (n, 3, spec.size, spec.size), dtype=torch.uint8, device=device, generator=g)
    y = torch.randint(0, spec.classes, (n,), device=device, generator=g)
    return DeviceLoader(x, y, replace(spec, large=False, pad=spec.pad or 4, augment=True), batch_size, gen,
                        channels_last)

# =============================================================================================================
# 3. Backbone and splits
# =============================================================================================================
# A backbone is a flat list of "units": unit 0 is the stem, units 1.. are the residual blocks in order. A split
# into K modules is the list of units where each module ends; the last module also owns the head (GAP -> FC).
# Keeping the backbone flat means state_dict keys and parameter counts do not depend on K.

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """He et al. 2016 post-activation block: conv-BN-ReLU-conv-BN, + shortcut, ReLU. The shortcut is a 1x1
    projection + BN ("option B") whenever stride or width changes -- as InfoPro/MAN (not DGL's zero-pad option A)."""
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """torchvision's ResNet-50/101/152 block (stride on the 3x3 conv), for ImageNet."""
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


# name -> (family, block, blocks per stage). CIFAR depth = 6n + 2 (stem conv + 2 convs x 3n blocks + FC).
ARCHS = {f"resnet{6 * n + 2}": ("cifar", BasicBlock, [n, n, n]) for n in (3, 5, 7, 9, 18)}
ARCHS.update(resnet18=("imagenet", BasicBlock, [2, 2, 2, 2]), resnet34=("imagenet", BasicBlock, [3, 4, 6, 3]),
             resnet50=("imagenet", Bottleneck, [3, 4, 6, 3]), resnet101=("imagenet", Bottleneck, [3, 4, 23, 3]),
             resnet152=("imagenet", Bottleneck, [3, 8, 36, 3]))


# Vision Transformers, as MAN++'s ViT code builds them (JunhaoSu0/MAN_PlusPlus Exp_on_ImageNet/networks/vit_man.py):
# name -> (width D, heads); all have 12 blocks and MLP ratio 4.
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}
VIT_DEPTH = 12


def family(arch):
    """'cifar' or 'imagenet' for our ResNets, 'vit' for our ViTs, None for any other backbone."""
    return ARCHS[arch][0] if arch in ARCHS else "vit" if arch in VITS else None


# Published split tables, boundaries [stage, block] after which a module ends (K-1 of them; [0, 0] = the stem
# alone): InfoPro's tables for ResNet-32 and ResNet-110 (its comand.sh splits), MAN's K=32. ResNet-32 K=16 makes
# the stem its own module, as the InfoPro code does.
_ALL = lambda n: [[s, b] for s in (1, 2, 3) for b in range(n)]
SPLITS = {
    "resnet32": {
        1: [], 2: [[2, 1]], 3: [[1, 4], [2, 4]], 4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0]] + _ALL(5)[:-1],
    },
    "resnet110": {
        1: [], 2: [[2, 8]], 3: [[1, 17], [2, 17]], 4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4], [2, 7], [2, 11], [2, 15], [3, 1],
             [3, 5], [3, 9], [3, 13]],
        # K=32 is the MAN table (its final entry, the last block, is implicit here).
        32: [[1, 1], [1, 2], [1, 4], [1, 5], [1, 7], [1, 9], [1, 11], [1, 13], [1, 14], [1, 16], [1, 17],
             [2, 1], [2, 2], [2, 4], [2, 5], [2, 7], [2, 9], [2, 11], [2, 13], [2, 14], [2, 16], [2, 17],
             [3, 1], [3, 3], [3, 4], [3, 6], [3, 7], [3, 9], [3, 11], [3, 13], [3, 15]],
        # K=55: the stem alone, then one block per module (InfoPro's ResNet-32 K=16 convention; MAN instead merges
        # the stem into module 1 and builds 54 modules -- its add-on reproduces that).
        55: [[0, 0]] + _ALL(18)[:-1],
    },
    # ImageNet. K=2: InfoPro* and MAN: module 1 = stem + layer1 + layer2[0..k]. K=4: MAN++'s lists
    # (JunhaoSu0/MAN_PlusPlus Exp_on_ImageNet/networks/configs.py; MAN's own final code has K=2 only).
    "resnet101": {2: [[2, 0]], 4: [[2, 2], [3, 8], [3, 16]]},
    "resnet152": {2: [[2, 5]], 4: [[2, 6], [3, 13], [3, 25]]},
}
# InfoPro* "balanced memory" tables: only ResNet-110, only CIFAR-10 and STL-10.
BALANCED = {
    "cifar10": {2: [[1, 14]], 3: [[1, 9], [2, 2]], 4: [[1, 6], [1, 14], [2, 8]]},
    "stl10": {2: [[1, 14]], 3: [[1, 8], [2, 1]], 4: [[1, 6], [1, 14], [2, 8]]},
}


def even_split(n_units, K):
    """Unit index at which each of K modules ends when n_units are dealt out evenly (remainder to the last)."""
    if not 1 <= K <= n_units:
        raise UserError(f"K = {K} is impossible for a network of {n_units} units: 1 <= K <= {n_units}")
    sizes = [n_units // K + (1 if i >= K - n_units % K else 0) for i in range(K)]
    return [int(e) - 1 for e in np.cumsum(sizes)]


def split_ends(arch, K, balanced=False, dataset=""):
    """Unit index (0 = stem) at which each of the K modules of one of our ResNets ends, last = final block.

    Published tables are used verbatim where they exist. Elsewhere the split is even by block count: the stem
    joins module 1 and the B blocks are dealt out as evenly as possible, the remainder going to the *last*
    modules (their feature maps are smaller, as in the published tables); K = B + 1 puts the stem alone."""
    if arch in VITS:
        return vit_ends(arch, K)
    blocks = ARCHS[arch][2]
    B = sum(blocks)
    if K < 1 or K > B + 1:
        raise UserError(f"--K {K} is impossible for {arch}: it has {B} residual blocks + the stem, "
                        f"so 1 <= K <= {B + 1}")
    if balanced:
        table = BALANCED.get(dataset, {}) if arch == "resnet110" else {}
        if K not in table:
            raise UserError(f"--balanced-memory (InfoPro*) tables exist only for resnet110 on cifar10/stl10 with "
                            f"K in 2,3,4; got {arch}, {dataset}, K={K}")
        bounds = table[K]
    elif K in SPLITS.get(arch, {}):
        bounds = SPLITS[arch][K]
    elif K == B + 1:
        return list(range(B + 1))
    else:
        return [e + 1 for e in even_split(B, K)]   # (block j is unit j: the stem is unit 0)
    return [0 if s == 0 else 1 + sum(blocks[:s - 1]) + b for s, b in bounds] + [B]


def arch_key(arch):
    """Order of our backbones in tables: the ResNets by depth, then the ViTs by width."""
    return (1, list(VITS).index(arch)) if arch in VITS else (0, int(arch[6:]))


def vit_ends(arch, K):
    """A ViT's K modules: K groups of 12/K blocks, the patch embedding with the first (the official code: K = 4)."""
    if K < 1 or VIT_DEPTH % K:
        raise UserError(f"--K {K}: {arch}'s {VIT_DEPTH} blocks split evenly into K = 1, 2, 3, 4, 6 or 12 groups "
                        f"(the official ViT code: 4); give any other split as unit ends with --ends")
    return [e + 1 for e in even_split(VIT_DEPTH, K)]   # (block B_j is unit j + 1: the embedding is unit 0)


def unit_position(arch, i):
    """Unit index -> (stage, block): 0 -> (0, 0) the stem; 1 -> (1, 0) the first block of stage 1; ..."""
    if i == 0:
        return 0, 0
    blocks, s = ARCHS[arch][2], 0
    while i > blocks[s]:
        i -= blocks[s]
        s += 1
    return s + 1, i - 1


def init_weights(module):
    """He fan-out init for every conv (backbone, aux nets and decoders alike), BN = (1, 0); Linear layers keep
    PyTorch's default -- exactly the originals' init loop."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def pool_features(h):
    """B x C x H x W -> B x C (global average pooling); B x N x D tokens -> B x D (token mean); B x D as it is."""
    if h.dim() == 4:
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    return h.mean(1) if h.dim() == 3 else h


class Head(nn.Module):
    """Pooling -> Linear(C -> classes): the head of our ResNets (GAP -> FC), and Greedy SL's aux net (InfoPro's
    `0c1f` config with cross-entropy), on maps, tokens or vectors alike (pool_features)."""

    def __init__(self, c, num_classes):
        super().__init__()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h):
        return self.fc(pool_features(h))


def resnet(arch, num_classes):
    """(units, head) of one of our ResNets: unit 0 the stem, then the residual blocks in order."""
    kind, block, blocks = ARCHS[arch]
    if kind == "cifar":
        stem_w, widths, strides = 16, [16, 32, 64], [1, 2, 2]
        stem = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    else:
        stem_w, widths, strides = 64, [64, 128, 256, 512], [1, 2, 2, 2]
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, 2, 1))
    units, cin = [stem], stem_w
    for w, s, n in zip(widths, strides, blocks):
        for b in range(n):
            units.append(block(cin, w, s if b == 0 else 1))
            cin = w * block.expansion
    return units, Head(cin, num_classes)


def vit_patch(size):
    """Patch side for S x S images: 4 at 32 px (CIFAR, SVHN), 8 at 96 px (STL-10), 16 at 224 px (ImageNet): 8 x 8,
    12 x 12 and 14 x 14 patches."""
    patch = 4 if size <= 32 else 8 if size <= 96 else 16
    if size % patch:
        raise UserError(f"a ViT on {size} px images: the side must be a multiple of its patch ({patch} px)")
    return patch


class PatchEmbed(nn.Module):
    """Unit 0 of our ViTs: p x p patches projected to D (a p x p conv of stride p), LayerNorm-ed (the official
    PatchEmbed's norm layer), a learned CLS token in front, learned position embeddings added:
    B x 3 x S x S -> B x (1 + (S/p)^2) x D tokens."""

    def __init__(self, dim, size, patch):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, dim, patch, patch), nn.LayerNorm(dim, eps=1e-6)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, dim))

    def forward(self, x):
        x = self.norm(self.proj(x).flatten(2).transpose(1, 2))
        return torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); LayerNorm eps 1e-6, qkv with bias, MLP
    D -> 4D -> D with GELU; no dropout or drop-path (0 in the official runs). Attention softmax(q k^T / sqrt(d)) v
    is PyTorch's scaled_dot_product_attention (fused kernels; the official code writes it out, same values)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.proj = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.n2(x))


class TokenHead(nn.Module):
    """LayerNorm -> Linear on the CLS token (token 0): the head of our ViTs, and Greedy SL's aux net on them."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, h):
        return self.fc(self.norm(h[:, 0]))


def init_vit(module):
    """The official ViT init, for backbone and aux nets alike: Linear weights trunc-normal(0.02) with zero biases,
    the CLS token and position embeddings trunc-normal(0.02); the patch conv and the norms keep PyTorch's."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.trunc_normal_(m.cls, std=0.02)
            nn.init.trunc_normal_(m.pos, std=0.02)


def vit(arch, num_classes, image_size):
    """(units, head) of one of our ViTs: unit 0 the patch embedding, then the 12 blocks; the head on CLS."""
    dim, heads = VITS[arch]
    return [PatchEmbed(dim, image_size, vit_patch(image_size))] + [ViTBlock(dim, heads) for _ in range(VIT_DEPTH)], \
        TokenHead(dim, num_classes)


def our_init(arch):
    """The init of our backbones and their aux nets: ResNets He (init_weights), ViTs trunc-normal (init_vit)."""
    return init_vit if arch in VITS else init_weights


class LocalNet(nn.Module):
    """Any network as a flat list of units plus a head, split into K gradient-isolated modules.

    `units` run in order (unit 0 reads the input), `head` maps the last unit's output to logits, `ends` lists the
    unit index at which each module ends (or is an int K: an even split). One dry run on `example_input` (a batch
    of inputs of the right shape; its values do not matter) records every unit's output shape: aux nets are
    sized from it. `arch` names one of our ResNets (unit names, MLAAN's leap tables, AugLocal's block factory);
    None for any other backbone. `block` (optional) is a residual-block factory block(cin, planes, stride) with
    an `expansion` attribute, e.g. BasicBlock for a torchvision ResNet-18: AugLocal then rebuilds the later
    units it imitates at the widths it needs instead of deep-copying them. `run(h, k)` runs module k only."""

    def __init__(self, units, head, ends, example_input, arch=None, block=None):
        super().__init__()
        self.arch, self.units, self.head = arch, nn.ModuleList(units), head
        self.block = ARCHS[arch][1] if arch in ARCHS else block   # AugLocal builds its aux nets from this factory
        self.input_shape = tuple(example_input.shape[1:])
        x = example_input
        if family(arch):
            our_init(arch)(self)
        with torch.no_grad():   # output shape (without the batch dimension) of every unit
            was = self.training
            self.eval()
            self.unit_shapes = []
            for u in self.units:
                x = u(x)
                self.unit_shapes.append(tuple(x.shape[1:]))
            self.num_classes = self.head(x).shape[-1]
            self.train(was)
        self.set_split(even_split(len(self.units), ends) if isinstance(ends, int) else ends)

    @classmethod
    def resnet(cls, arch, num_classes, ends, image_size):
        """One of our ResNets (ARCHS) on image_size x image_size inputs."""
        units, head = resnet(arch, num_classes)
        return cls(units, head, ends, torch.zeros(1, 3, image_size, image_size), arch)

    @classmethod
    def vit(cls, arch, num_classes, ends, image_size):
        """One of our ViTs (VITS) on image_size x image_size inputs."""
        units, head = vit(arch, num_classes, image_size)
        return cls(units, head, ends, torch.zeros(1, 3, image_size, image_size), arch)

    def set_split(self, ends):
        ends = [int(e) for e in ends]
        if not ends or ends[-1] != len(self.units) - 1 or any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 0:
            raise UserError(f"split {ends}: module ends must be increasing unit indices ending at the last unit "
                            f"({len(self.units) - 1})")
        self.ends = ends
        self.bounds = [(0 if k == 0 else ends[k - 1] + 1, e + 1) for k, e in enumerate(ends)]
        self.K = len(ends)

    @property
    def boundary_shapes(self):
        """Output shape of each local module k < K-1 (what its aux net reads)."""
        return [self.unit_shapes[e] for e in self.ends[:-1]]

    def stage(self, i):
        """Stage of unit i: 0 for the stem (unit 0), then 1 + the number of changes of output shape among units
        1..i -- for our ResNets exactly the stage of the block (unit_position)."""
        if i == 0:
            return 0
        return 1 + sum(self.unit_shapes[j] != self.unit_shapes[j - 1] for j in range(2, i + 1))

    def unit_name(self, i):
        """stem, L<stage>.<block> for our ResNets; embed, B<block> for our ViTs; u<i> for any other backbone."""
        if self.arch in VITS:
            return f"B{i - 1}" if i else "embed"
        if self.arch not in ARCHS:
            return f"u{i}"
        s, b = unit_position(self.arch, i)
        return "stem" if s == 0 else f"L{s}.{b}"

    def run(self, h, k):
        """Module k's forward: its units in order."""
        a, b = self.bounds[k]
        for u in self.units[a:b]:
            h = u(h)
        return h

    def forward(self, x):
        for k in range(self.K):
            x = self.run(x, k)
        return self.head(x)

# =============================================================================================================
# 4. Auxiliary networks
# =============================================================================================================
# Each class below is one method's aux net, sized from the shape of the features it reads. Parameter counts are
# the official constructors' (tests pin them).

def fp32(t):
    """Losses are computed in at least float32: half-precision tensors (autocast) are upcast, others kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class DGLAux(nn.Module):
    """DGL's auxiliary net, in two variants:

    dgl       the DGL authors' "MLP-SR" net (eugenium/DGL, auxillary_classifier2 with n_lin=3, mlp_layers=3):
              avg-pool to ceil(s/4) x ceil(s/4) -> 3 x [1x1 conv C->C (no bias) -> BN -> ReLU] -> avg-pool to 2x2
              -> flatten (4C) -> 3 x [Linear 4C->4C -> BN1d -> ReLU] -> Linear 4C -> classes.
              C=16@32px 14,378; C=32@16px 54,858; C=64@8px 214,154 params. The official module reports 2C more
              (14,410 / 54,922 / 214,282): it also registers a BatchNorm2d(C) that its MLP variant never calls;
              we leave that dead layer out (it receives no gradient and changes nothing).
    auglocal  the AugLocal repository's re-implementation (networks/auxiliary_nets.py, net_config 'DGL'), behind
              the DGL rows of the AugLocal, MAN and MLAAN papers: TWO hidden Linear layers, without bias, and the
              second pooling to min(ceil(s/4), 2). 9,962 / 37,834 / 147,338 params (10 classes).
    On token (N x D) or vector features the net is its MLP part on the token mean (the 1x1-conv stage and the
    2x2 pooling need a spatial map)."""

    def __init__(self, shape, num_classes, variant="dgl"):
        super().__init__()
        spatial = len(shape) == 3
        c = shape[0] if spatial else shape[-1]
        hidden, bias = (2, False) if variant == "auglocal" else (3, True)
        if spatial:
            self.pool = math.ceil(shape[1] / 4)
            self.pool2 = min(self.pool, 2) if variant == "auglocal" else 2
            self.convs = nn.Sequential(*[m for _ in range(3) for m in
                                         (nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))])
        f = c * self.pool2 ** 2 if spatial else c
        self.mlp = nn.Sequential(*[m for _ in range(hidden) for m in
                                   (nn.Linear(f, f, bias=bias), nn.BatchNorm1d(f), nn.ReLU(inplace=True))],
                                 nn.Linear(f, num_classes))

    def forward(self, h):
        if h.dim() != 4:
            return self.mlp(pool_features(h))
        h = self.convs(F.adaptive_avg_pool2d(h, self.pool))
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(h, self.pool2), 1))


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder, the estimator of I(h; x) (Wang et al., ICLR 2021):

        bilinear resize of h to the full S x S input (align_corners=True) -> conv3x3 C -> 12w (bias) -> BN -> ReLU
        -> conv3x3 12w -> 3 (bias) -> sigmoid,   loss = BCE(decoded, x in [0,1])

    It returns the pre-sigmoid map; `binary_cross_entropy_with_logits` on it is the same loss as sigmoid + BCE,
    computed stably and allowed under autocast (plain BCE is not). Parameters (w = 1): C=16 2,091; C=32 3,819;
    C=64 7,275."""

    def __init__(self, c, size, widen=1.0):
        super().__init__()
        hid = int(12 * widen)
        self.size = tuple(size)                       # (H, W) of the input image
        self.net = nn.Sequential(nn.Conv2d(c, hid, 3, 1, 1), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
                                 nn.Conv2d(hid, 3, 3, 1, 1))

    def forward(self, h):
        if tuple(h.shape[-2:]) != self.size:          # (resizing to the same size is the identity: skipped)
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return self.net(h)


class AuxClassifier(nn.Module):
    """InfoPro's auxiliary head, the estimator of I(h; y); `config` = "<convs>c<linears>f":

        convs: first conv3x3 C -> C1 (C=16: 32w, stride 2; C=32: 64w, stride 2; C=64: 64w, stride 1; in general
               C < 64 doubles the width at stride 2), BN, ReLU; a second conv (2c) is C1 -> C1, stride 1
        then GAP -> linears: 1f Linear(-> O); 2f Linear(-> Dw), ReLU, Linear(-> O); 3f adds Linear(Dw -> Dw), ReLU
        O = D (contrast: a D-dim embedding for SupCon) or the number of classes (cross_entropy)."""
    CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")

    def __init__(self, c, config, loss_mode, num_classes, widen=1.0, feature_dim=128):
        super().__init__()
        n_conv, n_fc = int(config[0]), int(config[2])
        c1, stride = (int(2 * c * widen), 2) if c < 64 else (int(c * widen), 1)
        layers, cin = [], c
        for i in range(n_conv):
            layers += [nn.Conv2d(cin, c1, 3, stride if i == 0 else 1, 1, bias=False), nn.BatchNorm2d(c1),
                       nn.ReLU(inplace=True)]
            cin = c1
        self.convs = nn.Sequential(*layers)
        out, hid, fcs = feature_dim if loss_mode == "contrast" else num_classes, int(feature_dim * widen), []
        for i in range(n_fc - 1):
            fcs += [nn.Linear(cin if i == 0 else hid, hid), nn.ReLU(inplace=True)]
        fcs.append(nn.Linear(cin if n_fc == 1 else hid, out))
        self.fc = nn.Sequential(*fcs)

    def forward(self, h):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.convs(h), 1), 1))


# InfoPro's and MAN's ImageNet decoders (Experiments on ImageNet/networks/resnet.py; MAN's InfoProAux.py), by
# input width: (kernel, output channels) of each conv; the map is upsampled x2 (bilinear, align_corners=True)
# before every conv but the first, so 28 px (after layer2) or 14 px (after layer3) reach 224 px.
IMAGENET_DECODERS = {512: [(1, 128), (3, 32), (3, 12), (3, 3)], 1024: [(1, 192), (1, 64), (3, 32), (3, 12), (3, 3)]}


class ImageNetDecoder(nn.Module):
    """The staged ImageNet decoder: conv (bias) -> BN -> ReLU, x2 upsampling between stages, the last conv to 3
    channels without BN; returns the pre-sigmoid image (BCE with logits, as Decoder). 106,699 params at C=512,
    232,011 at C=1024."""

    def __init__(self, c, size):
        super().__init__()
        self.size, layers, stages = tuple(size), [], IMAGENET_DECODERS[c]
        for i, (k, cout) in enumerate(stages):
            last = i == len(stages) - 1
            layers.append(nn.Sequential(nn.Conv2d(c, cout, k, 1, k // 2),
                                        *([] if last else [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)])))
            c = cout
        self.stages = nn.ModuleList(layers)

    def forward(self, h):
        n = len(self.stages)
        for i, stage in enumerate(self.stages):
            if i:   # x2, the last step exactly to the input size
                size = self.size if i == n - 1 else tuple(2 * s for s in h.shape[-2:])
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            h = stage(h)
        return h


class ImageNetAuxClassifier(nn.Module):
    """InfoPro's / MAN's ImageNet head: 1x1 conv C -> C/4, 3x3/2 conv -> 256, 3x3/2 conv -> 512, 1x1 conv -> 2048
    (each without bias, BN, ReLU), GAP, Linear 2048 -> classes; cross-entropy. 4,643,560 params at C=512,
    5,135,336 at C=1024 (1000 classes)."""

    def __init__(self, c, num_classes):
        super().__init__()
        layers = []
        for cout, k, s in ((c // 4, 1, 1), (256, 3, 2), (512, 3, 2), (2048, 1, 1)):
            layers += [nn.Conv2d(c, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            c = cout
        self.convs, self.fc = nn.Sequential(*layers), nn.Linear(2048, num_classes)

    def forward(self, h):
        return self.fc(pool_features(self.convs(h)))


def supcon_loss(z, y, temperature=0.07):
    """Supervised contrastive loss (Khosla et al. 2020), single view, as InfoPro's `contrast` mode:

        l_i = -1/|P(i)| sum_{p in P(i)} [ s_ip - log sum_{a != i} exp(s_ia) ],  s_ij = <z_i, z_j> / tau,  z L2-normed
        P(i) = {p != i : y_p = y_i};  |P(i)| = 0 counts as 1 (the anchor adds 0 but stays in the mean over B).
    tau = base temperature = 0.07, so the tau/tau_base factor is 1. Computed in (at least) fp32."""
    z = F.normalize(fp32(z), dim=1)
    s = z @ z.t() / temperature
    s = s - s.max(1, keepdim=True).values.detach()            # stability only: cancels in the loss
    eye = torch.eye(len(y), dtype=torch.bool, device=z.device)
    pos = (y[:, None] == y[None, :]) & ~eye
    log_prob = s - torch.logsumexp(s.masked_fill(eye, float("-inf")), 1, keepdim=True)
    return -((log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()


def fresh_copy(unit, init="random", reinit=init_weights):
    """A new unit with `unit`'s architecture: re-initialised (every layer's reset, then `reinit`, the init of our
    backbone where it is one of ours) or, with init="copy", a copy of its current weights."""
    clone = copy.deepcopy(unit)
    if init == "random":
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if reset is not None and m is not clone:
                reset()
        if reinit is not None:
            reinit(clone)
    return clone


class AugLocalAux(nn.Module):
    """AugLocal's auxiliary network for the module ending at unit L (Ma et al., ICLR 2024; ChenxiangMA/AugLocal):
    fresh, randomly initialised blocks with the architecture of D backbone units chosen uniformly among the units
    that follow L, then GAP -> [BatchNorm1d if D <= 1, CIFAR ResNets] -> Linear.

        selected = [round(L + (n - L - 1) / D * j) for j = 1..D]     (n units; all remaining ones if D >= n-1-L)
    Python's round (half to even), as the official code -- half-up rounding builds different nets. On our
    ResNets (`net.block` set) each block is rebuilt for the width it receives, with stride 2 while the map is
    larger than the imitated unit's output (one halving per block, carried to the next block if a single block
    skips two stages), like the backbone unit it imitates. On any other backbone the selected units are
    deep-copied and re-initialised as they are, so their input and output shapes must chain."""

    def __init__(self, L, depth, net, num_classes):
        super().__init__()
        shapes, n = net.unit_shapes, len(net.unit_shapes)
        if depth >= n - 1 - L:
            self.selected = list(range(L + 1, n))
        else:
            self.selected = [round(L + (n - L - 1) / depth * j) for j in range(1, depth + 1)]
        if net.block is not None:
            cur, size, blocks = shapes[L][0], shapes[L][1], []
            for j in self.selected:   # a block halves the map (stride 2) while it is larger than the imitated unit's
                cout, stride = shapes[j][0], 2 if size > shapes[j][1] else 1
                blocks.append(net.block(cur, cout // net.block.expansion, stride))
                cur, size = cout, size // stride
            self.blocks = nn.Sequential(*blocks)
        else:
            self.blocks = nn.Sequential(*[fresh_copy(net.units[j], "random", None) for j in self.selected])
            try:
                with torch.no_grad():
                    out = self.blocks.eval()(torch.zeros(2, *shapes[L]))
                self.blocks.train()
            except RuntimeError as e:
                raise UserError(f"--method auglocal: the copies of units {self.selected} do not chain on the output "
                                f"of unit {L} ({'x'.join(map(str, shapes[L]))}): {first_line(e)}")
            cur = out.shape[1] if out.dim() == 4 else out.shape[-1]
        bn = depth <= 1 and family(net.arch) == "cifar"   # (the CIFAR code's head; not its ImageNet code's)
        self.pool = family(net.arch) != "vit"           # (on ViTs: LayerNorm -> Linear on the CLS token)
        self.head = nn.Sequential(*([nn.BatchNorm1d(cur)] if bn else []), nn.Linear(cur, num_classes)) if self.pool \
            else TokenHead(cur, num_classes)

    def forward(self, h):
        h = self.blocks(h)
        return self.head(pool_features(h) if self.pool else h)


class PredSimAux(nn.Module):
    """PredSim's two local heads (Noekland & Eidnes 2019, as in the AugLocal repository, utils/others.py):
    `pred`: avg-pool -> Linear -> classes. The kernel grows (height, then width, doubling) until
    C * ceil(H/kh) * ceil(W/kw) <= 512; an axis the kernel does not divide is zero-padded by half a kernel on
    both sides, and the zeros count in the average (STL-10's 64x24x24 -> kernel 16x8, 2x3 cells, Linear 384).
    `sim`: conv3x3 C -> C (no bias) whose output feeds the similarity-matching loss."""
    POOLED = 512

    def __init__(self, c, h, w, num_classes):
        super().__init__()
        kh = kw = 1
        oh, ow = h, w
        while c * oh * ow > self.POOLED and kh < h:
            kh *= 2
            oh = math.ceil(h / kh)
            if c * oh * ow > self.POOLED:
                kw *= 2
                ow = math.ceil(w / kw)
        pad = tuple(k // 2 if n % k else 0 for n, k in ((h, kh), (w, kw)))
        self.pool = nn.AvgPool2d((kh, kw), padding=pad) if (kh, kw) != (1, 1) else nn.Identity()
        self.pred = nn.Linear(c * oh * ow, num_classes)
        self.sim = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, h):
        return self.pred(torch.flatten(self.pool(h), 1)), self.sim(h)


def similarity_matrix(x):
    """Row-centred cosine similarity (B x B) used by PredSim: 4-D maps are first reduced to the spatial standard
    deviation of each channel (unbiased), as the original."""
    x = fp32(x)
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.flatten(2).std(dim=2)
    x = x.flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / (1e-8 + x.norm(dim=1, keepdim=True))
    return (x @ x.t()).clamp(-1, 1)


class MLAANDGLAux(nn.Module):
    """The DGL-style head of the MAN group, as MLAAN's DGL base uses it. MLAAN's repository lacks the file; the
    same group's JunhaoSu0/MAN_PlusPlus Exp_on_CIFAR-SVHN-STL/networks/auxDGL.py has the same constructor:
    avg-pool to 8x8 -> 3 x [1x1 conv (no bias) -> BN -> ReLU] (C -> 128 -> 128 -> 128) -> GAP -> Linear 128 -> 512
    -> BN1d -> ReLU -> 2 x [Linear 512 -> 512 -> BN1d -> ReLU] -> Linear 512 -> classes.  635,146 / 637,194 /
    641,290 params at C = 16 / 32 / 64 (10 classes)."""

    def __init__(self, c, num_classes, width=128, hidden=512):
        super().__init__()
        convs, cin = [], c
        for _ in range(3):
            convs += [nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        mlp, fin = [], width
        for _ in range(3):
            mlp += [nn.Linear(fin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            fin = hidden
        self.convs, self.mlp = nn.Sequential(*convs), nn.Sequential(*mlp, nn.Linear(hidden, num_classes))

    def forward(self, h):
        h = self.convs(F.adaptive_avg_pool2d(h, 8))        # the 1x1 convs run on an 8x8 map whatever the input
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class MLAANImageNetAux(nn.Module):
    """MLAAN's independent head on ImageNet (ImageNet/networks/auxnet34.py, auxnet101.py): on 64- and 128-channel
    maps two 1x1 convs C -> 2C -> C (no bias, BN, ReLU) before GAP -> Linear; on wider maps GAP -> Linear alone.
    81,768 / 195,304 / 257,000 / 513,000 params at C = 64 / 128 / 256 / 512 (1000 classes)."""

    def __init__(self, c, num_classes):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
                                   nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)) \
            if c < 256 else nn.Identity()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h):
        return self.fc(pool_features(self.convs(h)))

# =============================================================================================================
# 5. Methods
# =============================================================================================================
# A method owns the auxiliary nets of the local modules and defines each module's loss. The training step
# (section 7) asks three things of it, for each module k = 0..K-1 in turn:
#
#     h, loss, logits = method(net, k, h_in, batch)   module k's forward from its detached input h_in and its loss:
#                                                      the local loss of its aux net, or, for the last module, the
#                                                      network's own head and cross-entropy
#     method.backward(net, k, loss, h_in, h)          backpropagate it (SGR adds its gradient term here)
#     method.after_backward(net, k)                   what follows module k's backward (MAN's and MLAAN's EMA)
#
# `parts(k)` lists the aux nets module k's loss trains; `describe` and `summary` are what --print-splits and the
# config show. Adding a method = one class here + @register. An add-on wraps an instance of its base method.
#
# Options. Each method declares the options it introduces (`options`); they become command-line flags and the
# keywords of `attach`. Their values are resolved in ONE place, `method_options` (end of this section): what the
# caller gave, else what an add-on sets for its base (`base_defaults`: MAN on InfoPro uses the 2c2f head with
# cross-entropy), else the option's own default. Constructors only read the resolved options, `opts`.

METHODS = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Opt:
    """A method option: its default (a value, or a function of the context namespace -> value), help text, and
    what the command line accepts. Flag --name-with-dashes; keyword name_with_underscores."""
    default: object
    help: str                     # None: an internal value resolved with the options, not a flag
    type: object = None
    choices: tuple = None
    lo: float = None              # smallest allowed value
    hi: float = None              # largest allowed value
    positive: bool = False        # must be > 0

    def check(self, name, value):
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        if value is not None and self.lo is not None and value < self.lo:
            raise UserError(f"{flag} must be >= {self.lo}, got {value}")
        if value is not None and self.positive and value <= 0:
            raise UserError(f"{flag} must be a positive number, got {value}")
        if value is not None and self.hi is not None and value > self.hi:
            raise UserError(f"{flag} must be in [{self.lo}, {self.hi}], got {value}")
        if self.choices and value not in self.choices:
            raise UserError(f"{flag} {value}: one of {', '.join(self.choices)}")


@dataclass
class Batch:
    x: torch.Tensor               # normalised, augmented inputs
    y: torch.Tensor               # labels
    mean: torch.Tensor = None     # 1x3x1x1 normalisation constants, for methods that rebuild the [0,1] image
    std: torch.Tensor = None      # (None: x is already the image in [0,1])

    def x01(self):
        """The augmented input image in [0,1] (target of reconstruction losses)."""
        x = self.x if self.mean is None else self.x * self.std + self.mean
        return x.clamp(0, 1)


def need_image_features(method, shape, what="its aux nets"):
    """Methods whose aux nets use convolutions need C x H x W features."""
    if len(shape) != 3:
        raise UserError(f"--method {method}: {what} need image-shaped features (C x H x W); this backbone gives "
                        f"{'x'.join(map(str, shape))}")


def chain_of(method):
    """The method and its bases, outermost first (instances: `--method sgr --base man+dgl` -> SGR, MAN, DGL)."""
    while method is not None:
        yield method
        method = getattr(method, "base", None)


def module_positions(n):
    """r_k = k / (n - 1) for the n local modules (0 when there is one): where each sits between first and last."""
    return [k / (n - 1) if n > 1 else 0.0 for k in range(n)]


def stage_positions(stages, n):
    """r = s / (n - 2) for stage indices s (0 when n <= 2): MAN's and MLAAN's interpolation variable, the stage of
    a block over the number of modules where InfoPro uses the module index (a quirk of their code)."""
    return [s / (n - 2) if n > 2 else 0.0 for s in stages]


class LocalMethod(nn.Module):
    """The default local step, and the base class of every method: one aux net per local module k < K-1
    (`make_aux`, sized from `shapes[k]`, the features it reads), a cross-entropy local loss on it (`local_loss`),
    and the network's head for the last module. A method overrides `make_aux`, and `local_loss` (another loss),
    `forward` (another step), `backward` or `after_backward` where it differs.

    `r` places each local module in the network, r_k in [0, 1] (default module_positions: k / (K-2)): methods
    whose loss weights change with depth (InfoPro, PredSim) interpolate over it; MAN and MLAAN place it by stage.
    `init`: our He init of the aux nets now (MLAAN initialises its two sets of heads together, after both exist)."""
    name = ""
    options = {}                                  # option name -> Opt, the options this method introduces
    bases, default_base, base_defaults = (), None, {}   # add-ons: accepted --base names, and defaults set for them
    vit_base = None                               # add-ons: the default base on ViTs
    default_K = 16
    protocol = "infopro"                          # whose training protocol the command line uses (section 1)
    imagenet_protocol = None                      # the paper's ImageNet batch, lr and epochs, where it has one
    eager_only = None                             # why --compile cannot run this method (None: it can)
    double_backward = False                       # its step differentiates a gradient again (SGR)
    # Module parallelism (section 9) reads three more: state one module's step hands to the next's (SGR's
    # gradient), the unit whose weights after_backward(net, k) reads (MAN's next block), why a gradient crosses
    # a module boundary (MLAAN's cascade).
    carried, tracked, crosses_modules = (), (), None

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        super().__init__()
        self.K, self.opts = net.K, opts
        self.shapes = net.boundary_shapes if shapes is None else shapes    # None: no aux net at that boundary
        self.r = module_positions(net.K - 1) if r is None else r
        self.aux = nn.ModuleList([None if s is None else self.make_aux(net, k, s, num_classes)
                                  for k, s in enumerate(self.shapes)])
        if init:
            our_init(net.arch)(self.aux)

    @classmethod
    def check(cls, net, opts):
        """Raise UserError for combinations this method cannot run (called before the aux nets are built)."""

    @classmethod
    def adjust_ends(cls, ends, opts):
        """Hook to change the split a method really builds (MAN merges a stem-alone module into module 1)."""
        return ends

    def make_aux(self, net, k, shape, num_classes):
        """The aux net of local module k, reading features of `shape` (C x H x W, N x D or D)."""
        raise NotImplementedError

    def forward(self, net, k, h_in, batch):
        """Module k's forward from its (detached) input, and its loss: (output, loss, logits or None)."""
        h = net.run(h_in, k)
        if k == self.K - 1:
            logits = net.head(h)
            return h, F.cross_entropy(logits, batch.y), logits
        return h, *self.local_loss(k, h, batch)

    def local_loss(self, k, h, batch):
        logits = self.aux[k](h)
        return F.cross_entropy(logits, batch.y), logits

    def backward(self, net, k, loss, h_in, h):
        """Backpropagate module k's loss. A loss without a graph (every term weighted 0) has nothing to
        backpropagate; the step still gives the module zero gradients."""
        if loss.requires_grad:
            loss.backward()

    def after_backward(self, net, k):
        """Work that follows module k's backward (every module, the last one included)."""

    def parts(self, k):
        """The aux nets trained by local module k's loss."""
        return [self.aux[k]]

    def describe(self, net, k):
        """(what local module k's aux net reads, a note) for --print-splits."""
        return self.shapes[k], ""

    def summary(self):
        """One line printed with the config (e.g. resolved loss weights)."""
        return ""


class Recompute(torch.autograd.Function):
    """Activation checkpointing of one module: the forward keeps only the module's input (a tensor autograd saves,
    so the memory meter counts it), the backward recomputes the module -- under the forward's autocast, leaving
    BatchNorm's running statistics as they were (the recomputation would update them a second time) -- and
    backpropagates through it. The parameters are inputs (so that even the first module's output needs a
    backward); their gradients accumulate in .grad during it."""

    @staticmethod
    def forward(ctx, units, x, *params):
        ctx.units, ctx.device = units, x.device.type
        ctx.amp = torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            for u in units:
                x = u(x)
        return x

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        bns = [m for u in ctx.units for m in u.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        stats = [[b.clone() for b in m.buffers()] for m in bns]
        with torch.enable_grad(), torch.autocast(ctx.device, ctx.amp[1], enabled=ctx.amp[0]):
            out = x
            for u in ctx.units:
                out = u(out)
        # The parameters' gradients accumulate in their .grad as in any backward; the input's is handed back.
        torch.autograd.backward(out, g, inputs=[t for t in (x, *params) if t.requires_grad])
        with torch.no_grad():   # (after the backward through them: BatchNorm's backward reads its buffers)
            for m, saved in zip(bns, stats):
                for b, v in zip(m.buffers(), saved):
                    b.copy_(v)
        return (None, x.grad, *[None] * len(params))


@register
class BP(LocalMethod):
    """End-to-end backpropagation: the real head's cross-entropy, no aux nets; one module (K = 1).

    --checkpoint: BP with activation checkpointing at the K modules of the split -- what one would pick instead
    of local learning to save memory with BP's exact gradients. The forward keeps only each module's input; the
    backward recomputes one module at a time, last to first (Recompute), so autograd holds the K boundaries plus
    one module's activations, for one extra forward of modules 1..K-1. The whole pass runs at the last module's
    step (the earlier modules' steps have no loss of their own)."""
    name = "bp"
    default_K = 1
    options = dict(checkpoint=Opt(False, "BP: activation checkpointing at the K modules of the split (each module "
                                  "recomputed in the backward; BP's exact gradients)", type=bool))

    @classmethod
    def check(cls, net, opts):
        if net.K != 1 and not opts.checkpoint:
            raise UserError(f"--method bp trains end to end; use --K 1 (got --K {net.K}), or --checkpoint to "
                            f"checkpoint its activations at K modules")

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        super().__init__(net, opts, num_classes, shapes=[])   # no aux nets

    def parts(self, k):
        return []

    def describe(self, net, k):
        return net.unit_shapes[net.ends[k]], "(checkpoint: its input is kept, the module recomputed in the backward)"

    @property
    def eager_only(self):
        return "BP's activation checkpointing" if self.opts.checkpoint and self.K > 1 else None

    @property
    def crosses_modules(self):
        return "BP's backward runs through every module" if self.K > 1 else None

    def forward(self, net, k, h_in, batch):
        if self.K == 1:
            return super().forward(net, k, h_in, batch)
        if k < self.K - 1:                                  # (no loss of its own: the pass runs at the last one)
            return h_in, fp32(h_in.new_zeros(())), None
        h = batch.x
        for j in range(self.K - 1):
            units = net.units[slice(*net.bounds[j])]
            h = Recompute.apply(units, h, *[p for u in units for p in u.parameters()])
        h = net.run(h, k)
        logits = net.head(h)
        return h, F.cross_entropy(logits, batch.y), logits


@register
class Greedy(LocalMethod):
    """Greedy supervised local learning (the InfoPro paper's "Greedy SL" baseline; Belilovsky et al. 2019).

    L_k = CE(W_k GAP(h_k) + b_k, y): each module is trained as if it were the last, through a linear head on
    its pooled output (InfoPro's `0c1f` config with cross-entropy and weight 1). Any feature shape works:
    C x H x W maps are averaged over space, N x D tokens over tokens, D vectors are used as they are. On our ViTs
    the head is LayerNorm -> Linear on the CLS token, as their own head (TokenHead)."""
    name = "greedy"

    def make_aux(self, net, k, shape, num_classes):
        if family(net.arch) == "vit":
            return TokenHead(shape[-1], num_classes)
        return Head(shape[0] if len(shape) == 3 else shape[-1], num_classes)


@register
class DGL(LocalMethod):
    """Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon, ICML 2020).

    L_k = CE(g_k(h_k), y) with g_k DGL's official MLP-SR aux net (DGLAux, eugenium/DGL; --dgl-head dgl, the
    default) or the AugLocal repository's re-implementation behind the DGL rows of the AugLocal paper, which
    MAN and MLAAN compare with (--dgl-head auglocal: two hidden Linear layers without bias).
    DGL steps each module's optimizer right after its backward; since every module's forward input is computed
    before any step, that is the same update as our single shared SGD step."""
    name = "dgl"
    options = dict(dgl_head=Opt("dgl", "DGL aux net: dgl (the DGL authors' MLP-SR net) or auglocal (the AugLocal "
                                "repository's, behind the AugLocal/MAN/MLAAN papers' DGL rows)",
                                choices=("dgl", "auglocal")))

    def make_aux(self, net, k, shape, num_classes):
        if self.opts.dgl_head == "auglocal":
            need_image_features("dgl --dgl-head auglocal", shape)
        return DGLAux(shape, num_classes, self.opts.dgl_head)


# (ixx_1, ixy_1, ixx_2, ixy_2) of the InfoPro repository's published commands (its comand.sh), keyed by
# (dataset, arch, K, balanced). All use --aux-config 1c2f, contrast, feature dim 128.
INFOPRO_LAMBDAS = {
    ("cifar10", "resnet32", 2, False): (5, 1, 0, 0), ("cifar10", "resnet32", 4, False): (6, 0, 1, 2),
    ("cifar10", "resnet32", 8, False): (5, 0, 0, 2), ("cifar10", "resnet32", 16, False): (5, 0.05, 0.2, 0.5),
    ("cifar10", "resnet110", 2, False): (5, 0.5, 0, 0), ("cifar10", "resnet110", 4, False): (1, 0, 0, 1),
    ("cifar10", "resnet110", 8, False): (5, 0, 0, 1), ("cifar10", "resnet110", 16, False): (5, 0, 0.5, 1),
    ("cifar10", "resnet110", 2, True): (5, 0.1, 0, 0), ("cifar10", "resnet110", 3, True): (5, 0, 5, 0.1),
    ("cifar10", "resnet110", 4, True): (5, 0, 5, 0.1),
    ("stl10", "resnet110", 2, False): (10, 1, 0, 0), ("stl10", "resnet110", 4, False): (20, 0.2, 5, 2),
    ("stl10", "resnet110", 8, False): (20, 0.2, 5, 1), ("stl10", "resnet110", 16, False): (20, 0.5, 10, 0.1),
    ("stl10", "resnet110", 2, True): (20, 1, 0, 0), ("stl10", "resnet110", 3, True): (20, 0.5, 5, 2),
    ("stl10", "resnet110", 4, True): (20, 0.5, 10, 1),
    ("svhn", "resnet110", 2, False): (1, 0.1, 0, 0), ("svhn", "resnet110", 4, False): (5, 0, 0.5, 1),
    ("svhn", "resnet110", 8, False): (5, 0, 0.5, 2), ("svhn", "resnet110", 16, False): (5, 0.2, 0.5, 1),
}
LAMBDA_NAMES = ("ixx_1", "ixy_1", "ixx_2", "ixy_2")
# The four weight flags, shared by InfoPro (and its add-ons) and PredSim.
LAMBDA_OPTIONS = {n: Opt(None, f"loss weight {n.replace('_', '-')}: reconstruction/similarity (ixx) or task (ixy) "
                               f"term at the first (_1) and the last (_2) local module; default: the method's",
                         type=float) for n in LAMBDA_NAMES}


def resolve_lambdas(given, defaults, source):
    """(ixx_1, ixy_1, ixx_2, ixy_2): the values given (None = not given), the rest from `defaults`; and a note
    saying where they came from."""
    values = tuple(d if v is None else v for v, d in zip(given, defaults))
    note = source if all(v is None for v in given) else "command line" + \
        ("" if all(v is not None for v in given) else f" (the others: {source})")
    return values, note


def interpolate_lambdas(lambdas, r):
    """(l1, l2) per local module from (ixx_1, ixy_1, ixx_2, ixy_2) and each module's position r in [0, 1]."""
    ixx1, ixy1, ixx2, ixy2 = lambdas
    return [(ixx1 * (1 - t) + ixx2 * t, ixy1 * (1 - t) + ixy2 * t) for t in r]


def published_lambdas(dataset, arch, K, balanced):
    """The published (ixx_1, ixy_1, ixx_2, ixy_2) for this setting, else a documented stand-in:
    the CIFAR-10 command of the same arch and K, else CIFAR-10 ResNet-110's command with the nearest K.
    Returns (values, where they came from)."""
    if family(arch) == "imagenet":     # the ImageNet README: one (ixx, ixy) per net, used at every module
        ixx, ixy = (5, 1) if arch == "resnet152" else (5, 0.75)
        return (ixx, ixy, ixx, ixy), f"InfoPro ImageNet README ({'resnet152' if arch == 'resnet152' else 'resnet101'})"
    key = (dataset, arch, K, balanced)
    if key in INFOPRO_LAMBDAS:
        return INFOPRO_LAMBDAS[key], f"published ({dataset}, {arch}, K={K}{', InfoPro*' if balanced else ''})"
    if ("cifar10", arch, K, balanced) in INFOPRO_LAMBDAS:
        return INFOPRO_LAMBDAS[("cifar10", arch, K, balanced)], f"not published for {dataset}; CIFAR-10's {arch} K={K}"
    near = min((k for d, a, k, b in INFOPRO_LAMBDAS if (d, a, b) == ("cifar10", "resnet110", False)),
               key=lambda k: (abs(k - K), k))
    return INFOPRO_LAMBDAS[("cifar10", "resnet110", near, False)], \
        f"not published for {dataset}/{arch}/K={K}; CIFAR-10 ResNet-110 K={near}'s"


def infopro_aux(c, opts, num_classes, image_size, imagenet=False):
    """Decoder + AuxClassifier of one InfoPro-style local loss (also MAN's and MLAAN's on the InfoPro base); on our
    ImageNet ResNets, at the 512- and 1024-channel boundaries the official ImageNet nets instead."""
    if imagenet and c in IMAGENET_DECODERS:
        return nn.ModuleDict(dict(decoder=ImageNetDecoder(c, image_size), head=ImageNetAuxClassifier(c, num_classes)))
    return nn.ModuleDict(dict(decoder=Decoder(c, image_size, opts.aux_widen),
                              head=AuxClassifier(c, opts.aux_config, opts.local_loss, num_classes, opts.aux_widen,
                                                 opts.aux_feature_dim)))


def infopro_loss(aux, z, batch, l1, l2, contrast):
    """l1 * BCE(decoder(z), x01) + l2 * {SupCon | CE}(head(z)); a term whose weight is 0 is not computed (same
    gradients for everything that is used, less work). Returns (loss, logits or None)."""
    loss, logits = fp32(z.new_zeros(())), None
    if l1:
        loss = loss + l1 * F.binary_cross_entropy_with_logits(fp32(aux["decoder"](z)), batch.x01())
    if l2:
        out = aux["head"](z)
        if contrast:
            loss = loss + l2 * supcon_loss(out, batch.y)
        else:
            loss, logits = loss + l2 * F.cross_entropy(fp32(out), batch.y), out
    return loss, logits


@register
class InfoPro(LocalMethod):
    """InfoPro (Wang, Ni, Song, Yang, Huang: "Revisiting Locally Supervised Learning: an Alternative to End-to-end
    Training", ICLR 2021), faithful to the official code (blackfeather-wang/InfoPro-Pytorch).

    Module k's local loss is a surrogate of  lambda_1 I(h_k; x) - lambda_2 I(h_k; y)  (the information-propagation
    loss): keep all the information about the input that later modules may need, while becoming discriminative:

        L_k = l1_k * BCE(Decoder_k(h_k), x01) + l2_k * { SupCon(Head_k(h_k), y)  (contrast)  |  CE (cross_entropy) }
        r_k = k / (K-2)  (0 if K = 2);   l1_k = ixx_1 (1 - r_k) + ixx_2 r_k;   l2_k = ixy_1 (1 - r_k) + ixy_2 r_k

    over the local modules k = 0..K-2, so module 0 uses (ixx_1, ixy_1) and module K-2 (ixx_2, ixy_2). Defaults:
    head 1c2f, contrast (tau 0.07), feature dim 128, widen 1, lambdas from the published commands (printed).
    InfoPro* = --balanced-memory (its split tables). ImageNet (its "Experiments on ImageNet" code, InfoPro* K=2
    on ResNet-101/152): the staged ImageNetDecoder and the ImageNetAuxClassifier at 512- and 1024-channel
    boundaries, cross-entropy, (ixx, ixy) = (5, 0.75) for ResNet-101, (5, 1) for ResNet-152 (its README), batch
    1024, lr 0.4, 90 epochs, cosine from epoch 0 without warm-up. Needs image inputs and C x H x W features
    (the decoder reconstructs the image)."""
    name = "infopro"
    imagenet_protocol = dict(batch_size=1024, lr=0.4, epochs=90)
    options = dict(
        aux_config=Opt("1c2f", "InfoPro-family aux head, <n>c<m>f = n convs, m linears (default 1c2f; MAN: 2c2f)",
                       choices=AuxClassifier.CONFIGS),
        aux_widen=Opt(1.0, "width multiplier of decoder and aux head", type=float, positive=True),
        aux_feature_dim=Opt(128, "hidden/embedding width D of the aux head (the original's default 0 builds a "
                            "broken head)", type=int, lo=1),
        local_loss=Opt(lambda c: "cross_entropy" if family(c.arch) == "imagenet" else "contrast",
                       "InfoPro task term: supervised contrastive (default) or softmax cross-entropy (default "
                       "under MAN and MLAAN, and on ImageNet)", choices=("contrast", "cross_entropy")),
        lambdas=Opt(lambda c: published_lambdas(c.dataset, c.arch, c.K, c.balanced_memory), None),
        **LAMBDA_OPTIONS)

    @classmethod
    def check(cls, net, opts):
        if not (len(net.input_shape) == 3 and net.input_shape[0] == 3):
            raise UserError(f"--method infopro: its decoder reconstructs the input image, which must be 3 x H x W "
                            f"(this network reads {'x'.join(map(str, net.input_shape))})")
        for shape in net.boundary_shapes:
            need_image_features("infopro", shape, "its decoder and head")
        if family(net.arch) == "imagenet" and opts.local_loss == "contrast":
            raise UserError("--local-loss contrast: the ImageNet aux nets of InfoPro and MAN are cross-entropy only")

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        super().__init__(net, opts, num_classes, shapes, r, init)
        self.contrast = opts.local_loss == "contrast"
        self.lambdas_all, self.lambda_source = opts.lambdas
        self.weights = interpolate_lambdas(self.lambdas_all, self.r)

    def make_aux(self, net, k, shape, num_classes):
        return infopro_aux(shape[0], self.opts, num_classes, net.input_shape[1:], family(net.arch) == "imagenet")

    def local_loss(self, k, h, batch):
        return infopro_loss(self.aux[k], h, batch, *self.weights[k], self.contrast)

    def summary(self):
        w = ", ".join(f"({a:g},{b:g})" for a, b in self.weights)
        return f"lambdas {self.lambdas_all} [{self.lambda_source}] per module (l1,l2): {w}"


@register
class AugLocal(LocalMethod):
    """AugLocal (Ma, Wu, Zhou, Pan, Liang, Gong, Zhang: "Scaling Supervised Local Learning with Augmented
    Auxiliary Networks", ICLR 2024; official code ChenxiangMA/AugLocal).

    The aux net of module k imitates the rest of the network: fresh copies of D_k backbone units sampled uniformly
    from those after module k (AugLocalAux), then pooling + FC;  L_k = CE(aux_k(h_k), y), weight 1.
    Pyramidal depth (--pyramid c): D_k = max(1, round(d (1 - r_k) + r_k)), r_k = k c / (K' - 2), so depth falls
    linearly from d to (d + 1)/2 at c = 0.5. Module count, as the official script: it subtracts the aux depth
    from the requested number, K' = K - d: the last module takes the final d + 1 units with the real head and no
    boundary falls inside them. With one unit per module (the official ResNet-32 K=16 and ResNet-110 K=55 runs)
    that is exactly K - d modules (16 -> 13 at d = 3); with multi-unit modules (e.g. ResNet-32 K=8) only the
    boundaries inside the last d + 1 units are dropped, so more than K - d modules remain. That is the CIFAR
    script (train.py); its ImageNet script (exp_imagenet) builds all K modules and no pyramid: ResNet-34 K=17
    (the stem alone, then one block per module), d = 4, batch 1024, lr 0.4, 200 epochs (run.sh), which is what
    the ImageNet ResNets and any other backbone get here. Defaults: d = 3, no pyramid; the official CIFAR
    commands use d in {1, 3, 5} with --pyramid 0.5.
    On our ResNets the copied blocks are rebuilt with the widths and strides that fit (like the official code);
    on any other backbone the selected units are deep-copied and re-initialised, so their shapes must chain."""
    name = "auglocal"
    protocol = "auglocal"
    imagenet_protocol = dict(batch_size=1024, lr=0.4, epochs=200)
    options = dict(aux_depth=Opt(3, "AugLocal: units per aux net d (official 1, 3, 5)", type=int, lo=1),
                   pyramid=Opt(0.0, "AugLocal pyramidal depth coefficient c (official commands 0.5; 0 = same depth d)",
                               type=float, lo=0))

    @classmethod
    def adjust_ends(cls, ends, opts):
        # CIFAR script: the last module takes the final d + 1 units, no aux net after any of them (with one unit
        # per module this is the official K' = K - d).
        if family(opts.arch) != "cifar":
            return ends
        kept = [e for e in ends[:-1] if e <= ends[-1] - 1 - opts.aux_depth] + ends[-1:]
        if len(kept) < 2:
            raise UserError(f"--aux-depth {opts.aux_depth} with --K {len(ends)}: AugLocal's last module takes the "
                            f"final d + 1 units and at least one local module must remain")
        return kept

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        n = net.K - 1     # (the official formula, kept as written: its rounding decides depths at .5)
        self.depths = [max(1, round(opts.aux_depth * (1 - t) + t))
                       for t in (k * opts.pyramid / (n - 1) if n > 1 else 0.0 for k in range(n))]
        super().__init__(net, opts, num_classes, shapes, r, init)

    def make_aux(self, net, k, shape, num_classes):
        return AugLocalAux(net.ends[k], self.depths[k], net, num_classes)

    def describe(self, net, k):
        return self.shapes[k], "copies " + ",".join(net.unit_name(j) for j in self.aux[k].selected)

    def summary(self):
        return "aux depths " + " ".join(map(str, self.depths))


@register
class PredSim(LocalMethod):
    """PredSim (Noekland & Eidnes, "Training Neural Networks with Local Error Signals", ICML 2019), as run in the
    AugLocal repository (its only official implementation on these ResNets):

        L_k = ixx * MSE( S(conv3x3(h_k)), S(onehot(y)) ) + ixy * CE( Linear(avgpool(h_k)), y )
    with S the row-centred cosine similarity matrix (similarity_matrix). Weights (ixx, ixy) = (0.99, 0.01) at every
    module (the official commands; --ixx-1/--ixy-1/--ixx-2/--ixy-2 interpolate over modules as InfoPro's)."""
    name = "predsim"
    options = dict(lambdas=Opt(((0.99, 0.01, 0.99, 0.01), "official commands"), None), **LAMBDA_OPTIONS)

    @classmethod
    def check(cls, net, opts):
        for shape in net.boundary_shapes:
            need_image_features("predsim", shape)

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        super().__init__(net, opts, num_classes, shapes, r, init)
        self.num_classes = num_classes
        self.weights = interpolate_lambdas(opts.lambdas[0], self.r)

    def make_aux(self, net, k, shape, num_classes):
        return PredSimAux(*shape, num_classes)

    def local_loss(self, k, h, batch):
        l_sim, l_pred = self.weights[k]
        logits, sim_feat = self.aux[k](h)
        target = similarity_matrix(F.one_hot(batch.y, self.num_classes).to(sim_feat.dtype))
        loss = l_sim * F.mse_loss(similarity_matrix(sim_feat), target) + l_pred * F.cross_entropy(fp32(logits), batch.y)
        return loss, logits

    def summary(self):
        return f"(sim, pred) weights {self.weights[0]} .. {self.weights[-1]}"

# ---- add-ons: methods that wrap a base method ------------------------------------------------------------------
# An add-on changes what its base's aux nets read (MAN), how the loss is backpropagated (SGR) or adds aux nets of
# its own around its base's heads and losses (MLAAN). One EMA implementation serves MAN and MLAAN.

@torch.no_grad()
def ema_update(ema, src, decay):
    """Parameters only (BN running statistics are not averaged, as in MAN's code):
    ema <- decay * ema + (1 - decay) * src. In place on .data, as the official codes: MAN++'s ViT update runs while
    a graph that read the EMA weights awaits its backward (which then reads the updated ones)."""
    e, p = [t.data for t in ema.parameters()], list(src.parameters())
    torch._foreach_mul_(e, decay)
    torch._foreach_add_(e, p, alpha=1 - decay)


class Fusion(nn.Module):
    """MAN++'s fusion of the learnable and the EMA branch: s a + (2 - s) b, a learnable scalar s starting at 1."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, a, b):
        return self.s * a + (2 - self.s) * b


def merge_stem(ends):
    """Drop a stem-alone module: MAN and MLAAN always run the stem as part of module 1."""
    return [e for e in ends if e != 0]


class AddOn(LocalMethod):
    """An add-on wraps an instance of its base method, `self.base` -- itself possibly an add-on: `--method sgr
    --base man+dgl` is SGR on MAN on DGL. The base keeps its aux nets and its loss, built on the `shapes` (and
    positions `r`) the add-on gives it; what an add-on does not override is its base's."""

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        nn.Module.__init__(self)
        self.K, self.opts = net.K, opts
        below = opts.chain[opts.chain.index(self.name) + 1]
        self.base = METHODS[below](net, opts, num_classes, shapes, r, init)

    def local_loss(self, k, h, batch):
        return self.base.local_loss(k, h, batch)

    def backward(self, net, k, loss, h_in, h):
        self.base.backward(net, k, loss, h_in, h)

    def after_backward(self, net, k):
        self.base.after_backward(net, k)

    def parts(self, k):
        return self.base.parts(k)

    def describe(self, net, k):
        return self.base.describe(net, k)

    def summary(self):
        return f"base {self.base.name}" + (f"; {self.base.summary()}" if self.base.summary() else "")


@register
class MAN(AddOn):
    """MAN, Momentum Auxiliary Network (Su et al., ECCV 2024; official code JunhaoSu0/MAN), on InfoPro, DGL or
    Greedy (the MAN++ ViT code's; on ResNets GAP -> Linear, our extension).

    For each boundary k, two copies of B_{k+1}, the first residual block of module k+1: EMA_k (no gradient) and a
    trainable "learnable bias" copy LB_k. The base's aux nets read

        z_k = LB_k(h_k) + EMA_k(h_k)           (gradient reaches module k through both branches)
        after module k's backward, before the optimizer step:  EMA_k <- m EMA_k + (1 - m) B_{k+1}   (parameters)

    so the aux net "sees" the next block's current behaviour. InfoPro base (default, as the official code): head
    2c2f, cross-entropy, feature dim 128, (ixx_1, ixy_1, ixx_2, ixy_2) = (5, 0.5, 0, 0), and MAN's own weights:
        r_k = s_k / (K - 2) (0 if K <= 2),  s_k = stage (1..3) of B_{k+1},  K = the nominal --K
    -- a quirk of the official code (InfoPro interpolates over the module index) that changes results: weights
    stay near (5, 0.5) instead of decaying to 0, and turn negative for K = 3, 4. Reproduced.
    Also reproduced: MAN never makes the stem its own module (ResNet-32 K=16 builds 15 modules, ResNet-110 K=55
    builds 54), and both copies start from a fresh random init like the rest of the model (`--man-init copy`,
    our extension, starts them as copies of B_{k+1}). Fixed: the EMA decay defaults to 0.995 (the official
    default 1.0 freezes the EMA branch at its random init; its README uses 0.995).
    DGL base: z_k feeds DGL's aux net with CE, weight 1 (inferred: the public MAN code has no DGL variant).

    On our ViTs, MAN++'s ViT code (JunhaoSu0/MAN_PlusPlus vit_man.py; its only setting K = 4), which differs from
    MAN on ResNets in three ways: the learnable branch copies the next group's first TWO blocks, the branches are
    fused with a learnable scalar s_k (starting at 1; s = 1 is MAN's plain sum), and the base is Greedy's
    LayerNorm -> Linear on the CLS token (`--base greedy`, the default on ViTs):

        z_k = LB2_k( s_k LB_k(h_k) + (2 - s_k) EMA_k(h_k) )
    Reproduced: the official ViT code updates EMA_k after the aux loss's forward and BEFORE its backward, in place
    on .data, so the backward through the EMA branch uses the updated weights (a gradient that differs from the
    ResNet order by O(1 - m))."""
    name = "man"
    protocol = "man"
    bases, default_base, vit_base = ("infopro", "dgl", "greedy"), "infopro", "greedy"
    base_defaults = {"infopro": dict(aux_config="2c2f", local_loss="cross_entropy",
                                     lambdas=lambda c: ((5, 0.75, 5, 0.75), "MAN ImageNet code (hard-coded)")
                                     if family(c.arch) == "imagenet" else ((5, 0.5, 0, 0), "MAN README command"))}
    imagenet_protocol = dict(batch_size=128, lr=0.05, epochs=90)
    options = dict(
        ema_decay=Opt(0.995, "MAN/MLAAN EMA decay m: ema <- m ema + (1-m) block (official MAN default 1.0 freezes "
                      "it)", type=float, lo=0, hi=1),
        man_init=Opt("random", "MAN EMA/LB copies start random (official) or as copies of the tracked block (ours)",
                     choices=("random", "copy")))

    @classmethod
    def adjust_ends(cls, ends, opts):
        return merge_stem(ends)                             # the stem always runs in front of module 1

    @classmethod
    def check(cls, net, opts):
        if family(net.arch) == "vit" and any(e + 2 > f for e, f in zip(net.ends, net.ends[1:])):
            raise UserError(f"--method man on a ViT copies the next group's first 2 blocks: every module after the "
                            f"first needs at least 2 blocks (split {net.ends})")

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        # B_{k+1}, the first unit of module k+1: what each boundary copies and reads after its backward (section 9
        # sends a pipeline stage the weights of the next stage's first unit for that).
        self.tracked = [e + 1 for e in net.ends[:-1]]
        super().__init__(net, opts, num_classes, shapes=[net.unit_shapes[u] for u in self.tracked],
                         r=stage_positions([net.stage(u) for u in self.tracked], opts.K), init=init)
        self.decay, self.vit = opts.ema_decay, family(net.arch) == "vit"
        reinit = our_init(net.arch) if family(net.arch) else None
        copies = lambda shift: nn.ModuleList([fresh_copy(net.units[u + shift], opts.man_init, reinit)
                                              for u in self.tracked])
        self.ema, self.lb = copies(0), copies(0)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        if self.vit:                                        # MAN++ on ViTs: the second block's copy, and s_k
            self.lb2, self.fuse = copies(1), nn.ModuleList([Fusion() for _ in self.tracked])

    def local_loss(self, k, h, batch):
        if self.vit:
            return self.base.local_loss(k, self.lb2[k](self.fuse[k](self.lb[k](h), self.ema[k](h))), batch)
        return self.base.local_loss(k, self.lb[k](h) + self.ema[k](h), batch)

    def backward(self, net, k, loss, h_in, h):
        if self.vit and k < self.K - 1:                     # (reproduced: before the backward, on ViTs)
            ema_update(self.ema[k], net.units[self.tracked[k]], self.decay)
        super().backward(net, k, loss, h_in, h)

    def after_backward(self, net, k):
        super().after_backward(net, k)
        if k < self.K - 1 and not self.vit:
            ema_update(self.ema[k], net.units[self.tracked[k]], self.decay)

    def parts(self, k):
        return super().parts(k) + [self.ema[k], self.lb[k]] + ([self.fuse[k], self.lb2[k]] if self.vit else [])

    def summary(self):
        fused = f"; fusion s {' '.join(f'{float(f.s.detach()):.3f}' for f in self.fuse)}" if self.vit else ""
        return super().summary() + f"; EMA decay {self.decay}" + fused

# MLAAN's leap chains (its configAuxPlus_new tables; ImageNet: ImageNet/networks/configAux_new.py): for
# boundary i, the backbone blocks ("stage.block") whose copies form the aux network, keyed by (arch, modules
# actually built). Written as (repeat, chain) runs.
MLAAN_CHAINS = {
    ("resnet32", 15): [(2, "2.0 3.0 3.2 3.4"), (1, "2.0 3.0 3.3 3.4"), (1, "2.0 3.0 3.2 3.4"), (1, "2.0 3.0 3.3 3.4"),
                       (5, "3.0 3.2 3.3 3.4"), (1, "3.1 3.2 3.4"), (1, "3.2 3.3 3.4"), (1, "3.3 3.4"), (1, "3.4")],
    ("resnet32", 8): [(2, "2.0 3.0 3.2 3.4"), (1, "2.0 3.0 3.3 3.4"), (2, "3.0 3.2 3.3 3.4"), (1, "3.2 3.3 3.4"),
                      (1, "3.3 3.4")],
    ("resnet110", 32): [(11, "2.0 3.0 3.2 3.17"), (10, "3.0 3.2 3.3 3.17"), (1, "3.0 3.3 3.4 3.17"), (4, "3.8 3.17"),
                        (2, "3.14 3.17"), (1, "3.15 3.17"), (1, "3.16 3.17"), (1, "3.17")],
    ("resnet110", 54): [(18, "2.0 3.0 3.2 3.17"), (17, "3.0 3.2 3.3 3.17"), (1, "3.0 3.3 3.4 3.17"), (7, "3.8 3.17"),
                        (4, "3.14 3.17"), (2, "3.15 3.17"), (3, "3.16 3.17"), (1, "3.17")],
    ("resnet34", 16): [(3, "2.0 2.1 3.0 4.0 4.2"), (4, "2.1 3.0 4.0 4.2"), (6, "3.1 4.0 4.1"), (1, "4.1 4.1 4.2"),
                       (1, "4.1 4.2")],
    ("resnet101", 33): [(3, "2.0 3.0 4.0 4.2"), (4, "3.0 4.0 4.1"), (23, "4.0 4.1"), (2, "4.1 4.2")],
}


class MLAANDGL(DGL):
    """MLAAN's DGL base (resnetDGLbin.py): DGL's cross-entropy on the MAN group's head, MLAANDGLAux."""

    def make_aux(self, net, k, shape, num_classes):
        return MLAANDGLAux(shape[0], num_classes)


class MLAANImageNetGreedy(Greedy):
    """MLAAN's independent heads on ImageNet (auxnet34.py, auxnet101.py): Greedy's cross-entropy on MLAANImageNetAux."""

    def make_aux(self, net, k, shape, num_classes):
        return MLAANImageNetAux(shape[0], num_classes)


# MLAAN's bases, as its official files build them: (method of the independent heads, the options it changes for
# them, method of the cascade heads). The InfoPro file's independent classifier is always 1c2f SupCon (kept).
MLAAN_BASES = {"greedy": (Greedy, {}, Greedy), "dgl": (MLAANDGL, {}, MLAANDGL),
               "infopro": (InfoPro, dict(aux_config="1c2f", local_loss="contrast"), InfoPro)}


@register
class MLAAN(LocalMethod):
    """MLAAN, Multilaminar Leap Augmented Auxiliary Network (Zhang et al., AAAI 2025, arXiv 2406.16633; official
    code Wendy231015/MLAAN). Three parts per boundary i (loss only for i >= D-1, D = cascade depth):

    1. independent aux net ("local" features): a head on module i's own output x_i = E_i(sg(x_{i-1}));
    2. cascade aux net ("global" features): the last D modules are re-run from the detached input of module
       i-D+1, y = E_i(...E_{i-D+1}(sg(x_{i-D}))) (same values as x_i, but its graph reaches D-1 modules back --
       the "multilaminar" coupling; nothing reaches further), then the leap chain, then a head. The first
       cascade (i = D-1) starts from the stem's output, graph included: the stem runs once per iteration;
    3. Leap Augmented Module: the leap chain is trainable copies of a few hand-picked later blocks
       (MLAAN_CHAINS), always ending with the last block; its first block runs as Aug(y) + EMA(y), EMA being a
       copy updated  ema <- m ema + (1 - m) block  (parameters only), like MAN's.

        L_i = 0.001 * loss_base(indep head(x_i)) + 0.999 * loss_base(cascade head(chain(y)))
        L_last = CE(FC(GAP(y_last)))   (the last module's loss also goes through the cascade)

    The heads and loss_base are the base method's, as the official files build them (MLAAN_BASES): greedy =
    resnetMLAAN.py, the model the official train.py builds (D = 2); dgl = resnetDGLbin.py (D = 3); infopro =
    resnetInfoProbin.py (decoder + classifier on both branches, D = 3; loss weights interpolated over
    r_i = s_i / (M - 2), s_i = stage of module i's last block, M = modules built; lambdas 5, 0.5, 0, 0). ImageNet
    (ResNet-34 K=16, ResNet-101 K=33; its resnet34.py, resnet101.py): the greedy base only, that code's independent
    heads (MLAANImageNetAux), D = 3, random copies, every boundary's EMA updated after its backward and the last
    again at the end (--mlaan-ema all+last), L_last = 0.001 CE(FC(x_last)) + 0.999 CE(FC(y_last)). Defaults:
    EMA decay 0.995 (the official default 1.0 freezes the EMA), --mlaan-ema last (the official CIFAR code; `all`
    = the paper), copies frozen on greedy/dgl and SGD-trained on infopro (each official file). Only the parts
    that are used are built (the official constructors also build hundreds of dead heads); the released ResNet-34
    code zero-initialises every block's last BN by accident (a deleted `if`): not reproduced."""
    name = "mlaan"
    protocol = "mlaan"
    bases, default_base = ("infopro", "dgl", "greedy"), "greedy"   # greedy: the model the official train.py builds
    base_defaults = {"greedy": dict(mlaan_depth=lambda c: 3 if family(c.arch) == "imagenet" else 2,
                                    mlaan_copies="frozen"),
                     "dgl": dict(mlaan_depth=3, mlaan_copies="frozen"),
                     "infopro": dict(mlaan_depth=3, mlaan_copies="trained", aux_config="1c2f",
                                     local_loss="cross_entropy", lambdas=((5, 0.5, 0, 0), "MLAAN README command"))}
    options = dict(
        ema_decay=MAN.options["ema_decay"],
        mlaan_ema=Opt(lambda c: "all+last" if family(c.arch) == "imagenet" else "last",
                      "MLAAN: EMA-update only the last boundary's copy after the final backward (official CIFAR "
                      "code, the default there), every one after its own backward (the paper), or both (official "
                      "ImageNet code, the default there); none: no EMA branch at all (an ablation)",
                      choices=("last", "all", "all+last", "none")),
        mlaan_depth=Opt(None, "MLAAN: modules re-run by the cascade branch (default: 2 on greedy, 3 on dgl/infopro "
                        "and on ImageNet)", type=int, lo=1),
        mlaan_copies=Opt(None, "MLAAN: EMA copies frozen (official greedy/dgl files) or also SGD-trained (official "
                         "InfoPro file, which never freezes them; its default)", choices=("frozen", "trained")))
    W_INDEP, W_CASCADE = 0.001, 0.999
    imagenet_protocol = dict(batch_size=128, lr=0.05, epochs=150)
    eager_only = "MLAAN's cascade, which re-runs earlier modules from state kept between module steps,"
    crosses_modules = "MLAAN's cascade backpropagates into the previous modules"

    @classmethod
    def adjust_ends(cls, ends, opts):
        return merge_stem(ends)        # reproduced: the stem trains with module 1 (ResNet-32 K=16 -> 15 modules)

    @classmethod
    def check(cls, net, opts):
        if family(net.arch) == "vit":
            raise UserError("--method mlaan: its leap chains and cascade are tables of ResNet blocks (the official "
                            "code has no ViT); on ViTs use man, auglocal, dgl, greedy or sgr")
        if (net.arch, net.K) not in MLAAN_CHAINS:
            raise UserError(f"--method mlaan: leap tables exist for resnet32 K=8,16, resnet110 K=32,55, resnet34 "
                            f"K=16 and resnet101 K=33 (got {net.arch or 'a custom backbone'} K={opts.K})")
        if not opts.mlaan_depth <= net.K - 1:
            raise UserError(f"--mlaan-depth {opts.mlaan_depth}: between 1 and the number of modules - 1 ({net.K - 1})")
        if family(net.arch) == "imagenet" and opts.chain[-1] != "greedy":
            raise UserError("--method mlaan on ImageNet ResNets: the official ImageNet code has CE heads only; "
                            "use --base greedy")
        if getattr(opts, "dgl_head", "dgl") != "dgl":
            raise UserError("--dgl-head: MLAAN's DGL base always uses the MAN group's head (MLAANDGLAux)")

    def __init__(self, net, opts, num_classes):
        super().__init__(net, opts, num_classes, shapes=[])
        M, self.depth, self.base_name = net.K, opts.mlaan_depth, opts.chain[1]
        self.first = self.depth - 1                         # reproduced: no loss before boundary D-1
        self.imagenet = family(net.arch) == "imagenet"
        self.decay, self.ema_mode = opts.ema_decay, opts.mlaan_ema
        pos = {unit_position(net.arch, u): u for u in range(len(net.units))}
        chains = [[pos[tuple(map(int, b.split(".")))] for b in c.split()] for n, c in MLAAN_CHAINS[(net.arch, M)]
                  for _ in range(n)]
        live = range(self.first, M - 1)
        self.chain_units = {i: chains[i] for i in live}
        # CIFAR: built after the backbone's init and not re-initialised, so the copies start equal to the current
        # blocks. ImageNet: built before the init loop there, so every copy is random and independent.
        dup = fresh_copy if self.imagenet else copy.deepcopy
        self.aug = nn.ModuleDict({str(i): nn.Sequential(*[dup(net.units[u]) for u in chains[i]]) for i in live})
        self.ema = nn.ModuleDict({str(i): dup(net.units[chains[i][0]]) for i in live if self.ema_mode != "none"})
        for p in self.ema.parameters():   # (the official InfoPro file never freezes its "EMA" copies: SGD trains
            p.requires_grad_(opts.mlaan_copies == "trained")       # them too, the last one also EMA-blended)
        # The heads of boundary i, as its base method builds and scores them: on module i's own output, and on the
        # leap chain's (the last block's shape). Both sets are initialised once both exist, as the official code.
        local, changes, cascade = MLAAN_BASES[self.base_name]
        local = MLAANImageNetGreedy if self.imagenet else local
        r = stage_positions([net.stage(e) for e in net.ends[:-1]], M)
        at_live = lambda shape: [shape(i) if i in live else None for i in range(M - 1)]
        self.local = local(net, argparse.Namespace(**{**vars(opts), **changes}), num_classes,
                           at_live(lambda i: net.unit_shapes[net.ends[i]]), r, init=False)
        self.cascade = cascade(net, opts, num_classes, at_live(lambda i: net.unit_shapes[-1]), r, init=False)
        init_weights(self.local.aux)
        init_weights(self.cascade.aux)
        self.inputs, self.stem_out = [], None

    def forward(self, net, k, h_in, batch):
        """Module k's forward and loss; the inputs of the last D modules are kept, for the cascade to re-run."""
        last = k == self.K - 1
        self.inputs = (self.inputs[-(self.depth - 1):] if k and self.depth > 1 else []) + [h_in]
        # The modules before the first boundary with a loss do not use their own graph (the cascade re-runs
        # them), nor does the last one on CIFAR (its loss is the cascade's): forward without one, saving memory.
        with torch.set_grad_enabled(self.first <= k < self.K - 1 or (self.imagenet and last)):
            if k == 0:
                with torch.enable_grad():                  # the stem runs once, and keeps its graph for the
                    self.stem_out = net.units[0](h_in)     # first cascade (the official `y = clone(stem(x))`)
                h = self.stem_out
                for u in net.units[1:net.bounds[0][1]]:
                    h = u(h)
            else:
                h = net.run(h_in, k)
        if last:
            logits = net.head(self._cascade(net, k))        # the official last loss uses the cascade chain
            loss = F.cross_entropy(logits, batch.y)
            if self.imagenet:                               # ImageNet code: plus 0.001 x the module's own path
                loss = self.W_INDEP * F.cross_entropy(net.head(h), batch.y) + self.W_CASCADE * loss
            return h, loss, logits
        if k < self.first:
            return h, fp32(h.new_zeros(())), None
        key = str(k)
        y = self._cascade(net, k)
        aug = self.aug[key]
        u = aug[0](y) + self.ema[key](y) if key in self.ema else aug[0](y)
        for blk in list(aug)[1:]:
            u = blk(u)
        l_x, _ = self.local.local_loss(k, h, batch)
        l_y, logits = self.cascade.local_loss(k, u, batch)
        return h, self.W_INDEP * l_x + self.W_CASCADE * l_y, logits

    def _cascade(self, net, k):
        """Re-run modules k-D+1..k from the detached input of the first one (same values, longer graph); from
        the stem's output when the first one is module 0."""
        j0 = k - len(self.inputs) + 1
        y, start = (self.stem_out, 1) if j0 == 0 else (self.inputs[0], net.bounds[j0][0])
        for u in net.units[start:net.bounds[k][1]]:
            y = u(y)
        if j0 == 0:
            self.stem_out = None                           # (its graph is consumed by this loss's backward)
        return y

    def after_backward(self, net, k):
        # Reproduced: the official CIFAR code updates only the LAST boundary's EMA, after the final backward
        # (--mlaan-ema last); `all` updates every boundary's EMA once, after its own backward, as the paper says.
        last = self.K - 1
        every = [k] if k < last and self.ema_mode not in ("last", "none") else []
        at_end = [last - 1] if k == last and self.ema_mode in ("last", "all+last") else []
        for i in every + at_end:
            if str(i) in self.ema:
                ema_update(self.ema[str(i)], net.units[self.chain_units[i][0]], self.decay)

    def parts(self, k):
        key = str(k)
        return [] if k < self.first else \
            [self.aug[key], *([self.ema[key]] if key in self.ema else []), self.local.aux[k], self.cascade.aux[k]]

    def describe(self, net, k):
        shape = net.unit_shapes[net.ends[k]]
        if k < self.first:
            return shape, "(no loss: trained by the next modules' cascade)"
        return shape, "leap " + ",".join(net.unit_name(u) for u in self.chain_units[k])

    def summary(self):
        s = f"base {self.base_name}, cascade depth {self.depth}, EMA decay {self.decay} ({self.ema_mode})"
        return s + (f"; lambdas {self.local.lambdas_all} [{self.local.lambda_source}]"
                    if self.base_name == "infopro" else "")


def sgr_distance(a, b, kind):
    """Distance between module j's input gradient a and the previous module's output gradient b (B x ...).

    Batch-size invariant (our choice; the paper's constants were not available): a mean-reduced loss gives every
    sample's gradient a 1/B factor, so both are multiplied by B (per-sample-loss gradients) and the distance is
    averaged over samples:  sq_l2 = mean_i ||a_i - b_i||^2,  l2 = mean_i ||a_i - b_i||,
    cos = mean_i (1 - cos(a_i, b_i)).
    Computed in (at least) fp32."""
    B = a.shape[0]
    a, b = fp32(a).flatten(1) * B, fp32(b).flatten(1) * B
    if kind == "cos":
        return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()
    sq = (a - b).pow(2).sum(1)
    return sq.mean() if kind == "sq_l2" else (sq + 1e-12).sqrt().mean()


def math_attention():
    """Scaled-dot-product attention on its math kernel: the one with a double backward, and the one whose matrix
    products torch's FlopCounterMode counts on every device (it does not know the CPU's fused kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def sgr_term(loss, h_in, target, kind):
    """D(dL/dh_in, target) with the input gradient kept differentiable (double backward), so that D trains the
    module (backbone and aux net) that produced `loss`; `target` is a constant."""
    a, = torch.autograd.grad(loss, h_in, create_graph=True)
    return sgr_distance(a, target, kind)


@register
class SGR(AddOn):
    """SGR, Successive Gradient Reconciliation (Yang et al., "Towards Interpretable Deep Local Learning with
    Successive Gradient Reconciliation", ICML 2024). No official code exists; README "Fidelity notes" lists what
    the paper states and what is our choice.

    Module j's loss gains a term that reconciles its input gradient with the gradient module j-1 trained on:

        L_j  <-  L_j + lambda * D( a_j, b_{j-1} ),   a_j = dL_j / dh_{j-1}  (double backward: trains module j),
                                                     b_{j-1} = dL_{j-1} / dh_{j-1}  (handed forward, a constant)
    for every module j >= 2, the last one included; module 1 has none. Nothing flows into module j-1, so gradient
    isolation holds. Our defaults (the paper's constants were not available): lambda = --sgr-weight 0.1,
    D = --sgr-distance sq_l2 on batch-scaled gradients (sgr_distance), b from the plain local loss
    (--sgr-target plain). Cost: one extra backward through module j, and module j's graph is kept for it."""
    name = "sgr"
    # Not MLAAN: its losses reach the module's input through the cascade re-run, not through h_{j-1}.
    bases, default_base = ("greedy", "dgl", "predsim", "infopro", "auglocal", "man"), "infopro"
    vit_base = "man"        # on ViTs: MAN++'s aux net (copies of the next group's first 2 blocks, LN, Linear on CLS)
    eager_only = "SGR's double backward"
    double_backward = True
    carried = ("target",)                                   # b_{j-1}, handed from module j-1's step to module j's
    options = dict(
        sgr_weight=Opt(0.1, "SGR: weight lambda of the reconciliation term", type=float, lo=0),
        sgr_distance=Opt("sq_l2", "SGR: distance between the two gradients (on per-sample, batch-scaled gradients)",
                         choices=("sq_l2", "l2", "cos")),
        sgr_target=Opt("plain", "SGR: b_j is the gradient of module j's plain local loss, or of the loss with its "
                       "own term", choices=("plain", "regularised")))

    @classmethod
    def check(cls, net, opts):
        if opts.amp == "fp16":
            raise UserError("--method sgr: double backward under fp16 loss scaling is not supported; use --amp bf16")
        if opts.sync_bn:
            raise UserError("--sync-bn with SGR: SyncBatchNorm's backward cannot be differentiated again (SGR's "
                            "double backward); drop --sync-bn")

    def __init__(self, net, opts, num_classes, shapes=None, r=None, init=True):
        super().__init__(net, opts, num_classes, shapes, r, init)
        self.weight, self.kind, self.plain_target = opts.sgr_weight, opts.sgr_distance, opts.sgr_target == "plain"
        self.target = None

    def forward(self, net, k, h_in, batch):
        if k == 0:
            self.target = None                              # module 1 has no predecessor
        h_in.requires_grad_(k > 0 and self.target is not None)
        # The double backward needs every op of the module and its aux net to be twice differentiable: attention
        # runs on PyTorch's math kernel here (the fused CPU/GPU kernels have no double backward).
        with math_attention():
            return super().forward(net, k, h_in, batch)

    def backward(self, net, k, loss, h_in, h):
        if not loss.requires_grad:
            self.target = None
            return
        total = loss
        if k > 0 and self.target is not None and h_in.requires_grad:
            total = loss + self.weight * sgr_term(loss, h_in, self.target, self.kind)
        if k < self.K - 1:                                  # b_k, handed to module k+1 (detached)
            self.target = torch.autograd.grad(loss if self.plain_target else total, h, retain_graph=True)[0]
        self.base.backward(net, k, total, h_in, h)

    def summary(self):
        return f"lambda {self.weight}, {self.kind}, target {'plain' if self.plain_target else 'regularised'}; " + \
            super().summary()


# ---- putting a method together: chains, options, attach -------------------------------------------------------
# `attach(net, "sgr", base="man+dgl", sgr_weight=0.2)` is how a user's script builds a method, and the command
# line does the same in two steps (resolve_config, then build_method): the chain of methods is validated, its
# options are resolved (the one place where their defaults live), the split is adjusted where a method requires
# it, and the method is built on the net's dry-run shapes.

CONTEXT = dict(dataset=None, arch=None, K=None, balanced_memory=False, amp="none", sync_bn=False)  # option defaults
                                                                                                   # may read these


def method_chain(method, base=None, arch=None):
    """The method and its bases, outermost first: ("sgr", "man+dgl") -> ["sgr", "man", "dgl"]. An add-on without a
    base gets its default one (on ViTs its `vit_base`); each link must accept the next as its base."""
    if method not in METHODS:
        raise UserError(f"unknown method {method} (one of {', '.join(sorted(METHODS))})")
    given, chain = (base.split("+") if base else []), [method]
    while METHODS[chain[-1]].bases:
        cls = METHODS[chain[-1]]
        nxt = given.pop(0) if given else cls.vit_base if arch in VITS and cls.vit_base else cls.default_base
        if nxt not in METHODS:
            raise UserError(f"--base {base}: unknown method {nxt}")
        if nxt not in cls.bases:
            raise UserError(f"--method {cls.name} composes with --base {', '.join(cls.bases)}; not {nxt}")
        chain.append(nxt)
    if given:
        wrappers = ", ".join(n for n, c in METHODS.items() if c.bases)
        raise UserError(f"--base applies to add-on methods only ({wrappers}); {chain[-1]} takes no base "
                        f"(got --base {base} with --method {method})")
    return chain


def all_options():
    """Every method option (name -> Opt), each declared once by the method that introduces it."""
    out = {}
    for cls in METHODS.values():
        for name, o in cls.options.items():
            out.setdefault(name, o)
    return out


def option_flags():
    """The names of the method options that are command-line flags (and keywords of `attach`)."""
    return [name for name, o in all_options().items() if o.help is not None]


def method_options(chain, given, **context):
    """Resolve every option of the methods in `chain`, in one place: the value given (None = not given), else
    what the nearest add-on above sets for its base (`base_defaults`), else the option's own default (which may
    depend on the context: dataset, arch, nominal K, ...). Returns a Namespace with the context, the chain and
    every option; `lambdas` holds ((ixx_1, ixy_1, ixx_2, ixy_2), where they came from)."""
    classes = [METHODS[n] for n in chain]
    declared = {}
    for c in classes:
        for name, o in c.options.items():
            declared.setdefault(name, o)
    wrong = [n for n, v in given.items() if v is not None and (n not in declared or declared[n].help is None)]
    if wrong:
        owners = [m for m, c in METHODS.items() if wrong[0] in c.options]
        raise UserError(f"--{wrong[0].replace('_', '-')} does not apply to {'+'.join(chain)}"
                        + (f" (it is an option of {', '.join(owners)})" if owners else " (no method has it)"))
    opts = argparse.Namespace(**{**CONTEXT, **context}, chain=tuple(chain))
    for name, o in declared.items():
        value = given.get(name)
        if value is None:
            value = next((c.base_defaults[b][name] for c, b in zip(classes, chain[1:])
                          if name in c.base_defaults.get(b, {})), o.default)
            value = value(opts) if callable(value) else value
        o.check(name, value)
        setattr(opts, name, value)
    if "lambdas" in declared:   # weight flags given on the command line override single entries of the default
        opts.lambdas = resolve_lambdas([getattr(opts, n) for n in LAMBDA_NAMES], *opts.lambdas)
    return opts


def build_method(net, opts, num_classes):
    """Build the method chain of `opts` for `net`, whose split is first changed where a method requires it (MAN and
    MLAAN merge a stem-alone module into module 1, AugLocal's last module takes the final d + 1 units)."""
    ends = list(net.ends)
    for name in reversed(opts.chain):                      # the innermost base first
        ends = METHODS[name].adjust_ends(ends, opts)
    if ends != net.ends:
        net.set_split(ends)
    for name in opts.chain:
        METHODS[name].check(net, opts)
    return METHODS[opts.chain[0]](net, opts, num_classes)


def attach(net, method, base=None, num_classes=None, **options):
    """Build `method` (with `base` for add-ons, e.g. attach(net, "man", base="dgl")) for the LocalNet `net`.

    Options are keyword arguments named like the command-line flags (ema_decay=0.99, aux_depth=3, ...); one that
    does not apply to this method chain is an error. The context keywords dataset, K (the nominal K),
    balanced_memory and amp pick published defaults where there are some (InfoPro's lambdas). num_classes
    defaults to the width of the net's head. Returns the method (an nn.Module holding the aux nets)."""
    context = {k: options.pop(k) for k in list(options) if k in CONTEXT and k != "arch"}
    context = dict(context, arch=net.arch, K=net.K if context.get("K") is None else context["K"])
    opts = method_options(method_chain(method, base, net.arch), options, **context)
    return build_method(net, opts, num_classes or net.num_classes)

# =============================================================================================================
# 6. Memory meter
# =============================================================================================================
# On every device we count the bytes autograd keeps for backward, via saved-tensor hooks: each saved tensor is
# wrapped in a small object that adds its storage's size on creation and subtracts it when autograd drops it
# (after that module's backward). Storages are deduplicated (a tensor saved by three ops counts once) and
# parameters are excluded (they are reported separately, with gradients and optimizer state). The peak of this
# count is the activation memory that local learning reduces.

class _Held:
    __slots__ = ("t", "key", "meter")

    def __init__(self, t, key, meter):
        self.t, self.key, self.meter = t, key, meter

    def __del__(self):
        self.meter._release(self.key)


class ActivationMeter:
    def __init__(self, params):
        self.param_keys = {self._key(p) for p in params}
        self.live, self.current, self.peak = {}, 0, 0

    @staticmethod
    def _key(t):
        return (t.device.type, t.device.index, t.untyped_storage().data_ptr())

    def _pack(self, t):
        key = self._key(t)
        if key in self.param_keys:
            return t
        n, size = self.live.get(key, (0, t.untyped_storage().nbytes()))
        if n == 0:
            self.current += size
            self.peak = max(self.peak, self.current)
        self.live[key] = (n + 1, size)
        return _Held(t, key, self)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def _release(self, key):
        n, size = self.live[key]
        if n == 1:
            del self.live[key]
            self.current -= size
        else:
            self.live[key] = (n - 1, size)

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def state_bytes(params, opt):
    """Bytes of parameters, their gradients and the optimizer state (momentum buffers). Gradients: one per trainable
    parameter, as at the optimizer step (zero_grad(set_to_none) frees them between steps, so .grad may be None)."""
    params = list(params)
    p = sum(t.numel() * t.element_size() for t in params)
    g = sum(t.numel() * t.element_size() for t in params if t.requires_grad)
    o = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return dict(param_bytes=p, grad_bytes=g, opt_state_bytes=o)


MiB = 2 ** 20


# =============================================================================================================
# 7. Training: the step and the epoch
# =============================================================================================================

def make_optimizer(params, lr, wd, kind="sgd"):
    """The one optimizer of backbone and aux nets, weight decay on every parameter as in the originals: SGD with
    Nesterov momentum 0.9 (the ResNet codes), or AdamW with betas (0.9, 0.999) and eps 1e-8 (the ViT code). The
    fused implementation where this PyTorch has one for the device -- one kernel for all parameters instead of a
    loop over them, measured faster (README, Results) -- else foreach."""
    cls, kw = (torch.optim.SGD, dict(momentum=0.9, nesterov=True)) if kind == "sgd" else \
        (torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-8))
    try:
        return cls(params, lr=lr, weight_decay=wd, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=lr, weight_decay=wd, foreach=True, **kw)


def lr_at(epoch, lr0, epochs, warmup, schedule="cifar"):
    """Per-epoch cosine with linear warm-up, lr constant within an epoch (epoch = 1..E).
    CIFAR codes (`--cos_lr`): c_e = lr0/2 (1 + cos(pi e / E)); for e <= W, lr_e = c_e (e-1)/W + 0.01 (W+1-e)/W.
    Reproduced quirks: epoch 1 starts at 0.01 whatever lr0 is, and the last epoch runs at lr = 0.
    ImageNet codes: c_e = lr0/2 (1 + cos(pi (e-1) / E)) -- counted from 0: the first epoch at lr0 -- and no
    warm-up (W = 0 is their default here)."""
    c = 0.5 * lr0 * (1 + math.cos(math.pi * (epoch if schedule == "cifar" else epoch - 1) / epochs))
    if epoch <= warmup:
        return c * (epoch - 1) / warmup + 0.01 * (warmup + 1 - epoch) / warmup
    return c


@dataclass
class Step:
    """How the training step runs around the math: mixed precision (an autocast context, a GradScaler for fp16),
    compiled modules (--compile: k -> module k's compiled forward and loss), and functions called with k before
    module k's backward and once its gradients are final (section 9: a pipeline stage fetches the weights MAN's
    EMA reads; data parallelism starts its gradient all-reduce)."""
    autocast: object = field(default_factory=contextlib.nullcontext)
    scaler: object = field(default_factory=lambda: torch.amp.GradScaler(enabled=False))
    compiled: dict = None
    after_module: object = None
    before_backward: object = None


def module_parts(net, method, k):
    """What module k's loss trains: its backbone units and its aux nets (the last module: the network's head)."""
    a, b = net.bounds[k]
    return [*net.units[a:b], *(method.parts(k) if k < net.K - 1 else [net.head])]


def run_modules(net, method, batch, h, modules, step):
    """Forward -> loss -> backward of `modules` (consecutive indices), module by module, starting from their input
    h. Returns the last module's output (detached) and each module's loss and correct count (on the device).

    Module k's graph is freed by its backward before module k+1's forward: that is where the memory saving comes
    from. Summing the local losses and calling backward once would keep every module's activations alive."""
    losses, correct = [], []
    for k in modules:
        h_in = h.detach()
        with step.autocast:
            h, loss, logits = step.compiled[k](h_in, batch) if step.compiled else method(net, k, h_in, batch)
        if step.before_backward is not None:
            step.before_backward(k)
        method.backward(net, k, step.scaler.scale(loss), h_in, h)
        # What the originals backpropagate as 0 * loss (a term, or a whole local loss, whose weight is 0) still
        # gets a zero gradient here, without the work: weight decay and momentum keep moving those parameters.
        if k < net.K - 1:
            for p in (p for part in module_parts(net, method, k) for p in part.parameters()):
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        if step.after_module is not None:
            step.after_module(k)
        method.after_backward(net, k)
        losses.append(loss.detach().float())
        correct.append((logits.argmax(1) == batch.y).sum().float() if logits is not None else
                       torch.full((), -1.0, device=batch.y.device))
    return h.detach(), losses, correct


def forward_backward(net, method, batch, scaler=None, autocast=None, on_module_done=None, compiled=None):
    """One iteration's forward and backward passes, module by module (the caller zeroes the gradients before and
    steps the optimizer after). Returns on-device stats [final loss, final correct, local loss_0..K-2, local
    correct_0..K-2] (correct = -1 where a loss has no logits). `scaler` (a GradScaler, for fp16), `autocast` (a
    torch.autocast context), `on_module_done(k)` and `compiled` (compile_modules) are optional."""
    step = Step(autocast or contextlib.nullcontext(), scaler or torch.amp.GradScaler(enabled=False), compiled,
                on_module_done)
    _, losses, correct = run_modules(net, method, batch, batch.x, range(net.K), step)
    return torch.stack([losses[-1], correct[-1]] + losses[:-1] + correct[:-1])


def train_step(net, method, opt, batch, step=None, meter=None):
    """One iteration: forward_backward (under the activation meter if given: metered iterations run eager, the
    meter's hooks count what eager autograd saves), then one SGD step for every module and aux net."""
    step = step or Step()
    opt.zero_grad(set_to_none=True)
    with meter if meter is not None else contextlib.nullcontext():
        s = forward_backward(net, method, batch, step.scaler, step.autocast, step.after_module,
                             step.compiled if meter is None else None)
    step.scaler.step(opt)
    step.scaler.update()
    return s


def use_channels_last(device, method):
    """NHWC memory format for the convolutions: faster on CUDA and, measured, on CPU (oneDNN kernels), except
    for a double backward (SGR) on CPU, which is slower in it."""
    double = any(m.double_backward for m in chain_of(method))
    return device.type == "cuda" or (device.type == "cpu" and not double)


def compile_modules(net, method, mode, device, backend="inductor"):
    """--compile: torch.compile of each module's forward and loss (the module, its aux net and its local loss in
    one graph, so that the backward through them is compiled too). Per module (not the whole step) because the
    step's loop and per-module backward calls are Python between the graphs; modules of the same shape share
    compiled code through the FX graph cache. Returns {k: callable}, or None (eager, with a printed line) for a
    method that cannot run compiled (`eager_only`). The activation meter's iterations (--mem-iters) run eager."""
    why = next((m.eager_only for m in chain_of(method) if m.eager_only), None)
    if why:
        print(f"--compile: {why} cannot run compiled; this run is eager", flush=True)
        return None
    if mode == "reduce-overhead" and device.type != "cuda":
        raise UserError("--compile reduce-overhead uses CUDA graphs: CUDA only (use --compile default)")
    cfg = torch._dynamo.config   # one cache entry per module (and batch shape), raised only around these calls
    limit = cfg.patch(cache_size_limit=max(cfg.cache_size_limit, 4 * net.K))
    mode = None if mode == "default" else mode
    return {k: limit(torch.compile(functools.partial(method.forward, net, k), mode=mode, backend=backend))
            for k in range(net.K)}


def check_finite(loss, epoch, it=None):
    if not math.isfinite(loss):
        where = f"epoch {epoch}" + (f", iteration {it + 1}" if it is not None else "")
        raise UserError(f"training loss became {loss} at {where}; lower --lr (or use --amp none)")


class _NoModuleTracking:
    """FlopCounterMode without its attribution of FLOPs to modules: all of them count as "Global". (Its module
    tracker hooks every module input, and those hooks fail inside an autograd.grad -- SGR's double backward.)"""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Trainer:
    """A run on one device: every batch, the whole model, one optimizer -- what the one training loop (`fit`,
    section 10) asks of a run. Section 9's data-parallel and pipelined runs are subclasses that change what
    differs: which batches and parameters a process owns, and how the processes combine their numbers."""
    world, rank = 1, 0            # processes in the run, and this one's index
    writes = True                 # this process writes --out and --save (of several processes, one does)
    note = ""                     # appended to progress lines

    def __init__(self, net, method, step, data, mem_iters=2, log_secs=30.0):
        self.net, self.method, self.step = net, method, step
        self.train_loader, self.test_loader = data
        self.mem_iters, self.log_secs = mem_iters, log_secs
        self.params = [*net.parameters(), *method.parameters()]
        self.device = next(net.parameters()).device
        self.norm = norm_tensors(self.train_loader.spec, self.device)

    def config(self):
        """What the config line adds about this run."""
        n = lambda m: sum(p.numel() for p in m.parameters())
        return dict(device=str(self.device), world_size=self.world, modules=self.net.K,
                    train_images=len(self.train_loader.labels), params_backbone=n(self.net), params_aux=n(self.method))

    def optimizer(self, lr, wd, kind="sgd"):
        return make_optimizer(self.params, lr, wd, kind)

    def clock(self):
        """Wall time once the device has done what it was given (and, section 9, every process has)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time()

    def train_epoch(self, opt, epoch, epochs, untimed=0, last=False, guard=None):
        """One epoch -- or its rest, when `guard` resumes one from a checkpoint taken in its middle. Its first
        `untimed` steps are not timed (--bench's warm-up). Statistics are summed on the device: host syncs happen
        only at progress lines, checkpoints and the end. Returns the row's training columns."""
        self.net.train()
        self.method.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        meter, n_iters = ActivationMeter(self.params), len(self.train_loader)
        saved = guard.resumed(epoch, self.rank) if guard is not None else None   # (a mid-epoch checkpoint's)
        order = saved["order"] if saved else self.train_loader.new_order()
        stats = saved["stats"].to(self.device) if saved else None
        start, seen, steps, done = (saved["step"], saved["seen"], saved["steps"], saved["secs"]) if saved else \
            (0, 0, 0, 0)
        meter.peak = saved["peak"] if saved else 0
        t0 = t_timed = last_log = self.clock()
        for it, (x, y) in enumerate(self.train_loader.epoch(order, start), start):
            if it == untimed and it:
                t_timed = self.clock()
            s = train_step(self.net, self.method, opt, Batch(x, y, *self.norm), self.step,
                           meter if it < self.mem_iters else None)
            s = torch.cat([s[:1] * len(y), s[1:2], s[2:]])
            stats = s if stats is None else stats + s
            seen, steps = seen + len(y), steps + 1
            if time.time() - last_log > self.log_secs and it + 1 < n_iters:
                last_log = time.time()
                loss = stats[0].item() / seen
                check_finite(loss, epoch, it)
                rate, eta = seen / (last_log - t0), (n_iters - it - 1) * (last_log - t0) / (it + 1 - start)
                print(f"  epoch {epoch}/{epochs} iter {it + 1}/{n_iters}  loss {loss:.4f}  {rate:.0f} img/s  "
                      f"eta {eta:.0f}s{self.note}", flush=True)
            if guard is not None:   # --save-every checkpoints, and a clean stop at SIGTERM/SIGINT/SIGUSR1
                mine = dict(stats=stats.cpu(), seen=seen, steps=steps, peak=meter.peak, secs=done + time.time() - t0)
                guard.after_step(self, opt, dict(epoch=epoch, step=it + 1, of=n_iters, order=order.cpu()), mine)
        secs = self.clock() - t_timed + done
        if stats is None:
            raise UserError("no training batch: the training set is smaller than 2 images per process")
        stats, seen = self.gather(stats, seen)
        s, K, cuda = stats.tolist(), self.net.K, self.device.type == "cuda"
        return dict(loss=s[0] / seen, train_acc=100.0 * s[1] / seen,
                    aux_acc=[None if c < 0 else 100.0 * c / seen for c in s[2 + (K - 1):]],
                    local_loss=[v / steps / self.world for v in s[2:2 + (K - 1)]], act_peak_bytes=meter.peak,
                    cuda_peak_alloc=torch.cuda.max_memory_allocated(self.device) if cuda else None,
                    cuda_peak_reserved=torch.cuda.max_memory_reserved(self.device) if cuda else None,
                    img_s=seen / secs, sec=secs, seen=seen, untimed_s=t_timed - t0)

    def agree(self, signum):
        """The signal this run stops at after this step (several processes: all of them, at the same step)."""
        return signum

    def per_process(self, mine):
        """A process's epoch accumulators, gathered from every process of the run (for a mid-epoch checkpoint)."""
        return [mine]

    def gather(self, stats, seen):
        """The epoch's summed statistics over the run's processes (one process: as they are)."""
        return stats, seen

    def evaluate(self):
        """Test accuracy (%) of the backbone and its head."""
        correct, n = self.gather(*evaluate(self.net, self.test_loader, self.step.autocast))
        return 100.0 * float(correct) / max(n, 1)

    def state(self, opt):
        return dict(net=self.net.state_dict(), method=self.method.state_dict(), opt=opt.state_dict(),
                    scaler=self.step.scaler.state_dict(), gen=self.train_loader.gen.get_state(),
                    cpu_rng=torch.get_rng_state())

    def load(self, ck, opt):
        self.net.load_state_dict(ck["net"])
        self.method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["opt"])
        self.step.scaler.load_state_dict(ck["scaler"])
        self.train_loader.gen.set_state(ck["gen"])
        torch.set_rng_state(ck["cpu_rng"])

    def save(self, path, meta, opt):
        """Write the checkpoint (one process of several writes it); whether it was written."""
        return atomic_save({**self.state(opt), **meta}, path) if self.writes else True

    header = f"{'act MiB':>8} {'cuda MiB':>8} {'img/s':>7} {'sec':>6}  aux acc% per module"

    def row_text(self, row):
        """The per-epoch row's columns after the accuracies (header: `header`)."""
        aux = " ".join("  -" if a is None else f"{a:3.0f}" for a in row["aux_acc"])
        cuda = f"{row['cuda_peak_alloc'] / MiB:8.0f}" if row["cuda_peak_alloc"] is not None else f"{'-':>8}"
        return f"{row['act_peak_bytes'] / MiB:8.1f} {cuda} {row['img_s']:7.0f} {row['sec']:6.1f}  {aux}"

    def result(self, history, ran, opt):
        """What the final JSON line adds about this run (`ran`: the epochs this process trained)."""
        last, secs = history[-1] if history else {}, sum(r["sec"] for r in ran)
        return dict(act_peak_bytes=max((h["act_peak_bytes"] for h in history), default=None),
                    cuda_peak_alloc=last.get("cuda_peak_alloc"), cuda_peak_reserved=last.get("cuda_peak_reserved"),
                    **state_bytes(self.params, opt), train_img_s=sum(r["seen"] for r in ran) / secs if secs else None)

    def flops_per_img(self):
        """FLOPs of one training step per image -- forward, every local backward, aux nets, a recomputation or a
        double backward where the method has one -- counted by torch's FlopCounterMode (2 per multiply-add) on one
        more batch, after the run's timed steps (its update is not applied). None where this process loads no data."""
        if self.train_loader is None:
            return None
        from torch.utils.flop_counter import FlopCounterMode
        x, y = next(iter(self.train_loader))
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _NoModuleTracking()         # (its per-module breakdown breaks autograd.grad: SGR)
        with counter, math_attention():
            forward_backward(self.net, self.method, Batch(x, y, *self.norm), self.step.scaler, self.step.autocast)
        self.net.zero_grad(set_to_none=True)
        self.method.zero_grad(set_to_none=True)
        return counter.get_total_flops() / len(y)

    def bench(self, row, opt):
        """What a --bench JSON line adds about this run."""
        out = dict(compiled=self.step.compiled is not None, warmup_s=round(row["untimed_s"], 2),
                   act_peak_bytes=row["act_peak_bytes"], act_peak_mib=round(row["act_peak_bytes"] / MiB, 2),
                   **state_bytes(self.params, opt))
        if self.device.type == "cuda":
            out.update(cuda_peak_alloc=row["cuda_peak_alloc"], cuda_peak_reserved=row["cuda_peak_reserved"])
        return out


# =============================================================================================================
# 8. Evaluation
# =============================================================================================================

@torch.no_grad()
def evaluate(net, loader, autocast=contextlib.nullcontext()):
    """What the test accuracy counts: the backbone and its final head only (aux nets are training scaffolding),
    BN in eval mode. Returns (correct, images): correct on the device, no host sync."""
    net.eval()
    correct, n = torch.zeros((), device=next(net.parameters()).device), 0
    for x, y in loader:
        with autocast:
            correct += (net(x).argmax(1) == y).sum()
        n += len(y)
    return correct, n

# =============================================================================================================
# 9. Distributed and pipelined execution (a single-device reader can skip this section)
# =============================================================================================================
# `torchrun --nproc_per_node=N local_learning.py ...` starts N processes; torch.distributed connects them (NCCL
# between GPUs, gloo on CPU), one device per rank. Two ways to use them, each a Trainer (section 7) of its own:
#
# Data parallelism (the default). Every rank holds the whole model and trains on its own part of each global
# batch (--batch-size stays the global batch); gradients are averaged over the ranks. Local learning makes
# module k's gradients final as soon as its own backward ends, so their all-reduce starts right then,
# asynchronously, and runs while the next modules compute; the optimizer step waits for all of them. (Whole-model
# DDP cannot do this: it hooks one backward through the whole network.) The result is the single-process update
# on the global batch, except where samples interact within a batch: BatchNorm statistics (per rank, as the
# originals' DDP; --sync-bn for SyncBatchNorm on CUDA), SupCon's and PredSim's batch-wise losses (per rank).
#
# Module parallelism (--pipeline, further below): rank s owns a contiguous group of modules and passes
# activations on to rank s+1, so all ranks compute at once on different batches.

class RankError(UserError):
    """A problem of one rank alone (e.g. its device): that rank reports it, where otherwise rank 0 speaks."""


@contextlib.contextmanager
def one_voice():
    """Under torchrun every rank runs this program; only rank 0 prints (errors still reach stderr)."""
    if os.environ.get("RANK", "0") == "0":
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


@contextlib.contextmanager
def own_process_group():
    """A run that joins a process group (join_torchrun) leaves it when it ends well: a barrier (no rank closes its
    connections while another still sends), then destroy_process_group -- while the interpreter is alive: a gloo
    thread that lets go of a Python tensor during interpreter shutdown aborts the process (pytorch/pytorch#179291),
    and NCCL warns about a group never destroyed. (That the group really goes: see the import at the top.) After
    an error the group is left as it is (a barrier with a dead rank would hang), and a group made before (a
    caller's) is the caller's to close."""
    ours = not (dist.is_available() and dist.is_initialized())
    yield
    if ours and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def join_torchrun(device, pipeline, sync_bn):
    """Join the process group of a torchrun launch of several processes; returns this rank's device. Returns
    None for one process: nothing changes."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if sync_bn or pipeline:
            raise UserError(f"{'--sync-bn' if sync_bn else '--pipeline'} needs several processes: launch with "
                            f"torchrun --nproc_per_node=N local_learning.py ...")
        return None
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run one process")
    local, kind = int(os.environ.get("LOCAL_RANK", "0")), pick_device(device).type
    if kind == "mps":
        raise UserError("torchrun on MPS is not supported (no torch.distributed backend); use --device cpu")
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise RankError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) on this node")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # torchrun --max-restarts keeps one store for every attempt (pytorch/pytorch#135712): a restarted rank can
        # read the address a dead rank of the previous attempt published and fail or hang connecting to it. Keys
        # under a prefix per attempt keep the attempts apart.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"local_learning/attempt_{attempt}", store))
    return torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")


def distributed_trainer(cfg, net, method, step, data, ck=None):
    """The Trainer of this rank of a torchrun launch: a pipeline stage (--pipeline) or a data-parallel rank.
    `data()` loads the (train, test) loaders; `ck`: the checkpoint being resumed."""
    if cfg.pipeline:
        return Pipeline(net, method, step, data, cfg.mem_iters, pipeline_cut(cfg, net, method, step, ck))
    world = dist.get_world_size()
    if cfg.batch_size < 2 * world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: at least 2 images per process "
                        f"(train-mode BatchNorm), i.e. >= {2 * world} for {world} processes")
    if cfg.sync_bn:
        kind = next(net.parameters()).device.type
        if kind != "cuda":
            raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm runs on NCCL only); this run uses "
                            f"{kind} with gloo")
        nn.SyncBatchNorm.convert_sync_batchnorm(net)
        nn.SyncBatchNorm.convert_sync_batchnorm(method)
    for t in [*net.state_dict().values(), *method.state_dict().values()]:   # every rank starts from rank 0's
        dist.broadcast(t, 0)
    return DataParallel(net, method, step, data(), cfg.mem_iters, cfg.log_secs)


def shard(n, rank, world):
    """This rank's contiguous part of a global batch of n samples (part sizes differ by at most one)."""
    return slice(rank * n // world, (rank + 1) * n // world)


class ShardedBatches(torch.utils.data.Sampler):
    """This rank's part of every batch of a batch sampler: each image is decoded by one rank only."""

    def __init__(self, batches, rank, world):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for idx in self.batches:
            part = idx[shard(len(idx), self.rank, self.world)]
            if part:            # (a rank's part of a small last evaluation batch can be empty)
                yield part


class Shards:
    """A loader as one data-parallel rank sees it: the same shuffled global batches on every rank (generators
    seeded alike), of which it keeps its own part -- on-device images are augmented with the draws of the whole
    global batch first, so every rank trains on exactly the images a single process would. `averager` learns each
    part's share n_r / N of its global batch."""

    def __init__(self, loader, rank, world, averager=None):
        self.loader, self.rank, self.world, self.averager = loader, rank, world, averager
        self.gen, self.spec, self.labels = loader.gen, loader.spec, loader.labels
        if isinstance(loader, HostLoader):
            loader.batches = ShardedBatches(loader.batches, rank, world)
        else:
            loader.least = 2 * world                        # train-mode BatchNorm: 2 images per rank

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self.epoch(self.new_order())

    def new_order(self):
        return self.loader.new_order()

    def epoch(self, order, start=0):
        n, bs = len(self.labels), self.loader.batch_size
        for it, (x, y) in enumerate(self.loader.epoch(order, start), start):
            N = min(bs, n - it * bs)                        # the global batch
            if not isinstance(self.loader, HostLoader):
                part = shard(N, self.rank, self.world)
                x, y = x[part], y[part]
            if self.averager is not None:
                self.averager.weight = len(y) / N
            yield x, y


class GradAverager:
    """Averages gradients over the ranks, one bucket per module, each all-reduce launched asynchronously as soon as
    the backward that makes those gradients final has ended (`module_done`, the step's after_module), and waited
    for after the last module's backward, before the optimizer step.

    Which gradients are final after which module's backward is learnt on the first step, from post-accumulate-
    grad hooks: usually a module's own parameters and its aux net, but MLAAN's cascade also reaches back into
    earlier modules, SGR's double backward into its module, etc. -- whatever the method does. Gradients of that
    first step are averaged at its end. Each rank's gradient is the mean over its n_r samples, so it is weighted
    by n_r / N (`weight`, set by Shards) before the sum: the result is the mean over the global batch of N, even
    when N is not a multiple of the world size."""

    def __init__(self, params, K):
        self.params, self.K, self.weight = [p for p in params if p.requires_grad], K, 1.0
        self.buckets, self.pending, self.last, self.current = None, [], {}, 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._seen) for p in self.params]

    def _seen(self, p):
        self.last[p] = self.current

    def module_done(self, k):
        self.current = k + 1
        if self.buckets is not None:
            self._launch(self.buckets.get(k, []))
        if k == self.K - 1:
            self._finish()

    def _launch(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads).mul_(self.weight)
            self.pending.append((dist.all_reduce(flat, async_op=True), flat, grads))

    def _finish(self):
        if self.buckets is None:           # first step: group the parameters by the module that finalises them
            for h in self.hooks:
                h.remove()
            self.buckets = {}
            for p in self.params:          # (gradients set without autograd -- zero gradients -- count as last)
                k = self.last.get(p, self.current - 1 if p.grad is not None else None)
                if k is not None:
                    self.buckets.setdefault(k, []).append(p)
            for k in sorted(self.buckets):
                self._launch(self.buckets[k])
            self.bucketed = {p for b in self.buckets.values() for p in b}
        else:   # a gradient that first appears after the first step (none of our methods): averaged here
            self._launch([p for p in self.params if p.grad is not None and p not in self.bucketed])
        for work, flat, grads in self.pending:
            work.wait()
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        self.pending, self.current = [], 0


class DataParallel(Trainer):
    """A data-parallel rank: its part of every global batch, gradients averaged as modules finish, epoch numbers
    summed over the ranks; rank 0 writes. BN running statistics are rank 0's, broadcast before every evaluation
    (what DDP's broadcast_buffers does), so that the ranks evaluate one model on their parts of the test set."""
    note = "  (rank 0)"

    def __init__(self, net, method, step, data, mem_iters, log_secs):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writes, self.averager = self.rank == 0, GradAverager([*net.parameters(), *method.parameters()], net.K)
        train, test = data
        data = Shards(train, self.rank, self.world, self.averager), test and Shards(test, self.rank, self.world)
        super().__init__(net, method, replace(step, after_module=self.averager.module_done), data, mem_iters,
                         log_secs if self.rank == 0 else math.inf)

    def sum(self, t):
        t = torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else t.dtype, device=self.device)
        dist.all_reduce(t)
        return t

    def gather(self, stats, seen):
        return self.sum(stats), int(self.sum(seen).item())

    def agree(self, signum):
        t = torch.tensor(float(signum or 0), device=self.device)   # (one number per step; any rank's signal)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def per_process(self, mine):
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def clock(self):
        super().clock()
        dist.barrier()
        return time.time()

    def evaluate(self):
        for b in self.net.buffers():
            dist.broadcast(b, 0)
        return super().evaluate()


# ---- module parallelism: --pipeline -----------------------------------------------------------------------------
# Gradient isolation means module k+1 never waits for module k's backward. With the modules cut into S stages on
# S ranks, rank s trains its modules on batch t while rank s+1 trains on batch t-1: every device works at once
# (DGL's "decoupled" training). Rank 0 loads and augments the data; each stage receives a batch's activation
# (and the input image and labels, which aux losses use) from rank s-1, runs forward -> local loss -> backward
# for its modules, sends its output on, and steps its own optimizer. No gradient crosses a stage.
#
# Exactness. Per-parameter SGD makes one optimizer per stage the same as one for all. In the sequential run
# module k trains on batch t as computed by module k-1's weights after t-1 updates; a stage's output for batch
# t is computed before its t-th update, so the pipeline computes the same weights -- bit for bit where the
# arithmetic is the same (tested). What a method hands from one module's step to the next's (`carried`: SGR's
# target gradient) travels with the activation. MAN's EMA update after the boundary module's backward reads the
# next stage's first block as it is after t-1 updates: that stage sends its block after every update, and the
# boundary waits for it there (the stages still overlap: the next stage is then finishing batch t-1). MLAAN's
# cascade backpropagates into earlier modules, across stages: refused.

def module_seconds(net, method, autocast, batch_size, iters=3):
    """Wall time of each module's forward + local loss + backward on this device (a batch of up to 64 synthetic
    inputs, the mean of `iters` steps after one warm-up): the cost --pipeline balances. (FLOPs misjudge CPUs,
    where a high-resolution, few-channel convolution costs several times more per FLOP than a deep one.)
    Measured on copies of the model, so nothing changes."""
    net2, m2 = copy.deepcopy((net, method))
    dev = next(net.parameters()).device
    B = max(2, min(batch_size, 64))
    x, y = torch.randn(B, *net.input_shape, device=dev), torch.arange(B, device=dev) % net.num_classes
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    stamps, total = [], [0.0] * net.K

    def done(k):
        sync()
        stamps.append(time.perf_counter())

    for it in range(iters + 1):
        stamps.clear()
        sync()
        stamps.append(time.perf_counter())
        forward_backward(net2, m2, Batch(x, y), torch.amp.GradScaler(dev.type, enabled=False), autocast, done)
        net2.zero_grad(set_to_none=True)
        m2.zero_grad(set_to_none=True)
        if it:
            total = [t + b - a for t, a, b in zip(total, stamps, stamps[1:])]
    return [t / iters for t in total]


def balance(costs, S):
    """Module counts of S contiguous stages that minimise the largest stage cost (dynamic programming)."""
    K, pre = len(costs), [0]
    for c in costs:
        pre.append(pre[-1] + c)
    best = {(0, 0): (0, None)}                        # (stages, modules) -> (max stage cost, previous cut)
    for s in range(1, S + 1):
        for k in range(s, K - (S - s) + 1):
            best[(s, k)] = min((max(best[(s - 1, j)][0], pre[k] - pre[j]), j) for j in range(s - 1, k)
                               if (s - 1, j) in best)
    cuts, k = [], K
    for s in range(S, 0, -1):
        j = best[(s, k)][1]
        cuts.append(k - j)
        k = j
    return cuts[::-1]


def check_pipeline(method, S, stages=None, sync_bn=False, amp="none"):
    """Refuse what --pipeline cannot run (one line); returns the --stages cut as module counts, or None."""
    why, chain, K = None, method.opts.chain, method.K
    crosses = next((m.crosses_modules for m in chain_of(method) if m.crosses_modules), None)
    if crosses:
        why = f"{crosses}, across the stage boundary"
    elif len([n for n in chain if METHODS[n].bases]) > 1:
        why = f"add-on chains ({'+'.join(chain)}) are not supported; use one add-on on a plain base"
    elif sync_bn:
        why = "--sync-bn is for data parallelism; pipeline + data parallel is not supported"
    elif amp == "fp16":
        why = "fp16 loss scaling would differ per stage; use --amp bf16"
    elif K < S:
        why = f"{K} module(s) cannot fill {S} stages"
    if why:
        raise UserError(f"--pipeline: {why}")
    if stages is None:
        return None
    try:
        sizes = [int(v) for v in stages.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != S or sum(sizes) != K or min(sizes) < 1:
        raise UserError(f"--stages {stages}: {S} positive module counts summing to {K} (one per process)")
    return sizes


def pipeline_cut(cfg, net, method, step, ck=None):
    """(modules per stage, how they were chosen): --stages, else the cut of the checkpoint being resumed, else
    balanced by the time rank 0 measures for each module with its aux net; every rank takes that partition."""
    S = dist.get_world_size()
    sizes = check_pipeline(method, S, cfg.stages, cfg.sync_bn, cfg.amp)
    if sizes is not None:
        return sizes, "by hand (--stages)"
    if ck is not None and ck.get("stages"):
        return ck["stages"], "as saved in --resume"
    box = [balance(module_seconds(net, method, step.autocast, cfg.batch_size), S) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, 0)
    return box[0], "balanced by the measured time of each module with its aux net"


@torch.no_grad()
def boundary_dtype(net, k, autocast, device):
    """The dtype module k receives in the sequential run: float32, or what autocast makes of module k-1's output
    (activations travel as float32, losslessly, and are cast back to it). One eval-mode pass on two samples."""
    if k == 0:
        return torch.float32
    was = net.training
    net.eval()
    h = torch.zeros(2, *net.input_shape, device=device)
    with autocast:
        for j in range(k):
            h = net.run(h, j)
    net.train(was)
    return h.dtype


def arrived(t, channels_last, dtype=None):
    """A received tensor in the layout and dtype the sequential run computes in (activations travel as float32,
    which holds bf16 exactly)."""
    t = t if dtype is None else t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def cpu_state(state):
    """A state dict with its tensors on the CPU (to gather it on another rank)."""
    if torch.is_tensor(state):
        return state.cpu()
    if isinstance(state, dict):
        return {k: cpu_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_state(v) for v in state)
    return state


class Pipeline(Trainer):
    """A pipeline stage: its modules, the parameters and aux nets they train, its own optimizer; rank 0 also loads
    the data and writes. Messages: activations forward (tag 1), MAN's tracked block back (tag 2), evaluation
    (tag 3). `data()` loads the loaders (rank 0 only); `cut` = (modules per stage, how they were chosen)."""

    def __init__(self, net, method, step, data, mem_iters, cut):
        self.net, self.method, self.mem_iters, self.log_secs = net, method, mem_iters, math.inf
        (self.sizes, self.how), self.rank, self.world = cut, dist.get_rank(), dist.get_world_size()
        self.first, self.last, self.writes = self.rank == 0, self.rank == self.world - 1, self.rank == 0
        lo = sum(self.sizes[:self.rank])
        self.modules = range(lo, lo + self.sizes[self.rank])
        self.parts = [p for k in self.modules for p in module_parts(net, method, k)]
        self.params = list({id(p): p for m in self.parts for p in m.parameters() if p.requires_grad}.values())
        self.device, self.cl = next(net.parameters()).device, use_channels_last(next(net.parameters()).device, method)
        # MAN: this stage's boundary EMA reads the next stage's first unit; the previous stage reads ours.
        self.fetches = not self.last and self.modules[-1] < len(method.tracked)
        self.sends_back = not self.first and lo - 1 < len(method.tracked)
        self.fresh, self.weight_send, self.sends, self.waited, self.guard, self.stop = True, None, [], 0.0, None, None
        self.step = replace(step, before_backward=self._fetch_weights)
        self.train_loader, self.test_loader = data() if self.first else (None, None)
        box = [None]
        if self.first:   # every stage learns the batch sizes (train-mode BatchNorm needs two samples) and the spec
            tr, te = self.train_loader, self.test_loader
            sizes = lambda ld: [min(ld.batch_size, len(ld.labels) - i * ld.batch_size) for i in range(len(ld))]
            box = [([b for b in sizes(tr) if b >= 2], sizes(te) if te is not None else [], len(tr.labels), tr.spec)]
        dist.broadcast_object_list(box, 0)
        self.train_sizes, self.test_sizes, self.n_train, spec = box[0]
        if not self.train_sizes:
            raise UserError("no training batch: the training set is smaller than 2 images")
        self.norm = norm_tensors(spec, self.device)
        self.h_shape = net.unit_shapes[net.bounds[lo][0] - 1] if not self.first else None
        self.h_dtype = boundary_dtype(net, lo, step.autocast, self.device)

    def config(self):
        return dict(device=str(self.device), world_size=self.world, modules=self.net.K,
                    stages=f"{self.sizes} ({self.how})", train_images=self.n_train)

    def _wait(self, works):
        t = time.time()
        for w in works:
            w.wait()
        self.waited += time.time() - t

    def _receive(self, B):
        """Start receiving a batch from the previous stage: x, y, h, whether the run stops after it, then a flag and
        a tensor per carried state."""
        shapes = [(B, *self.net.input_shape), (B,), (B, *self.h_shape), (1,)] + [(1,), (B, *self.h_shape)] * len(
            self.method.carried)
        bufs = [torch.empty(s, dtype=torch.long if i == 1 else torch.float32, device=self.device)
                for i, s in enumerate(shapes)]
        return bufs, [dist.irecv(t, self.rank - 1, tag=1) for t in bufs]

    def _send_on(self, tensors):
        self._wait(self.sends)                              # one batch in flight: the previous one has left
        self.keep = [t.contiguous() for t in tensors]
        self.sends = [dist.isend(t, self.rank + 1, tag=1) for t in self.keep]

    def _fetch_weights(self, k):
        """before_backward(k): before the boundary's EMA update reads the next stage's first unit (after module k's
        backward; on ViTs before it), its weights after as many updates as in the sequential run (the run's first
        batch: the local copy is current)."""
        if k != self.modules[-1] or not self.fetches:
            return
        if self.fresh:
            self.fresh = False
            return
        ps = list(self.net.units[self.method.tracked[k]].parameters())
        flat = torch.empty(sum(p.numel() for p in ps), device=self.device)
        self._wait([dist.irecv(flat, self.rank + 1, tag=2)])
        with torch.no_grad():
            for p, v in zip(ps, torch._utils._unflatten_dense_tensors(flat, ps)):
                p.copy_(v)

    def _send_weights(self):
        if self.weight_send is not None:                   # (the previous copy has been received)
            self._wait([self.weight_send[0]])
        unit = self.net.units[self.net.bounds[self.modules[0]][0]]
        flat = torch._utils._flatten_dense_tensors([p.detach() for p in unit.parameters()])
        self.weight_send = (dist.isend(flat, self.rank - 1, tag=2), flat)

    def _batches(self, order, start):
        """(x, y, h, the signal the run stops at after it, carried state) of each training batch from `start` on:
        loaded (rank 0, which decides when to stop) or received, the next one's receive posted while this one
        computes."""
        if self.first:
            for x, y in self.train_loader.epoch(order, start):
                yield x, y, x, self.guard.signal if self.guard else None, [None] * len(self.method.carried)
            return
        nxt = self._receive(self.train_sizes[start]) if start < len(self.train_sizes) else None
        for i in range(start, len(self.train_sizes)):
            bufs, works = nxt
            for w in works:
                w.wait()
            if i + 1 < len(self.train_sizes):
                nxt = self._receive(self.train_sizes[i + 1])
            x, y = (arrived(t, self.cl) for t in bufs[:2])
            carried = [t.to(self.h_dtype) if f.item() else None for f, t in zip(bufs[4::2], bufs[5::2])]
            yield x, y, arrived(bufs[2], self.cl, self.h_dtype), int(bufs[3].item()) or None, carried

    def train_epoch(self, opt, epoch, epochs, untimed=0, last=False, guard=None):
        self.net.train()
        self.method.train()
        self.guard, saved = guard, guard.resumed(epoch, self.rank) if guard is not None else None
        self.meter = meter = ActivationMeter(self.params)
        n = len(self.train_sizes)
        order = (saved["order"] if saved else self.train_loader.new_order()) if self.first else None
        start, seen, busy, done = (saved["step"], saved["seen"], saved["busy"], saved["secs"]) if saved else \
            (0, 0, 0, 0)
        stats = saved["stats"].to(self.device) if saved else torch.zeros(2 * self.net.K, device=self.device)
        meter.peak, self.waited, t0 = saved["peak"] if saved else 0, 0.0, time.time()
        t_timed = t0
        for i, (x, y, h, self.stop, carried) in enumerate(self._batches(order, start), start):
            if i == untimed and i:                          # --bench: time the steady state only
                dist.barrier()
                t_timed, busy, self.waited = time.time(), 0.0, 0.0
            t_b = time.time()
            losses, correct = self._step(opt, x, y, h, carried, metered=i < self.mem_iters)
            if self.sends_back and not (last and i == n - 1) and not self.stop:   # (no one reads the last update)
                self._send_weights()
            for k, loss, c in zip(self.modules, losses, correct):   # (in the layout of one process's stats)
                at = 0 if k == self.net.K - 1 else 2 + k
                stats[at] += loss * (y.shape[0] if k == self.net.K - 1 else 1)
                stats[at + 1 if k == self.net.K - 1 else at + self.net.K - 1] += c
            seen += len(y)
            if self.device.type == "cuda":                  # (busy time of kernels, not of their launches)
                torch.cuda.synchronize(self.device)
            busy += time.time() - t_b
            if guard is not None:
                mine = dict(stats=stats.cpu(), seen=seen, busy=busy, peak=meter.peak, secs=done + time.time() - t0)
                guard.after_step(self, opt, dict(epoch=epoch, step=i + 1, of=n, order=order), mine)
        self._send_on([])                                   # (the last batch has left)
        if last and self.weight_send is not None:          # (and the last weights sent back have arrived)
            self._wait([self.weight_send[0]])
            self.weight_send = None
        mine = dict(stats=stats, busy=busy - self.waited, act=meter.peak)   # (waits for messages are not busy)
        return self._epoch_row(mine, seen, sum(self.train_sizes[untimed:]), (t0, t_timed, done))

    def _step(self, opt, x, y, h, carried, metered):
        """One batch through this stage's modules: forward -> loss -> backward each, output on, own SGD step."""
        opt.zero_grad(set_to_none=True)
        for name, value in zip(self.method.carried, carried):
            setattr(self.method, name, value)
        step = replace(self.step, compiled=None) if metered else self.step   # (metered iterations run eager)
        with self.meter if metered else contextlib.nullcontext():
            h, losses, correct = run_modules(self.net, self.method, Batch(x, y, *self.norm), h, self.modules, step)
        if not self.last:
            out = [x, y, h.float(), torch.full((1,), float(self.stop or 0), device=self.device)]   # (bf16: as fp32)
            for name in self.method.carried:
                t = getattr(self.method, name)
                out += [torch.full((1,), float(t is not None), device=self.device),
                        t.detach().float() if t is not None else torch.zeros_like(out[2])]
            self._send_on(out)
        opt.step()
        return losses, correct

    def agree(self, signum):
        return self.stop                                    # (rank 0's decision, carried by every batch)

    def per_process(self, mine):
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def _epoch_row(self, mine, seen, timed, times):
        """Every stage's numbers to every rank (which also waits for the last stage: the epoch's end), as one row:
        the statistics summed over the stages (each module's come from its own stage), the pipeline's img/s and
        each stage's when busy, each stage's activation peak."""
        stats = mine["stats"].clone()
        dist.all_reduce(stats)
        rows = [None] * self.world
        dist.all_gather_object(rows, dict(busy=mine["busy"], act=mine["act"]))
        secs, (s, K) = time.time() - times[1] + times[2], (stats.tolist(), self.net.K)
        return dict(loss=s[0] / seen, train_acc=100.0 * s[1] / seen,
                    aux_acc=[None if c < 0 else 100.0 * c / seen for c in s[2 + (K - 1):]],
                    local_loss=[v / len(self.train_sizes) for v in s[2:2 + (K - 1)]], img_s=seen / secs, sec=secs,
                    seen=seen, untimed_s=times[1] - times[0], stage_img_s=[timed / max(r["busy"], 1e-9) for r in rows],
                    stage_act_peak_bytes=[r["act"] for r in rows])

    @torch.no_grad()
    def evaluate(self):
        """Test accuracy through the stages: rank 0 feeds the test batches, the last stage counts."""
        self.net.eval()
        correct = torch.zeros((), device=self.device)
        it = iter(self.test_loader) if self.first else None
        for B in self.test_sizes:
            if self.first:
                h, y = next(it)
            else:
                y, h = torch.empty(B, dtype=torch.long, device=self.device), torch.empty(B, *self.h_shape,
                                                                                         device=self.device)
                dist.recv(y, self.rank - 1, tag=3)
                dist.recv(h, self.rank - 1, tag=3)
                h = arrived(h, self.cl, self.h_dtype)
            with self.step.autocast:
                for k in self.modules:
                    h = self.net.run(h, k)
                if self.last:
                    correct += (self.net.head(h).argmax(1) == y).sum()
            if not self.last:
                dist.send(y, self.rank + 1, tag=3)
                dist.send(h.float().contiguous(), self.rank + 1, tag=3)
        dist.broadcast(correct, self.world - 1)
        return 100.0 * correct.item() / max(sum(self.test_sizes), 1)

    def state(self, opt):
        """Every stage's parameters, buffers and optimizer state, gathered (on the CPU) on rank 0."""
        mine = {id(t) for m in self.parts for t in [*m.parameters(), *m.buffers()]}
        owned = {f"{who}.{k}": v.detach().cpu() for who, mod in (("net", self.net), ("method", self.method))
                 for k, v in mod.state_dict(keep_vars=True).items() if id(v) in mine}
        states = [None] * self.world if self.first else None
        dist.gather_object(dict(state=owned, opt=cpu_state(opt.state_dict())), states, dst=0)
        if not self.first:
            return None
        full = dict(net=self.net.state_dict(), method=self.method.state_dict())
        for r in states:
            for key, v in r["state"].items():
                who, name = key.split(".", 1)
                full[who][name] = v
        return dict(full, opt=[r["opt"] for r in states], gen=self.train_loader.gen.get_state(),
                    cpu_rng=torch.get_rng_state(), stages=self.sizes)

    def save(self, path, meta, opt):
        state = self.state(opt)                             # (every stage takes part in the gather)
        return atomic_save({**state, **meta}, path) if self.first else True

    def load(self, ck, opt):
        if ck.get("stages") != self.sizes:
            raise UserError(f"--resume: saved with stages {ck.get('stages')}, this run {self.sizes}")
        self.net.load_state_dict(ck["net"])
        self.method.load_state_dict(ck["method"])
        opt.load_state_dict(ck["opt"][self.rank])
        if self.first:
            self.train_loader.gen.set_state(ck["gen"])
        torch.set_rng_state(ck["cpu_rng"])

    header = f"{'img/s':>7} {'sec':>6}  per stage: img/s (busy) | act MiB"

    def row_text(self, row):
        per = " ".join(f"{r:.0f}|{a / MiB:.1f}" for r, a in zip(row["stage_img_s"], row["stage_act_peak_bytes"]))
        return f"{row['img_s']:7.0f} {row['sec']:6.1f}  {per}"

    def result(self, history, ran, opt):
        last = history[-1] if history else {}
        return dict(pipeline=True, stages=self.sizes, train_img_s=last.get("img_s"),
                    stage_img_s=last.get("stage_img_s"), stage_act_peak_bytes=last.get("stage_act_peak_bytes"))

    def bench(self, row, opt):
        return dict(pipeline=True, stages=self.sizes, stage_img_s=row["stage_img_s"],
                    stage_act_peak_mib=[round(a / MiB, 2) for a in row["stage_act_peak_bytes"]])

# =============================================================================================================
# 10. Main
# =============================================================================================================

def print_splits(net, method):
    n = lambda m: sum(p.numel() for p in m.parameters())
    print(f"{net.arch}: {net.K} module(s), backbone {n(net):,} params, aux nets {n(method):,} params")
    print(f"{'module':>6}  {'units':<14} {'blocks':>6} {'params':>10}  {'aux input':<12} {'aux params':>10}")
    for k, (a, b) in enumerate(net.bounds):
        names = net.unit_name(a) + ("" if b - a == 1 else "-" + net.unit_name(b - 1))
        nb = b - a - (a == 0)
        p = sum(n(u) for u in net.units[a:b]) + (n(net.head) if k == net.K - 1 else 0)
        if k < net.K - 1:
            shape, note = method.describe(net, k)
            shape, ap = "x".join(map(str, shape)), f"{sum(n(m) for m in method.parts(k)):,}"
        else:
            shape, ap, note = "(head)", f"{n(net.head):,}", ""
        print(f"{k:>6}  {names:<14} {nb:>6} {p:>10,}  {shape:<12} {ap:>10}  {note}".rstrip())


# Flags that may differ between a run and its resumption (where files are, how much is logged; --pipeline checks
# its stages itself).
RESUME_FREE = {"save", "resume", "out", "log_secs", "workers", "device", "data_dir", "mem_iters", "no_download",
               "report", "report_run", "plot", "print_splits", "print_config", "compile", "stages",
               "save_every"}


def atomic_save(obj, path):
    """Write to a temporary file, then rename it over `path`: a checkpoint is whole or not there. A failed write
    (a full disk, a lost mount) prints one warning and returns False: the previous checkpoint is intact, and the
    run goes on (its progress is worth more than the stop; the next save tries again)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        print(f"warning: --save {path}: not written ({type(e).__name__}: {first_line(e)}); the previous checkpoint "
              f"is intact, training goes on and saves again at the next chance", file=sys.stderr, flush=True)
        return False


CHECKPOINT_KEYS = ("net", "method", "opt", "epoch", "best", "history", "args")


def provenance(device):
    """What produced a result or a checkpoint: this file's sha256, torch's version, the device."""
    import hashlib
    with open(os.path.abspath(__file__), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return dict(code_sha256=sha, torch=torch.__version__, device_name=device_name(device))


def load_checkpoint(path, config):
    """Read --resume (on the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest) and
    check that it is one of our checkpoints and of the same run: every flag but where and how it is logged must
    match `config`. (Whether its tensors fit the model is checked when they are loaded.)"""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--resume {path}: cannot read the checkpoint ({type(e).__name__}: {first_line(e)})")
    if not isinstance(ck, dict) or not all(k in ck for k in CHECKPOINT_KEYS) or not isinstance(ck["args"], dict):
        what = f"missing {', '.join(k for k in CHECKPOINT_KEYS if k not in ck)}" if isinstance(ck, dict) else \
            f"a {type(ck).__name__}"
        raise UserError(f"--resume {path}: not a checkpoint of local_learning.py ({what})")
    for key, value in config.items():
        if key not in RESUME_FREE and ck["args"].get(key) != value:
            raise UserError(f"--resume {path}: checkpoint has {key}={ck['args'].get(key)}, this run {key}={value}")
    return ck


def warmup_steps(cfg, step):
    """--bench: the untimed first steps (the metered ones run eager, and a compiled step compiles after them)."""
    return max(2, cfg.mem_iters + (step.compiled is not None))


def build(cfg, spec, opts):
    """The command line is the first user of the Python API: our ResNet or ViT as a LocalNet, then its method."""
    ends = cfg.ends or split_ends(cfg.arch, cfg.K, cfg.balanced_memory, spec.name)
    net = (LocalNet.vit if cfg.arch in VITS else LocalNet.resnet)(cfg.arch, spec.classes, ends, spec.size)
    return net, build_method(net, opts, spec.classes)


def train(cfg, spec, opts):
    """The command line's run of the resolved config: the model and the method, the Trainer of this kind of run
    (one device, or section 9's under torchrun), then `fit`."""
    joined = join_torchrun(cfg.device, cfg.pipeline, cfg.sync_bn)   # (section 9; None on one device)
    device = joined or pick_device(cfg.device)
    if cfg.amp != "none" and device.type != "cuda":
        raise UserError(f"--amp {cfg.amp} needs a CUDA device (this run uses {device.type})")
    torch.manual_seed(cfg.seed)
    net, method = build(cfg, spec, opts)
    if cfg.print_splits:
        return print_splits(net, method)
    if cfg.print_config:
        return show_config(cfg, method, device, net.K)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the originals' setting (and what their memory numbers assume)
    net.to(device)
    method.to(device)
    cl = use_channels_last(device, method)
    if cl:
        net.to(memory_format=torch.channels_last)
        method.to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    step = Step(torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
                torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
                compile_modules(net, method, cfg.compile, device) if cfg.compile else None)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    if cfg.bench:
        data = lambda: (synthetic_loader(spec, cfg.batch_size, warmup_steps(cfg, step) + cfg.bench, device, gen, cl),
                        None)
    else:
        data = lambda: load_data(cfg, spec, device, gen, cl)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts and cfg.save and not cfg.resume and os.path.isfile(cfg.save):   # (torchrun --max-restarts)
        cfg.resume = cfg.save
        print(f"restart {restarts}: resuming from {cfg.save}", flush=True)
    ck = load_checkpoint(cfg.resume, vars(cfg)) if cfg.resume else None
    if joined:
        trainer = distributed_trainer(cfg, net, method, step, data, ck)
    else:
        trainer = Trainer(net, method, step, data(), cfg.mem_iters, cfg.log_secs)
    return fit(cfg, spec, trainer, ck)


def show_config(cfg, method, device, modules):
    """--print-config: the config line, then every resolved value as one JSON line (lambdas, a pair of values and
    where they came from, as the values and `lambdas_source`)."""
    print_config(cfg, method, device=str(device), modules=modules)
    values = resolved_values(cfg, method.opts)
    if "lambdas" in values:
        values.update(lambdas=list(values["lambdas"][0]), lambdas_source=values["lambdas"][1])
    print(json.dumps(dict(values, modules=modules, sources=cfg.sources)), flush=True)


class Preempted(Exception):
    """The run stopped at a signal after a training step (and, with --save, wrote its checkpoint); `code` is the
    exit status shells expect, 128 + the signal's number (SIGINT 130, SIGTERM 143, SIGUSR1 138)."""

    def __init__(self, line, code):
        super().__init__(line)
        self.code = code


class Guard:
    """What long runs on shared clusters need, around fit's epochs: SIGTERM, SIGINT and SIGUSR1 (SLURM's --signal)
    end the current training step, write a checkpoint (--save) and stop the run (Preempted); a second Ctrl-C
    stops at once. --save-every N writes a checkpoint every N steps too, and a checkpoint taken in the middle of an
    epoch resumes at its step: same batches, augmentation draws, RNG states, lr and epoch statistics."""
    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self, path, every, meta, progress=None):
        self.path, self.every, self.meta, self.progress = path, every, meta, progress   # meta(): best, history, ..
        self.signal, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    self.old[name] = signal.signal(getattr(signal, name), self._caught)
        return self

    def __exit__(self, *exc):
        for name, handler in self.old.items():
            signal.signal(getattr(signal, name), handler)

    def _caught(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def resumed(self, epoch, rank):
        """This process's epoch accumulators, order and next step, if the run resumes in the middle of `epoch`."""
        p, self.progress = self.progress, None
        return dict(p["procs"][rank], order=p["order"], step=p["step"]) if p and p["epoch"] == epoch else None

    def after_step(self, trainer, opt, where, mine):
        """After every training step: the --save-every checkpoint; at a signal, the checkpoint and the stop."""
        stop = trainer.agree(self.signal)                 # (under torchrun every process stops at the same step)
        saved = False
        if self.path and (stop or (self.every and where["step"] % self.every == 0)):
            meta = dict(self.meta(), epoch=where["epoch"] - 1, progress=dict(where, procs=trainer.per_process(mine)))
            saved = trainer.save(self.path, meta, opt)
        if stop:
            at = f"stopped by {signal.Signals(stop).name} in epoch {where['epoch']} after step {where['step']} of " \
                 f"{where['of']}"
            lost = f"{where['epoch'] - 1} epoch(s) and {where['step']} step(s) of training are lost"
            raise Preempted(f"{at}: checkpoint {self.path} written; to continue, run the same command with --resume "
                            f"{self.path}" if saved else f"{at}: nothing saved (no --save PATH or a failed write) -- "
                            f"{lost}", 128 + stop)


def fit(cfg, spec, trainer, ck=None):
    """The training loop of every run -- one device, data parallel, pipelined, --bench: resume, then per epoch
    the lr, one epoch of training, the test accuracy, one row and a checkpoint; then the final JSON line."""
    opt, history, ran = trainer.optimizer(cfg.lr, cfg.wd, cfg.optimizer), [], []
    epochs = 1 if cfg.bench else cfg.epochs
    if not cfg.bench:
        print_config(cfg, trainer.method, **trainer.config())
    if ck is not None:
        load_state(trainer, ck, opt, cfg.resume)
        history = ck["history"]
        print(f"resumed from {cfg.resume} at epoch {ck['epoch']}" + (f", step {ck['progress']['step']}" if
              ck.get("progress") else ""), flush=True)
    if not cfg.bench:
        print(f"{'ep':>4} {'lr':>7} {'loss':>7} {'train%':>6} {'test%':>6} {'best%':>6} {trainer.header}", flush=True)
    best = lambda: max((h["test_acc"] for h in history), default=0.0)
    meta = lambda: dict(best=best(), history=history, args=vars(cfg), provenance=provenance(trainer.device))
    t_start, out, start = time.time(), cfg.out if trainer.writes else None, ck["epoch"] + 1 if ck else 1
    with Guard(cfg.save, cfg.save_every, meta, ck.get("progress") if ck else None) as guard:
        for epoch in range(start, epochs + 1):
            lr = cfg.lr if cfg.bench else lr_at(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs, spec.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            row = trainer.train_epoch(opt, epoch, cfg.epochs, warmup_steps(cfg, trainer.step) if cfg.bench else 0,
                                      cfg.bench or epoch == cfg.epochs, guard)
            if cfg.bench:
                flops = trainer.flops_per_img()
                return emit(dict(bench_result(cfg, spec, trainer, row, opt), flops_per_img=flops), out)
            check_finite(row["loss"], epoch)
            row = dict(epoch=epoch, lr=lr, **row, test_acc=trainer.evaluate())
            history.append(row)
            ran.append(row)
            print(f"{epoch:>4} {lr:7.4f} {row['loss']:7.4f} {row['train_acc']:6.2f} {row['test_acc']:6.2f} "
                  f"{best():6.2f} {trainer.row_text(row)}", flush=True)
            if cfg.save:
                trainer.save(cfg.save, dict(meta(), epoch=epoch), opt)
    if not ran and ck is not None:   # a finished run, resumed: its result is printed again, not appended again
        print(f"{cfg.resume}: the run had finished (epoch {ck['epoch']} of {cfg.epochs}); nothing to train", flush=True)
        out = None
    extra = dict(trainer.result(history, ran, opt), flops_per_img=trainer.flops_per_img())
    return emit(run_result(cfg, trainer, history, best(), t_start, **extra), out)


def load_state(trainer, ck, opt, path):
    """A checkpoint's tensors into the run (one line where they do not fit), and a warning if this file changed."""
    try:
        trainer.load(ck, opt)
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
        raise UserError(f"--resume {path}: the checkpoint does not fit this run ({type(e).__name__}: {first_line(e)})")
    was = (ck.get("provenance") or {}).get("code_sha256")
    if was and was != provenance(trainer.device)["code_sha256"]:
        print(f"warning: local_learning.py has changed since {path} was written: the resumed run need not equal an "
              f"uninterrupted one", flush=True)


def resolved_values(cfg, opts):
    """Every resolved value, keyed by flag name: the flags, then the method options (`opts`) as resolved."""
    values = {k: v for k, v in vars(cfg).items() if k not in all_options() and k not in ("sources", "warnings")}
    return dict(values, **{k: v for k, v in vars(opts).items() if k not in CONTEXT and k != "chain"})


def print_config(cfg, method, **extra):
    """The resolved config, one line (flags, method options as resolved, then `extra`), where the defaults came
    from, and the method's resolved settings (e.g. InfoPro's loss weights per module)."""
    print("config: " + " ".join(f"{k}={v}" for k, v in dict(resolved_values(cfg, method.opts), **extra).items()),
          flush=True)
    by_source = {}
    for key, source in cfg.sources.items():
        by_source.setdefault(source, []).append(f"{key}={getattr(cfg, key)}")
    print("defaults: " + "; ".join(f"{', '.join(keys)} ({source})" for source, keys in by_source.items()), flush=True)
    for line in cfg.warnings:
        print(line, flush=True)
    if method.summary():
        print(f"{cfg.method}: {method.summary()}", flush=True)


def run_result(cfg, trainer, history, best, t_start, **extra):
    """The final JSON line of a training run (`extra`: what the kind of run measures), with every resolved setting
    (`config`) and what produced it (`provenance`)."""
    last = history[-1] if history else {}
    return dict(method=cfg.method, dataset=cfg.dataset, arch=cfg.arch, K=cfg.K, modules=trainer.net.K, seed=cfg.seed,
                epochs=cfg.epochs, base=cfg.base, batch_size=cfg.batch_size, lr=cfg.lr, options=given_options(cfg),
                balanced_memory=cfg.balanced_memory, device=str(trainer.device),
                world_size=trainer.world, final_acc=last.get("test_acc"), best_acc=best, module_acc=last.get("aux_acc"),
                **extra, summary=trainer.method.summary(), wall_s=time.time() - t_start,
                config=resolved_values(cfg, trainer.method.opts), provenance=provenance(trainer.device),
                history=[{k: h.get(k) for k in ("epoch", "loss", "train_acc", "test_acc", "aux_acc")} for h in history])


def bench_result(cfg, spec, trainer, row, opt):
    """The JSON line of a --bench run; img/s of the global batch over the timed steps."""
    return dict(bench=True, method=cfg.method, base=cfg.base, arch=cfg.arch, K=cfg.K, modules=trainer.net.K,
                batch=cfg.batch_size, dataset=cfg.dataset, image_size=spec.size, device=str(trainer.device),
                device_name=device_name(trainer.device), options=given_options(cfg),
                balanced_memory=cfg.balanced_memory, amp=cfg.amp, world_size=trainer.world,
                threads=torch.get_num_threads(), iters=cfg.bench, img_s=cfg.bench * cfg.batch_size / row["sec"],
                summary=trainer.method.summary(), compile=cfg.compile, **trainer.bench(row, opt))


def device_name(device):
    """What the numbers were measured on (for the recorded tables)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def given_options(cfg):
    """Method options set on the command line (they label result rows, e.g. AugLocal's depth)."""
    return {k: getattr(cfg, k) for k in option_flags() if getattr(cfg, k) is not None}


def emit(result, out):
    """The JSON line to stdout, then appended to --out (checked writable at start; if it fails now, the line is
    already on stdout, and the error says so)."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        try:
            with open(out, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            raise UserError(f"--out {out}: not written ({type(e).__name__}: {first_line(e)}); the result line is "
                            f"the last line printed above")
    return result


def run_label(r):
    """method[+base] and the options that distinguish a row (auglocal d=3 pyramid=0.5, bp checkpoint, infopro*)."""
    opts = {k: v for k, v in (r.get("options") or {}).items() if not (k == "local_loss" and r["method"] == "bp")}
    short = dict(aux_depth="d", pyramid="pyramid", dgl_head="head", local_loss="loss")
    return r["method"] + ("*" if r.get("balanced_memory") else "") + (f"+{r['base']}" if r.get("base") else "") + \
        "".join(f" {short.get(k, k)}" + ("" if v is True else f"={v}") for k, v in sorted(opts.items()))


def report_bench(rows):
    """The speed/memory table of --bench lines (BENCH=1 run_all.sh): per method and arch/K, modules, activation
    peak and FLOPs per image (vs BP of the same arch), img/s eager (overhead vs BP) and compiled, CUDA peak memory
    where measured. (The rows at the papers' own batches are report_paper_memory's.)"""
    out, key = [], lambda r: (r["device_name"] if r.get("device_name") else r["device"], r["batch"], r.get("amp"))
    for (dev, batch, amp), rs in {k: [r for r in rows if key(r) == k] for k in dict.fromkeys(map(key, rows))}.items():
        cols = sorted({(r["arch"], r["K"]) for r in rs if r["method"] != "bp" or r["K"] > 1} or
                      {(r["arch"], r["K"]) for r in rs}, key=lambda c: (arch_key(c[0]), c[1]))
        cuda, flops = any(r.get("cuda_peak_alloc") for r in rs), any(r.get("flops_per_img") for r in rs)
        cell = {}
        for r in rs:   # plain BP (K = 1) fills every column of its arch
            for c in (cols if run_label(r) == "bp" else [(r["arch"], r["K"])]):
                if c[0] == r["arch"]:
                    cell.setdefault((run_label(r), c), {})["compiled" if r.get("compile") else "eager"] = r
        labels = list(dict.fromkeys(["bp"] + [run_label(r) for r in rs]))
        threads = sorted({r.get("threads") for r in rs})
        per = ["modules", "act. MiB (vs BP)"] + (["CUDA peak MiB"] if cuda else []) + \
            (["GFLOP/img (vs BP)"] if flops else []) + ["img/s eager (vs BP)", "img/s compiled"]
        out += [f"### Speed and memory: `--bench`, batch {batch}{', --amp ' + amp if amp and amp != 'none' else ''} "
                f"({dev}{', threads ' + ','.join(map(str, threads)) if 'cuda' not in str(dev).lower() else ''})", "",
                "| method | " + " | ".join(f"{a} K={k}: {p}" if i == 0 else p for a, k in cols
                                          for i, p in enumerate(per)) + " |",
                "|---|" + "---|" * (len(per) * len(cols))]
        for lab in labels:
            cells = []
            for c in cols:
                g, b = cell.get((lab, c), {}), cell.get(("bp", c), {}).get("eager")
                e, cp = g.get("eager"), g.get("compiled")
                r = e or cp
                if r is None:
                    cells += [""] * len(per)
                    continue
                vs = lambda x, y: f" ({100 * (x / y - 1):+.0f} %)" if b and lab != "bp" and x and y else ""
                cells += ["1" if lab == "bp" else str(r["modules"]),
                          f"{r['act_peak_mib']:.1f}" + vs(r["act_peak_mib"], b["act_peak_mib"] if b else 1)]
                if cuda:
                    cells.append(f"{r['cuda_peak_alloc'] / MiB:.0f}" if r.get("cuda_peak_alloc") else "")
                if flops:
                    f = r.get("flops_per_img")
                    cells.append(f"{f / 1e9:.3f}" + vs(f, b.get("flops_per_img") if b else 1) if f else "")
                cells += [f"{e['img_s']:.0f}" + vs(b["img_s"] if b else 1, e["img_s"]) if e else "",
                          "" if cp is None else f"{cp['img_s']:.0f}" if cp.get("compiled") else "(eager fallback)"]
            out.append(f"| {lab} | " + " | ".join(cells) + " |")
        out += ["", "act. MiB = peak bytes autograd holds for backward (the activation meter); GFLOP/img = one "
                "training step's FLOPs per image (torch's FlopCounterMode); vs BP = relative to BP of the same arch; "
                "img/s overhead = BP img/s / img/s - 1.", ""]
    return out


# The papers' memory figures (GB on their GPUs) and savings against their E2E run, by (dataset, arch, batch per GPU,
# method label): InfoPro's Table 3 (ResNet-110, one Titan Xp; its checkpointing row's segments are not given) and
# Table 4 (ImageNet, per V100 at 128 of 1024); MAN's ImageNet claims (K = 4; secondary, from summaries of its paper).
PAPER_MEMORY = {
    ("cifar10", "resnet110", 1024): {"bp": 9.40, "bp checkpoint": 3.91, "infopro* K=2": 5.38, "infopro* K=3": 4.22,
                                     "infopro* K=4": 3.52},
    ("stl10", "resnet110", 128): {"bp": 10.77, "bp checkpoint": 4.50, "infopro* K=2": 6.15, "infopro* K=3": 4.96,
                                  "infopro* K=4": 4.08},
    ("imagenet", "resnet101", 128): {"bp": 19.71, "infopro K=2": 12.06, "infopro K=4": 10.37, "man+infopro K=4": 10.47},
    ("imagenet", "resnet152", 128): {"bp": 26.29, "infopro K=2": 15.53, "infopro K=4": 13.48, "man+infopro K=4": 13.61},
}


def report_paper_memory(rows):
    """Memory at the papers' batch and config (BENCH=1 MEMTABLE=1 run_all.sh) next to the papers' figures: the
    activation peak + parameters, gradients and optimizer state on any device, CUDA max_memory_allocated where
    measured, each with its saving against our BP; then the paper's figure and saving."""
    out = []
    for (ds, arch, batch), paper in PAPER_MEMORY.items():
        rs = [r for r in rows if (r.get("dataset"), r["arch"], r["batch"]) == (ds, arch, batch)]
        label = lambda r: run_label(r) + ("" if run_label(r) == "bp" else f" K={r['K']}")
        got = {label(r): r for r in rs if label(r) in paper or label(r).startswith("bp checkpoint")}
        if not got:
            continue
        total = lambda r: r["act_peak_bytes"] + r["param_bytes"] + r["grad_bytes"] + r["opt_state_bytes"]
        bp = got.get("bp")
        save = lambda x, y: f"{100 * (1 - x / y):.1f} %" if x and y else ""
        out += [f"### Memory at the papers' setting: {ds}, {arch}, batch {batch} ({rs[0].get('device_name', '')})", "",
                "| method | ours: act. + params/grads/state GB | saving | ours: CUDA peak GB | saving | paper GB | "
                "paper saving |", "|---|---|---|---|---|---|---|"]
        for lab, r in got.items():
            ref = paper.get(lab.split(" K=")[0] if lab.startswith("bp checkpoint") else lab)
            cu, bcu = r.get("cuda_peak_alloc"), bp.get("cuda_peak_alloc") if bp else None
            ours = lab != "bp"
            out.append(f"| {lab} | {total(r) / 1e9:.2f} | {save(total(r), total(bp)) if bp and ours else ''} | "
                       f"{f'{cu / 1e9:.2f}' if cu else ''} | {save(cu, bcu) if ours else ''} | "
                       f"{f'{ref:.2f}' if ref else ''} | {save(ref, paper['bp']) if ref and ours else ''} |")
        out += ["", "GB = 1e9 bytes. The papers measured the least memory their GPUs needed (cuDNN benchmark on); "
                "ours are peaks at the same batch and split.", ""]
    return out


# ---- --report: Markdown tables from results files -------------------------------------------------------------

RUN_FIELDS = ("method", "dataset", "arch", "K", "modules", "seed", "epochs", "final_acc", "best_acc", "history",
              "train_img_s", "act_peak_bytes", "param_bytes", "grad_bytes", "opt_state_bytes")
BENCH_FIELDS = ("method", "arch", "K", "modules", "batch", "device", "img_s", "act_peak_mib")


def read_results(path):
    """The usable lines of a results file, as (line number, object); the others (not UTF-8, not JSON, not an
    object, without the fields the tables read) are skipped and counted, in one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read().splitlines()
    except OSError as e:
        raise UserError(f"--report {path}: {type(e).__name__}: {first_line(e)}")
    lines, skipped = [], []
    for i, b in enumerate(raw, 1):
        if not b.strip():
            continue
        try:
            r = json.loads(b.decode("utf-8"))
            usable = isinstance(r, dict) and (r.get("pipeline") or all(
                k in r for k in (BENCH_FIELDS if r.get("bench") else RUN_FIELDS)))
        except (UnicodeDecodeError, ValueError):
            usable = False
        (lines.append((i, r)) if usable else skipped.append(i))
    if skipped:
        print(f"note: --report {path}: skipped {len(skipped)} unusable line(s) {skipped[:10]} (not a result line of "
              f"local_learning.py)", file=sys.stderr, flush=True)
    return lines


def config_labels(runs):
    """Each run's label: run_label plus the settings that tell apart runs of that label (beyond dataset, arch, K
    and seed), so that different configurations are never pooled as seeds of one."""
    same_run = RESUME_FREE | {"seed", "dataset", "arch", "K", "method", "base", "options", "balanced_memory"}
    conf = {i: {k: json.dumps(v) for k, v in (r.get("config") or {}).items() if k not in same_run} for i, r in runs}
    labels = {}
    for lab in {run_label(r) for _, r in runs}:
        mine = [i for i, r in runs if run_label(r) == lab]
        differ = sorted(k for k in {k for i in mine for k in conf[i]} if len({conf[i].get(k) for i in mine}) > 1)
        labels.update({i: lab + "".join(f" {k}={conf[i].get(k)}" for k in differ) for i in mine})
    return labels


def report(path, run_line=None, plot_path=None):
    """Markdown tables from a results file: test error (mean +- std over seeds) per configuration x arch/K, peak
    memory and throughput against BP of the same arch, one run's per-module aux accuracies; and the bench tables."""
    lines = read_results(path)
    runs = [(i, r) for i, r in lines if not r.get("bench") and not r.get("pipeline") and r.get("final_acc") is not None]
    benches = [r for _, r in lines if r.get("bench") and not r.get("pipeline") and r.get("world_size", 1) == 1]
    if not runs and not benches:
        raise UserError(f"--report {path}: no usable training runs or bench lines in the file")
    labels = config_labels(runs)
    runs = [(i, dict(r, label=labels[i])) for i, r in runs]
    paper = [r for r in benches if (r.get("dataset"), r["arch"], r["batch"]) in PAPER_MEMORY]
    speed = [r for r in benches if r not in paper]
    out = (report_bench(speed) if speed else []) + report_paper_memory(paper)
    order = list(dict.fromkeys(["bp", "greedy", "dgl", "predsim", "infopro", "auglocal"] +
                               sorted({r["label"] for _, r in runs})))
    for ds in dict.fromkeys(r["dataset"] for _, r in runs):
        rs = [r for _, r in runs if r["dataset"] == ds]
        cols = sorted({(r["arch"], r["K"]) for r in rs if r["label"] != "bp"} or {(r["arch"], 1) for r in rs},
                      key=lambda c: (arch_key(c[0]), c[1]))
        groups = {}
        for r in rs:   # BP does not depend on K: its K=1 runs fill every column of their arch
            for c in cols if r["label"] == "bp" else [(r["arch"], r["K"])]:
                if c[0] == r["arch"]:
                    groups.setdefault((r["label"], c), []).append(r)
        out += report_errors(ds, rs, cols, groups, order) + report_memory(ds, rs, cols, groups, order)
    out += report_modules(runs, run_line)
    if plot_path:
        out += ["", f"plot: {plot_path} ({', '.join(plot(runs, plot_path))})"]
    text = "\n".join(out)
    print(text)
    return text


def plot(runs, path):
    """--plot: the trade-off every one of these papers draws -- test error against activation memory and against
    FLOPs per image, one labelled point per run -- and the per-module aux accuracy of the runs that have them.
    Returns the labels plotted."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    fig, (mem, flops, mods) = plt.subplots(1, 3, figsize=(18, 5.5))
    labels = []
    for _, r in runs:
        lab = f"{r['label']} {r['arch']} K={r['K']}"
        labels.append(lab)
        err = 100 - r["final_acc"]
        for ax, x in ((mem, r.get("act_peak_bytes")), (flops, r.get("flops_per_img"))):
            if x:
                x = x / MiB if ax is mem else x / 1e9
                ax.scatter(x, err)
                ax.annotate(lab, (x, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if r.get("module_acc"):
            mods.plot(range(len(r["module_acc"])), [math.nan if a is None else a for a in r["module_acc"]],
                      marker=".", label=lab)
    for ax, xl in ((mem, "activation peak (MiB)"), (flops, "GFLOP per image, one training step")):
        ax.set(xlabel=xl, ylabel="test error (%), final epoch")
    mods.set(xlabel="local module", ylabel="aux accuracy on training batches (%)")
    if mods.lines:
        mods.legend(fontsize=6)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UserError(f"--plot {path}: {first_line(e)}")
    finally:
        plt.close(fig)
    return labels


def report_errors(ds, rs, cols, groups, order):
    """Test error (%) per method and arch/K, mean +- std over seeds: of the final epoch, and (as every official
    script reports) of the best epoch."""
    mean_std = lambda v: (sum(v) / len(v), (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1)) ** 0.5
                          if len(v) > 1 else 0.0)
    epochs = sorted({r["epochs"] for r in rs})
    out = [f"### {ds}: test error (%), mean ± std over seeds: final epoch (best epoch) (epochs {epochs})", "",
           "| method | " + " | ".join(f"{a} K={k}" for a, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in order:
        cells = []
        for c in cols:
            g = groups.get((m, c))
            if g:
                (mu, sd), (bmu, bsd) = (mean_std([100 - r[key] for r in g]) for key in ("final_acc", "best_acc"))
                cells.append(f"{mu:.2f} ± {sd:.2f} (best {bmu:.2f} ± {bsd:.2f}; n={len(g)})")
            else:
                cells.append("")
        if any(cells):
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def report_memory(ds, rs, cols, groups, order):
    """Peak memory and throughput per method, with the saving and the overhead against BP of the same arch."""
    def mem(r):   # CUDA allocator peak when there is one; else the meter's activations + params/grads/state
        if r.get("cuda_peak_alloc"):
            return r["cuda_peak_alloc"]
        return r["act_peak_bytes"] + r["param_bytes"] + r["grad_bytes"] + r["opt_state_bytes"]

    out = ["", f"### {ds}: peak memory and throughput (vs BP of the same arch)", "",
           "| method | arch | K | peak memory | saved vs BP | img/s | overhead vs BP |",
           "|---|---|---|---|---|---|---|"]
    bp = {a: [r for r in rs if r["label"] == "bp" and r["arch"] == a] for a, _ in cols}
    for m in order:
        for a, k in cols:
            g = groups.get((m, (a, k)))
            if not g or (m == "bp" and k != min(kk for aa, kk in cols if aa == a)):
                continue
            gb, ips = sum(map(mem, g)) / len(g) / 1e9, sum(r["train_img_s"] for r in g) / len(g)
            saved = over = ""
            if bp[a] and m != "bp":
                b_gb = sum(map(mem, bp[a])) / len(bp[a]) / 1e9
                b_ips = sum(r["train_img_s"] for r in bp[a]) / len(bp[a])
                saved, over = f"{100 * (1 - gb / b_gb):.1f} %", f"{100 * (b_ips / ips - 1):+.1f} %"
            out.append(f"| {m} | {a} | {'1' if m == 'bp' else k} | {gb:.3f} GB | {saved} | {ips:.0f} | {over} |")
    devices = sorted({r.get("device", "?") for r in rs})
    return out + ["", f"Memory: CUDA max_memory_allocated where measured, else activation peak + parameters + "
                  f"gradients + optimizer state (device: {', '.join(devices)}); GB = 1e9 bytes.", ""]


def report_modules(runs, run_line):
    """One run's per-module aux accuracies (line `run_line`, else the last run with the most of them)."""
    with_mod = [(i, r) for i, r in runs if r.get("module_acc")]
    if not with_mod:
        return []
    i, r = next(((i, r) for i, r in with_mod if i == run_line), None) or \
        max(with_mod, key=lambda t: (sum(a is not None for a in t[1]["module_acc"]), t[0]))
    n = len(r["module_acc"])
    return [f"### Per-module aux accuracy on training batches (line {i}: {r['label']}, {r['dataset']}, {r['arch']} "
            f"K={r['K']}, seed {r['seed']})", "", "| module | " + " | ".join(str(j) for j in range(n)) + " | final |",
            "|---|" + "---|" * (n + 1), "| acc % | " + " | ".join("-" if a is None else f"{a:.1f}" for a in
            r["module_acc"]) + f" | {r['history'][-1]['train_acc']:.1f} |", ""]


def main(argv=None):
    """The command line: --report, or one run (under torchrun: this rank's part of one)."""
    try:
        args = parse_args(argv)
        if args.report:
            return report(args.report, args.report_run, args.plot)
        if args.plot:
            raise UserError("--plot draws a --report: add --report RESULTS")
        with one_voice(), own_process_group():              # (section 9: under torchrun, rank 0 prints)
            return train(*resolve_config(args))
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr, flush=True)
        sys.exit(e.code)
    except UserError as e:
        rank = os.environ.get("RANK", "0")                 # under torchrun every rank stops; rank 0 says why
        if rank == "0" or isinstance(e, RankError):
            print(f"error: {'' if rank == '0' else f'rank {rank}: '}{e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:                              # a collective with a process that died (torchrun)
        if not (dist.is_available() and dist.is_initialized() and peer_failure(e)):
            raise
        why = str(e).splitlines()[0].split("] ", 1)[-1].split(". ")[0][:100]   # (without gloo's source location)
        print(f"error: rank {dist.get_rank()}: a collective failed, most likely because another process died "
              f"({why}); the last checkpoint written is kept", file=sys.stderr, flush=True)
        sys.exit(2)


def peer_failure(e):
    """Whether a RuntimeError comes from the communication backend (gloo or NCCL), not from our code."""
    return isinstance(e, dist.DistError) or any(w in str(e).lower() for w in ("gloo", "nccl", "connection closed"))


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `... --print-splits | head` should end quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
