"""The training engine on tiny settings (preset `test`): RG mechanics inside real training steps,
exact resume, the CLI end to end."""
import json
import os

import pytest
import torch

import rgkernels
from rggan_fast import train as cli
from rggan_fast.config import resolve_config
from rggan_fast.metrics import inception
from rggan_fast.training.controller import DENSE
from rggan_fast.training.loop import TrainingInterrupted, TrainingRun, read_jsonl

FAST = dict(metric="proxy", tensorboard=False, progress=False)


def make_run(tmp_path, name="run", resume=False, **over):
    cfg = resolve_config("sngan", "lfw100", "test", {**FAST, "cache_dir": str(tmp_path / "cache"), **over})
    return TrainingRun(cfg, str(tmp_path / name), resume=resume, log=lambda m: None)


def thresholds(net):
    return [m.threshold.detach().clone() for _, m in rgkernels.masked_layers(net)]


def test_regulariser_gradient(tmp_path):
    run = make_run(tmp_path, lam=0.5)
    G = run.G
    for _, m in rgkernels.masked_layers(G):
        with torch.no_grad():
            m.threshold.uniform_(-0.2, 0.2)
    run.D.eval()  # no power iteration: two identical D calls
    z = torch.randn(4, run.cfg.z_dim)
    ts = [m.threshold for _, m in rgkernels.masked_layers(G)]
    torch.manual_seed(1)
    total, st = run.loss.g_loss(z)
    g_total = torch.autograd.grad(total, ts)
    run.loss.lam = 0.0
    torch.manual_seed(1)
    adv_only, st0 = run.loss.g_loss(z)
    g_adv = torch.autograd.grad(adv_only, ts, allow_unused=True)
    assert float(st0["reg_G"]) == 0.0 and torch.equal(st0["loss_G"], st["loss_G"])
    for t, gt, ga in zip(ts, g_total, g_adv):
        ga = torch.zeros_like(t) if ga is None else ga
        assert torch.allclose(gt - ga, -0.5 * torch.exp(-t.detach()), rtol=1e-4, atol=1e-6)
    assert float(st["reg_G"]) == pytest.approx(0.5 * sum(torch.exp(-t.detach()).sum().item() for t in ts), rel=1e-5)


def test_execution_option_fused_trains_as_the_default_path(tmp_path):
    """--execution fused: the pruned layers run the Triton kernels (the interpreter here) instead of the
    grouped masked-weight launch. The G and D losses of the loop give the same gradients on both paths,
    and training iterations run."""
    from rgkernels.ops import triton_masked_linear

    if not triton_masked_linear.available()[0]:
        pytest.skip("Triton unavailable")
    tiny = dict(res=16, g_ch=8, d_ch=8, batch=2, n_critic=1, diffaug="", flops_every=1000)  # interpreter speed
    runs = {e: make_run(tmp_path, name=e, execution=e, **tiny) for e in ("masked_weight", "fused")}
    fused = runs["fused"]
    assert all(m.execution == "fused" for net in (fused.G, fused.D) for _, m in rgkernels.masked_layers(net))
    grads = {}
    for e, run in runs.items():
        run.G.eval(), run.D.eval()  # no power iteration / batch statistics: both see the same weights
        torch.manual_seed(5)
        real = run.stream.next()
        z = torch.randn(2, run.cfg.z_dim)
        with run._masks(run.G), run._masks(run.D):
            loss_d, _ = run.loss.d_loss(real, run.G(z).detach())
            loss_g, _ = run.loss.g_loss(z)
        gd = torch.autograd.grad(loss_d, list(run.D.parameters()))
        gg = torch.autograd.grad(loss_g, list(run.G.parameters()), allow_unused=True)
        grads[e] = (loss_d.detach(), loss_g.detach()) + gd + gg
        run.G.train(), run.D.train()
    assert any(m._last_bits is not None for _, m in rgkernels.masked_layers(fused.D))  # the fused kernels ran
    for a, b in zip(grads["fused"], grads["masked_weight"]):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    stats = fused.train_iteration()
    assert all(torch.isfinite(v).all() for v in stats.values())
    with pytest.raises(ValueError, match="execution"):
        resolve_config("sngan", "lfw100", "test", {**FAST, "execution": "sparse"})


def test_dense_mode_freezes_thresholds_and_turns_regulariser_off(tmp_path):
    run = make_run(tmp_path, lam=1.0)  # a large lambda: any leak would move the thresholds
    run.train_iteration()
    run.controller.mode = DENSE
    run.controller.apply({"G": [run.G, run.G_ema], "D": run.D}, ("G", "D"), ("G", "D"))
    before_G, before_D = thresholds(run.G), thresholds(run.D)
    stats = run.train_iteration()
    assert float(stats["reg_G"]) == 0.0 and float(stats["reg_D"]) == 0.0
    for a, b in zip(before_G + before_D, thresholds(run.G) + thresholds(run.D)):
        assert torch.equal(a, b)
    for net in (run.G, run.D):
        for _, m in rgkernels.masked_layers(net):
            assert m.threshold.grad is None
    assert rgkernels.keep_ratio(run.G) == 1.0 and rgkernels.keep_ratio(run.D) == 1.0


def test_sparse_mode_freezes_pruned_weights_and_they_come_back(tmp_path):
    run = make_run(tmp_path)
    name, layer = rgkernels.masked_layers(run.G)[1]
    with torch.no_grad():
        layer.threshold.fill_(float(layer.weight.abs().median()))  # prunes about half of the layer
    w0 = layer.weight.detach().clone()
    run.train_iteration()
    pruned = ~layer.mask()
    assert 0 < pruned.float().mean() < 1
    assert torch.equal(layer.weight.detach()[pruned], w0[pruned])      # no Adam update on pruned entries
    assert not torch.equal(layer.weight.detach()[~pruned], w0[~pruned])
    rgkernels.set_sparse(run.G, False)                                  # dense: pruned weights are back
    z = torch.randn(2, run.cfg.z_dim)
    run.G.eval()
    out = run.G(z)
    assert torch.isfinite(out).all() and layer.mask() is None


def test_collapse_guard_in_training(tmp_path):
    run = make_run(tmp_path)
    _, layer = rgkernels.masked_layers(run.D)[2]
    with torch.no_grad():
        layer.threshold.fill_(100.0)  # prunes everything: keep ratio 0 <= 1%
    run.train_iteration()
    assert float(layer.threshold.detach().abs().max()) < 1.0  # reset to 0, then a few Adam steps at most
    assert rgkernels.layer_stats(run.D)[rgkernels.masked_layers(run.D)[2][0]]["keep_ratio"] > 0.01


def test_kernel_decisions_are_kept_with_the_run(tmp_path, monkeypatch):
    """Unpinned, the CPU GEMM path of each layer shape is measured in the first run and saved in the run
    directory; a later process on that directory (a resume) reads it instead of measuring again. (With
    --execution auto: the default path computes all masks of a net in one grouped launch and runs
    ATen's layers, with no CPU masked-linear node to choose a GEMM for.)"""
    from conftest import cpu_gemm, cpu_gemms
    from rgkernels import sparse_exec as SE
    from rgkernels.ops import cpu_masked_linear as CML

    if "ukernel" not in cpu_gemms():
        pytest.skip("one GEMM path only: nothing is measured")
    SE.clear_decisions()
    try:
        with cpu_gemm("auto"):
            make_run(tmp_path, "k", execution="auto").train_iteration()
            saved = json.loads((tmp_path / "k" / "kernel_decisions.json").read_text())["decisions"]
            assert saved and all(k.startswith("cpu_gemm|") and v in CML.GEMMS for k, v in saved.items())
            SE.clear_decisions()  # as in a new process
            monkeypatch.setattr(SE, "_cpu_times", lambda cands: pytest.fail("measured again"))
            make_run(tmp_path, "k", execution="auto").train_iteration()
            assert SE.decisions() == saved
    finally:
        SE.set_decision_cache(None)
        SE.clear_decisions()


def test_resume_is_exact(tmp_path):
    over = dict(kimg=0.096)  # 6 iterations of 16 real images; evaluations every 2
    a = make_run(tmp_path, "a", **over)
    a.train()
    b = make_run(tmp_path, "b", **over)
    orig = b.train_iteration
    calls = []

    def stop_after_three():
        out = orig()
        calls.append(1)
        if len(calls) == 3:
            b.stop_flag.requested = True
        return out

    b.train_iteration = stop_after_three
    with pytest.raises(TrainingInterrupted):
        b.train()
    assert b.counters["step"] == 3
    c = make_run(tmp_path, "b", resume=True, **over)
    c.train()
    sa = read_jsonl(str(tmp_path / "a" / "stats.jsonl"))
    sb = read_jsonl(str(tmp_path / "b" / "stats.jsonl"))
    assert [r["step"] for r in sb] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(sa, sb):
        for k in ("loss_D", "loss_G", "reg_D", "reg_G", "D_real", "D_fake", "keep_ratio_G", "keep_ratio_D"):
            assert ra[k] == rb[k], (ra["step"], k)
    ma = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    mb = read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["proxy_fid"] for r in ma] == [r["proxy_fid"] for r in mb]
    assert [r["flops_active"] for r in ma] == [r["flops_active"] for r in mb]
    layer_keys = [k for k in ma[0] if k.startswith("layers_")]
    assert layer_keys  # per-layer keep ratios and regeneration counts, equal after the resume too
    assert [[r[k] for k in layer_keys] for r in ma] == [[r[k] for k in layer_keys] for r in mb]
    for k, v in a.G_ema.state_dict().items():
        assert torch.equal(v, c.G_ema.state_dict()[k]), k


def test_checkpoint_of_iterations_run_by_hand_resumes_into_the_loop(tmp_path):
    """save_checkpoint() before train() (iterations run by hand, as a library user may): the resumed run has
    the same state, and its train() sets up the schedule (initial evaluation, then every eval_kimg)."""
    a = make_run(tmp_path, "a", kimg=0.048, tensorboard=True)
    a.train_iteration()
    a.save_checkpoint()
    b = make_run(tmp_path, "a", resume=True, kimg=0.048, tensorboard=True)
    for k, v in a.G.state_dict().items():
        assert torch.equal(v, b.G.state_dict()[k]), k
    assert b.counters["step"] == 1 and b.counters["real_images"] == 16
    summary = b.train()
    assert summary["steps"] == 3
    assert [r["real_images"] for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))] == [16, 32, 48]


def test_ar_switch_in_training(tmp_path):
    run = make_run(tmp_path, kimg=0.032, eval_at_start=False)
    for f in (10.0, 9.0, 8.0, 7.0):
        run.controller.update(f)
    run.evaluator.__class__ = type("Worse", (run.evaluator.__class__,), {
        "__call__": lambda self, G, num, seed=0: {"proxy_fid": 100.0, "proxy_kid": 0.0}})
    run.train()
    rows = read_jsonl(os.path.join(run.run_dir, "metrics.jsonl"))
    assert rows[-1]["mode"] == "sparse" and rows[-1]["next_mode"] == "dense"
    assert all(not m.sparse for _, m in rgkernels.masked_layers(run.G_ema))
    assert rgkernels.keep_ratio(run.D) == 1.0


def test_cli_unimplemented_archs_exit_2(capsys):
    for arch in ("progan", "stylegan2", "fastgan"):
        assert cli.main([arch]) == 2
        err = capsys.readouterr().err
        assert "not implemented yet" in err and "Traceback" not in err
    assert cli.main(["biggan"]) == 2


def test_cli_data_error_names_file_and_writes_nothing(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "ok.png")
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "runs"
    assert cli.main(["sngan", "--preset", "test", "--data", str(data), "--outdir", str(out), "--metric", "proxy"]) == 1
    assert "corrupt.jpg" in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)


def test_cli_without_inception_stops_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inception, "offline_weights_path", lambda: None)
    monkeypatch.setattr(inception, "cleanfid_candidates", lambda cache: [str(tmp_path / "none.pt")])
    out = tmp_path / "runs"
    rc = cli.main(["sngan", "--preset", "test", "--outdir", str(out), "--set", "inception_download=false",
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 1
    assert "--metric proxy" in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)


def _folder(tmp_path, n=12):
    from rggan_fast.data.sources import load_lfw100
    from PIL import Image

    d = tmp_path / "faces"
    d.mkdir()
    for i, im in enumerate(load_lfw100(32).images[:n]):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
    return d


def test_cli_end_to_end_writes_every_file(tmp_path, capsys):
    data = _folder(tmp_path)
    real_fid = inception.offline_weights_path() is not None
    metric = "fid" if real_fid else "proxy"
    args = ["sngan", "--preset", "test", "--data", str(data), "--outdir", str(tmp_path / "runs"), "--metric", metric,
            "--cache-dir", str(tmp_path / "cache"), "--set", "inception_download=false", "--set", "tensorboard=true",
            "--name", "e2e"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "keep ratio" in out and "training FLOPs" in out
    rd = tmp_path / "runs" / "e2e"
    files = set(os.listdir(rd))
    for f in ("config.json", "metrics.jsonl", "stats.jsonl", "checkpoint.pt", "reals.png", "summary.json",
              "G_ema.safetensors", "samples-0000000.png", "samples-0000004.png"):
        assert f in files, f
    assert any(f.startswith("events.out.tfevents") for f in files)
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["arch"] == "sngan" and cfg["presets"] == ["sngan", "sngan-fewshot", "test"]
    rows = read_jsonl(str(rd / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        for k in ("step", "real_images", "time_s", "fid", "mode", "keep_ratio_G", "keep_ratio_D", "flops_dense",
                  "flops_active", "flops_executed", "layers_G", "layers_D"):
            assert k in r, k
        assert r["mode"] in ("sparse", "dense")
        name, layer = next(iter(r["layers_D"].items()))
        assert set(layer) >= {"keep_ratio", "rows_pruned", "regenerations"}
    if real_fid:
        assert rows[-1]["fid"] > 0 and "Inception" in rows[-1]["metric"]
    else:
        assert rows[-1]["fid"] is None and rows[-1]["proxy_fid"] > 0
    assert rows[-1]["flops_dense"] > rows[1]["flops_dense"] > 0
    assert rows[-1]["flops_active"] <= rows[-1]["flops_dense"]
    # resume with a larger budget continues in place
    assert cli.main(["sngan", "--resume", str(rd), "--kimg", "0.096"]) == 0
    rows = read_jsonl(str(rd / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert cli.main(["sngan", "--resume", str(rd), "--batch", "4"]) == 2  # cannot change what is trained


def test_cli_dense_baseline_and_ablation(tmp_path):
    out = str(tmp_path / "runs")
    common = ["--preset", "test", "--outdir", out, "--metric", "proxy", "--kimg", "0.032",
              "--cache-dir", str(tmp_path / "cache"), "--set", "tensorboard=false"]
    assert cli.main(["sngan", "--no-rg", "--name", "dense", *common]) == 0
    rows = read_jsonl(os.path.join(out, "dense", "metrics.jsonl"))
    assert rows[-1]["mode"] == "dense" and rows[-1]["keep_ratio_G"] == 1.0
    assert rows[-1]["flops_active"] == rows[-1]["flops_dense"] and "layers_G" not in rows[-1]
    assert rows[-1]["proxy_fid"] is not None and rows[-1]["fid"] is None
    assert cli.main(["sngan", "--prune", "D", "--aug-regen", "none", "--name", "abl", *common]) == 0
    rows = read_jsonl(os.path.join(out, "abl", "metrics.jsonl"))
    assert "layers_D" in rows[-1] and "layers_G" not in rows[-1] and rows[-1]["keep_ratio_G"] == 1.0


def test_sigint_writes_checkpoint_and_run_resumes(tmp_path):
    """Ctrl-C in a real process: the iteration finishes, the checkpoint is written, exit code 130."""
    import signal
    import subprocess
    import sys
    import time

    rd = tmp_path / "runs" / "sig"
    env = dict(os.environ, RGGAN_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "rggan_fast.train", "sngan", "--preset", "test",
                             "--metric", "proxy", "--kimg", "10", "--outdir", str(tmp_path / "runs"), "--name", "sig",
                             "--set", "tensorboard=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(read_jsonl(str(rd / "stats.jsonl"))) < 2:
            time.sleep(0.2)
        assert len(read_jsonl(str(rd / "stats.jsonl"))) >= 2, proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    step = len(read_jsonl(str(rd / "stats.jsonl")))
    state = torch.load(str(rd / "checkpoint.pt"), weights_only=False)
    assert state["counters"]["step"] == step  # nothing trained after the checkpoint was lost
    kimg = (state["counters"]["real_images"] + 16) / 1000
    assert cli.main(["sngan", "--resume", str(rd), "--kimg", str(kimg)]) == 0
    assert [r["step"] for r in read_jsonl(str(rd / "stats.jsonl"))] == list(range(1, step + 2))


# ---- the optimiser -----------------------------------------------------------------------------------

def test_adam_is_fused_and_matches_torch_default_adam():
    """build.adam uses PyTorch's fused Adam (on the CPU too); same updates as the default Adam, with the
    zero gradients that pruned weights have."""
    from rggan_fast.build import adam

    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(33, 17))
    p2 = torch.nn.Parameter(p1.detach().clone())
    start = p1.detach().clone()
    o1, o2 = adam([p1], 1e-2, (0.0, 0.99)), torch.optim.Adam([p2], lr=1e-2, betas=(0.0, 0.99))
    assert o1.defaults["fused"] is True
    for _ in range(20):
        g = torch.randn(33, 17)
        g[:, ::2] = 0
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step(), o2.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(p1.detach(), start), "the parameters moved"


def test_adam_falls_back_with_a_warning(monkeypatch):
    from rggan_fast.build import adam

    real = torch.optim.Adam

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` is not supported here")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    with pytest.warns(UserWarning, match="fused Adam unavailable"):
        opt = adam([torch.nn.Parameter(torch.zeros(3))], 1e-3, (0.5, 0.9))
    assert not opt.defaults.get("fused")
