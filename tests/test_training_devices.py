"""RG-SNGAN's training losses and iterations on each device and execution path, against a float64 CPU
reference.

On a lent GPU (`scripts/gpu_check.sh train`) this is the check of the trainer on the device: the default
path (one grouped CUDA masked-weight launch per net, then cuDNN / cuBLAS on W * M), the fused Triton
kernels and "auto", in the real losses, with spectral norm, pruned and entirely pruned rows, the
optimisers' freeze of pruned weights, FLOP accounting, a checkpoint, and a resume on the CPU.
Here the same checks run on the CPU (the C++ kernels; Triton under the interpreter for the losses), so
that CI runs the test code itself. The data are CIFAR-10-format pickles written by the test: the GPU
machine has no scikit-image.
"""
import copy
import pickle

import numpy as np
import pytest
import torch

import rgkernels
from rgkernels.layers import stored_weight

pytest.importorskip("PIL", reason="the data loader and the image grids need Pillow")

from rggan_fast.config import resolve_config  # noqa: E402
from rggan_fast.training.loop import TrainingRun  # noqa: E402

EXECUTIONS = ["masked_weight", "fused", "auto"]
CUDA = [pytest.param("cuda", e, marks=pytest.mark.gpu) for e in EXECUTIONS]
# On the CPU, "auto" is "masked_weight", and "fused" runs Triton's interpreter: seconds for the losses,
# minutes for a training run (test_train_engine trains on it).
LOSS_CASES = [("cpu", e) for e in EXECUTIONS] + CUDA
TRAIN_CASES = [("cpu", "masked_weight")] + CUDA
# Tiny nets (the interpreter on the CPU), no DiffAugment (its random ops differ between devices).
TINY = dict(res=16, g_ch=8, d_ch=8, z_dim=16, batch=4, n_critic=1, diffaug="", flops_every=1000, grid=4,
            metric="proxy", tensorboard=False, progress=False)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """Six random images per CIFAR-10 pickle file (enough for batches of 4 and the proxy metric)."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0] * 6}, f)
    return str(root)


def make_run(tmp_path, cifar_dir, device, execution, name="run", resume=False, **over):
    if execution == "fused":
        from rgkernels.ops import triton_masked_linear

        ok, why = triton_masked_linear.available()
        if not ok:
            pytest.skip(f"Triton unavailable: {why}")
    cfg = resolve_config("sngan", cifar_dir, "test", {**TINY, "device": device, "execution": execution,
                                                       "cache_dir": str(tmp_path / "cache"), **over})
    return TrainingRun(cfg, str(tmp_path / name), resume=resume, log=lambda m: None)


def prune(run):
    """About half of the weights of every masked layer, and a quarter of the rows of D's and G's second
    layer entirely (the fused path skips those rows)."""
    for net in (run.G, run.D):
        for i, (_, m) in enumerate(rgkernels.masked_layers(net)):
            with torch.no_grad():
                w = m.weight.flatten(1).abs()  # the effective weight (spectral norm's W / sigma)
                # halfway between two weights: the float32 and float64 effective weights (spectral
                # norm's sigma differs in its last bits) give the same mask
                s = w.sort(dim=1).values
                k = w.shape[1] // 2
                m.threshold.copy_((s[:, k - 1] + s[:, k]) / 2)
                if i == 1:
                    rows = torch.arange(0, w.shape[0], 4, device=w.device)
                    m.threshold[rows] = w[rows].max(dim=1).values + 1.0


def float64_reference(net):
    """A CPU float64 copy of a masked net (thresholds stay float32, as the ops want them), run per layer:
    W * M, then ATen's float64 convolutions."""
    ref = copy.deepcopy(net).cpu().double().eval()
    for _, m in rgkernels.masked_layers(ref):
        m.threshold.data = m.threshold.data.float()
        m.execution = "masked_weight"
    return ref


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def assert_close_to(got, want, what):
    """float32 results against float64 ones: relative 1e-3, and 1e-3 of the tensor's largest entry."""
    got, want = got.detach().cpu().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale + 1e-7, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device, execution", LOSS_CASES)
def test_losses_and_gradients_match_a_float64_cpu_reference(tmp_path, cifar_dir, device, execution):
    run = make_run(tmp_path, cifar_dir, device, execution)
    prune(run)
    G, D = run.G.eval(), run.D.eval()  # spectral norm without power iterations: the same weights twice
    G64, D64 = float64_reference(G), float64_reference(D)
    loss64 = copy.copy(run.loss)
    loss64.G, loss64.D = G64, D64
    real = run.stream.next()
    z = torch.randn(run.cfg.batch, run.cfg.z_dim).to(real.device)
    with rgkernels.use_backend("reference"):  # the reference: the PyTorch composition, float64, CPU
        fake64 = G64(z.cpu().double())
        loss_d64, _ = loss64.d_loss(real.cpu().double(), fake64.detach())
        grads_d64 = grads(loss_d64, list(D64.parameters()))
        loss_g64, _ = loss64.g_loss(z.cpu().double())
        grads_g64 = grads(loss_g64, list(G64.parameters()))

    with run._masks(G):  # as train_iteration runs them (default path: one grouped mask launch per net)
        fake = G(z)
    assert_close_to(fake, fake64, "G(z)")
    with run._masks(D):
        loss_d, _ = run.loss.d_loss(real, fake.detach())
    assert_close_to(loss_d, loss_d64, "D loss")
    for (name, _), g, g64 in zip(D.named_parameters(), grads(loss_d, list(D.parameters())), grads_d64):
        assert_close_to(g, g64, f"D loss gradient of {name}")
    with run._masks(G), run._masks(D):
        loss_g, _ = run.loss.g_loss(z)
    assert_close_to(loss_g, loss_g64, "G loss")
    for (name, _), g, g64 in zip(G.named_parameters(), grads(loss_g, list(G.parameters())), grads_g64):
        assert_close_to(g, g64, f"G loss gradient of {name}")

    if execution == "fused":  # the fused kernels ran (not a fallback) and found the dead rows
        layer = rgkernels.masked_layers(D)[1][1]
        assert layer._last_bits is not None
        assert int((layer.last_counts == 0).sum()) == len(range(0, layer.last_counts.numel(), 4))


@pytest.mark.parametrize("device, execution", TRAIN_CASES)
def test_training_on_the_device_freezes_pruned_weights_and_resumes_on_the_cpu(tmp_path, cifar_dir, device,
                                                                              execution):
    """Iterations run by hand, not through train(): its evaluations need clean-fid, which the GPU machine
    does not have (the loop itself is test_train_engine's and test_train_runs')."""
    # Adam's beta1 > 0 (SNGAN's is 0) and one iteration before pruning: the first moments of the weights
    # pruned next are not 0, so only the freeze keeps them where they are.
    run = make_run(tmp_path, cifar_dir, device, execution, beta1=0.5)
    run.train_iteration()
    prune(run)
    layers = [m for net in (run.G, run.D) for _, m in rgkernels.masked_layers(net)]
    before = [stored_weight(m).detach().clone() for m in layers]  # what the optimisers update
    with torch.no_grad():  # pruned by a margin that two Adam steps of the thresholds cannot close
        far = [(m.weight.flatten(1).abs() < m.threshold[:, None] - 0.01).reshape(w.shape)
               for m, w in zip(layers, before)]
    for _ in range(2):
        stats = run.train_iteration()
        assert all(torch.isfinite(v).all() for v in stats.values()), stats
    for m, w0, pruned in zip(layers, before, far):
        w = stored_weight(m).detach()
        assert w.device.type == device
        assert pruned.any() and not (m.mask() & pruned).any()
        assert torch.equal(w[pruned], w0[pruned])  # Adam moved no pruned weight
        assert not torch.equal(w[m.mask()], w0[m.mask()])  # and did move the others
    keep = rgkernels.keep_ratio(run.G)
    masks = [m.mask() for _, m in rgkernels.masked_layers(run.G)]
    assert keep == pytest.approx(sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks))
    assert 0.3 < keep < 0.7
    run._refresh_flops()  # the loop's FLOP accounting: count_flops on G and D, on the device
    assert 0 < run.flops.rate["active"] < run.flops.rate["dense"]

    # The checkpoint written on the device, resumed on the CPU (--device may change on --resume)
    run.save_checkpoint()
    on_cpu = make_run(tmp_path, cifar_dir, "cpu", execution, resume=True, beta1=0.5)
    for net, net_cpu in ((run.G, on_cpu.G), (run.D, on_cpu.D), (run.G_ema, on_cpu.G_ema)):
        a, b = net.state_dict(), net_cpu.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].cpu(), b[k]), k
    assert on_cpu.counters["step"] == 3
    stats = on_cpu.train_iteration()
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert rgkernels.keep_ratio(on_cpu.G) == pytest.approx(keep, abs=0.02)
