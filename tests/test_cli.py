"""The command line end to end: exit codes, messages, run -> report, resume after Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bitwidth.cli import main

ROOT = Path(__file__).parent.parent
QUICK = ["--set", "train.epochs=3", "--set", "search.candidates=[2,4,8]", "--set", "search.layers=[conv1,fc2]",
         "--set", "stats.batches=2", "--quiet"]


def cli(*args, timeout=300):
    env = {**os.environ, "BITWIDTH_COMPILE": "0"}
    return subprocess.run([sys.executable, "-m", "bitwidth", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "quick"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *QUICK])
    assert code == 0
    return out


def test_version_and_formats(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "bitwidth 0." in capsys.readouterr().out
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "e4m3" in out and "448" in out and "fixed16_8" in out


def test_validate_ok_and_bad_config_exit_2_without_traceback(tmp_path, capsys):
    assert main(["validate", str(ROOT / "configs/quickstart.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {candidtes: [2, 4]}\nmode: qat\n")
    res = cli("validate", str(bad))  # the real command, as a user runs it
    assert res.returncode == 2
    assert "did you mean `candidates`" in res.stderr and "mode: must be 'ptq', 'train' or 'adaptive'" in res.stderr
    assert "Traceback" not in res.stderr
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--set", "search.strategy=random",
                 "--out", str(tmp_path / "x")]) == 2
    assert "search.strategy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a config that does not validate


def test_bad_layer_pattern_is_a_usage_error(tmp_path, capsys):
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path / "r"), *QUICK,
                 "--set", "search.layers=[conv9]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "conv9" in err and "conv1" in err  # names what was wrong and what exists


def test_run_writes_the_run_directory(quick_run):
    for name in ["config.yaml", "baseline.pt", "trials.jsonl", "trials.csv", "min_bits.csv", "joint_plan.yaml",
                 "stats.csv", "report.html", "report.md", "run.log", "meta.yaml"]:
        assert (quick_run / name).is_file(), name
    min_bits = pd.read_csv(quick_run / "min_bits.csv")
    assert set(min_bits["layer"]) == {"conv1", "fc2"} and set(min_bits["kind"]) == {"weight", "activation"}
    assert min_bits["min_bits"].dropna().isin([2, 4, 8]).all()
    assert "trials" in (quick_run / "run.log").read_text()


def test_report_regenerates_identical_tables(quick_run, capsys):
    before = {n: (quick_run / n).read_text() for n in ["trials.csv", "min_bits.csv", "report.md"]}
    assert main(["report", str(quick_run)]) == 0
    assert {n: (quick_run / n).read_text() for n in before} == before
    assert main(["report", str(quick_run / "nope")]) == 2


def test_rerun_reuses_every_trial(quick_run, capsys):
    lines = (quick_run / "trials.jsonl").read_text().count("\n")
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(quick_run), *QUICK]) == 0
    assert (quick_run / "trials.jsonl").read_text().count("\n") == lines


def test_variants_are_run_and_compared(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *QUICK,
                 "--set", "search.layers=[fc2]", "--set", "search.kinds=[weight]", "--set", "stats.enabled=false",
                 "--set", "variants={nearest: {search.options.rounding: nearest}, "
                          "stochastic: {search.options.rounding: stochastic}}"])
    assert code == 0
    table = pd.read_csv(out / "comparison.csv")
    assert list(table.columns) == ["layer", "kind", "nearest", "stochastic"]
    assert (out / "nearest" / "report.html").is_file() and (out / "stochastic" / "min_bits.csv").is_file()
    assert "variants compared" in (out / "report.html").read_text()
    assert main(["report", str(out)]) == 0


def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path):
    out = tmp_path / "train"
    args = [sys.executable, "-m", "bitwidth", "run", "configs/digits_train.yaml", "--out", str(out), "--quiet",
            "--set", "train.epochs=2", "--set", "search.candidates=[2,16]", "--set", "search.layers=[conv1,fc2]",
            "--set", "stats.enabled=false"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BITWIDTH_COMPILE": "0"})
    store = out / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not store.exists() or store.read_text().count("\n") < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    kept = store.read_text().splitlines()
    assert len(kept) >= 2
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BITWIDTH_COMPILE": "0"})
    assert res.returncode == 0, res.stderr
    assert store.read_text().splitlines()[: len(kept)] == kept  # appended to, never rewritten
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    assert summary["counts"]["trials_reused"] >= len(kept)


def test_validate_checks_layer_patterns_against_the_model(capsys):
    assert main(["validate", str(ROOT / "configs/quickstart.yaml"), "--set", "search.layers=[conv1, fc3]"]) == 2
    assert "'fc3' matches no site; closest sites: fc2" in capsys.readouterr().err


def test_run_directory_problems_are_one_line_usage_errors(tmp_path, capsys):
    from bitwidth.store import RunLock

    afile = tmp_path / "afile"
    afile.write_text("")
    res = cli("run", "configs/quickstart.yaml", "--out", str(afile / "run"), *QUICK)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "cannot use" in res.stderr or "cannot write" in res.stderr
    busy = tmp_path / "busy"
    with RunLock(busy):  # another process holds it: the lock is per process, so ask a child
        res = cli("run", "configs/quickstart.yaml", "--out", str(busy), *QUICK)
    assert res.returncode == 2 and "in use by another bitwidth run" in res.stderr
    assert not (busy / "config.yaml").exists()  # nothing touched


def test_validate_reports_every_unmatched_site_and_runs_user_builders(tmp_path, capsys):
    code = main(["validate", str(ROOT / "configs/quickstart.yaml"), "--set", "search.layers=[conv9, fc7, fc1]"])
    err = capsys.readouterr().err
    assert code == 2 and "'conv9' matches no site" in err and "'fc7' matches no site" in err
    builder = tmp_path / "broken.py"
    builder.write_text("def model(**kw):\n    raise RuntimeError('no such checkpoint')\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: {{model: '{builder}:model', data: digits}}\n")
    res = cli("validate", str(cfg))
    assert res.returncode == 1 and "no such checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_progress_lines_without_a_terminal(quick_run):
    res = cli("run", "configs/quickstart.yaml", "--out", str(quick_run), *[a for a in QUICK if a != "--quiet"])
    assert res.returncode == 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("[")]
    # said before the silent part (baseline training, statistics), not after it
    assert lines[0].startswith("[statistics]") and lines[1].startswith("[baseline] the fp32 baseline")
    counted = [ln for ln in lines if "trials (" in ln]  # e.g. "[bisect] 0/24 trials (0 run, 0 reused)"
    assert counted and any(ln.startswith("[bisect] 0/") for ln in counted)
    assert any(" reused)" in ln and "/" in ln for ln in counted)


def test_stats_writes_its_own_files(quick_run):
    report = (quick_run / "report.html").read_bytes()
    res = cli("stats", "configs/quickstart.yaml", "--out", str(quick_run), "--set", "stats.batches=2",
              "--set", "train.epochs=3", "--set", "search.layers=[conv1,fc2]")
    assert res.returncode == 0, res.stderr
    stats = pd.read_csv(quick_run / "stats" / "stats.csv", dtype={"layer": str})
    assert set(stats["kind"]) == {"weight", "activation", "gradient"}
    assert (quick_run / "stats" / "report.html").exists() and (quick_run / "report.html").read_bytes() == report


def test_the_report_and_the_answer_state_the_coverage(quick_run):
    html = (quick_run / "report.html").read_text()
    # QUICK searches conv1 and fc2 only: the rest is listed as left out, never silently
    assert "Coverage: the search quantizes" in html and "conv2" in html and "not in the plan" in html
    summary = yaml.safe_load((quick_run / "summary.yaml").read_text())
    cov = summary["coverage"]
    assert 0 < cov["mac_fraction"] < 1 and 0 < cov["weight_fraction"] < 1
    assert {(r["site"], r["kind"]) for r in cov["left_out"]} >= {("conv2", "weight"), ("fc1", "activation")}


def test_report_of_variants_never_writes_outside_the_run(tmp_path, capsys):
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    (victim / "report.html").write_text("keep me")
    (run / "variants.yaml").write_text(yaml.safe_dump(["../victim"]))
    assert main(["report", str(run)]) == 2
    assert "../victim" in capsys.readouterr().err and (victim / "report.html").read_text() == "keep me"


def test_bad_site_patterns_fail_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--set",
                 "search.layers=[conv1, nope, fc9]", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "'nope' matches no site" in err and "'fc9' matches no site" in err
    assert not (out / "baseline.pt").exists() and not (out / "stats.pt").exists()
