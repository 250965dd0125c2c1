"""Tests for local_learning.py (CPU only, no network, no ../shared needed).

Tiny datasets are written here in the real torchvision on-disk formats (CIFAR pickles, SVHN .mat, STL-10 .bin)
and as an ImageFolder tree of PNGs. Numbers pinned below come from ../shared/specs/infopro_dgl_man.md.
"""
import contextlib
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import local_learning as L

HERE = os.path.dirname(os.path.abspath(__file__))
n_params = lambda m: sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------ tiny datasets

def write_cifar10(root, n_train=48, n_test=24, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = n_train // 5 if i < 5 else n_test
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": [""] * n}, f)
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.array(y))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_cases_per_batch": n_train // 5}, f)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def write_svhn(root, n=20, seed=1):
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        stored = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)     # SVHN stores digit 0 as 10
        savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": stored})
        out[split] = (x, y)
    return out


def write_stl10(root, n=6, seed=2):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        x.transpose(0, 1, 3, 2).tofile(os.path.join(folder, f"{split}_X.bin"))     # column-major, as STL-10
        (y + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))     # labels 1..10
        out[split] = (x, y)
    return out


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar"))
    write_cifar10(root)
    return root


def train_args(cifar_dir, *extra):
    return ["--dataset", "cifar10", "--data-dir", cifar_dir, "--no-download", "--batch-size", "16", "--subset", "32",
            "--epochs", "1", "--mem-iters", "1", *extra]


# ------------------------------------------------------------------------------------------------ backbone, splits

def build(arch="resnet32", method="dgl", K=16, classes=10, size=32, **options):
    net = L.LocalNet.resnet(arch, classes, L.split_ends(arch, K, options.get("balanced_memory", False), "cifar10"),
                            size)
    return net, L.attach(net, method, dataset="cifar10", **options)


def build_cli(*argv):
    """Model and method exactly as the command line would build them."""
    args = L.parse_args(list(argv))
    spec = L.resolve_config(args)
    return L.build(args, spec)


def module_sizes(arch, K, balanced=False, dataset="cifar10"):
    """Residual blocks per module (the stem is not a block)."""
    ends = L.split_ends(arch, K, balanced, dataset)
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [e + 1 - s - (s == 0) for s, e in zip(starts, ends)]


def test_backbone_parameter_counts():
    assert n_params(L.LocalNet.resnet("resnet32", 10, [15], 32)) == 466_906
    assert n_params(L.LocalNet.resnet("resnet110", 10, [54], 32)) == 1_730_714
    import torchvision
    assert n_params(L.LocalNet.resnet("resnet50", 1000, [16], 64)) == n_params(torchvision.models.resnet50())


def test_published_split_tables():
    assert module_sizes("resnet32", 1) == [15]
    assert module_sizes("resnet32", 2) == [7, 8]
    assert module_sizes("resnet32", 3) == [5, 5, 5]
    assert module_sizes("resnet32", 4) == [3, 4, 4, 4]
    assert module_sizes("resnet32", 8) == [1, 2, 2, 2, 2, 2, 2, 2]
    assert module_sizes("resnet32", 16) == [0] + [1] * 15          # InfoPro: the stem alone is module 0
    assert module_sizes("resnet110", 2) == [27, 27]
    assert module_sizes("resnet110", 3) == [18, 18, 18]
    assert module_sizes("resnet110", 4) == [12, 14, 14, 14]
    assert module_sizes("resnet110", 8) == [5, 7, 7, 7, 7, 7, 7, 7]
    assert module_sizes("resnet110", 16) == [2] + [3] * 8 + [4] * 7
    assert module_sizes("resnet110", 32) == [2, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1] * 2 + [2, 2, 1, 2, 1, 2, 2, 2, 2, 2]
    assert module_sizes("resnet110", 55) == [0] + [1] * 54
    # InfoPro* balanced-memory tables
    assert module_sizes("resnet110", 2, True, "cifar10") == [15, 39]
    assert module_sizes("resnet110", 3, True, "cifar10") == [10, 11, 33]
    assert module_sizes("resnet110", 4, True, "cifar10") == [7, 8, 12, 27]
    assert module_sizes("resnet110", 3, True, "stl10") == [9, 11, 34]
    # Boundary positions of one table, verbatim: ResNet-32 K=4 ends after L1.2, L2.1, L3.0.
    net = L.LocalNet.resnet("resnet32", 10, L.split_ends("resnet32", 4), 32)
    assert [L.unit_name("resnet32", e) for e in net.ends] == ["L1.2", "L2.1", "L3.0", "L3.4"]
    assert net.boundary_shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_even_split_and_impossible_K():
    assert module_sizes("resnet20", 4) == [2, 2, 2, 3]               # 9 blocks, remainder to the last modules
    assert module_sizes("resnet32", 5) == [3, 3, 3, 3, 3]
    assert module_sizes("resnet20", 10) == [0] + [1] * 9             # K = blocks + 1: stem alone
    with pytest.raises(L.UserError, match="impossible"):
        L.split_ends("resnet32", 17)
    with pytest.raises(L.UserError, match="balanced"):
        L.split_ends("resnet32", 2, balanced=True, dataset="cifar10")


def test_dgl_and_greedy_aux_parameter_counts():
    # Spec (run-verified official module): 14,410 / 54,922 / 214,282, which includes an unused BatchNorm2d(C).
    for (c, s), official in {(16, 32): 14_410, (32, 16): 54_922, (64, 8): 214_282}.items():
        assert n_params(L.DGLAux((c, s, s), 10)) + 2 * c == official
    assert [n_params(L.GreedyAux(c, 10)) for c in (16, 32, 64)] == [170, 330, 650]   # spec 0c1f + CE


def test_init_is_he_fan_out():
    torch.manual_seed(0)
    net, method = build()
    conv = net.units[15].conv2                                        # 64 -> 64, 3x3
    assert abs(conv.weight.std().item() - (2 / (9 * 64)) ** 0.5) < 0.005
    aux_conv = method.aux[0].convs[0]                                  # aux nets are initialised the same way
    assert abs(aux_conv.weight.std().item() - (2 / 16) ** 0.5) < 0.05


# ------------------------------------------------------------------------------------------------ training step

@pytest.mark.parametrize("method, extra", [("greedy", ()), ("dgl", ()), ("infopro", ()), ("predsim", ()),
                                           ("sgr", ("--base", "dgl")), ("sgr", ("--base", "man+infopro", "--K", "8")),
                                           ("auglocal", ("--aux-depth", "1")),
                                           ("infopro", ("--local-loss", "cross_entropy"))])
def test_gradient_isolation(method, extra):
    """Module k's gradients are final once its own backward ran: later modules' losses add nothing to them."""
    torch.manual_seed(0)
    net, method = build_cli("--method", method, "--K", "5", *extra)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batch = L.Batch(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    owned = lambda k: [p for u in net.units[net.bounds[k][0]:net.bounds[k][1]] for p in u.parameters()] + \
        ([p for part in method.aux_parts(k) for p in part.parameters()] if k < net.K - 1 else list(net.head.parameters()))
    snap = {}
    clone = lambda g: None if g is None else g.clone()

    def done(k):
        snap[k] = [clone(p.grad) for p in owned(k)]
        for j in range(k + 1, net.K):                                  # nothing downstream has a gradient yet
            assert all(p.grad is None for p in owned(j))

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    L.forward_backward(net, method, batch, scaler, torch.autocast("cpu", enabled=False), on_module_done=done)
    for k in range(net.K):
        backbone = [p for u in net.units[net.bounds[k][0]:net.bounds[k][1]] for p in u.parameters()]
        assert all(p.grad is not None for p in backbone) and any(p.grad.abs().sum() > 0 for p in backbone)
        for a, p in zip(snap[k], owned(k)):                            # untouched by modules k+1..K-1
            assert (a is None and p.grad is None) or torch.equal(a, p.grad)


def test_lr_schedule_matches_spec():
    lr = lambda e: L.lr_at(e, 0.8, 160, 10)
    assert lr(1) == pytest.approx(0.01)
    assert lr(2) == pytest.approx(0.0890, abs=5e-4)
    assert lr(10) == pytest.approx(0.714, abs=5e-4)
    assert lr(11) == pytest.approx(0.791, abs=5e-4)
    assert lr(160) == pytest.approx(0.0, abs=1e-12)                   # the originals' last epoch runs at lr 0


@pytest.mark.parametrize("method", ["bp", "greedy", "dgl"])
def test_train_and_eval_smoke(cifar_dir, method, tmp_path):
    out = tmp_path / "r.jsonl"
    r = L.main(train_args(cifar_dir, "--method", method, "--out", str(out)))
    assert r["modules"] == (1 if method == "bp" else 16)
    assert 0 <= r["final_acc"] <= 100 and r["act_peak_bytes"] > 0
    assert len(r["module_acc"]) == r["modules"] - 1
    assert json.loads(out.read_text().strip().splitlines()[-1])["method"] == method


def test_same_seed_same_run(cifar_dir):
    a = L.main(train_args(cifar_dir, "--epochs", "2", "--warmup-epochs", "0"))
    b = L.main(train_args(cifar_dir, "--epochs", "2", "--warmup-epochs", "0"))
    assert a["history"] == b["history"] and a["module_acc"] == b["module_acc"]
    c = L.main(train_args(cifar_dir, "--epochs", "2", "--warmup-epochs", "0", "--seed", "1"))
    assert c["history"] != a["history"]


def test_resume_equals_uninterrupted(cifar_dir, tmp_path, monkeypatch):
    full = L.main(train_args(cifar_dir, "--epochs", "3", "--warmup-epochs", "1", "--save", str(tmp_path / "a.pt")))
    ck = str(tmp_path / "b.pt")
    real = L.train_epoch

    def crash_at_epoch_3(*a, **k):
        if a[10] == 3:                                   # the epoch argument
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(L, "train_epoch", crash_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        L.main(train_args(cifar_dir, "--epochs", "3", "--warmup-epochs", "1", "--save", ck))
    monkeypatch.setattr(L, "train_epoch", real)
    assert torch.load(ck, weights_only=False)["epoch"] == 2
    resumed = L.main(train_args(cifar_dir, "--epochs", "3", "--warmup-epochs", "1", "--resume", ck, "--save", ck))
    assert resumed["history"] == full["history"]
    a, b = torch.load(str(tmp_path / "a.pt"), weights_only=False), torch.load(ck, weights_only=False)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


# ------------------------------------------------------------------------------------------------ memory meter

def saved_bytes_from_graph(loss, params):
    """Independent count: walk the autograd graph and add up every distinct storage it saved for backward."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    seen, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for name in dir(fn):
            if name.startswith("_saved_"):
                v = getattr(fn, name)
                for t in (v if isinstance(v, (tuple, list)) else [v]):
                    if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in exclude:
                        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in fn.next_functions)
    return sum(seen.values())


def test_meter_matches_independent_count():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    expected = saved_bytes_from_graph(F.cross_entropy(net(x), y), net.parameters())
    meter = L.ActivationMeter(net.parameters())
    with meter:
        loss = F.cross_entropy(net(x), y)
    assert meter.current == meter.peak > 0
    loss.backward()
    assert meter.current == 0                                        # everything released after backward
    assert abs(meter.peak - expected) <= 0.1 * expected
    assert meter.peak >= 3 * 16 * 8 * 16 * 16 * 4                    # at least the three 8x16x16 feature maps


def test_dgl_K16_activation_peak_below_quarter_of_bp():
    peaks = {}
    for method, K in (("bp", 1), ("dgl", 16)):
        torch.manual_seed(0)
        net, m = build(method=method, K=K)
        batch = L.Batch(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), torch.zeros(1, 3, 1, 1),
                        torch.ones(1, 3, 1, 1))
        meter = L.ActivationMeter(list(net.parameters()) + list(m.parameters()))
        with meter:
            L.forward_backward(net, m, batch, torch.amp.GradScaler("cpu", enabled=False),
                               torch.autocast("cpu", enabled=False))
        peaks[method] = meter.peak
    assert peaks["dgl"] < 0.25 * peaks["bp"]


# ------------------------------------------------------------------------------------------------ data

def test_cifar10_loader_reads_real_format(tmp_path):
    xtr, ytr, xte, yte = write_cifar10(str(tmp_path))
    (a, b), (c, d) = L.load_torchvision("cifar10", str(tmp_path), allow_download=False)
    assert a.shape == (len(ytr), 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, xtr) and np.array_equal(b, ytr) and np.array_equal(c, xte) and np.array_equal(d, yte)


def test_svhn_loader_reads_real_format(tmp_path):
    ref = write_svhn(str(tmp_path))
    (a, b), (c, d) = L.load_torchvision("svhn", str(tmp_path), allow_download=False)
    assert np.array_equal(a, ref["train"][0]) and np.array_equal(b, ref["train"][1])
    assert np.array_equal(c, ref["test"][0]) and np.array_equal(d, ref["test"][1])
    assert b.min() >= 0 and b.max() <= 9                             # label 10 mapped to digit 0


def test_stl10_loader_reads_real_format(tmp_path):
    ref = write_stl10(str(tmp_path))
    (a, b), (c, d) = L.load_torchvision("stl10", str(tmp_path), allow_download=False)
    assert a.shape == (6, 3, 96, 96)
    assert np.array_equal(a, ref["train"][0]) and np.array_equal(b, ref["train"][1])
    assert np.array_equal(c, ref["test"][0]) and np.array_equal(d, ref["test"][1])
    assert L.DATASETS["stl10"].classes == 10                          # the originals' 100-class bug, fixed


def test_image_folder_loader(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, classes in (("train", ["cat", "dog", "eel"]), ("val", ["dog", "eel"])):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    args = L.parse_args(["--dataset", "folder", "--data-dir", str(tmp_path)])
    spec = L.resolve_config(args)
    assert (spec.classes, spec.size, args.norm, spec.pad_mode) == (3, 32, "cifar10", "reflect")
    tr, te = L.load_data(args, spec, torch.device("cpu"), torch.Generator())
    assert tr.images.shape == (6, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert sorted(te.labels.tolist()) == [1, 1, 2, 2]                 # val labels follow train's class order
    x, y = next(iter(te))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def _crops(img, pad, mode):
    """All (2p+1)^2 crops of one CHW image padded with zeros ('constant') or by reflection."""
    p = F.pad(img[None], (pad,) * 4, mode=mode)[0]
    H = img.shape[1]
    return [p[:, i:i + H, j:j + H] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


@pytest.mark.parametrize("name", ["svhn", "stl10", "cifar10"])
def test_augmentation_shapes_ranges_and_flips(name):
    spec = L.DATASETS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, spec.size, spec.size)).float() / 255
    out = L.augment(x, spec, g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    flipped = 0
    for i in range(len(x)):
        plain = any(torch.equal(out[i], c) for c in _crops(x[i], spec.pad, spec.pad_mode))
        mirrored = any(torch.equal(out[i], c) for c in _crops(x[i].flip(2), spec.pad, spec.pad_mode))
        assert plain or mirrored
        flipped += mirrored and not plain
    if spec.flip:
        assert 4 <= flipped <= 28
    else:
        assert flipped == 0                                           # SVHN is never flipped


def test_device_loader_normalises_and_covers_epoch():
    spec = L.DATASETS["cifar10"]
    imgs = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    loader = L.DeviceLoader(imgs, torch.arange(50), spec, 16, True, True, torch.Generator().manual_seed(0))
    ys = torch.cat([y for _, y in loader])
    assert sorted(ys.tolist()) == list(range(50)) and len(loader) == 4
    lo = (0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    hi = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    for x, _ in loader:
        assert (x.amin((0, 2, 3)) >= lo - 1e-5).all() and (x.amax((0, 2, 3)) <= hi + 1e-5).all()


# ------------------------------------------------------------------------------------------------ CLI

def test_bench_and_print_splits(capsys):
    r = L.main(["--method", "dgl", "--bench", "1", "--batch-size", "8", "--mem-iters", "1"])
    assert r["img_s"] > 0 and r["act_peak_bytes"] > 0 and r["modules"] == 16
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] is True
    L.main(["--method", "dgl", "--arch", "resnet110", "--K", "55", "--print-splits"])
    out = capsys.readouterr().out
    assert "55 module(s)" in out and "1,730,714" in out and "64x8x8" in out


def cli(*argv, cwd=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "local_learning.py"), *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--arch", "resnet32", "--K", "17"], "impossible"),
    (["--method", "bp", "--K", "4"], "end to end"),
    (["--balanced-memory", "--K", "2"], "balanced"),
    (["--dataset", "cifar10", "--data-dir", "EMPTY", "--no-download"], "data_batch_1"),
    (["--dataset", "svhn", "--data-dir", "EMPTY", "--no-download"], "train_32x32.mat"),
    (["--dataset", "stl10", "--data-dir", "EMPTY", "--no-download"], "train_X.bin"),
    (["--dataset", "folder", "--data-dir", "EMPTY"], "train"),
    (["--amp", "bf16", "--device", "cpu"], "CUDA"),
    (["--device", "gpu"], "not a device"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--method", "infopro", "--aux-widen", "0"], "--aux-widen must be"),
    (["--method", "dgl", "--aux-depth", "2"], "--aux-depth does not apply to dgl"),
    (["--method", "man", "--ema-decay", "1.5"], "--ema-decay must be in [0, 1]"),
    (["--method", "dgl", "--base", "infopro"], "add-on"),
    (["--method", "man", "--base", "greedy"], "composes with"),
    (["--method", "sgr", "--base", "mlaan"], "composes with"),
    (["--method", "mlaan", "--K", "8", "--mlaan-depth", "20"], "--mlaan-depth 20"),
    (["--method", "mlaan", "--K", "4"], "leap tables"),
    (["--resume", "EMPTY/none.pt"], "no such file"),
    (["--save", "EMPTY/no/dir/ck.pt"], "does not exist"),
    (["--out", "EMPTY/no/dir/r.jsonl"], "does not exist"),
    (["--subset", "1"], "at least 2"),
    (["--stages", "2,2"], "add --pipeline"),
    (["--bench", "2", "--save", "EMPTY/ck.pt"], "drop --save/--resume"),
])
def test_bad_input_one_line_nonzero_exit(argv, message, tmp_path):
    argv = [a.replace("EMPTY", str(tmp_path)) for a in argv]
    r = cli(*argv, "--epochs", "1", "--print-splits" if "--data-dir" not in argv else "--test-subset=8")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err
    if "--data-dir" in argv:
        assert str(tmp_path) in err                                   # names the folder to put the files in


def test_nan_loss_is_one_line_error(cifar_dir):
    r = cli(*train_args(cifar_dir, "--method", "greedy", "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e30"))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: training loss became") and "\n" not in err, err


# ------------------------------------------------------------------------------------------------ InfoPro

AUX_PARAMS = {  # spec section 2.2 (run-verified official AuxClassifier), inplanes 16 / 32 / 64, w=1, D=128
    "0c1f": ((2_176, 4_224, 8_320), (170, 330, 650)),
    "0c2f": ((18_688, 20_736, 24_832), (3_466, 5_514, 9_610)),
    "1c1f": ((8_896, 26_880, 45_312), (5_002, 19_210, 37_642)),
    "1c2f": ((25_408, 43_392, 61_824), (10_186, 28_170, 46_602)),
    "1c3f": ((41_920, 59_904, 78_336), (26_698, 44_682, 63_114)),
    "2c2f": ((34_688, 80_384, 98_816), (19_466, 65_162, 83_594)),
}


@pytest.mark.parametrize("config", sorted(AUX_PARAMS))
def test_infopro_aux_head_parameter_counts(config):
    for mode, counts in zip(("contrast", "cross_entropy"), AUX_PARAMS[config]):
        got = tuple(n_params(L.AuxClassifier(c, config, mode, 10, 1.0, 128)) for c in (16, 32, 64))
        assert got == counts, (config, mode)


def test_infopro_decoder_parameter_counts():
    assert [n_params(L.Decoder(c, (32, 32))) for c in (16, 32, 64)] == [2_091, 3_819, 7_275]


@pytest.mark.parametrize("arch, K, total", [("resnet32", 2, 47_211), ("resnet32", 4, 143_809),
                                            ("resnet32", 8, 315_117), ("resnet32", 16, 677_445),
                                            ("resnet110", 8, 334_829), ("resnet110", 16, 677_445)])
def test_infopro_total_aux_parameters(arch, K, total):
    _, method = build(arch=arch, method="infopro", K=K)
    assert n_params(method) == total


def test_supcon_matches_loop_definition():
    torch.manual_seed(0)
    z, y = torch.randn(7, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3])          # classes 2 and 3 have one sample
    zn, tau, total = F.normalize(z, dim=1), 0.07, 0.0
    for i in range(7):
        s = [float(zn[i] @ zn[j]) / tau for j in range(7)]
        log_den = np.log(sum(np.exp(s[a]) for a in range(7) if a != i))
        P = [p for p in range(7) if p != i and y[p] == y[i]]
        total += -sum(s[p] - log_den for p in P) / max(len(P), 1)
    assert L.supcon_loss(z, y).item() == pytest.approx(total / 7, rel=1e-5)


def test_infopro_lambda_schedule_and_published_values():
    net = L.LocalNet.resnet("resnet32", 10, L.split_ends("resnet32", 4), 32)
    m = L.attach(net, "infopro", dataset="cifar10")
    assert m.lambdas_all == (6, 0, 1, 2) and "published" in m.lambda_source
    assert m.weights == [(6, 0), (3.5, 1), (1, 2)]                         # spec's worked example
    _, m = build(method="infopro", K=2)
    assert m.weights == [(5, 1)]
    _, m = build(arch="resnet110", method="infopro", K=55)
    assert m.lambdas_all == (5, 0, 0.5, 1) and "not published" in m.lambda_source
    _, m = build(method="infopro", K=16, ixx_1=1, ixy_1=2, ixx_2=3, ixy_2=4)
    assert m.weights[0] == (1, 2) and m.weights[-1] == (3, 4) and m.lambda_source == "command line"


def test_infopro_local_loss_is_weighted_sum():
    torch.manual_seed(0)
    net, m = build(method="infopro", K=4, local_loss="cross_entropy")
    h = torch.randn(6, 32, 16, 16)                                         # module 1 ends after L2.1
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    batch = L.Batch(x, y, mean, std)
    loss, logits = m.local_loss(1, h, batch)
    l1, l2 = m.weights[1]
    dec = torch.sigmoid(m.aux[1]["decoder"](h))
    ref = l1 * F.binary_cross_entropy(dec, (x * std + mean).clamp(0, 1)) + l2 * F.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["contrast", "cross_entropy"])
def test_infopro_smoke(cifar_dir, mode):
    r = L.main(train_args(cifar_dir, "--method", "infopro", "--local-loss", mode))
    assert r["modules"] == 16 and 0 <= r["final_acc"] <= 100
    assert (r["module_acc"][0] is None) == (mode == "contrast")


def test_infopro_balanced_splits_only_where_published():
    net, m = build(arch="resnet110", method="infopro", K=3, balanced_memory=True)
    assert m.lambdas_all == (5, 0, 5, 0.1)
    with pytest.raises(L.UserError, match="balanced"):
        L.split_ends("resnet110", 8, True, "cifar10")
    with pytest.raises(L.UserError, match="balanced"):
        L.split_ends("resnet110", 2, True, "svhn")


# ------------------------------------------------------------------------------------------------ MAN


@pytest.mark.parametrize("arch, K, modules, lb_total", [("resnet32", 16, 15, 461_120), ("resnet110", 55, 54, 1_724_928),
                                                        ("resnet32", 8, 8, None), ("resnet110", 32, 32, None)])
def test_man_module_count_and_lb_parameters(arch, K, modules, lb_total):
    net, m = build_cli("--method", "man", "--arch", arch, "--K", str(K))
    assert net.K == modules                                        # MAN merges the stem into module 1
    assert n_params(m.lb) == n_params(m.ema)
    if lb_total:
        assert n_params(m.lb) == lb_total                          # spec 4: as large as the backbone


@pytest.mark.parametrize("K, arch, table", [
    (8, "resnet32", [(4.167, 0.417), (3.333, 0.333), (2.5, 0.25)]),
    (16, "resnet32", [(4.643, 0.464), (4.286, 0.429), (3.929, 0.393)]),
    (32, "resnet110", [(4.833, 0.483), (4.667, 0.467), (4.5, 0.45)]),
    (55, "resnet110", [(4.906, 0.491), (4.811, 0.481), (4.717, 0.472)]),
])
def test_man_stage_indexed_lambdas(K, arch, table):
    net, m = build_cli("--method", "man", "--arch", arch, "--K", str(K))
    stages = [L.unit_position(arch, e + 1)[0] for e in net.ends[:-1]]
    for s, (l1, l2) in zip(stages, m.base.weights):
        assert (l1, l2) == pytest.approx(table[s - 1], abs=1e-3)
    assert m.base.weights[0] != m.base.weights[-1] and all(l1 > 2 for l1, _ in m.base.weights)


def test_man_defaults_and_heads():
    net, m = build_cli("--method", "man")
    assert m.base.name == "infopro" and m.decay == 0.995
    head = m.base.aux[0]["head"]
    assert n_params(head) == 19_466                                # 2c2f + cross-entropy at 16 channels
    net, m = build_cli("--method", "man", "--base", "dgl")
    assert isinstance(m.base.aux[0], L.DGLAux) and m.base.aux_shapes[4] == (32, 16, 16)   # reads B_{k+1}'s output


def _man_step(m, net, batch):
    scaler, ac = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
    return L.forward_backward(net, m, batch, scaler, ac)


@pytest.mark.parametrize("base", ["infopro", "dgl"])
def test_man_ema_update_gradients_and_isolation(base):
    torch.manual_seed(0)
    net, m = build_cli("--method", "man", "--base", base, "--K", "8", "--ema-decay", "0.9")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batch = L.Batch(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    before = [[p.clone() for p in e.parameters()] for e in m.ema]
    tracked = [[p.clone() for p in b.parameters()] for b in m.tracked]
    snap = {}
    L.forward_backward(net, m, batch, torch.amp.GradScaler("cpu", enabled=False),
                       torch.autocast("cpu", enabled=False),
                       on_module_done=lambda k: snap.setdefault(k, [p.grad.clone() for p in net.units[net.bounds[k][0]].parameters()]))
    for k in range(net.K - 1):
        for e, e0, b in zip(m.ema[k].parameters(), before[k], tracked[k]):
            assert torch.allclose(e, 0.9 * e0 + 0.1 * b)                # one EMA step, pre-step block values
            assert e.grad is None and not e.requires_grad
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.lb[k].parameters())
    for k in range(net.K):                                            # later losses never touch module k
        assert all(torch.equal(a, p.grad) for a, p in zip(snap[k], net.units[net.bounds[k][0]].parameters()))


def test_man_negative_and_zero_weights_for_small_K(cifar_dir):
    net, m = build_cli("--method", "man", "--K", "4")                  # quirk: r = s/(K-2) reaches 1.5
    assert [w for w in m.base.weights] == [(2.5, 0.25), (0.0, 0.0), (-2.5, -0.25)]
    r = L.main(train_args(cifar_dir, "--method", "man", "--K", "4"))   # a module with weights (0, 0) is skipped
    assert r["modules"] == 4


def test_man_init_copy_and_bad_base():
    net, m = build_cli("--method", "man", "--man-init", "copy", "--K", "4")
    assert all(torch.equal(a, b) for a, b in zip(m.ema[0].parameters(), m.tracked[0].parameters()))
    net, m = build_cli("--method", "man", "--K", "4")
    assert not all(torch.equal(a, b) for a, b in zip(m.ema[0].parameters(), m.tracked[0].parameters()))
    with pytest.raises(L.UserError, match="composes with"):
        build_cli("--method", "man", "--base", "greedy")
    with pytest.raises(L.UserError, match="add-on"):
        build_cli("--method", "dgl", "--base", "infopro")


@pytest.mark.parametrize("base", ["infopro", "dgl"])
def test_man_smoke(cifar_dir, base):
    r = L.main(train_args(cifar_dir, "--method", "man", "--base", base))
    assert r["modules"] == 15 and 0 <= r["final_acc"] <= 100 and r["module_acc"][0] is not None


# ------------------------------------------------------------------------------------------------ AugLocal, PredSim

@pytest.mark.parametrize("arch, K, d, pyramid, modules, total", [
    # whole model, measured from the official constructors (ChenxiangMA/AugLocal)
    ("resnet32", 16, 1, 0.5, 15, 1_273_318), ("resnet32", 16, 3, 0, 13, 2_311_570),
    ("resnet32", 16, 3, 0.5, 13, 1_978_514), ("resnet32", 16, 5, 0, 11, 2_710_974),
    ("resnet32", 16, 5, 0.5, 11, 2_151_294), ("resnet110", 55, 1, 0.5, 54, 4_897_068),
    ("resnet110", 55, 3, 0, 52, 10_728_728), ("resnet110", 55, 3, 0.5, 52, 8_971_416),
    ("resnet110", 55, 5, 0.5, 50, 12_010_180),
])
def test_auglocal_parameter_counts_and_module_count(arch, K, d, pyramid, modules, total):
    net, m = build_cli("--method", "auglocal", "--arch", arch, "--K", str(K), "--aux-depth", str(d),
                       "--pyramid", str(pyramid))
    assert net.K == modules                                            # K' = K - d, as the official script
    assert n_params(net) + n_params(m) == total


def test_auglocal_layer_selection_and_pyramid():
    net, m = build_cli("--method", "auglocal", "--aux-depth", "3", "--pyramid", "0.5")
    assert m.depths == [3] * 6 + [2] * 6
    assert [a.selected for a in m.aux] == [[5, 10, 15], [6, 10, 15], [6, 11, 15], [7, 11, 15], [8, 11, 15],
                                           [8, 12, 15], [10, 15], [11, 15], [12, 15], [12, 15], [12, 15], [13, 15]]
    assert [n_params(a) for a in m.aux] == [77_578, 91_466] + [146_890] * 4 + [76_938] + [132_362] * 4 + [148_618]
    assert module_sizes_of(net)[-1] == 4                               # last module: d + 1 blocks + head
    _, m = build_cli("--method", "auglocal", "--arch", "resnet110", "--K", "55", "--aux-depth", "5", "--pyramid", "0.5")
    assert m.depths == [5] * 12 + [4] * 25 + [3] * 12                  # round half to even (4.5 -> 4)
    _, m = build_cli("--method", "auglocal", "--aux-depth", "1")
    assert isinstance(m.aux[0].head[0], nn.BatchNorm1d) and m.aux[0](torch.randn(2, 16, 32, 32)).shape == (2, 10)
    net, m = build_cli("--method", "auglocal", "--K", "8", "--aux-depth", "3")       # multi-block modules:
    assert module_sizes_of(net) == [1, 2, 2, 2, 2, 2, 4]                              # last = final d+1 units
    with pytest.raises(L.UserError, match="aux-depth"):
        build_cli("--method", "auglocal", "--K", "2", "--aux-depth", "9")


def module_sizes_of(net):
    return [b - a - (a == 0) for a, b in net.bounds]


def test_predsim_parameter_counts_and_similarity():
    net, m = build_cli("--method", "predsim")
    assert n_params(net) + n_params(m) == 751_216                      # official; 543,856 omits the sim conv
    net, m = build_cli("--method", "predsim", "--arch", "resnet110", "--K", "55")
    assert n_params(net) + n_params(m) == 2_844_086
    assert [n_params(m.aux[k].pred) for k in (0, 20, 40)] == [5_130] * 3
    y = torch.tensor([0, 0, 3])
    S = L.similarity_matrix(F.one_hot(y, 10).float())
    assert S[0, 1].item() == pytest.approx(1) and S[0, 2].item() == pytest.approx(-1 / 9)


def test_predsim_local_loss_formula():
    torch.manual_seed(0)
    net, m = build_cli("--method", "predsim")
    h, y = torch.randn(6, 32, 16, 16), torch.randint(0, 10, (6,))
    batch = L.Batch(torch.zeros(6, 3, 32, 32), y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    loss, logits = m.local_loss(7, h, batch)
    feat = m.aux[7].sim(h).flatten(2).std(2)
    feat = feat - feat.mean(1, keepdim=True)
    feat = feat / feat.norm(dim=1, keepdim=True)
    onehot = F.one_hot(y, 10).float()
    onehot = onehot - onehot.mean(1, keepdim=True)
    onehot = onehot / onehot.norm(dim=1, keepdim=True)
    ref = 0.99 * ((feat @ feat.t() - onehot @ onehot.t()) ** 2).mean() + 0.01 * F.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


@pytest.mark.parametrize("method, extra", [("auglocal", ("--aux-depth", "3", "--pyramid", "0.5")), ("predsim", ())])
def test_auglocal_predsim_smoke(cifar_dir, method, extra):
    r = L.main(train_args(cifar_dir, "--method", method, *extra))
    assert r["modules"] == (13 if method == "auglocal" else 16) and r["module_acc"][0] is not None


# ------------------------------------------------------------------------------------------------ SGR

def test_sgr_term_matches_analytic_gradient_and_finite_differences():
    torch.manual_seed(0)
    B = 5
    h_in = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
    W1 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y, target = torch.randint(0, 3, (B,)), torch.randn(B, 4, dtype=torch.float64) / B

    def D(w1, kind):
        logits = h_in @ w1 @ W2
        return L.sgr_term(F.cross_entropy(logits, y), h_in, target, kind)

    logits = h_in @ W1 @ W2
    a = (torch.softmax(logits, 1) - F.one_hot(y, 3)) / B @ W2.t() @ W1.t()      # dL/dh_in by hand
    diff = (a - target) * B
    assert D(W1, "sq_l2").item() == pytest.approx(diff.pow(2).sum(1).mean().item(), rel=1e-10)
    assert D(W1, "l2").item() == pytest.approx(diff.norm(dim=1).mean().item(), rel=1e-8)
    cos = F.cosine_similarity(a, target, dim=1)
    assert D(W1, "cos").item() == pytest.approx((1 - cos).mean().item(), rel=1e-10)
    for kind in ("sq_l2", "cos"):                                                 # d D / d W1 by finite differences
        g, = torch.autograd.grad(D(W1, kind), W1)
        e = torch.zeros_like(W1)
        e[1, 2] = 1e-6
        fd = (D(W1 + e, kind) - D(W1 - e, kind)).item() / 2e-6
        assert g[1, 2].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def _grads_after_step(net, m, batch):
    L.forward_backward(net, m, batch, torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False))
    return {n: p.grad.clone() for n, p in list(net.named_parameters()) + list(m.named_parameters()) if p.grad is not None}


def test_sgr_reaches_only_its_module_and_vanishes_at_zero_weight():
    torch.manual_seed(0)
    net, m = build_cli("--method", "sgr", "--base", "dgl", "--K", "4", "--sgr-weight", "1")
    state = ({k: v.clone() for k, v in net.state_dict().items()}, {k: v.clone() for k, v in m.state_dict().items()})
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batch = L.Batch(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    with_sgr = _grads_after_step(net, m, batch)
    net.load_state_dict(state[0]), m.load_state_dict(state[1])
    net.zero_grad(set_to_none=True), m.zero_grad(set_to_none=True)
    m.weight = 0.0
    without = _grads_after_step(net, m, batch)
    net2, dgl = build_cli("--method", "dgl", "--K", "4")                        # the plain base, same weights
    net2.load_state_dict(state[0])
    dgl.load_state_dict({k[len("base."):]: v for k, v in state[1].items()})
    plain = _grads_after_step(net2, dgl, batch)
    assert set(plain) == {k for k in without if not k.startswith("base.")} | {k[5:] for k in without if k.startswith("base.")}
    for k, g in without.items():                                               # lambda = 0: bit-identical to DGL
        assert torch.equal(g, plain[k[5:] if k.startswith("base.") else k])
    module_of = lambda name: next((j for j, (a, b) in enumerate(net.bounds) if name.startswith("units.") and
                                   a <= int(name.split(".")[1]) < b), None)
    for k in with_sgr:
        j = module_of(k) if k.startswith("units.") else (int(k.split(".")[2]) if k.startswith("base.aux.") else 3)
        if j == 0:
            assert torch.equal(with_sgr[k], without[k]), k                     # module 1: no term, untouched
    changed = lambda pred: any(not torch.equal(with_sgr[k], without[k]) for k in with_sgr if pred(k))
    for j in (1, 2):
        assert changed(lambda k: k.startswith("units.") and module_of(k) == j)                # backbone of module j
        assert changed(lambda k: k.startswith(f"base.aux.{j}."))                              # and its aux net
    assert changed(lambda k: k.startswith("head.fc."))                              # the last module gets a term too


def test_sgr_zero_weight_trains_exactly_like_base(cifar_dir):
    a = L.main(train_args(cifar_dir, "--method", "dgl", "--K", "4"))
    b = L.main(train_args(cifar_dir, "--method", "sgr", "--base", "dgl", "--K", "4", "--sgr-weight", "0"))
    # (SGR runs in the contiguous memory format on CPU, DGL in channels_last: the same numbers up to rounding)
    assert [(h["epoch"], h["train_acc"], h["test_acc"]) for h in a["history"]] == \
        [(h["epoch"], h["train_acc"], h["test_acc"]) for h in b["history"]] and a["module_acc"] == b["module_acc"]
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-5)


@pytest.mark.parametrize("base", ["infopro", "man+dgl", "auglocal"])
def test_sgr_smoke_and_bad_bases(cifar_dir, base):
    r = L.main(train_args(cifar_dir, "--method", "sgr", "--base", base, *(("--aux-depth", "1") if base == "auglocal" else ())))
    assert 0 <= r["final_acc"] <= 100 and r["modules"] == {"infopro": 16, "man+dgl": 15, "auglocal": 15}[base]
    with pytest.raises(L.UserError, match="composes with"):
        build_cli("--method", "sgr", "--base", "bp")


# ------------------------------------------------------------------------------------------------ MLAAN

@pytest.mark.parametrize("base, arch, K, modules, total", [
    # parameters the official constructors use in a training step (they also build unused heads; spec)
    ("greedy", "resnet32", 16, 15, 4_068_126), ("dgl", "resnet32", 16, 15, 19_172_042),
    ("infopro", "resnet32", 16, 15, 5_061_466), ("greedy", "resnet32", 8, 8, 2_135_314),
    ("dgl", "resnet32", 8, 8, 8_292_926), ("infopro", "resnet32", 8, 8, 2_423_866),
    ("greedy", "resnet110", 32, 32, 9_743_986), ("greedy", "resnet110", 55, 54, 15_547_722),
])
def test_mlaan_parameter_counts(base, arch, K, modules, total):
    net, m = build_cli("--method", "mlaan", "--base", base, "--arch", arch, "--K", str(K))
    assert net.K == modules and n_params(net) + n_params(m) == total


def test_mlaan_leap_chains_heads_and_weights():
    net, m = build_cli("--method", "mlaan")
    assert m.depth == 3 and m.first == 2 and sorted(map(int, m.aug)) == list(range(2, 14))
    name = lambda units: [L.unit_name("resnet32", u) for u in units]
    assert name(m.chain_units[2]) == ["L2.0", "L3.0", "L3.3", "L3.4"]
    assert name(m.chain_units[13]) == ["L3.4"]
    assert all(torch.equal(a, b) for a, b in zip(m.ema["5"].parameters(), net.units[11].parameters()))  # copies
    assert n_params(m.indep["2"]["head"]) == 25_408 and n_params(m.cascade["2"]["head"]) == 46_602
    assert m.weights[2] == pytest.approx((5 * 12 / 13, 0.5 * 12 / 13))                # r = stage / (M - 2)
    assert m.weights[12] == pytest.approx((5 * 10 / 13, 0.5 * 10 / 13))
    _, g = build_cli("--method", "mlaan", "--base", "greedy")
    assert g.depth == 2 and n_params(g.cascade["1"]) == 650
    assert [n_params(L.MLAANDGLAux(c, 10)) for c in (16, 32, 64)] == [635_146, 637_194, 641_290]
    with pytest.raises(L.UserError, match="leap tables"):
        build_cli("--method", "mlaan", "--K", "4")


@pytest.mark.parametrize("mode", ["last", "all"])
def test_mlaan_ema_updates_and_gradient_window(mode):
    torch.manual_seed(0)
    net, m = build_cli("--method", "mlaan", "--base", "greedy", "--K", "8", "--ema-decay", "0.9", "--mlaan-ema", mode)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batch = L.Batch(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    with torch.no_grad():                                   # make the tracked blocks differ from their copies
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = {i: [p.clone() for p in e.parameters()] for i, e in m.ema.items()}
    target = {i: [p.clone() for p in net.units[m.chain_units[int(i)][0]].parameters()] for i in m.ema}
    module_params = lambda k: [p for u in net.units[net.bounds[k][0]:net.bounds[k][1]] for p in u.parameters()]
    snap = {}
    L.forward_backward(net, m, batch, torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False),
                       on_module_done=lambda k: snap.__setitem__(k, [None if p.grad is None else p.grad.clone()
                                                                     for j in range(net.K) for p in module_params(j)]))
    last = str(net.K - 2)
    for i, e in m.ema.items():
        updated = mode == "all" or i == last
        for p, p0, t in zip(e.parameters(), before[i], target[i]):
            assert p.grad is None and not p.requires_grad
            assert torch.allclose(p, 0.9 * p0 + 0.1 * t) if updated else torch.equal(p, p0)
    assert all(p.grad is not None for p in m.aug[last].parameters())
    # Gradient window: module k's gradients are final once module k + D - 1 (D = 2) has run its backward.
    offsets = [0] + list(np.cumsum([len(module_params(j)) for j in range(net.K)]))
    for k in range(net.K):
        done = min(k + 1, net.K - 1)
        final = [p.grad for p in module_params(k)]
        later = snap[done][offsets[k]:offsets[k + 1]]
        assert all(a is not None and torch.equal(a, b) for a, b in zip(later, final))
        if k + 2 <= net.K - 1 and k >= 1:                  # ...but not before: the next module's loss reaches it
            own = snap[k][offsets[k]:offsets[k + 1]]
            assert any(a is None or not torch.equal(a, b) for a, b in zip(own, final))


@pytest.mark.parametrize("base", ["infopro", "dgl", "greedy"])
def test_mlaan_smoke(cifar_dir, base):
    r = L.main(train_args(cifar_dir, "--method", "mlaan", "--base", base))
    assert r["modules"] == 15 and 0 <= r["final_acc"] <= 100


# ------------------------------------------------------------------------------------------------ report, run_all.sh

def _result(method, seed, acc, K=16, base=None, img_s=100.0, act=1e8, modules=None):
    return dict(method=method, dataset="cifar10", arch="resnet32", K=K, modules=modules or K, seed=seed, epochs=160,
                base=base, final_acc=acc, best_acc=acc, module_acc=[50.0] * ((modules or K) - 1), act_peak_bytes=act,
                param_bytes=0, grad_bytes=0, opt_state_bytes=0, cuda_peak_alloc=None, train_img_s=img_s,
                device="cpu", history=[dict(epoch=160, loss=0.1, train_acc=99.0, test_acc=acc)])


def test_report_renders_papers_layout(tmp_path, capsys):
    rows = [_result("bp", 0, 93.0, K=1, img_s=200, act=4e8), _result("bp", 1, 92.0, K=1, img_s=200, act=4e8),
            _result("dgl", 0, 85.0, act=1e8, img_s=100), _result("dgl", 1, 87.0, act=1e8, img_s=100),
            _result("man", 0, 90.0, K=16, base="dgl", modules=15, act=2e8, img_s=50)]
    pipe = dict(_result("dgl", 2, 10.0), pipeline=True, stage_img_s=[1, 1])  # a --pipeline run: not in the tables
    del pipe["act_peak_bytes"]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows + [pipe]) + "\n")
    text = L.main(["--report", str(path)])
    lines = text.splitlines()
    assert "| method | resnet32 K=16 |" in lines
    assert "| bp | 7.50 ± 0.71 (n=2) |" in lines                       # BP's K=1 runs fill the K=16 column
    assert "| dgl | 14.00 ± 1.41 (n=2) |" in lines
    assert "| man+dgl | 10.00 ± 0.00 (n=1) |" in lines
    assert "| bp | resnet32 | 1 | 0.400 GB |  | 200 |  |" in lines
    assert "| dgl | resnet32 | 16 | 0.100 GB | 75.0 % | 100 | +100.0 % |" in lines
    assert "| man+dgl | resnet32 | 16 | 0.200 GB | 50.0 % | 50 | +300.0 % |" in lines
    assert any(l.startswith("### Per-module aux accuracy") and "line 4: dgl" in l for l in lines)
    assert text in capsys.readouterr().out


def test_run_all_quick_smoke(cifar_dir, tmp_path):
    env = dict(os.environ, QUICK="1", METHODS="bp dgl", DATASETS="cifar10", GRID="resnet32:4", DATA_DIR=cifar_dir,
               RESULTS_QUICK=str(tmp_path / "q.jsonl"), PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = [json.loads(l) for l in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [(x["method"], x["K"]) for x in runs] == [("bp", 1), ("dgl", 4)]
    again = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert "0 run(s) made, 2 already" in again.stdout and len((tmp_path / "q.jsonl").read_text().splitlines()) == 2
    env.update(DATA_DIR=str(tmp_path / "nothing"), EXTRA="--no-download")
    missing = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], env=dict(env, RESULTS_QUICK=str(tmp_path / "m")),
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "data_batch_1" in missing.stderr and "stopped" in missing.stderr


def test_resume_refuses_a_different_run(cifar_dir, tmp_path):
    ck = str(tmp_path / "c.pt")
    L.main(train_args(cifar_dir, "--save", ck))
    r = cli(*train_args(cifar_dir, "--resume", ck, "--lr", "0.5"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --resume") and "lr=" in r.stderr


@pytest.mark.parametrize("argv", [("bp",), ("greedy",), ("dgl",), ("predsim",), ("infopro",), ("auglocal",),
                                  ("man",), ("man", "--base", "dgl"), ("mlaan",), ("mlaan", "--base", "dgl"),
                                  ("mlaan", "--base", "greedy"), ("sgr", "--base", "dgl"), ("sgr", "--base", "man+infopro")])
def test_every_method_learns_one_batch(argv):
    """A few SGD steps on one fixed batch lower the summed (local + final) losses: every method really trains."""
    torch.manual_seed(0)
    chain = L.method_chain(argv[0], argv[2] if len(argv) > 2 else None)
    ce = ("--local-loss", "cross_entropy") if "infopro" in chain else ()
    net, m = build_cli("--method", *argv, "--K", "1" if argv[0] == "bp" else "8", *ce)
    opt = torch.optim.SGD(list(net.parameters()) + list(m.parameters()), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    batch = L.Batch(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        s = L.forward_backward(net, m, batch, torch.amp.GradScaler("cpu", enabled=False),
                               torch.autocast("cpu", enabled=False))
        K = net.K
        losses.append(float(s[0] + s[2:2 + K - 1].sum()))
        opt.step()
    assert losses[-1] < 0.9 * losses[0], losses


def test_mlaan_contrast_cascade_uses_supcon():
    net, m = build_cli("--method", "mlaan", "--local-loss", "contrast", "--K", "8")
    assert n_params(m.cascade["2"]["head"]) == 61_824                     # 1c2f contrast head on 64 channels
    x = torch.randn(4, 3, 32, 32)
    h = x
    for k in range(3):                                                     # the cascade re-runs modules 0..2
        m.start_module(k, h)
        h = m.run_module(net, k, h).detach()
    loss, logits = m.local_loss(2, h, L.Batch(x, torch.tensor([0, 0, 1, 1]), torch.zeros(1, 3, 1, 1),
                                              torch.ones(1, 3, 1, 1)))
    assert logits is None and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ issue 13 fixes

def _one_step(net, m, x, y, lr=0.1):
    opt = torch.optim.SGD(list(net.parameters()) + list(m.parameters()), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    opt.zero_grad(set_to_none=True)
    L.forward_backward(net, m, L.Batch(x, y), torch.amp.GradScaler("cpu", enabled=False),
                       torch.autocast("cpu", enabled=False))
    return opt


@pytest.mark.parametrize("base, D", [("greedy", 2), ("dgl", 3)])
def test_mlaan_runs_the_stem_once_and_counts_bn_updates_as_official(base, D):
    """Official BN update counts per iteration (stem 1, E_0 2, E_1 3, middle D+1, E_{M-2} 3, E_{M-1} 2)."""
    torch.manual_seed(0)
    net, m = build_cli("--method", "mlaan", "--base", base, "--K", "16")
    _one_step(net, m, torch.randn(4, 3, 32, 32), torch.arange(4) % 10)
    tracked = lambda u: int(next(b for n, b in net.units[u].named_buffers() if n.endswith("num_batches_tracked")))
    M = net.K
    unit_of = lambda k: net.bounds[k][1] - 1                       # each module's (last) residual block
    assert tracked(0) == 1                                          # the stem: once (it ran twice before the fix)
    assert [tracked(unit_of(k)) for k in (0, 1, M // 2, M - 2, M - 1)] == [2, 3, D + 1, 3, 2]
    assert all(p.grad is not None for p in net.units[0].parameters())  # ...and still learns from the cascade


def test_mlaan_dgl_head_pools_to_8x8_first():
    torch.manual_seed(0)
    head = L.MLAANDGLAux(16, 10).eval()
    h = torch.randn(2, 16, 32, 32)
    assert torch.allclose(head(h), head(F.adaptive_avg_pool2d(h, 8)))
    assert [n_params(L.MLAANDGLAux(c, 10)) for c in (16, 32, 64)] == [635_146, 637_194, 641_290]


@pytest.mark.parametrize("arch, K, total", [("resnet32", 16, 838_294), ("resnet110", 55, 3_375_036)])
def test_dgl_head_auglocal_counts(arch, K, total):
    """AugLocal repository's DGL head (counts of its constructor): two hidden Linear layers without bias."""
    assert [n_params(L.AugLocalDGLAux((c, s, s), 10)) for c, s in ((16, 32), (32, 16), (64, 8))] == \
        [9_962, 37_834, 147_338]
    _, m = build_cli("--method", "dgl", "--arch", arch, "--K", str(K), "--dgl-head", "auglocal")
    assert n_params(m) == total
    _, m = build_cli("--method", "dgl", "--arch", arch, "--K", str(K))
    assert n_params(m) == {16: 1_217_174, 55: 4_901_244}[K]      # the DGL authors' head (default)
    with pytest.raises(L.UserError, match="dgl-head"):
        build_cli("--method", "mlaan", "--base", "dgl", "--dgl-head", "auglocal")


def test_predsim_pools_like_the_official_helper_on_stl10():
    aux = L.PredSimAux(64, 24, 24, 10)                              # kernel 16x8, rows padded by 8: 2x3 cells
    assert aux.pred.in_features == 384 and n_params(aux.pred) == 3_850
    h = torch.randn(2, 64, 24, 24)
    padded = F.pad(h, (0, 0, 8, 8))                                 # zeros count in the average
    ref = F.avg_pool2d(padded, (16, 8))
    assert torch.allclose(aux.pool(h), ref)
    assert [L.PredSimAux(c, s, s, 10).pred.in_features for c, s in ((16, 96), (32, 48), (16, 32), (64, 8))] == \
        [288, 288, 512, 512]
    net, m = build_cli("--method", "predsim", "--dataset", "stl10")
    assert [m.aux[k].pred.in_features for k in range(11, 15)] == [384] * 4


def test_zero_weight_module_gets_zero_gradients_and_weight_decay():
    """MAN at K=4: module 1 has weights (0, 0); the originals still backpropagate 0 * loss."""
    torch.manual_seed(0)
    net, m = build_cli("--method", "man", "--K", "4")
    assert m.base.weights[1] == (0.0, 0.0)
    before = [p.clone() for p in net.units[net.bounds[1][0]].parameters()]
    opt = _one_step(net, m, torch.randn(4, 3, 32, 32), torch.arange(4) % 10)
    module1 = [p for u in net.units[slice(*net.bounds[1])] for p in u.parameters()]
    parts = [p for part in (m.lb[1], m.base.aux[1]["decoder"], m.base.aux[1]["head"]) for p in part.parameters()]
    assert all(p.grad is not None and not p.grad.any() for p in module1 + parts)
    assert all(p.grad is None for p in m.ema[1].parameters())      # frozen: as the original
    opt.step()
    for p, p0 in zip(net.units[net.bounds[1][0]].parameters(), before):
        assert torch.allclose(p, p0 * (1 - 0.1 * 1.9 * 1e-4))        # nesterov's first step: weight decay only


def test_mlaan_infopro_copies_trained_by_default_frozen_on_request():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % 10
    net, m = build_cli("--method", "mlaan", "--K", "8")
    _one_step(net, m, x, y)
    assert all(p.requires_grad and p.grad is not None for k in m.ema for p in m.ema[k].parameters())
    net, m = build_cli("--method", "mlaan", "--K", "8", "--mlaan-copies", "frozen")
    _one_step(net, m, x, y)
    assert all(p.grad is None for k in m.ema for p in m.ema[k].parameters())
    _, g = build_cli("--method", "mlaan", "--base", "greedy", "--K", "8")
    assert all(not p.requires_grad for p in g.ema.parameters())   # the greedy/dgl files freeze them


def _write_bad_files(root):
    from PIL import Image
    c = os.path.join(root, "c", "cifar-10-batches-py")
    os.makedirs(c)
    write_cifar10(os.path.join(root, "c"))
    with open(os.path.join(c, "data_batch_3"), "r+b") as f:
        f.truncate(100)
    os.makedirs(os.path.join(root, "s"))
    write_svhn(os.path.join(root, "s"))
    with open(os.path.join(root, "s", "test_32x32.mat"), "wb") as f:
        f.write(b"MATLAB garbage" * 20)
    write_stl10(os.path.join(root, "t"))
    with open(os.path.join(root, "t", "stl10_binary", "train_X.bin"), "ab") as f:
        f.write(b"xyz")
    for split in ("train", "val"):
        d = os.path.join(root, "f", split, "cat")
        os.makedirs(d)
        for i in range(3):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(d, f"{i}.png"))
    with open(os.path.join(root, "f", "val", "cat", "1.png"), "wb") as f:
        f.write(b"not a png")


@pytest.mark.parametrize("dataset, sub, bad", [("cifar10", "c", "data_batch_3"), ("svhn", "s", "test_32x32.mat"),
                                               ("stl10", "t", "train_X.bin"), ("folder", "f", "1.png")])
def test_corrupt_dataset_files_are_one_line_errors(tmp_path, dataset, sub, bad):
    _write_bad_files(str(tmp_path))
    r = cli("--dataset", dataset, "--data-dir", str(tmp_path / sub), "--no-download", "--epochs", "1",
            "--batch-size", "4")
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error:") and "\n" not in err, err
    assert bad in err and ("delete" in err)


# ------------------------------------------------------------------------------------------------ ImageNet configs

def test_imagenet_split_tables():
    assert module_sizes("resnet101", 2) == [4, 29]                   # InfoPro*/MAN K=2: boundary [2,0]
    assert module_sizes("resnet152", 2) == [9, 41]                   # [2,5]
    assert module_sizes("resnet101", 4) == [6, 10, 8, 9]             # MAN++ K=4: [2,2],[3,8],[3,16]
    assert module_sizes("resnet152", 4) == [10, 15, 12, 13]          # [2,6],[3,13],[3,25]
    assert module_sizes("resnet34", 17) == [0] + [1] * 16            # AugLocal: the stem alone, then one block each
    assert module_sizes("resnet34", 16) == [1] * 16                  # MLAAN (stem in module 1)
    assert module_sizes("resnet101", 33) == [1] * 33


@pytest.mark.parametrize("argv, total, trainable", [
    # the official ImageNet constructors (run on CPU), whole model: InfoPro-Pytorch, MAN, MAN_PlusPlus's K=4 lists
    # (plain MAN: without MAN++'s 3 learnable scales), AugLocal's run.sh, MLAAN's used parts (+ frozen EMA blocks)
    (("infopro", "resnet101", "2"), 49_299_419, 49_299_419), (("infopro", "resnet152", "2"), 64_943_067, 64_943_067),
    (("man", "resnet101", "2"), 49_859_547, 49_579_483), (("man", "resnet152", "2"), 65_503_195, 65_223_131),
    (("man", "resnet101", "4"), 65_062_977, 62_548_545), (("man", "resnet152", "4"), 80_706_625, 78_192_193),
    (("auglocal", "resnet34", "17", "--aux-depth", "4"), 176_157_608, 176_157_608),
    (("mlaan", "resnet34", "16", "--base", "greedy"), 179_155_512, 161_218_360),
    (("mlaan", "resnet101", "33", "--base", "greedy"), 610_117_256, 455_853_192),
])
def test_imagenet_parameter_counts_match_official_constructors(argv, total, trainable):
    method, arch, K, *extra = argv
    with torch.device("meta"):                                       # shapes only: no memory, no init time
        net, m = build_cli("--method", method, "--dataset", "imagenet", "--arch", arch, "--K", K, *extra)
    assert n_params(net) + n_params(m) == total
    assert sum(p.numel() for p in list(net.parameters()) + list(m.parameters()) if p.requires_grad) == trainable


def test_imagenet_aux_nets_protocols_and_weights():
    with torch.device("meta"):
        net, m = build_cli("--method", "infopro", "--dataset", "imagenet", "--arch", "resnet101", "--K", "2")
        assert isinstance(m.aux[0]["decoder"], L.ImageNetDecoder) and m.weights == [(5, 0.75)] and not m.contrast
        assert n_params(m.aux[0]["decoder"]) == 106_699 and n_params(m.aux[0]["head"]) == 4_643_560
        net, m = build_cli("--method", "man", "--dataset", "imagenet", "--arch", "resnet101", "--K", "4")
        assert [n_params(a["decoder"]) for a in m.base.aux] == [106_699, 232_011, 232_011]
        assert [n_params(a["head"]) for a in m.base.aux] == [4_643_560, 5_135_336, 5_135_336]
        assert m.base.weights == [(5, 0.75)] * 3                     # hard-coded in MAN's ImageNet code
        _, m = build_cli("--method", "infopro", "--dataset", "imagenet", "--arch", "resnet152", "--K", "2")
        assert m.weights == [(5, 1)]
    protocol = lambda *a: (lambda args: (L.resolve_config(args), (args.batch_size, args.lr, args.epochs,
                                                                 args.warmup_epochs))[1])(L.parse_args(list(a)))
    im = ("--dataset", "imagenet")
    assert protocol("--method", "infopro", *im) == (1024, 0.4, 90, 0)
    assert protocol("--method", "man", *im) == (128, 0.05, 90, 0)
    assert protocol("--method", "auglocal", *im) == (1024, 0.4, 200, 0)
    assert protocol("--method", "mlaan", "--base", "greedy", *im) == (128, 0.05, 150, 0)
    assert protocol("--method", "dgl", *im) == (256, 0.1, 90, 0)
    assert L.lr_at(1, 0.4, 90, 0, "imagenet") == 0.4                # counted from epoch 0, no warm-up
    with pytest.raises(L.UserError, match="greedy"):
        build_cli("--method", "mlaan", "--dataset", "imagenet", "--arch", "resnet34", "--K", "16")


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in "ab":
            os.makedirs(root / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return str(root)


@pytest.mark.parametrize("argv", [("infopro", "resnet101", "2"), ("man", "resnet101", "4"),
                                  ("auglocal", "resnet34", "17", "--aux-depth", "4"),
                                  ("mlaan", "resnet34", "16", "--base", "greedy")])
def test_imagenet_aux_nets_smoke(tiny_imagenet, argv):
    method, arch, K, *extra = argv
    r = L.main(["--method", method, "--arch", arch, "--K", K, *extra, "--dataset", "imagenet", "--data-dir",
                tiny_imagenet, "--epochs", "1", "--batch-size", "2", "--workers", "0", "--mem-iters", "1"])
    assert r["modules"] == int(K) and 0 <= r["final_acc"] <= 100 and math.isfinite(r["history"][0]["loss"])


# ------------------------------------------------------------------------------------------------ data parallel

def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_train(net, m, rank, world, steps, eval_bn, sync=True, N=9, dtype=torch.float32):
    """`steps` SGD steps on fixed random global batches of N (N odd: rank parts of 4 and 5); returns the
    gradients of every step (the rank's copy after the all-reduce)."""
    net.to(dtype), m.to(dtype)
    params = list(net.parameters()) + list(m.parameters())
    opt = torch.optim.SGD(params, lr=0.005 if eval_bn else 0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    averager = L.GradAverager(params) if sync else None
    scaler, ac = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
    g, grads = torch.Generator().manual_seed(1), []
    if eval_bn:   # BatchNorm on running statistics set from one full calibration batch (the same on every rank)
        bns = [b for b in list(net.modules()) + list(m.modules()) if isinstance(b, nn.modules.batchnorm._BatchNorm)]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None                                  # cumulative average: after one batch, its statistics
        L.forward_backward(net, m, L.Batch(torch.randn(N, 3, 32, 32, generator=g).to(dtype), torch.arange(N) % 10),
                           scaler, ac)
        opt.zero_grad(set_to_none=True)
    net.train(not eval_bn), m.train(not eval_bn)
    for _ in range(steps):
        x, y = torch.randn(N, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 10, (N,), generator=g)
        part = L.shard(N, rank, world)
        L.train_step(net, m, opt, L.Batch(x[part], y[part]), scaler, ac, None, averager, len(y[part]) / N)
        grads.append({n: p.grad.clone() for n, p in list(net.named_parameters()) + list(m.named_parameters())
                      if p.grad is not None})
    if averager is not None:   # which module's backward finalises each gradient (its all-reduce starts there)
        names = {p: n for n, p in list(net.named_parameters()) + list(m.named_parameters())}
        grads.append({k: sorted(names[p] for p in ps) for k, ps in averager.buckets.items()})
    return grads


DDP_METHODS = {"bp": ("--method", "bp", "--K", "1"), "dgl": ("--method", "dgl", "--K", "8"),
               "infopro": ("--method", "infopro", "--K", "8", "--local-loss", "cross_entropy"),
               "man": ("--method", "man", "--base", "dgl", "--K", "8"),
               "mlaan": ("--method", "mlaan", "--base", "greedy", "--K", "8"),
               "sgr": ("--method", "sgr", "--base", "dgl", "--K", "8")}


def _ddp_worker(rank, world, port, out, eval_bn, names, dtype):
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name in names:
            torch.manual_seed(0)
            net, m = build_cli(*DDP_METHODS[name])
            L.DataParallel(torch.device("cpu")).prepare(net, m, False)
            grads = _ddp_train(net, m, rank, world, 3, eval_bn, dtype=dtype)
            torch.save(dict(grads=grads, params={**dict(net.named_parameters()), **dict(m.named_parameters())}),
                       os.path.join(out, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(out, eval_bn, names, world=2, dtype=torch.float32):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(out), eval_bn, names, dtype), nprocs=world, join=True)
    return {(n, r): torch.load(os.path.join(out, f"{n}_{r}.pt"), weights_only=False) for n in names
            for r in range(world)}


def test_data_parallel_ranks_stay_bit_identical(tmp_path):
    """Train mode (per-rank BatchNorm statistics), 3 steps: every parameter, EMA copies included, is the same
    bit for bit on both ranks, and training moved it."""
    res = _spawn(tmp_path, False, list(DDP_METHODS))
    for name in DDP_METHODS:
        a, b = res[(name, 0)]["params"], res[(name, 1)]["params"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        torch.manual_seed(0)
        net, m = build_cli(*DDP_METHODS[name])
        buckets = res[(name, 0)]["grads"][-1]
        if name == "dgl":           # one bucket per module: its units and its aux net, launched after its backward
            assert sorted(buckets) == list(range(8))
            assert all(n.startswith(("units.", "aux.3.")) for n in buckets[3]) and "aux.3.mlp.9.bias" in buckets[3]
        if name == "mlaan":         # cascade depth 2: module k's gradients are final after module k+1's backward
            k = next(k for k, (a, b) in enumerate(net.bounds) if a <= 2 < b)
            assert "units.2.conv1.weight" in buckets[k + 1]
        init = {**dict(net.named_parameters()), **dict(m.named_parameters())}
        assert any(not torch.equal(init[k], a[k]) for k in a), name


def test_data_parallel_gradient_equals_single_process_gradient(tmp_path):
    """BatchNorm in eval mode (running statistics: no sample interacts with another, so the 2-rank average must
    be the full-batch gradient), float64 (so that float rounding, amplified by training, stays invisible): with
    rank parts of 4 and 5 of a global batch of 9, after the first step (averaged at its end) and the next ones
    (bucketed, overlapped), the averaged gradients equal one process's on the global batch."""
    names = ["bp", "dgl", "infopro", "man", "mlaan", "sgr"]
    res = _spawn(tmp_path, True, names, dtype=torch.float64)
    for name in names:
        torch.manual_seed(0)
        net, m = build_cli(*DDP_METHODS[name])
        ref = _ddp_train(net, m, 0, 1, 3, True, sync=False, dtype=torch.float64)
        for step, (g1, g2) in enumerate(zip(ref, res[(name, 0)]["grads"][:-1])):
            assert g1.keys() == g2.keys(), name
            for k in g1:
                assert torch.isfinite(g1[k]).all() and torch.allclose(g1[k], g2[k], rtol=1e-7, atol=1e-10), \
                    (name, step, k)


def _torchrun(*argv, nproc=2, cwd=None):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           os.path.join(HERE, "local_learning.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_torchrun_only_rank0_writes(cifar_dir, tmp_path):
    out, ck = str(tmp_path / "r.jsonl"), str(tmp_path / "ck.pt")
    r = _torchrun(*train_args(cifar_dir, "--method", "dgl", "--K", "4", "--out", out, "--save", ck))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("config:") == 1 and r.stdout.count("world_size=2") == 1
    lines = open(out).read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["world_size"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "r.jsonl"]            # no stray temporary files


def _main_worker(rank, world, port, argv, crash_epoch, out):
    """L.main in a process of a gloo group, as torchrun would start it; optionally interrupted at an epoch."""
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real = L.train_epoch

    def crash(*a, **k):
        if a[10] == crash_epoch:                                          # the epoch argument
            raise KeyboardInterrupt
        return real(*a, **k)

    L.train_epoch = crash
    try:
        r = L.main(argv)
        with open(os.path.join(out, f"result_{rank}.json"), "w") as f:
            json.dump(r["history"], f)
    except KeyboardInterrupt:
        pass
    finally:
        L.train_epoch = real
        if dist.is_initialized():
            dist.destroy_process_group()


def test_data_parallel_resume_equals_uninterrupted(cifar_dir, tmp_path):
    import torch.multiprocessing as mp
    run = lambda argv, crash, out: mp.spawn(_main_worker, args=(2, _free_port(), argv, crash, str(out)), nprocs=2)
    argv = train_args(cifar_dir, "--method", "man", "--base", "dgl", "--K", "4", "--epochs", "3", "--warmup-epochs", "1")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run(argv, None, tmp_path / "a")
    ck = str(tmp_path / "b" / "ck.pt")
    run(argv + ["--save", ck], 3, tmp_path / "b")
    assert torch.load(ck, weights_only=False)["epoch"] == 2
    run(argv + ["--save", ck, "--resume", ck], None, tmp_path / "b")
    full = json.load(open(tmp_path / "a" / "result_0.json"))
    assert json.load(open(tmp_path / "b" / "result_0.json")) == full == json.load(open(tmp_path / "b" / "result_1.json"))


def test_distributed_bad_launches_are_one_line():
    r = cli("--sync-bn", "--print-splits")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --sync-bn needs several processes")
    r = cli("--pipeline", "--print-splits")
    assert r.returncode == 2 and "torchrun" in r.stderr and "\n" not in r.stderr.strip()


# ------------------------------------------------------------------------------------------------ pipeline

PIPE_METHODS = {"greedy": ("--method", "greedy"), "dgl": ("--method", "dgl"), "predsim": ("--method", "predsim"),
                "infopro": ("--method", "infopro"), "auglocal": ("--method", "auglocal", "--aux-depth", "1"),
                "sgr": ("--method", "sgr", "--base", "dgl"), "man": ("--method", "man", "--base", "dgl")}


def _pipe_worker(rank, world, port, jobs):
    """Every job's L.main in one gloo group of `world` stages (one thread each)."""
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for argv in jobs:
            L.main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout = sys.__stdout__


def _sequential(argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                          # the stages' arithmetic: bit-identical results
    try:
        return L.main(argv)
    finally:
        torch.set_num_threads(threads)


def _pipe_args(cifar_dir, name, ck, *extra):
    return train_args(cifar_dir, *PIPE_METHODS[name], "--K", "8", "--epochs", "2", "--warmup-epochs", "1",
                      "--save", ck, *extra)


@pytest.mark.parametrize("S, stages", [(2, None), (3, "2,3,3")])
def test_pipeline_equals_sequential_bit_for_bit(cifar_dir, tmp_path, S, stages):
    """2 epochs of 2 batches through S gloo stages: every parameter and BatchNorm buffer of the backbone and of
    every aux net (MAN's EMA copies included) equals the single-process run's, bit for bit."""
    import torch.multiprocessing as mp
    extra = ("--pipeline",) + (("--stages", stages) if stages else ())
    jobs = [_pipe_args(cifar_dir, n, str(tmp_path / f"{n}_pipe.pt"), *extra) for n in PIPE_METHODS]
    mp.spawn(_pipe_worker, args=(S, _free_port(), jobs), nprocs=S, join=True)
    for n in PIPE_METHODS:
        seq = _sequential(_pipe_args(cifar_dir, n, str(tmp_path / f"{n}_seq.pt")))
        a = torch.load(tmp_path / f"{n}_seq.pt", weights_only=False)
        b = torch.load(tmp_path / f"{n}_pipe.pt", weights_only=False)
        assert b["stages"] == ([2, 3, 3] if stages else b["stages"]) and len(b["stages"]) == S
        for who in ("net", "method"):
            assert a[who].keys() == b[who].keys()
            for k in a[who]:
                assert torch.equal(a[who][k], b[who][k]), (n, S, who, k)
        assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]] == \
            [h["test_acc"] for h in seq["history"]], n
        assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6), n


def _pipe_crash_worker(rank, world, port, argv, crash_at_eval):
    """Like _pipe_worker, interrupted (on every stage) at evaluation number `crash_at_eval` (None: not at all)."""
    real, calls = L.evaluate_pipeline, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == crash_at_eval:
            raise KeyboardInterrupt
        return real(*a, **k)

    L.evaluate_pipeline = crash
    try:
        _pipe_worker(rank, world, port, [argv])
    except KeyboardInterrupt:
        pass
    finally:
        L.evaluate_pipeline = real


def test_pipeline_resume_equals_uninterrupted(cifar_dir, tmp_path):
    import torch.multiprocessing as mp
    run = lambda argv, crash: mp.spawn(_pipe_crash_worker, args=(2, _free_port(), argv, crash), nprocs=2)
    argv = lambda ck, *x: train_args(cifar_dir, "--method", "man", "--base", "dgl", "--K", "8", "--epochs", "3",
                                     "--warmup-epochs", "1", "--pipeline", "--stages", "3,5", "--save", ck, *x)
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    run(argv(a), None)
    run(argv(b), 2)                                       # stopped in epoch 2: the checkpoint holds epoch 1
    assert torch.load(b, weights_only=False)["epoch"] == 1
    resume = [v for v in argv(b, "--resume", b) if v not in ("--stages", "3,5")]
    run(resume, None)                                     # (the saved stages, without --stages)
    ca, cb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    keep = lambda h: [(r["epoch"], r["loss"], r["train_acc"], r["test_acc"], r["aux_acc"]) for r in h]
    assert keep(ca["history"]) == keep(cb["history"]) and ca["epoch"] == cb["epoch"] == 3
    for who in ("net", "method"):
        assert all(torch.equal(ca[who][k], cb[who][k]) for k in ca[who])


@pytest.mark.parametrize("argv, message", [
    (("--method", "mlaan"), "MLAAN's cascade backpropagates"), (("--method", "sgr", "--base", "man+dgl"), "chains"),
    (("--method", "bp"), "cannot fill"), (("--method", "dgl", "--amp", "fp16"), "fp16"),
    (("--method", "dgl", "--sync-bn"), "data parallel"), (("--method", "dgl", "--stages", "4,4"), "--stages 4,4"),
    (("--method", "dgl", "--stages", "1,x"), "--stages 1,x")])
def test_pipeline_refuses_what_it_does_not_support(argv, message):
    args = L.parse_args(list(argv) + ["--pipeline"])
    L.resolve_config(args)
    net, m = L.build(args, L.DATASETS["cifar10"])
    with pytest.raises(L.UserError, match=message):
        L.check_pipeline(args, net, m.opts.chain, 3)


def test_pipeline_refusal_is_one_line_under_torchrun(cifar_dir):
    r = _torchrun(*train_args(cifar_dir, "--method", "mlaan", "--pipeline"))
    assert r.returncode != 0 and "error: --pipeline: MLAAN's cascade backpropagates" in r.stderr
    assert r.stderr.count("error: --pipeline") == 1
    r = _torchrun(*train_args(cifar_dir, "--method", "dgl", "--batch-size", "3"))    # data parallel: 2 per rank
    assert r.returncode != 0 and r.stderr.count("error: --batch-size 3 is the global batch") == 1


def test_pipeline_boundary_dtype_is_the_sequential_runs():
    """Activations travel as float32; a stage casts them back to what its first module receives sequentially."""
    net = L.LocalNet.resnet("resnet20", 10, L.split_ends("resnet20", 4), 32)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    assert L.boundary_dtype(net, 2, torch.bfloat16, bf16, torch.device("cpu")) == torch.bfloat16
    assert L.boundary_dtype(net, 2, None, contextlib.nullcontext(), torch.device("cpu")) == torch.float32
    assert L.boundary_dtype(net, 0, torch.bfloat16, bf16, torch.device("cpu")) == torch.float32
    assert net.training


def test_balance_minimises_the_largest_stage():
    assert L.balance([1, 1, 1, 1], 2) == [2, 2]
    assert L.balance([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert L.balance([1, 2, 3, 4, 5, 6], 3) == [3, 2, 1]                 # 6 | 9 | 6
    assert sum(L.balance(list(range(1, 56)), 4)) == 55


# ------------------------------------------------------------------------------------------------ Python API

def readme_snippet():
    text = open(os.path.join(HERE, "README.md")).read()
    section = text.split("## Use it in your project", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_api_snippet_runs_as_written(tmp_path):
    code = readme_snippet()
    assert 15 <= len(code.strip().splitlines()) <= 25
    (tmp_path / "snippet.py").write_text(code)
    r = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=HERE))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("step  0") and lines[-1].startswith("activation peak")


def torchvision_resnet18(K, size=32, block=None):
    import torchvision
    tv = torchvision.models.resnet18(num_classes=10)
    units = [nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool), *tv.layer1, *tv.layer2, *tv.layer3, *tv.layer4]
    return L.LocalNet(units, nn.Sequential(tv.avgpool, nn.Flatten(), tv.fc), K, torch.zeros(1, 3, size, size),
                      block=block)


class TokenHead(nn.Module):
    def __init__(self, d, classes):
        super().__init__()
        self.fc = nn.Linear(d, classes)

    def forward(self, h):
        return self.fc(h.mean(1))


def tiny_transformer(K, d=32, tokens=64, layers=6):
    torch.manual_seed(0)
    units = [nn.Linear(8, d)] + [nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
                                 for _ in range(layers)]
    return L.LocalNet(units, TokenHead(d, 10), K, torch.zeros(1, tokens, 8))


def _check_local_learning(make, x, y, method, base=None, steps=6, memory=True, **opts):
    """Gradient isolation (later losses never touch module k), activation peak below BP's (`memory`), and a few
    SGD steps on one batch lower the summed losses."""
    torch.manual_seed(0)
    net = make()
    m = L.attach(net, method, base=base, **opts)
    params = [*net.parameters(), *m.parameters()]
    snap = {}
    module_params = lambda k: [p for u in net.units[slice(*net.bounds[k])] for p in u.parameters()]
    with L.ActivationMeter(params) as meter:
        L.forward_backward(net, m, L.Batch(x, y), on_module_done=lambda k: snap.__setitem__(
            k, [p.grad.clone() for j in range(k + 1) for p in module_params(j)]))
    final = [p.grad for j in range(net.K) for p in module_params(j)]
    assert all(torch.equal(a, b) for k in snap for a, b in zip(snap[k], final))    # nothing changes after module k
    bp_net = make()
    bp_net.set_split([len(bp_net.units) - 1])
    bp = L.attach(bp_net, "bp")
    with L.ActivationMeter([*bp_net.parameters()]) as bp_meter:
        L.forward_backward(bp_net, bp, L.Batch(x, y))
    assert meter.peak < bp_meter.peak or not memory, (meter.peak, bp_meter.peak)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        s = L.forward_backward(net, m, L.Batch(x, y))
        losses.append(float(s[0] + s[2:net.K + 1].sum()))
        opt.step()
    assert losses[-1] < losses[0], losses
    return net, m


@pytest.mark.parametrize("method, base", [("greedy", None), ("dgl", None), ("sgr", "dgl"), ("man", "dgl"),
                                          ("infopro", None), ("auglocal", None)])
def test_api_on_torchvision_resnet18(method, base):
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    opts = dict(aux_depth=2) if method == "auglocal" else dict(local_loss="cross_entropy") if method == "infopro" else {}
    block = L.BasicBlock if method == "auglocal" else None     # AugLocal rebuilds the later blocks at its widths
    # (InfoPro's full-resolution decoder and AugLocal's copied blocks outweigh this small net's own activations)
    net, m = _check_local_learning(lambda: torchvision_resnet18(4, block=block), x, y, method, base,
                                   memory=method in ("greedy", "dgl", "sgr"), **opts)
    assert net.K == 4 and net.arch is None


@pytest.mark.parametrize("method, base", [("greedy", None), ("dgl", None), ("sgr", "dgl"), ("sgr", "greedy"),
                                          ("auglocal", None), ("man", "dgl")])
def test_api_on_token_transformer(method, base):
    x, y = torch.randn(16, 64, 8), torch.arange(16) % 10
    opts = dict(aux_depth=1) if method == "auglocal" else {}        # (deep copies: a transformer's shapes chain)
    # (SGR's double backward runs attention on the math kernel, heavier than BP's fused one: one layer per module)
    net, m = _check_local_learning(lambda: tiny_transformer(7), x, y, method, base,
                                   memory=method in ("greedy", "dgl", "sgr"), **opts)
    assert net.unit_shapes[-1] == (64, 32) and net.ends == list(range(1 if method == "man" else 0, 7))


def test_api_errors_for_unsupported_backbones():
    with pytest.raises(L.UserError, match="reconstructs the input image"):
        L.attach(tiny_transformer(3), "infopro")
    with pytest.raises(L.UserError, match="image-shaped features"):
        L.attach(tiny_transformer(3), "predsim")
    with pytest.raises(L.UserError, match="leap tables"):
        L.attach(torchvision_resnet18(8), "mlaan", base="greedy")
    with pytest.raises(L.UserError, match="do not chain"):
        L.attach(torchvision_resnet18(8), "auglocal", aux_depth=3)          # copies of layer2[1] after layer1
    with pytest.raises(L.UserError, match="does not apply"):
        L.attach(torchvision_resnet18(4), "dgl", ema_decay=0.9)
    with pytest.raises(L.UserError, match="--lambdas does not apply"):     # resolved internally, not an option
        L.attach(torchvision_resnet18(4), "predsim", lambdas=((0.5, 0.5, 0.5, 0.5), "mine"))
    with pytest.raises(L.UserError, match="impossible"):
        L.LocalNet([nn.Identity()] * 3, nn.Identity(), 5, torch.zeros(1, 4))
    net = tiny_transformer(3)
    m = L.attach(net, "man", base="dgl")                                    # MAN copies the next unit: any backbone
    assert isinstance(m.ema[0], nn.TransformerEncoderLayer) and net.ends == [1, 3, 6]      # 7 units in 3 modules


# ------------------------------------------------------------------------------------------------ --compile

def tiny_resnet(ends=(1, 2, 3)):
    torch.manual_seed(0)
    units = [nn.Sequential(L.conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU()), L.BasicBlock(8, 8), L.BasicBlock(8, 16, 2),
             L.BasicBlock(16, 16)]
    net = L.LocalNet(units, L.Head(16, 10), list(ends), torch.zeros(1, 3, 16, 16), block=L.BasicBlock)
    L.init_weights(net)
    return net


@pytest.mark.parametrize("method, opts, backend", [
    ("dgl", {}, "inductor"),                         # the real thing once (its C++ kernels take ~30 s on this CPU)
    ("bp", {}, "aot_eager"), ("infopro", dict(local_loss="cross_entropy"), "aot_eager"),
    ("auglocal", dict(aux_depth=1), "aot_eager"), ("man", dict(base="infopro"), "aot_eager")])
def test_compiled_steps_equal_eager(method, opts, backend):
    """3 SGD steps in float64 (so that rounding, amplified by training, stays invisible): every parameter and buffer
    equals the eager run's (aot_eager: the Dynamo capture and compiled backward, without Inductor's code)."""
    states = []
    for compiled in (False, True):
        net = tiny_resnet((3,) if method == "bp" else (1, 2, 3))
        m = L.attach(net, method, **opts)
        net.double(), m.double()
        opt = L.make_sgd([*net.parameters(), *m.parameters()], 0.05, 1e-4)
        c = L.compile_modules(net, m, "default", torch.device("cpu"), backend) if compiled else None
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 3, 16, 16, generator=g).double(), torch.randint(0, 10, (8,), generator=g)
            L.train_step(net, m, opt, L.Batch(x, y), compiled=c)
        states.append({**net.state_dict(), **{"m." + k: v for k, v in m.state_dict().items()}})
    for k in states[0]:
        assert torch.allclose(states[0][k].double(), states[1][k].double(), rtol=1e-9, atol=1e-12), k


def test_compile_falls_back_or_refuses_in_one_line(capsys):
    net = tiny_resnet()
    assert L.compile_modules(net, L.attach(net, "sgr", base="dgl"), "default", torch.device("cpu")) is None
    assert "SGR's double backward cannot run compiled" in capsys.readouterr().out
    r = cli("--method", "dgl", "--compile", "reduce-overhead", "--bench", "1", "--batch-size", "4")
    assert r.returncode == 2 and r.stderr.strip() == "error: --compile reduce-overhead uses CUDA graphs: CUDA only " \
        "(use --compile default)"


def _bench_row(method, K, img_s, act_mib, compiled=False, base=None, modules=None, compile=None, **kw):
    return dict(bench=True, method=method, base=base, arch="resnet32", K=K, modules=modules or K, batch=128,
                device="cpu", device_name="cpu (2 CPUs)", options={}, balanced_memory=False, amp="none", threads=2,
                img_s=img_s, act_peak_mib=act_mib, act_peak_bytes=act_mib * 2 ** 20, compiled=compiled,
                compile="default" if compiled else compile, **kw)


def test_report_renders_bench_lines(tmp_path):
    rows = [_bench_row("bp", 1, 200.0, 300.0), _bench_row("dgl", 16, 100.0, 30.0),
            _bench_row("dgl", 16, 125.0, 30.0, compiled=True), _bench_row("man", 16, 50.0, 60.0, base="dgl", modules=15),
            _bench_row("sgr", 16, 40.0, 60.0, base="dgl"), _bench_row("sgr", 16, 41.0, 60.0, base="dgl", compile="default")]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = L.main(["--report", str(path)]).splitlines()
    assert "| bp | 1 | 300.0 | 200 |  |" in lines
    assert "| dgl | 16 | 30.0 (-90 %) | 100 (+100 %) | 125 |" in lines
    assert "| man+dgl | 15 | 60.0 (-80 %) | 50 (+300 %) |  |" in lines
    assert "| sgr+dgl | 16 | 60.0 (-80 %) | 40 (+400 %) | (eager fallback) |" in lines    # --compile fell back


def test_run_all_bench_grid(tmp_path):
    env = dict(os.environ, BENCH="1", METHODS="bp dgl", BENCH_GRID="resnet20:4", BENCH_COMPILE="eager",
               BENCH_ITERS="1", BENCH_BATCH="8", MEMTABLE="0", RESULTS_BENCH=str(tmp_path / "b.jsonl"),
               PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [(x["method"], x["K"], x["bench"]) for x in rows] == [("bp", 1, True), ("dgl", 4, True)]
    assert any(l.startswith("| dgl | 4 | ") for l in r.stdout.splitlines())
