"""The science subcommands: `labkit sweep`, `labkit critical`, `labkit sharpness`."""

from __future__ import annotations

import json
import math

import pytest

from labkit.cli import main
from labkit.train import SMOKE_SIZES, TrainConfig, config_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


GRID = """\
base:
  profile: smoke
  epochs: 1
  batch_size: 256
  optimizer: shb
grid:
  lr: [0.05, 1e-1]
  beta: [0.9]
"""


def test_sweep_dry_run_then_run_then_reload(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out, data = tmp_path / "sweep", tmp_path / "data"
    argv = ["sweep", grid, "--out", out, "--data-root", data, "--device", "cpu"]

    code, text, _ = run(capsys, *argv, "--dry-run")
    assert code == 0
    lines = text.strip().splitlines()
    assert len(lines) == 3 and "2 points; 2 to run; 2 pending" in lines[-1]
    assert "lr=0.05" in lines[0] and "lr=0.1" in lines[1] and "pending" in lines[0]
    assert not (out / "runs").exists()  # a dry run trains nothing

    code, text, _ = run(capsys, *argv)
    assert code == 0
    summary = last_json(text)
    assert summary["counts"] == {"finished": 2} and summary["points"] == 2
    assert "[1/2]" in text and "[2/2]" in text and "test_acc" in text
    index = json.loads((out / "index.json").read_text())
    assert {e["status"] for e in index["points"].values()} == {"finished"}

    code, text, _ = run(capsys, *argv, "--dry-run")
    assert code == 0 and "2 points; 0 to run; 2 finished" in text

    code, text, _ = run(capsys, *argv)
    assert code == 0 and text.count("loaded") == 2  # nothing trained again

    # `labkit sharpness` on one of these finished smoke runs.
    cfg = TrainConfig(profile="smoke", epochs=1, batch_size=256, optimizer="shb", lr=0.05,
                      hparams={"beta": 0.9}, device="cpu")
    run_dir = out / "runs" / config_hash(cfg)
    assert (run_dir / "checkpoint.pt").exists()
    sharp = ["sharpness", run_dir, "--batches", "1", "--batch-size", "16", "--n-iters", "3",
             "--device", "cpu"]
    code, text, _ = run(capsys, *sharp)
    assert code == 0
    assert text.startswith("adaptive sharpness (rho=0.0002, linf, 1 train batches of 16, "
                           "first images): ")
    assert last_json(text)["selection"] == "first" and last_json(text)["batch_size"] == 16
    value = last_json(text)["sharpness"]
    assert value >= 0
    code, text, _ = run(capsys, *sharp, "--rho", "0.01", "--norm", "l2", "--split", "test")
    assert code == 0 and last_json(text)["norm"] == "l2"
    code, _, err = run(capsys, "sharpness", tmp_path, "--device", "cpu")
    assert code == 1 and "config.json does not exist" in err
    code, text, _ = run(capsys, *sharp, "--selection", "random", "--seed", "3")
    assert code == 0 and last_json(text)["selection"] == "random"
    with pytest.raises(SystemExit) as e:
        main(["sharpness", str(run_dir), "--batches", "100", "--batch-size", "256"])
    assert e.value.code == 2
    assert "exceeds the 512 images of the train split" in capsys.readouterr().err
    # the defaults are the authors' 8 x 128 = 1024 first training images: more than the smoke
    # data holds
    with pytest.raises(SystemExit) as e:
        main(["sharpness", str(run_dir), "--device", "cpu"])
    assert "8 * 128 = 1024 exceeds the 512 images" in capsys.readouterr().err


@pytest.mark.parametrize("text,match", [
    ("base:\n  profile: smoke\ngrid:\n  lr: [0.1, 0.2\n",
     "grid.yaml:5:1: YAML syntax error: expected ',' or ']', but got '<stream end>' (while "
     "parsing a flow sequence at line 4, column 7)"),
    ("base:\n  profile: smoke\ngrid:\n  lr: [0.1]\n  momentum: [0.9]\n",
     "grid.yaml:5: unknown grid key 'momentum'"),
    ("base:\n  profile: smoke\n  lr: -1\ngrid:\n  seed: [0]\n",
     "grid.yaml:3: grid point 1 of 1 (seed=0): lr must be a positive"),
    ("base:\n  profile: smoke\ngrid:\n  lr: []\n", "grid.yaml:4: grid.lr is an empty list"),
    ("base:\n  profile: smoke\ngrid: {}\n", "the grid is empty"),
    (f"base:\n  profile: smoke\ngrid:\n  batch_size: [64, {SMOKE_SIZES['n_train'] * 2}]\n",
     f"exceeds the {SMOKE_SIZES['n_train']} training images"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_sweep_bad_grid_is_an_error_before_anything_runs(tmp_path, capsys, text, match, dry):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    argv = ["sweep", str(grid), "--out", str(tmp_path / "out"), "--data-root",
            str(tmp_path / "data"), "--device", "cpu"] + (["--dry-run"] if dry else [])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_missing_grid_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "nope.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_sweep_profile_flag_overrides_base(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base:\n  profile: paper\ngrid:\n  lr: [0.1]\n")
    code, text, _ = run(capsys, "sweep", grid, "--out", tmp_path / "o", "--profile", "smoke",
                        "--data-root", tmp_path / "d", "--dry-run")
    assert code == 0 and "1 points; 1 to run; 1 pending" in text


# --------------------------------------------------------------------------- critical


@pytest.mark.parametrize("optimizer,beta,b_star,c2", [
    # Sato & Iiduka (2024) §4.3: eta = 0.1, beta = 0.9, eps = 0.5 and the measured b*.
    ("sgd", None, 512, 1280.0),
    ("shb", 0.9, 1024, 25.3187),
    ("nshb", 0.9, 512, 128.0),
])
def test_critical_reproduces_the_paper(capsys, optimizer, beta, b_star, c2):
    # U-shaped SFO curves with their minimum at the paper's b*.
    sfo = [f"{b}:{(1 + abs(b.bit_length() - b_star.bit_length())) * 1e6:g}"
           for b in (2**k for k in range(3, 14))]
    argv = ["critical", "--optimizer", optimizer, "--lr", "0.1", "--eps", "0.5", "--sfo", *sfo]
    if beta is not None:
        argv += ["--beta", str(beta)]
    code, text, _ = run(capsys, *argv)
    assert code == 0
    power = b_star.bit_length() - 1
    assert f"critical batch size b* = {b_star} (2^{power})" in text
    res = last_json(text)
    assert res["critical_batch_size"] == b_star
    assert res["c2_upper_bound"] == pytest.approx(c2, rel=1e-5)
    assert res["note"] is None  # the minimum lies inside the measured range


@pytest.mark.parametrize("argv,match", [
    (["critical", "--eps", "0.5", "--sfo", "8:1e6"], "--sfo needs --optimizer and --lr"),
    (["critical", "--optimizer", "shb", "--lr", "0.1", "--eps", "0.5", "--sfo", "8:1e6"],
     "--beta is required for --optimizer shb"),
    (["critical", "--optimizer", "sgd", "--lr", "0.1", "--eps", "0.5", "--sfo", "8=1e6"],
     "expected BATCH:SFO"),
    (["critical", "--optimizer", "sgd", "--lr", "0.1", "--eps", "0.5", "--sfo", "0:1e6"],
     "batch size >= 1"),
    (["critical", "--optimizer", "sgd", "--lr", "0.1", "--eps", "0", "--sfo", "8:1e6"],
     "--eps must be a positive"),
    (["critical", "--optimizer", "sgd", "--lr", "0.1", "--eps", "0.5", "--sfo", "8:1", "8:2"],
     "batch size 8 twice"),
    (["critical", "--optimizer", "sgd", "--lr", "0.1", "--eps", "0.5", "--sfo", "8:inf"],
     "no batch size reached the threshold"),
    (["critical", "--optimizer", "adam", "--lr", "0.1", "--eps", "0.5", "--sfo", "8:1"],
     "invalid choice: 'adam'"),
    (["critical", "--optimizer", "sgd", "--lr", "0.1", "--eps", "0.5"],
     "one of the arguments --sfo --results is required"),
])
def test_critical_bad_flags(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def _write_run(root, cfg: TrainConfig, epochs: list[list[float]]) -> None:
    """A finished run folder whose epochs had these per-step gradient norms (logged)."""
    from labkit.store import append_grad_norms

    cfg = cfg.resolved()
    folder = root / "runs" / config_hash(cfg)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    rows, total = [], 0
    for e, norms in enumerate(epochs, start=1):
        total += len(norms)
        rows.append({"epoch": e, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                     "test_acc": 0.5, "lr": cfg.lr, "batch_size": cfg.batch_size,
                     "steps": len(norms), "total_steps": total,
                     "grad_norm": sum(norms) / len(norms), "time": 0.1})
        append_grad_norms(folder, norms)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "result.json").write_text(json.dumps({"status": "finished", "config":
                                                    cfg.to_dict(), "final": rows[-1]}))


def test_critical_from_a_sweep_folder(tmp_path, capsys):
    def cfg(opt, b, **hp):
        return TrainConfig(profile="short", dataset="cifar100", optimizer=opt, lr=0.1,
                           batch_size=b, hparams=hp)

    # eps = 0.7, the test skipping 1 epoch. SGD b = 8: the sum is 8 + 4.8 = 12.8 after 16
    # steps and (12.8 + 0.2 k) / (16 + k) <= 0.7 from k = 4 on: T = 20, SFO 160. b = 16: 0.6
    # at the first tested step 5: SFO 80. b = 32: 3.0 / 4 = 0.75 at step 4, 3.2 / 5 = 0.64
    # at step 5: SFO 160.
    _write_run(tmp_path, cfg("sgd", 8), [[1.0] * 8, [0.6] * 8, [0.2] * 8])
    _write_run(tmp_path, cfg("sgd", 16), [[0.6] * 4, [0.6] * 4])
    _write_run(tmp_path, cfg("sgd", 32), [[0.9] * 2, [0.6] * 2, [0.2] * 2])
    # SHB (default beta 0.9): b = 16 never reaches eps, so b* = 32 (T = 3, the first tested).
    _write_run(tmp_path, cfg("shb", 16), [[0.9] * 4, [0.9] * 4])
    _write_run(tmp_path, cfg("shb", 32), [[0.5] * 2, [0.5] * 2])
    code, text, _ = run(capsys, "critical", "--results", tmp_path, "--eps", "0.7",
                        "--skip-epochs", "1")
    assert code == 0
    res = last_json(text)
    assert res["skip_epochs"] == 1
    groups = {g["optimizer"]: g for g in res["groups"]}
    assert groups["sgd"]["sfo"] == {"8": 160.0, "16": 80.0, "32": 160.0}
    assert groups["sgd"]["critical_batch_size"] == 16
    assert groups["sgd"]["c2_upper_bound"] == pytest.approx(16 * 0.49 / 0.1)
    assert groups["shb"]["sfo"] == {"16": None, "32": 96.0}
    assert groups["shb"]["critical_batch_size"] == 32 and groups["shb"]["beta"] == 0.9
    assert groups["shb"]["c2_upper_bound"] == pytest.approx(
        32 * 0.49 * 0.9 * 0.01 / (0.1 * 0.91))
    assert "did not reach eps" in text
    assert groups["sgd"]["note"] is None
    assert "only batch size 32 reached eps" in groups["shb"]["note"]
    # Filters and the skipped epochs: skipping 2, b = 16 (2 epochs) is never tested.
    code, text, _ = run(capsys, "critical", "--results", tmp_path, "--eps", "0.7",
                        "--optimizer", "sgd", "--skip-epochs", "2")
    assert code == 0
    (g,) = last_json(text)["groups"]
    assert g["sfo"] == {"8": 160.0, "16": None, "32": 160.0} and g["critical_batch_size"] == 8
    assert "at the edge of the batch sizes that reached eps (8 to 32)" in g["note"]
    # By default the test skips 11 epochs (the authors' code): these runs are too short.
    code, text, _ = run(capsys, "critical", "--results", tmp_path, "--eps", "0.7")
    assert code == 1 and last_json(text)["skip_epochs"] == 11
    assert "the runs have at most 3 epochs and the test skips 11: pass a smaller " \
        "--skip-epochs" in text
    code, _, err = run(capsys, "critical", "--results", tmp_path / "nope", "--eps", "0.7")
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "critical", "--results", tmp_path, "--eps", "0.7", "--lr", "0.5")
    assert code == 1 and "no finished sgd/shb/nshb runs" in err
    with pytest.raises(SystemExit):
        run(capsys, "critical", "--results", tmp_path, "--eps", "0.7", "--skip-epochs", "-1")
    assert "--skip-epochs must be >= 0; got -1" in capsys.readouterr().err


def test_sharpness_is_measured_in_fp32_with_tf32_off(tmp_path, capsys, monkeypatch):
    import torch

    import labkit.experiments.results as results

    seen = []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.conv.fp32_precision,
                     torch.backends.cuda.matmul.fp32_precision))
        return 0.25

    monkeypatch.setattr(results, "measure_sharpness", spy)
    code, text, _ = run(capsys, "sharpness", tmp_path, "--device", "cpu")
    assert code == 0 and last_json(text)["sharpness"] == 0.25
    assert seen == [("ieee", "ieee")]


def test_sweep_exit_codes(tmp_path, capsys, monkeypatch):
    import labkit.experiments.sweep as sweep_mod

    grid = tmp_path / "grid.yaml"
    grid.write_text("base:\n  profile: smoke\ngrid:\n  lr: [0.1]\n")
    argv = ["sweep", grid, "--out", tmp_path / "o", "--data-root", tmp_path / "d"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "run_sweep", interrupted)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "run the same command again to resume" in err

    def one_failed(configs, out, **kwargs):
        p = sweep_mod.PointResult(0, "abc", configs[0], "failed", str(out), error="boom")
        kwargs["on_run_end"](p)
        return sweep_mod.SweepResult(str(out), [p])

    monkeypatch.setattr(sweep_mod, "run_sweep", one_failed)
    code, text, err = run(capsys, *argv)
    assert code == 1 and "[1/1] abc failed" in text and "boom" in text
    assert last_json(text)["counts"] == {"failed": 1} and "1 point(s) failed" in err


def test_sweep_no_pack_gives_the_same_runs(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    # b = 16: small enough that the CPU packs (labkit.train_pack.CPU_PACK_MAX_BATCH).
    grid.write_text(GRID.replace("profile: smoke", "profile: smoke\n  precision: fp64")
                    .replace("batch_size: 256", "batch_size: 16"))
    data = tmp_path / "data"
    results = {}
    for flag in ([], ["--no-pack"]):
        out = tmp_path / ("alone" if flag else "packed")
        code, text, _ = run(capsys, "sweep", grid, "--out", out, "--data-root", data,
                            "--device", "cpu", *flag)
        assert code == 0 and last_json(text)["counts"] == {"finished": 2}
        index = json.loads((out / "index.json").read_text())["points"]
        results[bool(flag)] = {h: e["final"]["test_loss"] for h, e in index.items()}
    assert results[True].keys() == results[False].keys()
    for h, loss in results[True].items():
        assert results[False][h] == pytest.approx(loss, rel=1e-10)
def test_critical_skips_non_finite_runs_per_run(tmp_path, capsys):
    """A sweep holding runs whose metrics and gradient norms became NaN or infinite (lr 1e6):
    as labkit writes them now (null, diverged) and as it wrote them before (NaN literals,
    not marked). The other group's result is exact and nothing blames track_grad_norm."""
    def cfg(lr, b):
        return TrainConfig(profile="short", dataset="cifar100", optimizer="sgd", lr=lr,
                           batch_size=b)

    _write_run(tmp_path, cfg(0.1, 16), [[0.6] * 4, [0.6] * 4])
    _write_run(tmp_path, cfg(0.1, 32), [[0.9] * 2, [0.6] * 2, [0.2] * 2])
    nan, inf = float("nan"), float("inf")
    for b, status in ((16, "finished"), (32, "diverged")):
        c = cfg(1e6, b).resolved()
        _write_run(tmp_path, c, [[0.5] * (64 // b), [inf] + [nan] * (64 // b - 1)])
        folder = tmp_path / "runs" / config_hash(c)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        rows[1].update(test_loss=nan, grad_norm=nan)
        if status == "diverged":  # as labkit writes it now
            rows[1] = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in rows[1].items()} | {"diverged": True}
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "result.json").write_text(json.dumps(
            {"status": status, "config": c.to_dict(), "final": rows[-1], "metrics": rows}))
    code, text, err = run(capsys, "critical", "--results", tmp_path, "--eps", "0.7",
                          "--skip-epochs", "1")
    groups = {g["lr"]: g for g in last_json(text)["groups"]}
    assert groups[0.1]["sfo"] == {"16": 80.0, "32": 160.0}
    assert groups[0.1]["critical_batch_size"] == 16
    assert groups[1e6]["sfo"] == {"16": None, "32": None}
    assert groups[1e6]["critical_batch_size"] is None
    assert code == 1  # one group has no b*
    assert "track_grad_norm" not in text + err and "before labkit logged" not in text + err
    assert "Traceback" not in err
