"""Run directories and the CLI around them: claiming and locking, stops before the first checkpoint,
damaged files, bad options, logs after a hard kill, data paths, sample counts in the summary, and
hyperparameters that live in the configuration (preset `test`, proxy metric: seconds per run)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from rggan_fast import build
from rggan_fast import train as cli
from rggan_fast.config import TrainConfig, resolve_config
from rggan_fast.plot import split_by_samples
from rggan_fast.training import rundir
from rggan_fast.training.loop import TrainingInterrupted, TrainingRun, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # proxy reference features, computed once


def common(cache, *extra):
    return ["--preset", "test", "--metric", "proxy", "--cache-dir", cache, "--set", "tensorboard=false", *extra]


def make_run(tmp_path, cache, name="run", resume=False, **over):
    cfg = resolve_config("sngan", "lfw100", "test", {"metric": "proxy", "tensorboard": False, "progress": False,
                                                     "cache_dir": cache, **over})
    return TrainingRun(cfg, str(tmp_path / name), resume=resume, log=lambda m: None)


def steps(path):
    return [r["step"] for r in read_jsonl(str(path))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """A finished 2-iteration run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished")
    assert cli.main(["sngan", *common(cache, "--kimg", "0.032", "--outdir", str(out), "--name", "r")]) == 0
    return out / "r"


@pytest.fixture
def run_copy(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "r")


# ---- 1. claiming and locking run directories ----------------------------------------------------------

def test_new_runs_claim_distinct_directories_at_once(tmp_path, monkeypatch, cache):
    cfg = resolve_config("sngan", "lfw100", "test", {"outdir": str(tmp_path / "runs"), "cache_dir": cache})
    a, _, lock_a = cli.claim_new_run(cfg, None)
    # another run starting at the same moment lists the directory before `a` appears in it
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: [d for d in real_listdir(p) if d != os.path.basename(a)])
    b, _, lock_b = cli.claim_new_run(cfg, None)
    monkeypatch.undo()
    assert os.path.basename(a).startswith("00000-") and os.path.basename(b).startswith("00001-")
    for d in (a, b):
        assert os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, rundir.LOCK))
    lock_a.release(), lock_b.release()


def test_directory_is_claimed_before_data_loads_and_removed_if_the_run_cannot_start(tmp_path, monkeypatch,
                                                                                     capsys, cache):
    from rggan_fast.data import DataError

    out = tmp_path / "runs"
    seen = {}

    def failing_data(cfg, progress=None):
        (d,) = os.listdir(out)
        seen["files"] = sorted(os.listdir(out / d))
        raise DataError("broken on purpose")

    monkeypatch.setattr(build, "build_data", failing_data)
    assert cli.main(["sngan", *common(cache, "--outdir", str(out))]) == 1
    assert "broken on purpose" in capsys.readouterr().err
    assert seen["files"] == ["config.json", rundir.LOCK]  # claimed and locked while the data loaded
    assert os.listdir(out) == []                           # nothing left once it failed


def test_resume_of_a_run_being_trained_is_refused_and_a_dead_owner_does_not_block(run_copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rggan_fast.training.rundir import "
                               "RunLock; RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
                               str(run_copy)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["sngan", "--resume", str(run_copy), "--kimg", "0.048"]) == 1
        err = capsys.readouterr().err
        assert "being trained by another process" in err and f"pid {holder.pid}" in err and "Traceback" not in err
        assert steps(run_copy / "stats.jsonl") == [1, 2]  # untouched
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the lock itself goes with the process
        holder.wait()
    assert (run_copy / rundir.LOCK).exists()
    assert cli.main(["sngan", "--resume", str(run_copy), "--kimg", "0.048"]) == 0
    assert steps(run_copy / "stats.jsonl") == [1, 2, 3]
    assert not (run_copy / rundir.LOCK).exists()  # released at the end


# ---- 2. a stop before the first checkpoint ----------------------------------------------------------

def test_stop_while_the_run_is_set_up_can_be_resumed_from_its_config(tmp_path, monkeypatch, capsys, cache):
    out, real = tmp_path / "runs", build.build_data

    def data_then_ctrl_c(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the data loads: handled by train.py's handler
        return real(*a, **kw)

    monkeypatch.setattr(build, "build_data", data_then_ctrl_c)
    assert cli.main(["sngan", *common(cache, "--outdir", str(out), "--name", "s")]) == 130
    err = capsys.readouterr().err
    assert "intact" not in err and "before the first checkpoint" in err and f"--resume {out / 's'}" in err
    assert sorted(os.listdir(out / "s")) == ["config.json"]
    monkeypatch.setattr(build, "build_data", real)
    assert cli.main(["sngan", *common(cache, "--outdir", str(out), "--name", "s")]) == 2  # a run: resume it
    assert cli.main(["sngan", "--resume", str(out / "s")]) == 0
    assert "starting the run from the beginning" in capsys.readouterr().out
    assert steps(out / "s" / "metrics.jsonl") == [0, 2, 4]


def test_abort_before_the_first_checkpoint_does_not_claim_one_is_intact(tmp_path, monkeypatch, capsys, cache):
    def second_ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_evaluator", second_ctrl_c)
    out = tmp_path / "runs"
    assert cli.main(["sngan", *common(cache, "--outdir", str(out), "--name", "k")]) == 130
    err = capsys.readouterr().err
    assert "intact" not in err and f"--resume {out / 'k'} starts the run from the beginning" in err


def test_stop_before_the_initial_evaluation_writes_a_checkpoint_and_resumes_exactly(tmp_path, cache):
    a = make_run(tmp_path, cache, "a")
    a.train()
    b = make_run(tmp_path, cache, "b")
    b.stop_flag.requested = True
    with pytest.raises(TrainingInterrupted, match="checkpoint written"):
        b.train()
    assert read_jsonl(str(tmp_path / "b" / "metrics.jsonl")) == []
    c = make_run(tmp_path, cache, "b", resume=True)
    c.train()
    ma, mb = (read_jsonl(str(tmp_path / n / "metrics.jsonl")) for n in ("a", "b"))
    assert [r["step"] for r in mb] == [0, 2, 4]
    assert [r["proxy_fid"] for r in ma] == [r["proxy_fid"] for r in mb]


# ---- 3. damaged checkpoint and configuration ----------------------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (_truncate, "cannot be read, the file is damaged"),
    (lambda p: p.write_bytes(b"garbage" * 100), "cannot be read, the file is damaged"),
    (lambda p: torch.save({"format": 1, "G": {}}, str(p)), "does not fit this run's configuration"),
    (lambda p: torch.save([1, 2], str(p)), "not a rggan_fast checkpoint"),
])
def test_damaged_checkpoint_is_named_and_config_is_kept(run_copy, capsys, damage, message):
    damage(run_copy / "checkpoint.pt")
    config = (run_copy / "config.json").read_bytes()
    assert cli.main(["sngan", "--resume", str(run_copy), "--kimg", "0.2"]) == 1
    err = capsys.readouterr().err
    assert str(run_copy / "checkpoint.pt") in err and message in err and "Traceback" not in err
    assert (run_copy / "config.json").read_bytes() == config  # --kimg 0.2 was not saved


def _logs(run_dir):
    return {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "stats.jsonl", "config.json")}


@pytest.mark.parametrize("loss", ["deleted", "directory"])
def test_a_lost_checkpoint_is_refused_and_the_logs_are_kept(run_copy, capsys, loss):
    """A run that trained and then lost checkpoint.pt (a copy that skipped *.pt) is not started again
    from the beginning, which would empty its logs; nor is one whose checkpoint.pt is not a file."""
    before = _logs(run_copy)
    assert read_jsonl(str(run_copy / "stats.jsonl"))
    (run_copy / "checkpoint.pt").unlink()
    if loss == "directory":
        (run_copy / "checkpoint.pt").mkdir()
    assert cli.main(["sngan", "--resume", str(run_copy), "--kimg", "0.2"]) == 1
    err = capsys.readouterr().err
    want = "is not a file" if loss == "directory" else "is missing, but the run had trained (stats.jsonl has"
    assert str(run_copy / "checkpoint.pt") in err and want in err and "Traceback" not in err
    assert _logs(run_copy) == before
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith("checkpoint.pt")) == (
        ["checkpoint.pt"] if loss == "directory" else [])


def test_resume_deletes_temporaries_of_a_cut_save_and_remeasures_a_changed_final_count(run_copy, cache, capsys):
    """A hard kill in mid-save leaves checkpoint.pt.tmp<pid>: the next resume deletes it. A finished run
    resumed with another --final-fid-samples measures its final evaluation again, in a new row."""
    (run_copy / "checkpoint.pt.tmp99999999").write_bytes(b"partial")
    (run_copy / "checkpoint.pt.tmpnotes").write_text("not ours")
    rows = read_jsonl(str(run_copy / "metrics.jsonl"))
    assert rows[-1]["final"] and rows[-1]["fid_samples"] == 8
    assert cli.main(["sngan", "--resume", str(run_copy)]) == 0  # nothing to do: no new row
    assert read_jsonl(str(run_copy / "metrics.jsonl")) == rows
    assert not (run_copy / "checkpoint.pt.tmp99999999").exists() and (run_copy / "checkpoint.pt.tmpnotes").exists()
    assert cli.main(["sngan", "--resume", str(run_copy), "--final-fid-samples", "16"]) == 0
    after = read_jsonl(str(run_copy / "metrics.jsonl"))
    assert after[:-1] == rows and after[-1]["final"] and after[-1]["fid_samples"] == 16
    assert after[-1]["step"] == rows[-1]["step"]
    assert json.loads((run_copy / "summary.json").read_text())["last_samples"] == 16
    assert cli.main(["sngan", "--resume", str(run_copy), "--final-fid-samples", "16"]) == 0  # measured already
    assert read_jsonl(str(run_copy / "metrics.jsonl")) == after
    # back to the training count: measured again, and the finished run's AR controller is left alone
    controller = torch.load(str(run_copy / "checkpoint.pt"), weights_only=False)["controller"]
    assert cli.main(["sngan", "--resume", str(run_copy), "--final-fid-samples", "0"]) == 0
    last = read_jsonl(str(run_copy / "metrics.jsonl"))[-1]
    assert last["fid_samples"] == 8 and last["final"] and not last["ar_input"]
    assert torch.load(str(run_copy / "checkpoint.pt"), weights_only=False)["controller"] == controller


@pytest.mark.parametrize("edit, message", [
    (lambda d, text: text[:len(text) // 2], "not valid JSON"),
    (lambda d, text: json.dumps([d]), "expected an object of configuration fields, got list"),
    (lambda d, text: json.dumps({**d, "res": "32"}), "res must be an integer, got '32'"),
    (lambda d, text: json.dumps({**d, "kimg": True}), "kimg must be a number, got True"),
    (lambda d, text: json.dumps({**d, "res": 24}), "res must be a power of two"),
    (lambda d, text: json.dumps({**d, "colour": 1}), "unknown configuration keys: colour"),
])
def test_damaged_config_is_named(run_copy, capsys, edit, message):
    path = run_copy / "config.json"
    text = path.read_text()
    path.write_text(edit(json.loads(text), text))
    assert cli.main(["sngan", "--resume", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "Traceback" not in err


# ---- 4. / 5. options and configuration fields ---------------------------------------------------------

def _unwritable(monkeypatch, tmp_path):
    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", denied)  # (running as root, chmod would not stop it)
    return ["--outdir", str(tmp_path / "ro" / "runs")], "--outdir"


@pytest.mark.parametrize("args, message", [
    ("--outdir {file}", "--outdir {file}: exists and is not a directory"),
    ("--outdir {file}/sub", "--outdir {file}/sub: cannot create it"),
    ("--device foo", "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    ("--threads -2", "threads must be an integer >= 0, got -2"),
    ("--kimg inf", "kimg must be a finite number > 0, got inf"),
    ("--kimg nan", "kimg must be a finite number > 0, got nan"),
    ("--final-fid-samples -3", "final_fid_samples must be 0"),
    ("--final-fid-samples 1", "final_fid_samples must be 0"),
    ("--diffaug colour", "unknown DiffAugment policy colour"),
    ("--ckpt-kimg -1", "ckpt_kimg must be a finite number >= 0"),
    ("--set grad_mode=bogus", "grad_mode must be one of dst, masked"),
    ("--set loss=wgan", "loss must be one of hinge"),
    ("--set fid_ref=val", "fid_ref must be one of auto, train, test"),
    ("--set grid=0", "grid must be an integer >= 1"),
    ("--set kid_subsets=0", "kid_subsets must be an integer >= 1"),
    ("--set res=abc", "--set res: expected an integer, got 'abc'"),
    ("--set ema_warmup_steps=0.5", "ema_warmup_steps must be a finite number >= 1"),
    ("--set diffaug_cutout=1.5", "diffaug_cutout must be a finite number in [0, 1]"),
    ("--set lr_g=-1", "lr_g must be a finite number > 0"),
    ("--set beta2=1", "beta2 must be a finite number in [0, 1)"),
    ("--set prune=GX", "prune must be one of G, D, GD"),
    ("--seed 100000000000000", "seed must be an integer in [-9223344366820, 9223344366820]"),
    ("--seed -9223372036854775808", "seed must be an integer in"),
    ("--set data_kind=zip", "--set data_kind: resolved by the configuration itself"),
    ("--set presets=mine", "--set presets: resolved by the configuration itself"),
    ("--data {file}", "{file} is a file: --data takes lfw100, a folder of images"),
    ("--data {file}.tar.gz", "{file}.tar.gz is a tar archive: extract it first"),
    ("unwritable", "--outdir"),
])
def test_bad_options_fail_with_a_message_before_a_run_directory_exists(tmp_path, monkeypatch, capsys, cache,
                                                                       args, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "file.tar.gz").write_text("")
    out = ["--outdir", str(tmp_path / "runs")]
    if args == "unwritable":
        out, args = _unwritable(monkeypatch, tmp_path)
        args = ""
    argv = ["sngan", *common(cache, *out, *args.format(file=tmp_path / "file").split())]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message.format(file=tmp_path / "file") in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_device_cuda_without_a_gpu(tmp_path, capsys, cache):
    assert cli.main(["sngan", *common(cache, "--outdir", str(tmp_path / "runs"), "--device", "cuda")]) == 1
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_validate_checks_every_field_of_a_default_config():
    TrainConfig(data_kind="lfw100").validate()  # the defaults are valid
    with pytest.raises(ValueError) as e:
        TrainConfig(data_kind="lfw100", kimg=float("nan"), ar_weights=(0.1, float("inf")), seed=2 ** 70,
                    outdir="", data_ratio=0.0).validate()
    for field in ("kimg", "ar_weights", "seed", "outdir", "data_ratio"):
        assert field in str(e.value)


# ---- 6. logs after a hard kill --------------------------------------------------------------------

class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_resume_after_a_hard_kill_writes_every_log_row_once(tmp_path, cache, old_checkpoint):
    over = dict(kimg=0.096)  # 6 iterations, evaluations at steps 0, 2, 4, 6
    b = make_run(tmp_path, cache, "b", **over)
    save = b.save_checkpoint

    def killed_at_step_4():
        if b.counters["step"] == 4:  # after the rows of steps 3-4 and the evaluation at 4 were written
            raise Killed
        return save()

    b.save_checkpoint = killed_at_step_4
    with pytest.raises(Killed):
        b.train()
    assert steps(tmp_path / "b" / "stats.jsonl") == [1, 2, 3, 4]
    assert steps(tmp_path / "b" / "metrics.jsonl") == [0, 2, 4]
    if old_checkpoint:  # written before checkpoints held the row counts: rows are cut by step
        path = str(tmp_path / "b" / "checkpoint.pt")
        state = torch.load(path, weights_only=False)
        del state["log_rows"]
        torch.save(state, path)
    make_run(tmp_path, cache, "b", resume=True, **over).train()
    assert steps(tmp_path / "b" / "stats.jsonl") == [1, 2, 3, 4, 5, 6]
    assert steps(tmp_path / "b" / "metrics.jsonl") == [0, 2, 4, 6]


def test_truncate_jsonl_drops_a_row_cut_off_in_mid_write(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert rundir.truncate_jsonl(str(path), 2) == 1
    assert steps(path) == [1, 2]


# ---- 7. data paths -------------------------------------------------------------------------------

def test_relative_data_path_is_stored_absolute_and_resumes_from_elsewhere(tmp_path, monkeypatch, capsys, cache):
    from test_train_engine import _folder

    data = _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sngan", *common(cache, "--data", "faces", "--kimg", "0.032", "--outdir", "runs",
                                      "--name", "rel")]) == 0
    rd = tmp_path / "runs" / "rel"
    assert json.loads((rd / "config.json").read_text())["data"] == str(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the same data named by its absolute path is no change
    assert cli.main(["sngan", "--resume", str(rd), "--data", str(data), "--kimg", "0.048"]) == 0, \
        capsys.readouterr().err
    assert steps(rd / "stats.jsonl") == [1, 2, 3]


# ---- 8. sample counts in the summary -----------------------------------------------------------------

def test_final_evaluation_with_another_sample_count_is_reported_apart(tmp_path, cache):
    def by_count(self, G, num, seed=0):  # the final evaluation's count gives a (much) lower score
        return {"proxy_fid": 100.0 if num == 8 else 1.0, "proxy_kid": 0.0}

    run = make_run(tmp_path, cache, final_fid_samples=16)
    run.evaluator.__class__ = type("ByCount", (run.evaluator.__class__,), {"__call__": by_count})
    summary = run.train()
    rows = read_jsonl(os.path.join(run.run_dir, "metrics.jsonl"))
    assert [(r["step"], r["fid_samples"], r["ar_input"]) for r in rows] == [(0, 8, True), (2, 8, True),
                                                                             (4, 16, False)]
    assert rows[-1]["next_mode"] == rows[-1]["mode"] and rows[-1]["ar_avg"] is None
    assert run.controller.history == [100.0, 100.0]  # the final value decides nothing
    assert (summary["first"], summary["first_samples"]) == (100.0, 8)
    assert (summary["last"], summary["last_samples"]) == (1.0, 16)
    assert (summary["best"], summary["best_samples"]) == (100.0, 8)
    text = cli.format_summary(summary)
    assert "100.00 (8 samples) at the start -> 1.00 (16 samples) at the end" in text
    assert "best during training 100.00 (8 samples)" in text
    assert split_by_samples(rows) == (8, rows[:2], rows[2:])
    # extended, the history goes on without the final value
    more = make_run(tmp_path, cache, resume=True, final_fid_samples=16, kimg=0.128)
    more.evaluator.__class__ = run.evaluator.__class__
    more.train()
    assert more.controller.history == [100.0, 100.0, 100.0]


# ---- 10. hyperparameters in the configuration ----------------------------------------------------------

def test_ema_warmup_and_diffaug_strengths_come_from_the_config(tmp_path, cache):
    cfg = resolve_config("sngan", "lfw100", None, {})
    assert (cfg.ema_warmup_steps, cfg.diffaug_translation, cfg.diffaug_cutout) == (10.0, 0.125, 0.5)
    # a very long warm-up: beta_t ~ 0, so G_ema becomes G after one step
    run = make_run(tmp_path, cache, ema_warmup_steps=1e12)
    run.train_iteration()
    for pe, p in zip(run.G_ema.parameters(), run.G.parameters()):
        torch.testing.assert_close(pe, p.detach())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["ema_warmup_steps"] == 1e12 and saved["diffaug_cutout"] == 0.5
    # zero strengths: translation and cutout leave the images as they are
    cfg = cfg.updated(diffaug="translation,cutout", diffaug_translation=0.0, diffaug_cutout=0.0)
    loss = build.build_loss(cfg, torch.nn.Identity(), torch.nn.Identity())
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(loss.augment(x), x)


# ---- 11. options and documentation -------------------------------------------------------------------

def test_data_ratio_is_a_fraction_or_a_percentage(capsys):
    parser = cli.build_parser()
    for text, value in (("0.1", 0.1), ("1", 1.0), ("10%", 0.1), ("1.5%", 0.015), ("100%", 1.0)):
        assert parser.parse_args(["sngan", "--data-ratio", text]).data_ratio == pytest.approx(value)
    for text in ("2", "1.5", "0", "-0.5", "150%", "ten", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["sngan", "--data-ratio", text])
        assert "--data-ratio" in capsys.readouterr().err
    assert "percentage" in parser.format_help()


def test_name_must_be_a_plain_name_and_not_given_with_resume(tmp_path, capsys, cache):
    out = ["--outdir", str(tmp_path / "runs")]
    assert cli.main(["sngan", *common(cache, *out, "--name", str(tmp_path / "abs"))]) == 2
    assert "without path separators" in capsys.readouterr().err
    assert cli.main(["sngan", *common(cache, *out, "--name", "a/b")]) == 2
    assert cli.main(["sngan", "--resume", str(tmp_path), "--name", "x"]) == 2
    assert "--name" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "abs").exists()


def test_demo_length_is_the_same_everywhere():
    import re

    readme = open(os.path.join(REPO, "README.md")).read()
    minutes = re.search(r"about (\d+) minutes on a quiet 2-core CPU", readme).group(1)
    for f in ("rggan_fast/demo.py", "rggan_fast/train.py", "rggan_fast/presets.py", "rggan_fast/__init__.py",
              "scripts/demo.sh"):
        text = " ".join(open(os.path.join(REPO, f)).read().lower().split())  # comments wrap lines
        assert f"about {minutes} minutes" in text, f
        assert not re.search(r"~?\d+[ -]minute", text.replace(f"about {minutes} minutes", "")), f


def test_config_execution_modes_are_rgkernels():
    """config.EXECUTIONS (the CLI's choices; config.py imports no torch) is rgkernels' list."""
    from rggan_fast.config import EXECUTIONS
    from rgkernels.sparse_exec import EXECUTION_MODES

    assert sorted(EXECUTIONS) == sorted(EXECUTION_MODES)
